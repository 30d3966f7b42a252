"""Running checks: one scheduler thread keeps a heap of due times, a small pool runs the HTTP/TCP probes.

TTL checks cost no thread at all: the scheduler only wakes at their deadline. Probes report in Consul's
words (Go's net/http error texts), since that is what a real agent puts in a check's Output.
"""

from __future__ import annotations

import heapq
import itertools
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from standins.consul.state import CHECK_OUTPUT_MAX_BYTES, CRITICAL, PASSING, WARNING, CheckRecord, ConsulState

MIN_CHECK_INTERVAL_SECONDS = 1.0
DEFAULT_HTTP_CHECK_TIMEOUT_SECONDS = 10.0
HTTP_CHECK_BODY_READ_LIMIT = 1 << 20

ProbeSpec = tuple[str, str, dict[str, list[str]], float, bool]
Probe = Callable[[str, str, dict[str, list[str]], float, bool], tuple[str, str]]


@dataclass(order=True, slots=True)
class _Due:
    at: float
    seq: int
    check_id: str = field(compare=False)
    generation: int = field(compare=False)


class CheckScheduler:
    """Fires each check when due: TTL expiry, HTTP/TCP probes, and DeregisterCriticalServiceAfter reaping.

    A check re-registered or removed gets a new generation (or none), so its stale heap entries fire as no-ops.
    """

    def __init__(self, state: ConsulState, min_check_interval: float, workers: int) -> None:
        self._state = state
        self.min_check_interval = min_check_interval
        self._workers = workers
        self._heap: list[_Due] = []
        self._heap_cv = threading.Condition()
        self._seq = itertools.count()
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="consul-standin-check")
        self._thread = threading.Thread(target=self._run, name="consul-standin-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after ``state.stop()``: wake the scheduler so it sees ``stopping``, then drop pending probes."""
        with self._heap_cv:
            self._heap_cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def run_every(self, interval: float) -> float:
        """The catalog shows the interval as given; the agent runs it no faster than its minimum."""
        return max(interval, self.min_check_interval)

    def start_check(self, check: CheckRecord, now: float) -> None:
        """Schedule a just-registered check (caller holds ``state.cond``)."""
        if check.check_type == "ttl":
            check.ttl_deadline = now + check.ttl
            self._schedule(check, check.ttl_deadline)
        else:
            # Consul staggers the first run randomly within one interval.
            self._schedule(check, now + random.uniform(0, check.run_every))  # noqa: S311

    def _schedule(self, check: CheckRecord, at: float) -> None:
        due = _Due(at, next(self._seq), check.check_id, check.generation)
        with self._heap_cv:
            heapq.heappush(self._heap, due)
            if self._heap[0] is due:
                self._heap_cv.notify()

    def _run(self) -> None:
        while True:
            with self._heap_cv:
                while not self._state.stopping and (not self._heap or self._heap[0].at > time.monotonic()):
                    timeout = self._heap[0].at - time.monotonic() if self._heap else None
                    self._heap_cv.wait(timeout)
                if self._state.stopping:
                    return
                due = heapq.heappop(self._heap)
            self._fire(due)

    def _fire(self, due: _Due) -> None:
        state = self._state
        now = time.monotonic()
        with state.cond:
            check = state.checks.get(due.check_id)
            if check is None or check.generation != due.generation:
                return
            if check.deregister_critical_after and self._reap_if_critical_too_long(check, now):
                return
            if check.check_type == "ttl":
                if check.ttl_deadline > now:
                    self._schedule(check, check.ttl_deadline)
                else:
                    expired = "TTL expired"
                    if check.ttl_last_output:
                        expired += f" (last output before timeout follows): {check.ttl_last_output}"
                    state.set_check_status(check, CRITICAL, expired, now)
                    # Keep watching so DeregisterCriticalServiceAfter can still fire.
                    if check.deregister_critical_after:
                        self._schedule(check, now + max(check.ttl, self.min_check_interval))
                return
            probe = http_probe if check.check_type == "http" else tcp_probe
            timeout = check.timeout or DEFAULT_HTTP_CHECK_TIMEOUT_SECONDS
            spec = (check.target, check.method, dict(check.header), timeout, check.tls_skip_verify)
        executor = self._executor
        if executor is None:
            return
        try:
            executor.submit(self._probe_and_record, due.check_id, due.generation, probe, spec, now)
        except RuntimeError:  # the pool is shut down: the stand-in is stopping
            return

    def _probe_and_record(self, check_id: str, generation: int, probe: Probe, spec: ProbeSpec, started: float) -> None:
        status, output = probe(*spec)
        state = self._state
        with state.cond:
            check = state.checks.get(check_id)
            if check is None or check.generation != generation or state.stopping:
                return
            state.set_check_status(check, status, output, time.monotonic())
            self._schedule(check, max(started + check.run_every, time.monotonic()))

    def _reap_if_critical_too_long(self, check: CheckRecord, now: float) -> bool:
        if check.critical_since is None or now - check.critical_since < check.deregister_critical_after:
            return False
        if check.service_id in self._state.services:
            self._state.deregister_service(check.service_id)
        return True


def http_probe(
    url: str, method: str, header: dict[str, list[str]], timeout: float, tls_skip_verify: bool
) -> tuple[str, str]:
    """One Consul HTTP check run: 2xx passing, 429 warning, anything else critical; Consul's output format."""
    request = urllib.request.Request(url, method=method)  # noqa: S310  # the URL is the check's own target
    request.add_header("User-Agent", "Consul Health Check")
    request.add_header("Accept", "text/plain, text/*, */*")
    for name, values in header.items():
        for value in values:
            request.add_header(name, value)
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if tls_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            code, reason, body = response.status, response.reason, response.read(HTTP_CHECK_BODY_READ_LIMIT)
    except urllib.error.HTTPError as error:
        with error:
            code, reason, body = error.code, error.reason, error.read(HTTP_CHECK_BODY_READ_LIMIT)
    except (urllib.error.URLError, OSError) as error:
        return CRITICAL, f'{method.capitalize()} "{url}": {_go_style_error(url, error)}'
    # Consul keeps the body in a circular buffer, so a long body shows its end.
    tail = body[-CHECK_OUTPUT_MAX_BYTES:].decode(errors="replace")
    output = f"HTTP {method} {url}: {code} {reason} Output: {tail}"
    if 200 <= code < 300:
        return PASSING, output
    if code == 429:
        return WARNING, output
    return CRITICAL, output


def _go_style_error(url: str, error: BaseException) -> str:
    """The failure as Go's net/http client words it, which is what a real agent puts in Output."""
    reason = getattr(error, "reason", error)
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
    if isinstance(reason, ConnectionRefusedError):
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return f"dial tcp {parsed.hostname}:{port}: connect: connection refused"
    return str(reason)


def tcp_probe(address: str, _method: str, _header: dict[str, list[str]], timeout: float, _tls: bool) -> tuple[str, str]:
    """One Consul TCP check run: a connection that opens is passing, anything else critical."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return PASSING, f"TCP connect {address}: Success"
    except ConnectionRefusedError:
        return CRITICAL, f"dial tcp {address}: connect: connection refused"
    except TimeoutError:
        return CRITICAL, f"dial tcp {address}: i/o timeout"
    except (OSError, ValueError) as error:
        return CRITICAL, f"dial tcp {address}: {error}"
