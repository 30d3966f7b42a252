"""Shared bench plumbing: a Consul stand-in in its own process and a request-counting py-consul client."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import consul
import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
