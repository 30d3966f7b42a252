"""Consul health watching with transitions-only alerting: snapshot parsing, the pure engine, persistence.

Why not consul-alerts: it waits a fixed change threshold (60 s by default) before it even looks, keeps its
state in memory plus a KV tree without compare-and-swap, and so can lose an alert across a restart or send
it twice from two instances. Here:

* **One request per round.** A round is one blocking query on ``/v1/health/state/any`` with the last
  ``X-Consul-Index``: Consul answers the moment anything changes, so a flip is seen within milliseconds,
  not at the next poll. Service Meta (``artifact_version``, ``commit``, ``deploy_run_id``) is not part of
  that answer; it is fetched lazily with one ``/v1/health/service/:name`` per service that has a transition
  (or is inside a deploy window), and remembered in the persisted state.
* **Transitions, per service instance.** An operator thinks in instances ("web-3 on node-7 is critical
  because `http` and `disk` fail"), not in check rows, so the engine aggregates each instance's checks
  (service checks plus its node's checks) into the worst status and alerts when that status changes,
  naming the failing checks. A check that changes while the aggregate stays the same is not an alert.
  Maintenance mode is tracked apart from health: turning it on/off alerts once, and status changes
  while in maintenance are held back until it ends (then the usual diff applies).
* **The pure engine** ``evaluate(previous, snapshot, now, config, deploy_windows)`` does no I/O, reads no
  clock and is tested as tables. Everything else here is thin I/O around it.

State lives in Consul KV (``icd/health-watch/<watch_name>/state``), not in a Prefect variable, because:
it lives beside the data it describes (a Consul restore brings both back together), it survives Prefect
server resets and database moves, and KV writes take ``?cas=<ModifyIndex>`` so two overlapping runs
cannot both claim the same transition: the loser's write fails, it re-reads the winner's state and finds
nothing left to report. A Prefect variable has no compare-and-swap.

Delivery is at-least-once. Each round that has alerts first writes the new state together with an
*outbox* (the rendered notifications) in ONE CAS write, then sends, then clears the outbox with a second
CAS write. A crash after the first write loses nothing: the next run finds the outbox (older than
``OUTBOX_STALE_SECONDS``), claims it with CAS and re-sends. The price is a possible duplicate, which is
recognisable: every notification carries a dedup key ``kind:node/service_id:from->to@index`` that the
notifier (and a human) can match. Sending before persisting would instead risk a lost alert, and losing
an alert is worse than repeating one.

Restarts and gaps: a new run diffs Consul against the persisted state, so a transition that happened while
no run was watching is reported by the next run, and a restart with nothing changed says nothing. The very
first run (no state yet) treats every instance as new: passing ones are silent, others alert once. Service
Meta learnt for an instance is kept in its state record, so an instance that disappears can still be named
with the version it ran (re-registering the same service ID with new Meta keeps the old record's Meta; with
immutable instances each deploy brings new IDs). The state is compact JSON, zlib-compressed above 256 KiB
so thousands of instances stay under Consul's 512 KiB value limit.

Deploy windows: while a deploy replaces the instances of a service, it writes
``icd/deploy-windows/<service_name>`` (see ``open_deploy_window``). Alerts for instances of that service
still running ``from_version`` are then expected: they say so and go out at severity ``info``.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import json
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import consul
import requests

from tasks.errors import ConsulError, NotificationError
from tasks.notifications import Notification, Severity

HealthStatus = Literal["passing", "warning", "critical"]
AlertKind = Literal["status", "appeared", "disappeared", "maintenance_on", "maintenance_off", "reminder"]

STATUS_RANK: Mapping[str, int] = {"passing": 0, "warning": 1, "critical": 2}
META_KEYS = ("artifact_version", "commit", "deploy_run_id")
NODE_MAINTENANCE_CHECK = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
STATE_KEY_TEMPLATE = "icd/health-watch/{watch_name}/state"
DEPLOY_WINDOW_PREFIX = "icd/deploy-windows/"
# Another run's unsent outbox is taken over only after this long, so a live run is never doubled.
OUTBOX_STALE_SECONDS = 30.0
# Consul's default KV value limit is 512 KiB; above this the state is stored zlib-compressed.
_COMPRESS_ABOVE_BYTES = 256 * 1024
_OUTPUT_MAX = 300
_MAX_CAS_ATTEMPTS = 5


# --- snapshot -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckHealth:
    check_id: str
    name: str
    status: str
    output: str


@dataclass(frozen=True)
class InstanceHealth:
    """One service instance as Consul sees it: its own checks plus the checks of the node it runs on."""

    node: str
    service_id: str
    service_name: str
    checks: tuple[CheckHealth, ...]

    @property
    def key(self) -> str:
        return instance_key(self.node, self.service_id)


@dataclass(frozen=True)
class HealthSnapshot:
    """Everything one ``/v1/health/state/any`` answer says, keyed by ``node/service_id``.

    ``meta`` holds the Service Meta of the instances it was fetched for (usually none of them).
    """

    index: int
    instances: Mapping[str, InstanceHealth]
    meta: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def with_meta(self, meta: Mapping[str, Mapping[str, str]]) -> HealthSnapshot:
        return dataclasses.replace(self, meta={**self.meta, **meta})


def instance_key(node: str, service_id: str) -> str:
    return f"{node}/{service_id}"


def parse_health_state(index: int, entries: Iterable[Mapping[str, Any]]) -> HealthSnapshot:
    """Group the rows of ``/v1/health/state/any`` into instances; node checks apply to every instance."""
    node_checks: dict[str, list[CheckHealth]] = {}
    service_checks: dict[tuple[str, str], list[CheckHealth]] = {}
    service_names: dict[tuple[str, str], str] = {}
    for entry in entries:
        check = CheckHealth(
            check_id=entry["CheckID"],
            name=entry.get("Name") or entry["CheckID"],
            status=entry["Status"],
            output=entry.get("Output") or "",
        )
        node = entry["Node"]
        service_id = entry.get("ServiceID") or ""
        if service_id:
            ident = (node, service_id)
            service_checks.setdefault(ident, []).append(check)
            service_names[ident] = entry.get("ServiceName") or service_id
        else:
            node_checks.setdefault(node, []).append(check)
    instances = {
        instance_key(node, service_id): InstanceHealth(
            node=node,
            service_id=service_id,
            service_name=service_names[(node, service_id)],
            checks=(*checks, *node_checks.get(node, ())),
        )
        for (node, service_id), checks in service_checks.items()
    }
    return HealthSnapshot(index=index, instances=instances)


def parse_service_meta(entries: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """``/v1/health/service/:name`` rows -> the deploy-relevant Service Meta per instance key."""
    meta: dict[str, dict[str, str]] = {}
    for entry in entries:
        service = entry["Service"]
        raw = service.get("Meta") or {}
        meta[instance_key(entry["Node"]["Node"], service["ID"])] = {
            k: str(raw[k]) for k in META_KEYS if raw.get(k) is not None
        }
    return meta


# --- configuration, deploy windows, state ------------------------------------------------------------


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


@dataclass(frozen=True)
class WatchConfig:
    """What to ignore (glob patterns), per-service flap damping and the reminder interval.

    ``thresholds`` maps a service name or glob to seconds a new status must persist before it alerts; an
    exact name wins over globs. ``reminder_interval`` of ``None`` turns reminders off.
    """

    ignore_services: tuple[str, ...] = ()
    ignore_checks: tuple[str, ...] = ()
    ignore_nodes: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    reminder_interval: timedelta | None = timedelta(hours=1)

    def threshold_for(self, service_name: str) -> timedelta:
        seconds = self.thresholds.get(service_name)
        if seconds is None:
            seconds = next(
                (s for pattern, s in self.thresholds.items() if fnmatch.fnmatchcase(service_name, pattern)),
                0.0,
            )
        return timedelta(seconds=seconds)

    def ignores_instance(self, service_name: str, node: str) -> bool:
        return _matches(service_name, self.ignore_services) or _matches(node, self.ignore_nodes)

    def ignores_check(self, check: CheckHealth) -> bool:
        return _matches(check.check_id, self.ignore_checks) or _matches(check.name, self.ignore_checks)


@dataclass(frozen=True)
class DeployWindow:
    deploy_run_id: str
    from_version: str
    to_version: str
    until: datetime

    def covers(self, meta: Mapping[str, str] | None, now: datetime) -> bool:
        return now < self.until and meta is not None and meta.get("artifact_version") == self.from_version

    def to_json(self) -> str:
        return json.dumps(
            {
                "deploy_run_id": self.deploy_run_id,
                "from_version": self.from_version,
                "to_version": self.to_version,
                "until": self.until.astimezone(UTC).isoformat(),
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeployWindow:
        data = json.loads(raw)
        until = datetime.fromisoformat(data["until"].replace("Z", "+00:00"))
        return cls(
            deploy_run_id=str(data["deploy_run_id"]),
            from_version=str(data["from_version"]),
            to_version=str(data["to_version"]),
            until=until if until.tzinfo else until.replace(tzinfo=UTC),
        )


@dataclass(frozen=True)
class FailingCheck:
    check_id: str
    name: str
    status: str
    output: str


@dataclass(frozen=True)
class InstanceRecord:
    """What the watch last knew about an instance.

    ``alerted_status`` is the status operators were last told (``None``: never announced, e.g. a new
    instance still inside its threshold). ``observed_status`` is what Consul says now, ``observed_since``
    when it started saying so; they differ only while a change waits out its threshold.
    """

    service_name: str
    node: str
    service_id: str
    alerted_status: str | None
    observed_status: str
    observed_since: datetime
    maintenance: bool = False
    last_alert_at: datetime | None = None
    meta: Mapping[str, str] | None = None


@dataclass(frozen=True)
class WatchState:
    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    kind: AlertKind
    service_name: str
    service_id: str
    node: str
    previous_status: str | None
    status: str
    failing_checks: tuple[FailingCheck, ...]
    at: datetime
    index: int
    meta: Mapping[str, str] | None = None
    expected_by: DeployWindow | None = None

    @property
    def dedup_key(self) -> str:
        """Same transition, same key: a re-send after a crash is recognisable as the same alert."""
        moment = self.at.strftime("%Y%m%dT%H%M%SZ") if self.kind == "reminder" else str(self.index)
        return f"{self.kind}:{self.node}/{self.service_id}:{self.previous_status}->{self.status}@{moment}"

    @property
    def severity(self) -> Severity:
        if self.expected_by is not None:
            return "info"
        if self.kind == "disappeared" or self.kind == "maintenance_on":
            return "warning"
        if self.kind == "maintenance_off" or self.status == "passing":
            return "success"
        return "critical" if self.status == "critical" else "warning"


# --- the pure engine ----------------------------------------------------------------------------------


def _aggregate(instance: InstanceHealth, config: WatchConfig) -> tuple[str, bool, tuple[FailingCheck, ...]]:
    status_rank = 0
    maintenance = False
    failing: list[FailingCheck] = []
    for check in instance.checks:
        if check.check_id == NODE_MAINTENANCE_CHECK or check.check_id.startswith(SERVICE_MAINTENANCE_PREFIX):
            maintenance = True
            continue
        if config.ignores_check(check):
            continue
        rank = STATUS_RANK.get(check.status, 2)  # anything unknown counts as critical
        if rank:
            failing.append(FailingCheck(check.check_id, check.name, check.status, check.output[:_OUTPUT_MAX]))
        status_rank = max(status_rank, rank)
    status = ("passing", "warning", "critical")[status_rank]
    return status, maintenance, tuple(failing)


def evaluate(
    previous: WatchState,
    snapshot: HealthSnapshot,
    now: datetime,
    config: WatchConfig,
    deploy_windows: Mapping[str, DeployWindow],
) -> tuple[list[Alert], WatchState]:
    """Diff ``snapshot`` against ``previous``: the alerts to send and the state to persist. No I/O."""
    alerts: list[Alert] = []
    records: dict[str, InstanceRecord] = {}

    def alert(
        kind: AlertKind, rec: InstanceRecord, prev: str | None, status: str, failing: tuple[FailingCheck, ...]
    ) -> None:
        window = deploy_windows.get(rec.service_name)
        alerts.append(
            Alert(
                kind=kind,
                service_name=rec.service_name,
                service_id=rec.service_id,
                node=rec.node,
                previous_status=prev,
                status=status,
                failing_checks=failing,
                at=now,
                index=snapshot.index,
                meta=rec.meta,
                expected_by=window if window is not None and window.covers(rec.meta, now) else None,
            )
        )

    for key, instance in snapshot.instances.items():
        if config.ignores_instance(instance.service_name, instance.node):
            continue
        status, maintenance, failing = _aggregate(instance, config)
        rec = previous.instances.get(key)
        meta = snapshot.meta.get(key) or (rec.meta if rec is not None else None)
        if rec is None:
            rec = InstanceRecord(
                service_name=instance.service_name,
                node=instance.node,
                service_id=instance.service_id,
                alerted_status=None,
                observed_status=status,
                observed_since=now,
                meta=meta,
            )
            if maintenance:
                alert("maintenance_on", rec, None, status, failing)
                rec = dataclasses.replace(rec, maintenance=True, last_alert_at=now)
        else:
            if meta != rec.meta:
                rec = dataclasses.replace(rec, meta=meta)
            if status != rec.observed_status:
                rec = dataclasses.replace(rec, observed_status=status, observed_since=now)
            if maintenance != rec.maintenance:
                kind: AlertKind = "maintenance_on" if maintenance else "maintenance_off"
                alert(kind, rec, rec.alerted_status, status, failing)
                rec = dataclasses.replace(rec, maintenance=maintenance, last_alert_at=now)
        if not rec.maintenance:
            rec = _status_step(rec, failing, now, config, alert)
        records[key] = rec

    for key, rec in previous.instances.items():
        if key in snapshot.instances or config.ignores_instance(rec.service_name, rec.node):
            continue
        if rec.alerted_status is not None or rec.maintenance:
            alert("disappeared", rec, rec.alerted_status, "absent", ())
    return alerts, WatchState(instances=records)


class _AlertSink(Protocol):
    def __call__(
        self,
        kind: AlertKind,
        rec: InstanceRecord,
        prev: str | None,
        status: str,
        failing: tuple[FailingCheck, ...],
    ) -> None: ...


def _status_step(
    rec: InstanceRecord,
    failing: tuple[FailingCheck, ...],
    now: datetime,
    config: WatchConfig,
    alert: _AlertSink,
) -> InstanceRecord:
    if rec.observed_status != rec.alerted_status:
        if rec.alerted_status is None and rec.observed_status == "passing":
            return dataclasses.replace(rec, alerted_status="passing")  # a healthy newcomer is not news
        if now - rec.observed_since < config.threshold_for(rec.service_name):
            return rec  # still inside the flap-damping threshold
        kind: AlertKind = "appeared" if rec.alerted_status is None else "status"
        alert(kind, rec, rec.alerted_status, rec.observed_status, failing)
        return dataclasses.replace(rec, alerted_status=rec.observed_status, last_alert_at=now)
    reminder = config.reminder_interval
    if (
        reminder is not None
        and rec.alerted_status == "critical"
        and rec.last_alert_at is not None
        and now - rec.last_alert_at >= reminder
    ):
        alert("reminder", rec, rec.alerted_status, rec.alerted_status, failing)
        return dataclasses.replace(rec, last_alert_at=now)
    return rec


def next_wakeup(state: WatchState, config: WatchConfig) -> datetime | None:
    """When ``evaluate`` would next alert with no change in Consul (a threshold or a reminder falls due)."""
    due: list[datetime] = []
    for rec in state.instances.values():
        if rec.maintenance:
            continue
        if rec.observed_status != rec.alerted_status:
            due.append(rec.observed_since + config.threshold_for(rec.service_name))
        elif (
            config.reminder_interval is not None and rec.alerted_status == "critical" and rec.last_alert_at is not None
        ):
            due.append(rec.last_alert_at + config.reminder_interval)
    return min(due, default=None)


def services_needing_meta(
    previous: WatchState,
    current: WatchState,
    alerts: Sequence[Alert],
    deploy_windows: Mapping[str, DeployWindow],
    now: datetime,
) -> set[str]:
    """Services to describe once: those with an alert lacking meta, and open-window services lacking it.

    The second set records the old version of instances before a deploy removes them, so their
    disappearance can still be recognised as expected.
    """
    needed = {a.service_name for a in alerts if a.meta is None and a.kind != "disappeared"}
    open_windows = {name for name, window in deploy_windows.items() if now < window.until}
    needed.update(
        rec.service_name for rec in current.instances.values() if rec.meta is None and rec.service_name in open_windows
    )
    return needed


# --- rendering ----------------------------------------------------------------------------------------

_TITLES: Mapping[AlertKind, str] = {
    "status": "{service} is {status} on {node}",
    "appeared": "{service}: new instance is {status} on {node}",
    "disappeared": "{service}: instance left {node}",
    "maintenance_on": "{service}: maintenance mode ON on {node}",
    "maintenance_off": "{service}: maintenance mode OFF on {node}",
    "reminder": "{service} is still {status} on {node}",
}


def alert_notification(alert: Alert, deploy_run_url: Callable[[str], str | None] | None = None) -> Notification:
    """The operator message for one alert: what changed, why (failing checks), and which deploy it runs."""
    status = "recovered (passing)" if alert.kind == "status" and alert.status == "passing" else alert.status
    title = _TITLES[alert.kind].format(service=alert.service_name, status=status, node=alert.node)
    lines: list[str] = []
    if alert.expected_by is not None:
        window = alert.expected_by
        lines.append(
            f"_Expected during deploy of {window.from_version} -> {window.to_version} (run {window.deploy_run_id})._"
        )
    if alert.previous_status is not None and alert.kind != "reminder":
        lines.append(f"`{alert.service_id}`: {alert.previous_status} -> {alert.status}")
    lines.extend(
        f"• *{check.name}* (`{check.check_id}`) {check.status}: {check.output or 'no output'}"
        for check in alert.failing_checks
    )
    meta = alert.meta or {}
    fields = {
        "Service": alert.service_name,
        "Instance": alert.service_id,
        "Node": alert.node,
        "Status": alert.status,
        "Version": meta.get("artifact_version", "unknown"),
        "Deploy run": meta.get("deploy_run_id", "unknown"),
    }
    if "commit" in meta:
        fields["Commit"] = meta["commit"]
    run_id = meta.get("deploy_run_id", "")
    link = deploy_run_url(run_id) if deploy_run_url is not None and _is_uuid(run_id) else None
    return Notification(
        title=title,
        text="\n".join(lines) or title,
        severity=alert.severity,
        fields=fields,
        link_url=link,
        link_text="Open deploy run" if link else None,
        dedup_key=alert.dedup_key,
    )


def _is_uuid(value: str) -> bool:
    # Only a Prefect flow run ID makes a working link; other run identifiers are shown as text.
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --- state (de)serialisation --------------------------------------------------------------------------


def _ts(moment: datetime | None) -> float | None:
    return None if moment is None else round(moment.timestamp(), 3)


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def encode_state(state: WatchState, outbox: Sequence[Notification] = (), outbox_since: datetime | None = None) -> bytes:
    records = {
        key: [
            rec.service_name,
            rec.node,
            rec.service_id,
            rec.alerted_status,
            rec.observed_status,
            _ts(rec.observed_since),
            rec.maintenance,
            _ts(rec.last_alert_at),
            dict(rec.meta) if rec.meta is not None else None,
        ]
        for key, rec in state.instances.items()
    }
    document = {
        "version": 1,
        "instances": records,
        "outbox": [dataclasses.asdict(n) | {"fields": dict(n.fields)} for n in outbox],
        "outbox_since": _ts(outbox_since),
    }
    raw = json.dumps(document, separators=(",", ":")).encode()
    if len(raw) > _COMPRESS_ABOVE_BYTES:
        return b"zlib:" + base64.b64encode(zlib.compress(raw, 6))
    return raw


def decode_state(raw: bytes) -> tuple[WatchState, tuple[Notification, ...], datetime | None]:
    if raw.startswith(b"zlib:"):
        raw = zlib.decompress(base64.b64decode(raw[5:]))
    document = json.loads(raw)
    instances: dict[str, InstanceRecord] = {}
    for key, row in document["instances"].items():
        service_name, node, service_id, alerted, observed, since, maintenance, last_alert, meta = row
        observed_since = datetime.fromtimestamp(since, UTC)
        instances[key] = InstanceRecord(
            service_name=service_name,
            node=node,
            service_id=service_id,
            alerted_status=alerted,
            observed_status=observed,
            observed_since=observed_since,
            maintenance=maintenance,
            last_alert_at=_dt(last_alert),
            meta=meta,
        )
    outbox = tuple(Notification(**item) for item in document.get("outbox", ()))
    return WatchState(instances=instances), outbox, _dt(document.get("outbox_since"))


# --- Consul I/O ---------------------------------------------------------------------------------------


def _consul_call(what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return func(*args, **kwargs)
    except (consul.ConsulException, requests.RequestException) as exc:
        raise ConsulError(f"Consul {what} failed: {exc}") from exc


def fetch_health_state(client: consul.Consul, *, index: int, wait_seconds: float) -> HealthSnapshot:
    """One blocking query on ``/v1/health/state/any``; returns at once when ``index`` is 0 or stale."""
    kwargs: dict[str, Any] = {}
    if index > 0:
        kwargs = {"index": str(index), "wait": f"{max(1, int(wait_seconds * 1000))}ms"}
    new_index, entries = _consul_call("health/state query", client.health.state, "any", **kwargs)
    return parse_health_state(int(new_index), entries or ())


def fetch_service_meta(client: consul.Consul, service_name: str) -> dict[str, dict[str, str]]:
    _, entries = _consul_call(f"health/service/{service_name}", client.health.service, service_name)
    return parse_service_meta(entries or ())


def read_deploy_windows(client: consul.Consul) -> dict[str, DeployWindow]:
    _, items = _consul_call("deploy window read", client.kv.get, DEPLOY_WINDOW_PREFIX, recurse=True)
    windows: dict[str, DeployWindow] = {}
    for item in items or ():
        if item.get("Value"):
            try:
                windows[item["Key"][len(DEPLOY_WINDOW_PREFIX) :]] = DeployWindow.from_json(item["Value"])
            except (ValueError, KeyError, TypeError):
                continue  # a malformed window must not stop health alerts; it simply does not apply
    return windows


def open_deploy_window(
    client: consul.Consul,
    service_name: str,
    *,
    deploy_run_id: str,
    from_version: str,
    to_version: str,
    duration: timedelta,
    now: datetime | None = None,
) -> DeployWindow:
    """Mark the replacement of ``service_name`` from ``from_version`` as expected until ``now + duration``."""
    window = DeployWindow(
        deploy_run_id=deploy_run_id,
        from_version=from_version,
        to_version=to_version,
        until=(now or datetime.now(UTC)) + duration,
    )
    if not _consul_call("deploy window write", client.kv.put, DEPLOY_WINDOW_PREFIX + service_name, window.to_json()):
        raise ConsulError(f"Consul refused the deploy window for {service_name}")
    return window


def close_deploy_window(client: consul.Consul, service_name: str, *, deploy_run_id: str | None = None) -> bool:
    """Remove the window; with ``deploy_run_id`` only if it is still that run's. True when one was removed."""
    key = DEPLOY_WINDOW_PREFIX + service_name
    _, item = _consul_call("deploy window read", client.kv.get, key)
    if item is None:
        return False
    if deploy_run_id is not None and item.get("Value"):
        try:
            owner = DeployWindow.from_json(item["Value"]).deploy_run_id
        except (ValueError, KeyError, TypeError):
            owner = None
        if owner != deploy_run_id:
            return False
    return bool(_consul_call("deploy window delete", client.kv.delete, key, cas=item["ModifyIndex"]))


