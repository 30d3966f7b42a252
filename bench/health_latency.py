"""Latency from a TTL check turning critical (or back) to its Slack message: our engine against a plain
blocking-query loop (what ``consul watch`` does), with equal repetitions on both sides.

    .venv/bin/python bench/health_latency.py [--flips 50] [--services 50] [--repeat 3] [--poller]

The Consul stand-in runs in its own process; the watchers, the Slack stand-in and the clock are in this one.
Each transition is timed from just before ``PUT /v1/agent/check/fail|pass/:id`` to the moment the Slack
stand-in has stored the message. A cycle is a random service turning critical and back, 0.25-0.5 s apart
(one change at a time: bursts are ``health_scale.py``'s subject), so ``--flips 50`` gives 100 samples per
run. Every contender runs ``--repeat`` times, interleaved (ours, baseline, baseline, ours, ...), each run a
fresh watcher thread; before its first run each contender sees every service flip once, untimed, so that
ours knows every instance's Service Meta as a long-running deployment does.

* **ours**: ``icd.health.watch.watch`` as the flow runs it (``min_round_seconds=0.2``): the blocking query,
  the engine, the CAS write of state plus outbox, the Slack post, the outbox clear. Damping is off
  (``NO_DAMPING``), so that each transition, recoveries included, has a message to time; ``flap.py``
  measures the damping.
* **baseline**: ``bench/health_common.py``'s blocking-query loop: diff by check, post, nothing persisted.
* **poller** (``--poller``): reads everything every second and diffs; the strawman of earlier figures.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect_slack import SlackCredentials

from bench.health_common import (
    SLACK_TOKEN,
    CountingClient,
    blocking_query_loop,
    check_notification,
    consul_standin_process,
    load_average,
    percentile,
)
from blocks.notifier import SlackNotifier
from icd.errors import ConsulError
from icd.health.config import NO_DAMPING
from icd.health.watch import watch
from icd.notify.message import Sender
from standins.slack import SlackStandIn

STATE_PATH = "/v1/health/state/any"
Start = Callable[[CountingClient, Sender, threading.Event], threading.Thread]


@dataclass
class Contender:
    name: str
    start: Start
    runs: list[list[float]] = field(default_factory=list)
    requests_per_alert: list[float] = field(default_factory=list)
    warmed: bool = False

    @property
    def samples(self) -> list[float]:
        return [v for run in self.runs for v in run]


def start_ours(client: CountingClient, sender: Sender, stop: threading.Event) -> threading.Thread:
    def body() -> None:
        with contextlib.suppress(ConsulError):  # the stand-in went away under a parked query: the bench is over
            watch(
                client.client,
                sender,
                NO_DAMPING,  # every change one message, as the baseline's: a recovery is timed, not held
                3600,
                watch_name="bench-latency",
                stop=stop,
                max_wait_seconds=1.0,
                min_round_seconds=0.2,  # as the flow runs it (tasks/watch.py)
            )

    return _thread(body)


def start_baseline(client: CountingClient, sender: Sender, stop: threading.Event) -> threading.Thread:
    return _thread(lambda: blocking_query_loop(client.client, sender, stop, max_wait_seconds=1.0))


def start_poller(client: CountingClient, sender: Sender, stop: threading.Event) -> threading.Thread:
    def body() -> None:
        last: dict[tuple[str, str], str] | None = None
        while not stop.is_set():
            index, rows = client.client.health.state("any")
            now = {(row["Node"], row["CheckID"]): row["Status"] for row in rows}
            for key, status in now.items():
                if last is not None and last.get(key) != status:
                    sender.send(check_notification(None, key, last.get(key) or "absent", status, int(index)))
            last = now
            stop.wait(1.0)

    return _thread(body)


def _thread(body: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def register(client: CountingClient, services: int) -> list[str]:
    checks = []
    for n in range(services):
        client.client.agent.service.register(
            f"svc-{n}",
            service_id=f"svc-{n}-1",
            meta={"artifact_version": "v1", "deploy_run_id": "bench"},
            check={"CheckID": f"ttl-svc-{n}", "Name": "ttl", "TTL": "3600s", "Status": "passing"},
        )
        checks.append(f"ttl-svc-{n}")
    return checks


def flip(client: CountingClient, slack: SlackStandIn, check: str, critical: bool) -> float:
    expected = len(slack.messages) + 1
    started = time.perf_counter()
    if critical:
        client.client.agent.check.ttl_fail(check, "bench: failing")
    else:
        client.client.agent.check.ttl_pass(check, "bench: ok")
    got = slack.wait_for_messages(expected, timeout=20)
    elapsed = time.perf_counter() - started
    if len(got) < expected:
        raise SystemExit(f"{check}: no message within 20 s")
    return elapsed


def run_once(
    contender: Contender, addr: str, slack: SlackStandIn, sender: Sender, checks: Sequence[str], flips: int
) -> None:
    setup = CountingClient(addr)
    watcher = CountingClient(addr)
    stop = threading.Event()
    thread = contender.start(watcher, sender, stop)
    deadline = time.monotonic() + 30
    while watcher.paths.get(STATE_PATH, 0) < 1:  # its first read is in: every later flip moves the index
        if time.monotonic() > deadline:
            raise SystemExit(f"{contender.name} never read Consul")
        time.sleep(0.01)
    time.sleep(0.3)  # ... and its first round is done (state persisted, next query parked)
    if not contender.warmed:
        for check in checks:
            for critical in (True, False):
                flip(setup, slack, check, critical)
        contender.warmed = True
    before_requests, before_messages = watcher.requests, len(slack.messages)
    latencies = []
    for _ in range(flips):
        check = random.choice(checks)  # noqa: S311
        for critical in (True, False):
            time.sleep(random.uniform(0.25, 0.5))  # noqa: S311
            latencies.append(flip(setup, slack, check, critical))
    contender.requests_per_alert.append((watcher.requests - before_requests) / (len(slack.messages) - before_messages))
    stop.set()
    thread.join(timeout=10)
    contender.runs.append(latencies)


def ms(values: Sequence[float], pct: float) -> float:
    return percentile(values, pct) * 1000


def summary(contender: Contender) -> str:
    samples = contender.samples
    best = min(contender.runs, key=lambda run: percentile(run, 95))
    per_run = ", ".join(f"{ms(run, 50):.1f}/{ms(run, 95):.1f}" for run in contender.runs)
    return (
        f"{contender.name:<9} n={len(samples):<4} p50={ms(samples, 50):7.1f} ms  p95={ms(samples, 95):7.1f} ms  "
        f"max={max(samples) * 1000:7.1f} ms  mean={statistics.fmean(samples) * 1000:6.1f} ms | best of "
        f"{len(contender.runs)}: p50={ms(best, 50):6.1f} p95={ms(best, 95):6.1f} ms | p50/p95 per run: {per_run} | "
        f"HTTP requests per alert {statistics.fmean(contender.requests_per_alert):.1f}"
    )


def compare(ours: Contender, other: Contender) -> str:
    lines = []
    for label, a, b in (
        ("p50 (all runs)", ms(ours.samples, 50), ms(other.samples, 50)),
        ("p95 (all runs)", ms(ours.samples, 95), ms(other.samples, 95)),
        (
            f"p95 (best of {len(ours.runs)})",
            min(ms(run, 95) for run in ours.runs),
            min(ms(run, 95) for run in other.runs),
        ),
    ):
        verdict = f"ours is SLOWER, x{a / b:.2f}" if a > b else f"ours is faster, x{b / a:.2f}"
        lines.append(f"ours vs {other.name} at {label}: {a:.1f} ms vs {b:.1f} ms: {verdict}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=50, help="critical-and-back cycles per run")
    parser.add_argument("--services", type=int, default=50, help="services (one TTL check each) registered")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (the same for every one)")
    parser.add_argument("--poller", action="store_true", help="also measure a 1 s poller")
    args = parser.parse_args()
    contenders = [Contender("ours", start_ours), Contender("baseline", start_baseline)]
    if args.poller:
        contenders.append(Contender("poller", start_poller))
    print(f"load average at start: {load_average()}", flush=True)
    with consul_standin_process() as addr, SlackStandIn(token=SLACK_TOKEN) as slack:
        notifier = SlackNotifier(credentials=SlackCredentials(token=SLACK_TOKEN), channel="#ops", api_url=slack.api_url)
        checks = register(CountingClient(addr), args.services)
        print(
            f"Consul stand-in (own process) at {addr}; {args.services} services; {args.flips} cycles "
            f"({2 * args.flips} transitions) per run; {args.repeat} runs per contender, interleaved",
            flush=True,
        )
        for repeat in range(args.repeat):
            for contender in contenders if repeat % 2 == 0 else contenders[::-1]:
                run_once(contender, addr, slack, notifier.channel_sender(), checks, args.flips)
    print(f"load average at end: {load_average()}")
    for contender in contenders:
        print(summary(contender))
    for other in contenders[1:]:
        print(compare(contenders[0], other))
    p95 = ms(contenders[0].samples, 95)
    print(f"goal p95 <= 1 s: {'met' if p95 <= 1000 else 'MISSED'} ({p95:.1f} ms)")


if __name__ == "__main__":
    main()
