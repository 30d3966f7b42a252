"""What the health benchmarks share: the stand-ins in their own processes, counted clients, percentiles, and
the baseline every health figure is measured against.

The baseline is what an operator gets from ``consul watch -type=checks`` with a diff-and-alert handler: one
blocking query on ``/v1/health/state/any?index=`` after another, each answer diffed against the last by
check, and one Slack message per check whose status changed, sent through the same ``SlackSender`` as ours.
No state is persisted, nothing is deduplicated across restarts, no Service Meta is looked up: it is the
least a blocking-query watcher can do, so it is the bar the engine's extra work is measured against.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import consul
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.local_env import free_port
from icd.notify.message import Notification, Sender

REPO = Path(__file__).resolve().parent.parent
SLACK_TOKEN = "xoxb-bench"


def _wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310  # loopback
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def _process(args: Sequence[str], ready_url: str) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_http(ready_url, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def consul_standin_process() -> Iterator[str]:
    """``python -m standins.consul`` in a separate process, so its CPU is not counted as ours; its address."""
    port = free_port()
    addr = f"http://127.0.0.1:{port}"
    with _process(["-m", "standins.consul", "--port", str(port)], f"{addr}/v1/status/leader"):
        yield addr


@contextmanager
def slack_standin_process() -> Iterator[str]:
    """``python -m standins.slack`` in a separate process; its Web API URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with _process(["-m", "standins.slack", "--port", str(port), "--token", SLACK_TOKEN], f"{base}/_standin/received"):
        yield f"{base}/api/"


class CountingClient:
    """A py-consul client whose HTTP requests are counted, by path too (a requests response hook)."""

    def __init__(self, http_addr: str) -> None:
        host, port = http_addr.removeprefix("http://").split(":")
        self.client = consul.Consul(host=host, port=int(port), connections_timeout=30)
        self.requests = 0
        self.paths: dict[str, int] = {}
        self.client.http.session.hooks["response"].append(self._count)

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.requests += 1
        path = urllib.parse.urlsplit(response.url).path
        self.paths[path] = self.paths.get(path, 0) + 1


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def check_notification(
    row: dict[str, Any] | None, key: tuple[str, str], before: str, status: str, index: int
) -> Notification:
    """The baseline's message about one check, about as large as ours (title, text, facts, dedup key)."""
    node, check_id = key
    service = (row or {}).get("ServiceName") or node
    instance = (row or {}).get("ServiceID") or ""
    return Notification(
        title=f"{service}: check {check_id} is {status} on {node}",
        text=f"`{check_id}`: {before} -> {status}\n{(row or {}).get('Output') or ''}"[:300],
        severity="success" if status == "passing" else ("critical" if status == "critical" else "warning"),
        fields={"Service": service, "Instance": instance, "Node": node, "Status": status},
        dedup_key=f"check:{node}/{check_id}:{before}->{status}@{index}",
        kind="health",
    )


def blocking_query_loop(
    client: consul.Consul,
    sender: Sender,
    stop: threading.Event,
    *,
    max_wait_seconds: float = 1.0,
    min_round_seconds: float = 0.0,
    on_round: Any = None,
) -> int:
    """The baseline: blocking queries on ``/v1/health/state/any``, diff by check, one message per change.

    Runs until ``stop`` is set (noticed within ``max_wait_seconds``); returns the rounds it made.
    ``min_round_seconds`` spaces rounds as ours are (0: back to back, as ``consul watch`` does).
    """
    index = 0
    last: dict[tuple[str, str], str] | None = None
    rounds = 0
    last_round = -min_round_seconds
    while not stop.is_set():
        if (spacing := last_round + min_round_seconds - time.monotonic()) > 0:
            stop.wait(spacing)
        last_round = time.monotonic()
        params: dict[str, Any] = {"index": str(index), "wait": f"{int(max_wait_seconds * 1000)}ms"} if index else {}
        raw_index, rows = client.health.state("any", **params)
        new_index = int(raw_index)
        rounds += 1
        current: dict[tuple[str, str], str] = {}
        changes: list[tuple[dict[str, Any], tuple[str, str], str]] = []
        for row in rows or ():
            key = (row["Node"], row["CheckID"])
            status = current[key] = row["Status"]
            if last is not None and new_index != index and last.get(key) != status:
                changes.append((row, key, last.get(key) or "absent"))
        for row, key, before in changes:
            sender.send(check_notification(row, key, before, status=row["Status"], index=new_index))
        if last is not None and new_index != index:
            for key in last.keys() - current.keys():
                sender.send(check_notification(None, key, last[key], "absent", new_index))
        last = current
        # Consul's index can go backwards (a restore); then start over with a plain read.
        index = new_index if new_index >= index else 0
        if on_round is not None:
            on_round()
    return rounds
