"""A Consul agent stand-in that speaks the subset of Consul's HTTP API this project uses.

No Consul binary can be installed where tests and the offline demo run, so this server answers the same
requests with the same JSON shapes, status codes and headers as a single-node Consul agent in dev mode:
agent service/check registration with checks that really run (HTTP, TCP and TTL), health, catalog, KV, and
blocking queries (``?index=&wait=``) that wake as soon as the watched data changes.

Where the stand-in must choose, it does what Consul does and says so:
- a check starts ``critical`` unless its definition gives a ``Status``;
- a check update with the same status and output changes nothing and bumps no index;
- an update that only changes the output reaches the catalog (health endpoints) at most once per
  ``check_update_interval`` (Consul's anti-entropy default is 5 minutes); ``/v1/agent/checks`` shows it
  at once;
- check intervals below one second are raised to one second (Consul's ``MinInterval``);
- script checks are refused, as on an agent without ``enable_script_checks``.

Stdlib only. One scheduler thread keeps a heap of due times for every check and a small thread pool runs
the HTTP/TCP probes, so ten thousand TTL checks cost no threads.
"""

from __future__ import annotations

import argparse
import base64
import heapq
import itertools
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
CHECK_STATUSES = (PASSING, WARNING, CRITICAL)

SERF_CHECK_ID = "serfHealth"
NODE_MAINTENANCE_CHECK_ID = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
DEFAULT_SERVICE_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
DEFAULT_NODE_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
MIN_CHECK_INTERVAL_SECONDS = 1.0
DEFAULT_HTTP_CHECK_TIMEOUT_SECONDS = 10.0
DEFAULT_CHECK_UPDATE_INTERVAL_SECONDS = 300.0
DEFAULT_BLOCKING_WAIT_SECONDS = 300.0
MAX_BLOCKING_WAIT_SECONDS = 600.0
CHECK_OUTPUT_MAX_BYTES = 4096
HTTP_CHECK_BODY_READ_LIMIT = 1 << 20

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


class ApiError(Exception):
    """An HTTP error answer: Consul replies with a status code and a plain-text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_duration(value: object) -> float:
    """Seconds from a Go duration string ("10s", "500ms", "1m30s") or a JSON number of nanoseconds."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        raise ApiError(400, f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    text = str(value).strip()
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ApiError(400, f'time: invalid duration "{text}"')
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """Go's time.Duration String() for the whole-millisecond values checks use."""
    if seconds <= 0:
        return ""
    millis = round(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    hours, rest_ms = divmod(millis, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:g}s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def _unknown_service(service_id: str) -> str:
    return f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'


def _unknown_check(check_id: str) -> str:
    return f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'


def _normalized(body: dict[str, Any]) -> dict[str, Any]:
    """Consul decodes JSON keys case-insensitively and accepts snake_case aliases; so does this."""
    return {key.replace("_", "").lower(): value for key, value in body.items()}


@dataclass(slots=True)
class ServiceRecord:
    service_id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int
    modify_index: int


@dataclass(slots=True)
class CheckRecord:
    check_id: str
    name: str
    node: str
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    check_type: str = ""
    notes: str = ""
    # What the agent knows now (``/v1/agent/checks``) ...
    status: str = CRITICAL
    output: str = ""
    # ... and what the catalog has (health endpoints); they differ only while an output-only change waits.
    synced_status: str = CRITICAL
    synced_output: str = ""
    last_synced_at: float = 0.0
    interval: float = 0.0
    run_every: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    ttl_deadline: float = 0.0
    ttl_last_output: str = ""
    target: str = ""
    method: str = "GET"
    header: dict[str, list[str]] = field(default_factory=dict)
    tls_skip_verify: bool = False
    deregister_critical_after: float = 0.0
    critical_since: float | None = None
    generation: int = 0
    create_index: int = 0
    modify_index: int = 0
    cached_json: str | None = None

    def health_dict(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.synced_status,
            "Notes": self.notes,
            "Output": self.synced_output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.check_type,
            "Interval": format_duration(self.interval),
            "Timeout": format_duration(self.timeout),
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def health_json(self) -> str:
        if self.cached_json is None:
            self.cached_json = json.dumps(self.health_dict(), separators=(",", ":"))
        return self.cached_json

    def agent_dict(self) -> dict[str, Any]:
        answer = self.health_dict()
        answer.update(Status=self.status, Output=self.output, CreateIndex=0, ModifyIndex=0)
        return answer


@dataclass(slots=True)
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "LockIndex": 0,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    index: int | None = None


def _json_reply(payload: object, *, status: int = 200, index: int | None = None) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), index=index)


def _raw_json_reply(text: str, *, index: int | None = None) -> Reply:
    return Reply(200, text.encode(), index=index)