@dataclass(frozen=True)
class StoredState:
    state: WatchState
    outbox: tuple[Notification, ...]
    outbox_since: datetime | None
    modify_index: int  # 0: the key does not exist yet (a CAS of 0 creates it only if still absent)


class HealthStateStore:
    """The watch state in Consul KV, always written with ``?cas=`` against the last read ModifyIndex."""

    def __init__(self, client: consul.Consul, watch_name: str) -> None:
        self.client = client
        self.key = STATE_KEY_TEMPLATE.format(watch_name=watch_name)

    def load(self) -> StoredState:
        _, item = _consul_call("state read", self.client.kv.get, self.key)
        if item is None or not item.get("Value"):
            return StoredState(WatchState(), (), None, int(item["ModifyIndex"]) if item else 0)
        state, outbox, since = decode_state(item["Value"])
        return StoredState(state, outbox, since, int(item["ModifyIndex"]))

    def save(
        self,
        state: WatchState,
        *,
        cas: int,
        outbox: Sequence[Notification] = (),
        outbox_since: datetime | None = None,
    ) -> int | None:
        """Write with CAS; the new ModifyIndex, or ``None`` if another run wrote first."""
        body = encode_state(state, outbox, outbox_since)
        if not _consul_call("state write", self.client.kv.put, self.key, body, cas=cas):
            return None
        _, item = _consul_call("state read", self.client.kv.get, self.key)
        return int(item["ModifyIndex"]) if item is not None else None


