"""Sustained churn: 100 checks changing per second on 10,000 checks. CPU seconds per wall second of our watch
against the plain blocking-query loop, with the same number of runs on both sides.

    .venv/bin/python bench/health_scale.py [--services 1000] [--checks-per-service 10] [--rate 100]
                                           [--seconds 20] [--warmup 5] [--repeat 3]

Four processes: the Consul stand-in and the Slack stand-in each run in their own, so their CPU is not
counted; this one registers the checks and drives the churn; the watcher under test runs alone in a fourth
(``--role``), and its CPU is ``time.process_time()`` of that whole process (every thread) over a window of
``--seconds`` that starts ``--warmup`` seconds after the churn does.

**Churn.** ``--rate`` changes a second, evenly spaced: a random check of an instance with none failing turns
critical, or the check that failed longest ago (about a second) turns passing again; about ``rate / 2``
checks fail at any moment, each on its own instance, so every change is a transition for both contenders
(ours alerts per instance, the baseline per check) and each change means one Slack message.

**Contenders**, each a fresh process per run, runs interleaved:

* ``ours``: ``icd.health.watch.watch`` as the flow runs it (``min_round_seconds=0.2``), starting from a
  persisted state that already knows every instance's Service Meta, as a running deployment's does; with
  damping off (``NO_DAMPING``), since a check failing for a second is exactly what damping keeps quiet;
* ``baseline``: ``bench/health_common.py``'s blocking-query loop, back to back as ``consul watch`` runs;
* ``baseline-paced``: the same loop with ours' 0.2 s round spacing, to compare equal batching.

Each run also reports its rounds a second, the messages it sent, and the lag from a change to its message
(matched by instance for ours, by check for the baseline). Goal: ours <= 1 CPU-second per second.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench.health_common import (
    SLACK_TOKEN,
    CountingClient,
    blocking_query_loop,
    consul_standin_process,
    load_average,
    percentile,
    slack_standin_process,
)
from icd.health.config import NO_DAMPING
from icd.health.engine import WatchState, evaluate
from icd.health.snapshot import parse_health_state
from icd.health.state import HealthStateStore
from icd.health.watch import query_health_state

STATE_PATH = "/v1/health/state/any"
WATCH_NAME = "bench-scale"
META = {"artifact_version": "v1", "deploy_run_id": "bench"}
CONTENDERS = ("ours", "baseline", "baseline-paced")


# --- the watcher process -----------------------------------------------------------------------------


def watcher(role: str, addr: str, slack_api: str | None, warmup: float, seconds: float) -> None:
    """Run one contender; after ``warmup`` s measure ``seconds`` s; print the figures as one JSON line.
    ``slack_api`` None: messages are recorded, not posted."""
    from prefect_slack import SlackCredentials

    from blocks.notifier import SlackNotifier
    from icd.health.watch import watch
    from icd.notify.message import Notification, NotificationReceipt

    inner = (
        SlackNotifier(
            credentials=SlackCredentials(token=SLACK_TOKEN), channel="#ops", api_url=slack_api
        ).channel_sender()
        if slack_api
        else None
    )
    sent: list[tuple[float, str]] = []

    class RecordingSender:
        def send(self, notification: Notification) -> NotificationReceipt:
            receipt = inner.send(notification) if inner is not None else NotificationReceipt("#ops", "0")
            sent.append((time.time(), notification.dedup_key or ""))
            return receipt

    counting = CountingClient(addr)
    stop = threading.Event()
    if role == "ours":

        def body() -> object:
            return watch(
                counting.client,
                RecordingSender(),
                NO_DAMPING,  # every change one message, as the baseline's: equal work on both sides
                3600,
                watch_name=WATCH_NAME,
                stop=stop,
                max_wait_seconds=1.0,
                min_round_seconds=0.2,
            )

    else:
        pace = 0.2 if role == "baseline-paced" else 0.0

        def body() -> object:
            return blocking_query_loop(
                counting.client, RecordingSender(), stop, max_wait_seconds=1.0, min_round_seconds=pace
            )

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    while counting.paths.get(STATE_PATH, 0) < 2:  # a first round is done, the second query went out
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(warmup)
    cpu0, wall0, rounds0, requests0 = time.process_time(), time.time(), counting.paths[STATE_PATH], counting.requests
    time.sleep(seconds)
    cpu1, wall1, rounds1, requests1 = time.process_time(), time.time(), counting.paths[STATE_PATH], counting.requests
    stop.set()
    thread.join(timeout=30)
    result = {
        "cpu": cpu1 - cpu0,
        "wall": wall1 - wall0,
        "start": wall0,
        "end": wall1,
        "rounds": rounds1 - rounds0,
        "requests": requests1 - requests0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sent": sent,
    }
    print(json.dumps(result), flush=True)


# --- the driver: checks, churn, runs -------------------------------------------------------------------


class Churn:
    """``rate`` check changes a second against the stand-in, from this process, with kept-alive HTTP."""

    def __init__(self, addr: str, checks: dict[str, list[str]], rate: float) -> None:
        self.addr = addr
        self.checks = checks  # service id -> its check ids
        self.rate = rate
        self.session = requests.Session()
        self.failing: collections.deque[tuple[str, str]] = collections.deque()  # (service id, check id)
        self.changes: list[tuple[float, str, str, str]] = []  # (time, service id, check id, to)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _put(self, verb: str, check: str) -> None:
        self.session.put(f"{self.addr}/v1/agent/check/{verb}/{check}", timeout=10).raise_for_status()

    def _run(self) -> None:
        services = list(self.checks)
        started = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            due = started + tick / self.rate
            if (ahead := due - time.monotonic()) > 0:
                self._stop.wait(ahead)
            if len(self.failing) < self.rate / 2 or tick % 2 == 0:
                busy = {service for service, _ in self.failing}
                service = random.choice([s for s in random.sample(services, 8) if s not in busy] or services)  # noqa: S311
                check = random.choice(self.checks[service])  # noqa: S311
                self.changes.append((time.time(), service, check, "critical"))
                self._put("fail", check)
                self.failing.append((service, check))
            else:
                service, check = self.failing.popleft()
                self.changes.append((time.time(), service, check, "passing"))
                self._put("pass", check)
            tick += 1

    def start(self) -> Churn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        while self.failing:  # every run starts from all passing
            self._put("pass", self.failing.popleft()[1])


def register(client: CountingClient, services: int, checks: int) -> dict[str, list[str]]:
    registered: dict[str, list[str]] = {}
    for n in range(services):
        definitions = [
            {"CheckID": f"svc-{n:04d}-c{c}", "Name": f"check {c}", "TTL": "3600s", "Status": "passing"}
            for c in range(checks)
        ]
        client.client.agent.service.register(
            f"svc-{n:04d}",
            service_id=f"svc-{n:04d}-1",
            meta=META,
            # py-consul sends extra_checks only alongside check.
            check=definitions[0],
            extra_checks=definitions[1:],
        )
        registered[f"svc-{n:04d}-1"] = [d["CheckID"] for d in definitions]
    return registered


def seed_state(client: CountingClient) -> None:
    """The state a running deployment has: every instance passing, its Service Meta known."""
    snapshot = parse_health_state(*query_health_state(client.client, index=0, wait_seconds=0))
    snapshot = snapshot.with_meta({key: META for key in snapshot.instances})
    _, state = evaluate(WatchState(), snapshot, datetime.now(UTC), NO_DAMPING, {})
    store = HealthStateStore(client.client, WATCH_NAME)
    client.client.kv.delete(store.key)
    if not store.save(state, cas=0).written:
        raise SystemExit("could not seed the watch state")


@dataclass
class Run:
    cpu_per_second: float
    rounds_per_second: float
    requests_per_second: float
    messages_per_second: float
    changes_per_second: float
    lags: list[float]
    unmatched: int
    rss_mb: float


@dataclass
class Contender:
    role: str
    runs: list[Run] = field(default_factory=list)


def lag_of(
    role: str, changes: list[tuple[float, str, str, str]], sent: list[tuple[float, str]], window: tuple[float, float]
) -> tuple[list[float], int]:
    """Each change inside the measured window, matched to the first message about it that followed."""
    by_target: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for moment, key in sent:
        # ours: "status:node/service-id:a->b@index"; baseline: "check:node/check-id:a->b@index"
        target = key.split("/", 1)[1].split(":", 1)[0] if "/" in key else ""
        to = key.rsplit("->", 1)[1].split("@", 1)[0] if "->" in key else ""
        by_target[(target, to)].append(moment)
    lags: list[float] = []
    unmatched = 0
    for moment, service, check, to in changes:
        if not window[0] <= moment <= window[1]:
            continue
        times = by_target.get((service if role == "ours" else check, to), [])
        later = next((t for t in times if t >= moment), None)
        if later is None:
            unmatched += 1
        else:
            lags.append(later - moment)
    return lags, unmatched


def run_once(
    role: str, addr: str, slack_api: str | None, checks: dict[str, list[str]], args: argparse.Namespace
) -> Run:
    setup = CountingClient(addr)
    if role == "ours":
        seed_state(setup)
    command = [sys.executable, __file__, "--role", role, "--consul", addr, "--slack", slack_api or ""]
    command += ["--warmup", str(args.warmup), "--seconds", str(args.seconds)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"the {role} watcher did not start")
    churn = Churn(addr, checks, args.rate).start()
    line = proc.stdout.readline()
    time.sleep(1.0)  # messages for the last changes of the window may still be on their way
    churn.stop()
    proc.wait(timeout=60)
    result: dict[str, Any] = json.loads(line)
    wall = result["wall"]
    window = (result["start"], result["end"] - 1.0)  # a change in the last second may be alerted after it
    lags, unmatched = lag_of(role, churn.changes, [tuple(s) for s in result["sent"]], window)
    in_window = [c for c in churn.changes if result["start"] <= c[0] <= result["end"]]
    sent_in_window = [s for s in result["sent"] if result["start"] <= s[0] <= result["end"]]
    return Run(
        cpu_per_second=result["cpu"] / wall,
        rounds_per_second=result["rounds"] / wall,
        requests_per_second=result["requests"] / wall,
        messages_per_second=len(sent_in_window) / wall,
        changes_per_second=len(in_window) / wall,
        lags=lags,
        unmatched=unmatched,
        rss_mb=result["rss_mb"],
    )


def describe(run: Run) -> str:
    lag = (
        f"lag p50 {percentile(run.lags, 50) * 1000:5.0f} ms p95 {percentile(run.lags, 95) * 1000:5.0f} ms"
        if run.lags
        else "lag -"
    )
    per_round = run.cpu_per_second / run.rounds_per_second * 1000 if run.rounds_per_second else 0.0
    return (
        f"cpu {run.cpu_per_second:5.2f} s/s ({per_round:4.0f} ms/round)  rounds {run.rounds_per_second:5.1f}/s  requests "
        f"{run.requests_per_second:5.1f}/s  changes {run.changes_per_second:5.1f}/s  messages "
        f"{run.messages_per_second:5.1f}/s  {lag}  unmatched {run.unmatched:3d}  rss {run.rss_mb:4.0f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--checks-per-service", type=int, default=10)
    parser.add_argument("--rate", type=float, default=100, help="check changes a second")
    parser.add_argument("--seconds", type=float, default=20, help="the measured window of each run")
    parser.add_argument("--warmup", type=float, default=5, help="churn before the window opens")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender (the same for every one)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--sender",
        choices=("slack", "null"),
        default="slack",
        help="post every message to the Slack stand-in, or only record it (the watch's own cost, unthrottled)",
    )
    parser.add_argument("--role", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--consul", help=argparse.SUPPRESS)
    parser.add_argument("--slack", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        watcher(args.role, args.consul, args.slack or None, args.warmup, args.seconds)
        return
    contenders = [Contender(role) for role in args.contenders.split(",")]
    print(f"load average at start: {load_average()}", flush=True)
    with consul_standin_process() as addr, slack_standin_process() as slack_url:
        slack_api = slack_url if args.sender == "slack" else None
        setup = CountingClient(addr)
        started = time.perf_counter()
        checks = register(setup, args.services, args.checks_per_service)
        rows = len(setup.client.health.state("any")[1])
        print(
            f"Consul stand-in and Slack stand-in in their own processes; {args.services} services, {rows} check rows "
            f"(incl. the node's serfHealth), registered in {time.perf_counter() - started:.0f} s; churn "
            f"{args.rate:.0f} changes/s; each run measures {args.seconds:.0f} s after {args.warmup:.0f} s of churn; "
            f"{args.repeat} runs per contender, interleaved; messages "
            + ("posted to the Slack stand-in" if slack_api else "recorded, not posted (--sender null)"),
            flush=True,
        )
        for repeat in range(args.repeat):
            for contender in contenders if repeat % 2 == 0 else contenders[::-1]:
                run = run_once(contender.role, addr, slack_api, checks, args)
                contender.runs.append(run)
                print(f"{contender.role:<15} run {repeat + 1}: {describe(run)}  (load {load_average()})", flush=True)
    print(f"load average at end: {load_average()}")
    for contender in contenders:
        cpus = [run.cpu_per_second for run in contender.runs]
        per_round = [run.cpu_per_second / run.rounds_per_second for run in contender.runs if run.rounds_per_second]
        print(
            f"{contender.role:<15} CPU-s/s over {len(cpus)} runs: best {min(cpus):.2f}, median "
            f"{statistics.median(cpus):.2f}, worst {max(cpus):.2f}; CPU per round: best {min(per_round) * 1000:.0f} ms, "
            f"median {statistics.median(per_round) * 1000:.0f} ms"
        )
    ours = next((c for c in contenders if c.role == "ours"), None)
    if ours is None:
        return
    for other in contenders:
        if other is ours:
            continue
        for label, key in (("CPU-s/s", _cpu), ("CPU per round", _per_round)):
            a, b = min(key(run) for run in ours.runs), min(key(run) for run in other.runs)
            verdict = "ours costs MORE" if a > b else "ours costs less"
            print(
                f"ours vs {other.role}, {label} (best of {len(ours.runs)} each): {a:.3f} vs {b:.3f}: {verdict} "
                f"(x{max(a, b) / min(a, b):.2f})"
            )
    worst = max(_cpu(run) for run in ours.runs)
    # Ours spaces its rounds by 0.2 s (tasks/watch.py): however fast Consul answers, at most 5 rounds a second.
    bound = 5 * statistics.median(_per_round(run) for run in ours.runs)
    print(
        f"goal <= 1 core for ours: {'met' if worst <= 1.0 and bound <= 1.0 else 'MISSED'} (worst run "
        f"{worst:.2f} CPU-s/s; at the 5 rounds/s its pacing allows, median CPU per round x 5 = {bound:.2f})"
    )


def _cpu(run: Run) -> float:
    return run.cpu_per_second


def _per_round(run: Run) -> float:
    return run.cpu_per_second / run.rounds_per_second if run.rounds_per_second else 0.0


if __name__ == "__main__":
    main()