_TRUE = Reply(200, b"true")
_FALSE = Reply(200, b"false")


class _ConsulState:
    """The agent's and catalog's data, guarded by one condition variable that wakes blocking queries."""

    def __init__(self, node_name: str, datacenter: str, check_update_interval: float) -> None:
        self.cond = threading.Condition()
        self.node_name = node_name
        self.datacenter = datacenter
        self.node_id = str(uuid.uuid4())
        self.check_update_interval = check_update_interval
        self.stopping = False
        self.raft_index = 0
        self.table_index: dict[str, int] = {"nodes": 0, "services": 0, "checks": 0, "kvs": 0}
        self.service_name_index: dict[str, int] = {}
        self.services: dict[str, ServiceRecord] = {}
        self.checks: dict[str, CheckRecord] = {}
        self.kv: dict[str, KVEntry] = {}
        self.kv_change_index: dict[str, int] = {}
        self.generations = itertools.count(1)
        with self.cond:
            self._register_node(node_name)

    def _register_node(self, node_name: str) -> None:
        self.node_index = self._bump("nodes")
        serf = CheckRecord(
            check_id=SERF_CHECK_ID,
            name="Serf Health Status",
            node=node_name,
            status=PASSING,
            output="Agent alive and reachable",
            synced_status=PASSING,
            synced_output="Agent alive and reachable",
        )
        serf.create_index = serf.modify_index = self._bump("checks")
        self.checks[SERF_CHECK_ID] = serf

    # --- indexes (callers hold self.cond) -------------------------------------------------------------

    def _bump(self, *tables: str, service_names: Iterable[str] = ()) -> int:
        self.raft_index += 1
        for table in tables:
            self.table_index[table] = self.raft_index
        for name in service_names:
            self.service_name_index[name] = self.raft_index
        self.cond.notify_all()
        return self.raft_index

    def _all_service_names(self) -> set[str]:
        return {service.name for service in self.services.values()}

    def checks_changed(self, check: CheckRecord) -> int:
        names = [check.service_name] if check.service_id else self._all_service_names()
        index = self._bump("checks", service_names=names)
        check.modify_index = index
        # Rendered on write so that reading ten thousand checks is a join of ready-made strings.
        check.cached_json = None
        check.health_json()
        return index


@dataclass(order=True, slots=True)
class _Due:
    at: float
    seq: int
    check_id: str = field(compare=False)
    generation: int = field(compare=False)