# --- the watch loop -----------------------------------------------------------------------------------


class Notifier(Protocol):
    def send(self, notification: Notification) -> object: ...


@dataclass(frozen=True)
class WatchReport:
    rounds: int
    alerts_sent: int
    conflicts: int
    snapshot: HealthSnapshot | None
    state: WatchState


def _send_all(
    notifier: Notifier,
    notifications: Sequence[Notification],
    logger: logging.LoggerAdapter[Any] | logging.Logger,
) -> int:
    sent = 0
    for notification in notifications:
        try:
            notifier.send(notification)
            sent += 1
        except NotificationError as exc:
            # Keep watching: the outbox stays written, and a later run re-sends it.
            logger.error("Could not send %r: %s", notification.title, exc)
            raise
    return sent


def watch(
    client: consul.Consul,
    notifier: Notifier,
    config: WatchConfig,
    window_seconds: float,
    *,
    watch_name: str = "default",
    logger: logging.LoggerAdapter[Any] | logging.Logger | None = None,
    clock: Any = None,
) -> WatchReport:
    """Watch Consul for ``window_seconds``, alert every transition, and persist the state with CAS.

    A plain function (no Prefect context needed) so tests drive it directly; the flow wraps it.
    Raises ``ConsulError`` when Consul fails and ``NotificationError`` when the notifier does (the outbox
    is then already persisted, so the next run re-sends).
    """
    log = logger or logging.getLogger(__name__)
    now_fn = clock or (lambda: datetime.now(UTC))
    store = HealthStateStore(client, watch_name)
    stored = store.load()
    deadline = time.monotonic() + window_seconds
    index = 0
    rounds = alerts_sent = conflicts = 0
    snapshot: HealthSnapshot | None = None
    run_marker = uuid.uuid4().hex[:8]
    # SlackNotifier links to the Prefect UI when configured; any other notifier simply gets no link.
    deploy_run_url = getattr(notifier, "flow_run_url", None)
    log.info("Watching Consul health as %r (run %s) for %.0f s", watch_name, run_marker, window_seconds)

    while True:
        if stored.outbox and (
            stored.outbox_since is None or (now_fn() - stored.outbox_since).total_seconds() >= OUTBOX_STALE_SECONDS
        ):
            claimed = store.save(stored.state, cas=stored.modify_index, outbox=stored.outbox, outbox_since=now_fn())
            if claimed is not None:
                log.warning("Re-sending %d notification(s) left unsent by an earlier run", len(stored.outbox))
                alerts_sent += _send_all(notifier, stored.outbox, log)
                cleared = store.save(stored.state, cas=claimed)
                stored = store.load() if cleared is None else StoredState(stored.state, (), None, cleared)
            else:
                stored = store.load()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        wakeup = next_wakeup(stored.state, config)
        wait = remaining if wakeup is None else min(remaining, max(0.0, (wakeup - now_fn()).total_seconds()))
        fetched = fetch_health_state(client, index=index, wait_seconds=wait)
        rounds += 1
        # Consul's index can go backwards (a restore, a new leader); then start over with a plain read.
        index = fetched.index if fetched.index >= index else 0
        snapshot = fetched
        for _attempt in range(_MAX_CAS_ATTEMPTS):
            now = now_fn()
            alerts, new_state = evaluate(stored.state, snapshot, now, config, {})
            if not alerts and new_state == stored.state:
                break
            windows = read_deploy_windows(client)
            for service_name in sorted(services_needing_meta(stored.state, new_state, alerts, windows, now)):
                snapshot = snapshot.with_meta(fetch_service_meta(client, service_name))
            alerts, new_state = evaluate(stored.state, snapshot, now, config, windows)
            notifications = [alert_notification(a, deploy_run_url) for a in alerts]
            # Another run's unsent outbox is kept as it is: only that run (or a later one) sends it.
            foreign, foreign_since = stored.outbox, stored.outbox_since
            outbox = (*foreign, *notifications)
            written = store.save(new_state, cas=stored.modify_index, outbox=outbox, outbox_since=foreign_since or now)
            if written is None:
                # Another run persisted first and owns whatever it found; diff against its state instead.
                conflicts += 1
                stored = store.load()
                continue
            stored = StoredState(new_state, outbox, (foreign_since or now) if outbox else None, written)
            if notifications:
                for a in alerts:
                    log.info("Alert %s: %s %s -> %s", a.dedup_key, a.service_name, a.previous_status, a.status)
                alerts_sent += _send_all(notifier, notifications, log)
                cleared = store.save(new_state, cas=written, outbox=foreign, outbox_since=foreign_since)
                stored = store.load() if cleared is None else StoredState(new_state, foreign, foreign_since, cleared)
            break
        else:
            raise ConsulError(f"the watch state lost {_MAX_CAS_ATTEMPTS} compare-and-swap races in a row")
    log.info("Watch ended after %d round(s): %d alert(s) sent, %d CAS conflict(s)", rounds, alerts_sent, conflicts)
    return WatchReport(
        rounds=rounds, alerts_sent=alerts_sent, conflicts=conflicts, snapshot=snapshot, state=stored.state
    )


def health_table(snapshot: HealthSnapshot, state: WatchState, config: WatchConfig) -> list[dict[str, str]]:
    """Rows for the Prefect table artifact: one per watched instance, worst first."""
    rows: list[dict[str, str]] = []
    for key, instance in snapshot.instances.items():
        if config.ignores_instance(instance.service_name, instance.node):
            continue
        status, maintenance, failing = _aggregate(instance, config)
        rec = state.instances.get(key)
        meta = (rec.meta if rec is not None else None) or {}
        rows.append(
            {
                "service": instance.service_name,
                "instance": instance.service_id,
                "node": instance.node,
                "status": "maintenance" if maintenance else status,
                "failing_checks": ", ".join(c.name for c in failing),
                "version": meta.get("artifact_version", ""),
            }
        )
    rank = {"critical": 0, "warning": 1, "maintenance": 2, "passing": 3}
    rows.sort(key=lambda r: (rank[r["status"]], r["service"], r["node"], r["instance"]))
    return rows
