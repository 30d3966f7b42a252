"""Latency from a TTL check turning critical (or back) to the Slack message, vs a naive 1 s polling loop.

    .venv/bin/python bench/health_latency.py [--flips 50] [--services 50]

The Consul stand-in runs in its own process; the watch, the Slack stand-in and the clock are in this one.
Each flip is timed from just before ``PUT /v1/agent/check/fail|pass/:id`` to the moment the Slack stand-in
has stored the message. Both directions count, so ``--flips 50`` measures 100 transitions per contender.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import consul
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect_slack import SlackCredentials

from blocks.notifier import SlackNotifier
from examples.local_env import free_port
from icd.errors import ConsulError
from icd.health.config import WatchConfig
from icd.health.watch import fetch_health_state, watch
from icd.notify.message import Notification
from standins.slack import SlackStandIn

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def consul_standin_process() -> Iterator[str]:
    """``python -m standins.consul`` in a separate process, so its CPU is not counted as ours."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "standins.consul", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    addr = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{addr}/v1/status/leader", timeout=1):  # noqa: S310  # loopback
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield addr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class CountingClient:
    """A py-consul client whose HTTP requests are counted (a requests response hook)."""

    def __init__(self, http_addr: str) -> None:
        host, port = http_addr.removeprefix("http://").split(":")
        self.client = consul.Consul(host=host, port=int(port), connections_timeout=30)
        self.requests = 0
        self.client.http.session.hooks["response"].append(self._count)

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.requests += 1


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def summary(name: str, latencies: Sequence[float]) -> str:
    ms = [v * 1000 for v in latencies]
    return (
        f"{name:<28} n={len(ms):<4} p50={percentile(ms, 50):8.1f} ms  p95={percentile(ms, 95):8.1f} ms  "
        f"max={max(ms):8.1f} ms  mean={statistics.fmean(ms):8.1f} ms"
    )


TOKEN = "xoxb-bench"


def register(client: CountingClient, services: int) -> str:
    for n in range(services):
        client.client.agent.service.register(
            f"svc-{n}",
            service_id=f"svc-{n}-1",
            meta={"artifact_version": "v1", "deploy_run_id": "bench"},
            check={"CheckID": f"ttl-svc-{n}", "Name": "ttl", "TTL": "3600s", "Status": "passing"},
        )
    return "ttl-svc-0"


def naive_poller(client: CountingClient, notifier: SlackNotifier, stop: threading.Event) -> None:
    """What a cron-style checker does: read everything every second and diff check statuses."""
    last: dict[str, str] | None = None
    while not stop.is_set():
        snapshot = fetch_health_state(client.client, index=0, wait_seconds=0)
        now = {f"{i.key}/{c.check_id}": c.status for i in snapshot.instances.values() for c in i.checks}
        if last is not None:
            for key, status in now.items():
                if last.get(key) != status:
                    notifier.sender().send(Notification(title=f"{key} is {status}", text=status, severity="warning"))
        last = now
        stop.wait(1.0)


def measure(client: CountingClient, check_id: str, slack: SlackStandIn, flips: int, jitter: float) -> list[float]:
    latencies: list[float] = []
    for n in range(flips * 2):
        expected = len(slack.messages) + 1
        time.sleep(random.uniform(0.02, jitter))  # noqa: S311  # flips land anywhere in a poll interval
        started = time.perf_counter()
        if n % 2 == 0:
            client.client.agent.check.ttl_fail(check_id, "bench: failing")
        else:
            client.client.agent.check.ttl_pass(check_id, "bench: ok")
        got = slack.wait_for_messages(expected, timeout=10)
        latencies.append(time.perf_counter() - started)
        if len(got) < expected:
            raise SystemExit(f"flip {n}: no message within 10 s")
    return latencies


def run_contender(
    name: str,
    addr: str,
    flips: int,
    services: int,
    start: Callable[[CountingClient, SlackNotifier, threading.Event], threading.Thread],
    jitter: float,
) -> list[float]:
    with SlackStandIn(token=TOKEN) as slack:
        notifier = SlackNotifier(credentials=SlackCredentials(token=TOKEN), channel="#ops", api_url=slack.api_url)
        setup = CountingClient(addr)
        check_id = "ttl-svc-0"
        if services and not setup.client.health.service("svc-0")[1]:
            check_id = register(setup, services)
        stop = threading.Event()
        thread = start(CountingClient(addr), notifier, stop)
        time.sleep(1.5)  # the watch has read and persisted its baseline; the poller has a first picture
        latencies = measure(setup, check_id, slack, flips, jitter)
        stop.set()
        print(summary(name, latencies))
        del thread  # daemon: the watch's last blocking query is abandoned with the process
        return latencies


def start_watch(client: CountingClient, notifier: SlackNotifier, stop: threading.Event) -> threading.Thread:
    def body() -> None:
        # ConsulError: the stand-in stopped under the parked blocking query, i.e. the bench is over.
        with contextlib.suppress(ConsulError):
            watch(client.client, notifier.sender(), WatchConfig(), 3600, watch_name=f"bench-{random.random()}")  # noqa: S311

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def start_poller(client: CountingClient, notifier: SlackNotifier, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=naive_poller, args=(client, notifier, stop), daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=50, help="critical-and-back cycles per contender")
    parser.add_argument("--services", type=int, default=50, help="services (one TTL check each) registered")
    args = parser.parse_args()
    with consul_standin_process() as addr:
        print(f"Consul stand-in (own process) at {addr}; {args.services} services; {args.flips} cycles each")
        # The poller stops on request; the watch holds a blocking query, so it runs last and dies with us.
        naive = run_contender("naive 1 s polling", addr, args.flips, args.services, start_poller, 1.0)
        ours = run_contender("blocking-query watch", addr, args.flips, args.services, start_watch, 0.1)
    ratio_p50 = percentile(naive, 50) / percentile(ours, 50)
    ratio_p95 = percentile(naive, 95) / percentile(ours, 95)
    print(f"naive/watch ratio: p50 x{ratio_p50:.1f}  p95 x{ratio_p95:.1f}")
    goal = "met" if percentile(ours, 95) <= 1.0 else "MISSED"
    print(f"goal p95 <= 1 s: {goal} ({percentile(ours, 95) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