class ConsulStandIn:
    """A single-node Consul agent over real HTTP on loopback; ``start()`` returns self. A context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        node_name: str = "standin-node",
        datacenter: str = "dc1",
        acl_token: str | None = None,
        *,
        check_update_interval: float = DEFAULT_CHECK_UPDATE_INTERVAL_SECONDS,
        min_check_interval: float = MIN_CHECK_INTERVAL_SECONDS,
        check_workers: int = 8,
    ) -> None:
        self._host = host
        self._port = port
        self.acl_token = acl_token
        self.min_check_interval = min_check_interval
        self._state = _ConsulState(node_name, datacenter, check_update_interval)
        self._heap: list[_Due] = []
        self._heap_cv = threading.Condition()
        self._seq = itertools.count()
        self._check_workers = check_workers
        self._executor: ThreadPoolExecutor | None = None
        self._scheduler: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> ConsulStandIn:
        standin = self

        class Handler(_Handler):
            api = standin

        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self._port = int(self._server.server_address[1])
        self._executor = ThreadPoolExecutor(self._check_workers, thread_name_prefix="consul-standin-check")
        self._scheduler = threading.Thread(target=self._run_scheduler, name="consul-standin-scheduler", daemon=True)
        self._scheduler.start()
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="consul-standin-http",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        with self._state.cond:
            self._state.stopping = True
            self._state.cond.notify_all()
        with self._heap_cv:
            self._heap_cv.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
            self._scheduler = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ConsulStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def http_addr(self) -> str:
        return f"http://{self.address}"

    @property
    def node_name(self) -> str:
        return self._state.node_name

    @property
    def datacenter(self) -> str:
        return self._state.datacenter

    # --- scheduler ------------------------------------------------------------------------------------

    def _schedule(self, check: CheckRecord, at: float) -> None:
        due = _Due(at, next(self._seq), check.check_id, check.generation)
        with self._heap_cv:
            heapq.heappush(self._heap, due)
            if self._heap[0] is due:
                self._heap_cv.notify()

    def _run_scheduler(self) -> None:
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
                    self._set_check_status(check, CRITICAL, expired, now)
                    # Keep watching so DeregisterCriticalServiceAfter can still fire.
                    if check.deregister_critical_after:
                        self._schedule(check, now + max(check.ttl, self.min_check_interval))
                return
            probe = _http_probe if check.check_type == "http" else _tcp_probe
            timeout = check.timeout or DEFAULT_HTTP_CHECK_TIMEOUT_SECONDS
            spec = (check.target, check.method, dict(check.header), timeout, check.tls_skip_verify)
        executor = self._executor
        if executor is None:
            return
        try:
            executor.submit(self._probe_and_record, due.check_id, due.generation, probe, spec, now)
        except RuntimeError:  # the pool is shut down: the stand-in is stopping
            return

    def _probe_and_record(
        self,
        check_id: str,
        generation: int,
        probe: Callable[[str, str, dict[str, list[str]], float, bool], tuple[str, str]],
        spec: tuple[str, str, dict[str, list[str]], float, bool],
        started: float,
    ) -> None:
        status, output = probe(*spec)
        with self._state.cond:
            check = self._state.checks.get(check_id)
            if check is None or check.generation != generation or self._state.stopping:
                return
            self._set_check_status(check, status, output, time.monotonic())
            self._schedule(check, max(started + check.run_every, time.monotonic()))

    def _reap_if_critical_too_long(self, check: CheckRecord, now: float) -> bool:
        if check.critical_since is None or now - check.critical_since < check.deregister_critical_after:
            return False
        if check.service_id in self._state.services:
            self._deregister_service(check.service_id)
        return True

    # --- state changes (callers hold self._state.cond) ------------------------------------------------

    def _set_check_status(self, check: CheckRecord, status: str, output: str, now: float) -> None:
        output = output.encode()[:CHECK_OUTPUT_MAX_BYTES].decode(errors="ignore")
        if check.status == status and check.output == output:
            return
        if status == CRITICAL and check.critical_since is None:
            check.critical_since = now
        elif status != CRITICAL:
            check.critical_since = None
        check.status, check.output = status, output
        status_changed = status != check.synced_status
        due_for_sync = now - check.last_synced_at >= self._state.check_update_interval
        if status_changed or (output != check.synced_output and due_for_sync):
            check.synced_status, check.synced_output, check.last_synced_at = status, output, now
            self._state.checks_changed(check)

    def _deregister_service(self, service_id: str) -> None:
        state = self._state
        service = state.services.pop(service_id)
        for check_id in [cid for cid, c in state.checks.items() if c.service_id == service_id]:
            del state.checks[check_id]
        state._bump("services", "checks", service_names=[service.name])

    def _add_check(self, check: CheckRecord, definition: dict[str, Any]) -> None:
        """Fill ``check`` from a normalized definition, keep a re-registered check's status, schedule it."""
        state = self._state
        if "args" in definition or "script" in definition:
            raise ApiError(
                400,
                "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or "
                "'enable_local_script_checks' to true",
            )
        check.notes = str(definition.get("notes") or "")
        check.deregister_critical_after = parse_duration(definition.get("deregistercriticalserviceafter"))
        check.timeout = parse_duration(definition.get("timeout"))
        interval = parse_duration(definition.get("interval"))
        if definition.get("ttl"):
            check.check_type, check.ttl = "ttl", parse_duration(definition["ttl"])
            if check.ttl <= 0:
                raise ApiError(400, "Invalid check: TTL must be > 0 for TTL checks")
        elif definition.get("http") or definition.get("tcp"):
            check.check_type = "http" if definition.get("http") else "tcp"
            check.target = str(definition.get("http") or definition.get("tcp"))
            if interval <= 0:
                raise ApiError(400, "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks")
            # The catalog shows the interval as given; the agent runs it no faster than its minimum.
            check.interval = interval
            check.run_every = max(interval, self.min_check_interval)
            check.method = str(definition.get("method") or "GET")
            check.header = {str(k): [str(v) for v in vs] for k, vs in (definition.get("header") or {}).items()}
            check.tls_skip_verify = bool(definition.get("tlsskipverify"))
        else:
            raise ApiError(400, "Invalid check: TTL or Interval and one of HTTP or TCP must be specified")
        status = str(definition.get("status") or CRITICAL)
        if status not in CHECK_STATUSES:
            raise ApiError(400, f"Status for checks must 'passing', 'warning', 'critical', got {status!r}")
        existing = state.checks.get(check.check_id)
        # Consul restores a re-registered check's status and output from its snapshot.
        if existing is not None:
            check.status, check.output = existing.status, existing.output
            check.ttl_last_output = existing.ttl_last_output
            check.synced_status, check.synced_output = existing.synced_status, existing.synced_output
            check.critical_since = existing.critical_since
            check.create_index = existing.create_index
        else:
            check.status = check.synced_status = status
            check.critical_since = time.monotonic() if status == CRITICAL else None
        check.generation = next(state.generations)
        now = time.monotonic()
        check.last_synced_at = now
        state.checks[check.check_id] = check
        index = state.checks_changed(check)
        if not check.create_index:
            check.create_index = index
        if check.check_type == "ttl":
            check.ttl_deadline = now + check.ttl
            self._schedule(check, check.ttl_deadline)
        else:
            # Consul staggers the first run randomly within one interval.
            self._schedule(check, now + random.uniform(0, check.run_every))  # noqa: S311

    # --- agent endpoints ------------------------------------------------------------------------------

    def register_service(self, body: dict[str, Any], replace_existing_checks: bool) -> Reply:
        spec = _normalized(body)
        name = spec.get("name")
        if not name:
            raise ApiError(400, "Missing service name")
        service_id = str(spec.get("id") or name)
        definitions = [_normalized(c) for c in ([spec["check"]] if spec.get("check") else [])]
        definitions += [_normalized(c) for c in (spec.get("checks") or [])]
        state = self._state
        with state.cond:
            existing = state.services.get(service_id)
            service = ServiceRecord(
                service_id=service_id,
                name=str(name),
                tags=[str(t) for t in spec.get("tags") or []],
                address=str(spec.get("address") or ""),
                port=int(spec.get("port") or 0),
                meta={str(k): str(v) for k, v in (spec.get("meta") or {}).items()},
                weights=dict(spec.get("weights") or {"Passing": 1, "Warning": 1}),
                enable_tag_override=bool(spec.get("enabletagoverride")),
                create_index=0,
                modify_index=0,
            )
            new_checks: list[tuple[CheckRecord, dict[str, Any]]] = []
            for position, definition in enumerate(definitions, start=1):
                check_id = str(definition.get("checkid") or definition.get("id") or f"service:{service_id}")
                if not (definition.get("checkid") or definition.get("id")) and len(definitions) > 1:
                    check_id += f":{position}"
                check_name = str(definition.get("name") or f"Service '{name}' check")
                new_checks.append((CheckRecord(check_id=check_id, name=check_name, node=state.node_name), definition))
            names = [service.name] + ([existing.name] if existing and existing.name != service.name else [])
            index = state._bump("services", service_names=names)
            service.create_index = existing.create_index if existing else index
            service.modify_index = index
            state.services[service_id] = service
            kept = {check.check_id for check, _ in new_checks}
            # A new service owns no checks yet, so only a re-registration needs the scans below.
            if existing is not None and replace_existing_checks:
                for check_id in [c.check_id for c in state.checks.values() if c.service_id == service_id]:
                    if check_id not in kept and not check_id.startswith(SERVICE_MAINTENANCE_PREFIX):
                        del state.checks[check_id]
            for check in state.checks.values() if existing is not None else ():
                if check.service_id == service_id:
                    check.service_name, check.service_tags, check.cached_json = (
                        service.name,
                        service.tags,
                        None,
                    )
            for check, definition in new_checks:
                check.service_id, check.service_name, check.service_tags = (
                    service_id,
                    service.name,
                    service.tags,
                )
                self._add_check(check, definition)
        return _TRUE

    def deregister_service(self, service_id: str) -> Reply:
        with self._state.cond:
            if service_id not in self._state.services:
                raise ApiError(404, _unknown_service(service_id))
            self._deregister_service(service_id)
        return _TRUE

    def register_check(self, body: dict[str, Any]) -> Reply:
        definition = _normalized(body)
        name = definition.get("name")
        if not name:
            raise ApiError(400, "Missing check name")
        state = self._state
        with state.cond:
            check = CheckRecord(
                check_id=str(definition.get("checkid") or definition.get("id") or name),
                name=str(name),
                node=state.node_name,
            )
            service_id = str(definition.get("serviceid") or "")
            if service_id:
                service = state.services.get(service_id)
                if service is None:
                    raise ApiError(400, f'ServiceID "{service_id}" does not exist')
                check.service_id, check.service_name, check.service_tags = (
                    service_id,
                    service.name,
                    service.tags,
                )
            self._add_check(check, definition)
        return _TRUE

    def deregister_check(self, check_id: str) -> Reply:
        with self._state.cond:
            check = self._state.checks.pop(check_id, None)
            if check is None or check_id == SERF_CHECK_ID:
                raise ApiError(404, _unknown_check(check_id))
            self._state.checks_changed(check)
        return _TRUE

    def update_ttl(self, check_id: str, status: str, output: str) -> Reply:
        if status not in CHECK_STATUSES:
            raise ApiError(400, f'Invalid status: "{status}"')
        with self._state.cond:
            check = self._state.checks.get(check_id)
            if check is None:
                raise ApiError(404, _unknown_check(check_id))
            if check.check_type != "ttl":
                raise ApiError(500, f'CheckID "{check_id}" does not have associated TTL')
            now = time.monotonic()
            check.ttl_deadline = now + check.ttl
            check.ttl_last_output = output
            self._set_check_status(check, status, output, now)
        return Reply(200, b"")

    def service_maintenance(self, service_id: str, enable: bool, reason: str) -> Reply:
        state = self._state
        with state.cond:
            service = state.services.get(service_id)
            if service is None:
                raise ApiError(404, f'No service registered with ID "{service_id}"')
            check_id = SERVICE_MAINTENANCE_PREFIX + service_id
            if enable and check_id not in state.checks:
                check = CheckRecord(
                    check_id=check_id,
                    name="Service Maintenance Mode",
                    node=state.node_name,
                    service_id=service_id,
                    service_name=service.name,
                    service_tags=service.tags,
                    notes=reason or DEFAULT_SERVICE_MAINTENANCE_REASON,
                )
                state.checks[check_id] = check
                check.create_index = state.checks_changed(check)
            elif not enable and check_id in state.checks:
                state.checks_changed(state.checks.pop(check_id))
        return Reply(200, b"")

    def node_maintenance(self, enable: bool, reason: str) -> Reply:
        state = self._state
        with state.cond:
            if enable and NODE_MAINTENANCE_CHECK_ID not in state.checks:
                check = CheckRecord(
                    check_id=NODE_MAINTENANCE_CHECK_ID,
                    name="Node Maintenance Mode",
                    node=state.node_name,
                    notes=reason or DEFAULT_NODE_MAINTENANCE_REASON,
                )
                state.checks[check.check_id] = check
                check.create_index = state.checks_changed(check)
            elif not enable and NODE_MAINTENANCE_CHECK_ID in state.checks:
                state.checks_changed(state.checks.pop(NODE_MAINTENANCE_CHECK_ID))
        return Reply(200, b"")

    # --- read views (callers hold self._state.cond) ---------------------------------------------------

    def _agent_service_dict(self, service: ServiceRecord) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Meta": dict(service.meta),
            "Port": service.port,
            "Address": service.address,
            "Weights": dict(service.weights),
            "EnableTagOverride": service.enable_tag_override,
            "Datacenter": self._state.datacenter,
        }

    def _node_dict(self) -> dict[str, Any]:
        return {
            "ID": self._state.node_id,
            "Node": self._state.node_name,
            "Address": self._host,
            "Datacenter": self._state.datacenter,
            "TaggedAddresses": {
                "lan": self._host,
                "lan_ipv4": self._host,
                "wan": self._host,
                "wan_ipv4": self._host,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self._state.node_index,
            "ModifyIndex": self._state.node_index,
        }

    def _health_service_dict(self, service: ServiceRecord) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Address": service.address,
            "Meta": dict(service.meta),
            "Port": service.port,
            "Weights": dict(service.weights),
            "EnableTagOverride": service.enable_tag_override,
            "CreateIndex": service.create_index,
            "ModifyIndex": service.modify_index,
        }

    def _catalog_service_dict(self, service: ServiceRecord) -> dict[str, Any]:
        node = self._node_dict()
        return {
            "ID": node["ID"],
            "Node": node["Node"],
            "Address": node["Address"],
            "Datacenter": node["Datacenter"],
            "TaggedAddresses": node["TaggedAddresses"],
            "NodeMeta": node["Meta"],
            "ServiceKind": "",
            "ServiceID": service.service_id,
            "ServiceName": service.name,
            "ServiceTags": list(service.tags),
            "ServiceAddress": service.address,
            "ServiceMeta": dict(service.meta),
            "ServicePort": service.port,
            "ServiceWeights": dict(service.weights),
            "ServiceEnableTagOverride": service.enable_tag_override,
            "CreateIndex": service.create_index,
            "ModifyIndex": service.modify_index,
        }

    def _services_named(self, name: str, tags: list[str]) -> list[ServiceRecord]:
        return [s for s in self._state.services.values() if s.name == name and all(tag in s.tags for tag in tags)]

    # --- KV -------------------------------------------------------------------------------------------

    def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> Reply:
        if not key:
            raise ApiError(400, "Missing key name")
        state = self._state
        with state.cond:
            existing = state.kv.get(key)
            if cas is not None and (existing.modify_index if existing else 0) != cas:
                return _FALSE
            index = state._bump("kvs")
            state.kv[key] = KVEntry(key, value, flags, existing.create_index if existing else index, index)
            state.kv_change_index[key] = index
        return _TRUE

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> Reply:
        state = self._state
        with state.cond:
            if recurse:
                doomed = [k for k in state.kv if k.startswith(key)]
            else:
                existing = state.kv.get(key)
                if cas is not None and (existing is None or existing.modify_index != cas):
                    return _FALSE
                doomed = [key] if existing else []
            if doomed:
                index = state._bump("kvs")
                for k in doomed:
                    del state.kv[k]
                    state.kv_change_index[k] = index
        return _TRUE


def _http_probe(
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
        import ssl

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


def _tcp_probe(
    address: str, _method: str, _header: dict[str, list[str]], timeout: float, _tls: bool
) -> tuple[str, str]:
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


# --- HTTP layer ---------------------------------------------------------------------------------------


def _truthy_flag(query: dict[str, list[str]], name: str) -> bool:
    """Consul treats a present query flag (``?recurse``, ``?passing``) as true unless it says false."""
    if name not in query:
        return False
    return query[name][-1].lower() not in ("false", "0")


class _Handler(BaseHTTPRequestHandler):
    api: ConsulStandIn
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and the client's
    # delayed ACK add ~40 ms to every answer.
    disable_nagle_algorithm = True
    server_version = "ConsulStandIn"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            self._authorize(path, query)
            reply = _Router(self.api, method, path, query, body).route()
        except ApiError as error:
            reply = Reply(error.status, error.message.encode(), content_type="text/plain; charset=utf-8")
        self._send(reply)

    def _authorize(self, path: str, query: dict[str, list[str]]) -> None:
        expected = self.api.acl_token
        if expected is None or path.startswith("/v1/status/"):
            return
        bearer = self.headers.get("Authorization", "")
        token = (
            self.headers.get("X-Consul-Token")
            or (bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else "")
            or (query.get("token") or [""])[-1]
        )
        if not token:
            raise ApiError(403, "Permission denied: anonymous token lacks permission")
        if token != expected:
            raise ApiError(403, "ACL not found")

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Vary", "Accept-Encoding")
        if reply.index is not None:
            self.send_header("X-Consul-Index", str(max(reply.index, 1)))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
            self.send_header("X-Consul-Effective-Consistency", "leader")
        self.end_headers()
        self.wfile.write(reply.body)


class _Router:
    """Parses one request and answers it; blocking GETs wait on the state's condition variable."""

    def __init__(self, api: ConsulStandIn, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        self.api = api
        self.state = api._state
        self.method = method
        self.path = path
        self.query = query
        self.body = body

    def param(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[-1] if values else default

    def json_body(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            decoded = json.loads(self.body)
        except ValueError as error:
            raise ApiError(400, f"Request decode failed: {error}") from error
        if not isinstance(decoded, dict):
            raise ApiError(400, "Request decode failed: expected a JSON object")
        return decoded

    def int_param(self, name: str) -> int | None:
        raw = self.param(name)
        if name not in self.query:
            return None
        try:
            return int(raw)
        except ValueError as error:
            raise ApiError(400, f"Invalid {name}: {raw!r}") from error

    def route(self) -> Reply:
        dc = self.param("dc")
        if dc and dc != self.state.datacenter:
            raise ApiError(500, "No path to datacenter")
        p = self.path
        api = self.api
        if self.method == "PUT":
            if p == "/v1/agent/service/register":
                replace = _truthy_flag(self.query, "replace-existing-checks")
                return api.register_service(self.json_body(), replace)
            if p.startswith("/v1/agent/service/deregister/"):
                return api.deregister_service(p.removeprefix("/v1/agent/service/deregister/"))
            if p == "/v1/agent/check/register":
                return api.register_check(self.json_body())
            if p.startswith("/v1/agent/check/deregister/"):
                return api.deregister_check(p.removeprefix("/v1/agent/check/deregister/"))
            for verb, status in (("pass", PASSING), ("warn", WARNING), ("fail", CRITICAL)):
                prefix = f"/v1/agent/check/{verb}/"
                if p.startswith(prefix):
                    return api.update_ttl(p.removeprefix(prefix), status, self.param("note"))
            if p.startswith("/v1/agent/check/update/"):
                update = _normalized(self.json_body())
                return api.update_ttl(
                    p.removeprefix("/v1/agent/check/update/"),
                    str(update.get("status") or ""),
                    str(update.get("output") or ""),
                )
            if p.startswith("/v1/agent/service/maintenance/"):
                return api.service_maintenance(
                    p.removeprefix("/v1/agent/service/maintenance/"),
                    self.enable_param(),
                    self.param("reason"),
                )
            if p == "/v1/agent/maintenance":
                return api.node_maintenance(self.enable_param(), self.param("reason"))
            if p.startswith("/v1/kv/"):
                flags = self.int_param("flags") or 0
                return api.kv_put(p.removeprefix("/v1/kv/"), self.body, flags, self.int_param("cas"))
        elif self.method == "DELETE":
            if p.startswith("/v1/kv/"):
                return api.kv_delete(
                    p.removeprefix("/v1/kv/"), _truthy_flag(self.query, "recurse"), self.int_param("cas")
                )
        elif self.method == "GET":
            return self.route_get(p)
        raise (ApiError(405, "method not allowed") if self.known_path(p) else ApiError(404, "404 page not found"))

    @staticmethod
    def known_path(path: str) -> bool:
        return path.startswith(("/v1/agent/", "/v1/kv/", "/v1/health/", "/v1/catalog/", "/v1/status/"))

    def enable_param(self) -> bool:
        if "enable" not in self.query:
            raise ApiError(400, "Missing value for enable")
        raw = self.param("enable").lower()
        if raw not in ("true", "false", "1", "0"):
            raise ApiError(400, f"Invalid value for enable: {raw!r}")
        return raw in ("true", "1")

    # --- blocking GETs --------------------------------------------------------------------------------

    def blocking(
        self,
        index_of: Callable[[], int],
        render: Callable[[int], Reply],
        wake_on: Callable[[], int] | None = None,
    ) -> Reply:
        """Consul's blocking query: answer at once unless ``?index`` is current, else wait for a change."""
        min_index = self.int_param("index")
        state = self.state
        with state.cond:
            if min_index and index_of() <= min_index:
                wait = parse_duration(self.param("wait")) if "wait" in self.query else DEFAULT_BLOCKING_WAIT_SECONDS
                wait = min(wait, MAX_BLOCKING_WAIT_SECONDS)
                wait += random.uniform(0, wait / 16)  # noqa: S311  # Consul's jitter
                changed = wake_on or index_of
                state.cond.wait_for(lambda: state.stopping or changed() > min_index, timeout=wait)
            return render(index_of())

    def route_get(self, p: str) -> Reply:
        api, state = self.api, self.state
        if p == "/v1/status/leader":
            return _json_reply(f"{api._host}:8300")
        if p == "/v1/status/peers":
            return _json_reply([f"{api._host}:8300"])
        if p == "/v1/agent/self":
            return _json_reply(
                {
                    "Config": {
                        "Datacenter": state.datacenter,
                        "NodeName": state.node_name,
                        "NodeID": state.node_id,
                        "Server": True,
                        "Version": "1.21.0-standin",
                    },
                    "Member": {"Name": state.node_name, "Addr": api._host, "Port": 8301, "Status": 1},
                    "Meta": {},
                }
            )

        def checks_index() -> int:
            return state.table_index["checks"]

        def services_index() -> int:
            return max(state.table_index["services"], state.table_index["checks"])

        if p == "/v1/agent/services":
            return self.blocking(
                services_index,
                lambda i: _json_reply(
                    {s.service_id: api._agent_service_dict(s) for s in state.services.values()}, index=i
                ),
            )
        if p == "/v1/agent/checks":
            return self.blocking(
                checks_index,
                lambda i: _json_reply({c.check_id: c.agent_dict() for c in state.checks.values()}, index=i),
            )
        if p.startswith("/v1/agent/service/"):
            service_id = p.removeprefix("/v1/agent/service/")

            def render_agent_service(i: int) -> Reply:
                service = state.services.get(service_id)
                if service is None:
                    raise ApiError(404, f"unknown service ID: {service_id}")
                answer = api._agent_service_dict(service)
                answer["ContentHash"] = f"{service.modify_index:016x}"
                return _json_reply(answer, index=i)

            return self.blocking(services_index, render_agent_service)
        if p.startswith("/v1/health/state/"):
            wanted = p.removeprefix("/v1/health/state/")
            if wanted not in ("any", *CHECK_STATUSES):
                raise ApiError(400, "Bad state")
            return self.blocking(
                checks_index,
                lambda i: _raw_json_reply(
                    "["
                    + ",".join(
                        c.health_json() for c in state.checks.values() if wanted == "any" or c.synced_status == wanted
                    )
                    + "]",
                    index=i,
                ),
            )
        if p.startswith("/v1/health/checks/"):
            name = p.removeprefix("/v1/health/checks/")
            return self.blocking(
                lambda: state.service_name_index.get(name, state.table_index["services"]),
                lambda i: _raw_json_reply(
                    "[" + ",".join(c.health_json() for c in state.checks.values() if c.service_name == name) + "]",
                    index=i,
                ),
            )
        if p.startswith("/v1/health/node/"):
            node = p.removeprefix("/v1/health/node/")
            return self.blocking(
                checks_index,
                lambda i: _raw_json_reply(
                    "[" + ",".join(c.health_json() for c in state.checks.values() if c.node == node) + "]",
                    index=i,
                ),
            )
        if p.startswith("/v1/health/service/"):
            name = p.removeprefix("/v1/health/service/")
            return self.blocking(
                lambda: state.service_name_index.get(name, state.table_index["services"]),
                lambda i: self.render_health_service(name, i),
            )
        if p == "/v1/catalog/services":
            return self.blocking(
                lambda: state.table_index["services"],
                lambda i: _json_reply(self.catalog_services(), index=i),
            )
        if p.startswith("/v1/catalog/service/"):
            name = p.removeprefix("/v1/catalog/service/")
            tags = self.query.get("tag", [])
            return self.blocking(
                lambda: state.service_name_index.get(name, state.table_index["services"]),
                lambda i: _json_reply([api._catalog_service_dict(s) for s in api._services_named(name, tags)], index=i),
            )
        if p == "/v1/catalog/nodes":
            return self.blocking(lambda: state.table_index["nodes"], lambda i: _json_reply([api._node_dict()], index=i))
        if p.startswith("/v1/kv/"):
            return self.kv_get(p.removeprefix("/v1/kv/"))
        raise (ApiError(404, "404 page not found") if not self.known_path(p) else ApiError(405, "method not allowed"))

    def catalog_services(self) -> dict[str, list[str]]:
        answer: dict[str, list[str]] = {}
        for service in self.state.services.values():
            tags = answer.setdefault(service.name, [])
            tags.extend(t for t in service.tags if t not in tags)
        return answer

    def render_health_service(self, name: str, index: int) -> Reply:
        api, state = self.api, self.state
        tags = self.query.get("tag", [])
        passing_only = _truthy_flag(self.query, "passing")
        node_checks = [c for c in state.checks.values() if not c.service_id]
        by_service: dict[str, list[CheckRecord]] = {}
        for check in state.checks.values():
            if check.service_name == name and check.service_id:
                by_service.setdefault(check.service_id, []).append(check)
        node = api._node_dict()
        entries = []
        for service in api._services_named(name, tags):
            checks = node_checks + by_service.get(service.service_id, [])
            if passing_only and any(c.synced_status != PASSING for c in checks):
                continue
            entries.append(
                '{"Node":'
                + json.dumps(node, separators=(",", ":"))
                + ',"Service":'
                + json.dumps(api._health_service_dict(service), separators=(",", ":"))
                + ',"Checks":['
                + ",".join(c.health_json() for c in checks)
                + "]}"
            )
        return _raw_json_reply("[" + ",".join(entries) + "]", index=index)

    def kv_get(self, key: str) -> Reply:
        state = self.state
        recurse = _truthy_flag(self.query, "recurse")
        keys_only = "keys" in self.query
        if recurse or keys_only:

            def render_many(index: int) -> Reply:
                entries = sorted((e for k, e in state.kv.items() if k.startswith(key)), key=lambda e: e.key)
                if keys_only:
                    separator = self.param("separator")
                    listed: list[str] = []
                    for entry in entries:
                        cut = entry.key.find(separator, len(key)) if separator else -1
                        listed_key = entry.key[: cut + len(separator)] if cut >= 0 else entry.key
                        if not listed or listed[-1] != listed_key:
                            listed.append(listed_key)
                    if not listed:
                        return Reply(404, b"", index=index)
                    return _json_reply(listed, index=index)
                if not entries:
                    return Reply(404, b"", index=index)
                return _json_reply([e.as_dict() for e in entries], index=index)

            return self.blocking(lambda: state.table_index["kvs"], render_many)

        def render_one(index: int) -> Reply:
            entry = state.kv.get(key)
            if entry is None:
                return Reply(404, b"", index=index)
            if _truthy_flag(self.query, "raw") or ("raw" in self.query and not self.param("raw")):
                return Reply(200, entry.value, content_type="text/plain; charset=utf-8", index=index)
            return _json_reply([entry.as_dict()], index=index)

        # Consul answers with the table's index but only a change to this key wakes the watcher.
        return self.blocking(
            lambda: state.table_index["kvs"], render_one, wake_on=lambda: state.kv_change_index.get(key, 0)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Consul HTTP API stand-in until interrupted.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--node-name", default="standin-node")
    parser.add_argument("--datacenter", default="dc1")
    parser.add_argument("--acl-token", default=None, help="require this X-Consul-Token on every request")
    args = parser.parse_args(argv)
    standin = ConsulStandIn(args.host, args.port, args.node_name, args.datacenter, args.acl_token).start()
    sys.stderr.write(f"Consul stand-in listening on {standin.http_addr} (node {args.node_name})\n")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
