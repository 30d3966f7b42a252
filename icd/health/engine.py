"""The pure transitions engine: previous state + a Consul snapshot -> the alerts to send and the new state.

``evaluate(previous, snapshot, now, config, deploy_windows)`` does no I/O, reads no clock and is tested as
tables; ``watch.py`` is the thin I/O around it.

* **Transitions, per service instance.** An instance's status is the aggregate of its checks
  (``snapshot.aggregate``); the engine alerts when that status changes, naming the failing checks. A check
  that changes while the aggregate stays the same is not an alert.
* **Maintenance** is tracked apart from health: turning it on/off alerts once, and status changes while in
  maintenance are held back until it ends (then the usual diff applies).
* **Flap damping and reminders** come from ``WatchConfig``; ``next_wakeup`` says when one falls due.
* **Restarts and gaps.** The first run (no state) treats every instance as new: passing ones are silent,
  others alert once. Service Meta learnt for an instance is kept in its record, so an instance that
  disappears can still be named with the version it ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from icd.health.config import WatchConfig
from icd.health.snapshot import FailingCheck, HealthSnapshot, InstanceHealth, InstanceStatus, aggregate
from icd.health.windows import DeployWindow
from icd.notify.message import Severity

AlertKind = Literal["status", "appeared", "disappeared", "maintenance_on", "maintenance_off", "reminder"]


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
        if self.kind in ("disappeared", "maintenance_on"):
            return "warning"
        if self.kind == "maintenance_off" or self.status == "passing":
            return "success"
        return "critical" if self.status == "critical" else "warning"


def instance_status(instance: InstanceHealth, config: WatchConfig) -> InstanceStatus:
    return aggregate(instance, config.ignores_check)


def evaluate(
    previous: WatchState,
    snapshot: HealthSnapshot,
    now: datetime,
    config: WatchConfig,
    deploy_windows: Mapping[str, DeployWindow],
    *,
    changed: Collection[str] | None = None,
) -> tuple[list[Alert], WatchState]:
    """Diff ``snapshot`` against ``previous``: the alerts to send and the state to persist. No I/O.

    ``changed`` is a shortcut for a watch that keeps evaluating: when ``previous`` is the state evaluated
    from the snapshot before this one (by this config), ``changed`` names the instances whose checks
    changed, appeared or went away since (``HealthStateParser`` says which). Only those, the records a
    clock can move (a threshold or a reminder falling due) and the instances ``snapshot.meta`` describes
    are looked at; every other record stays as it is, which is what the full diff would find too.
    ``None`` diffs every instance.
    """
    alerts: list[Alert] = []

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

    def step(key: str, instance: InstanceHealth, rec: InstanceRecord | None) -> InstanceRecord:
        current = instance_status(instance, config)
        meta = snapshot.meta.get(key) or (rec.meta if rec is not None else None)
        if rec is None:
            rec = InstanceRecord(
                service_name=instance.service_name,
                node=instance.node,
                service_id=instance.service_id,
                alerted_status=None,
                observed_status=current.status,
                observed_since=now,
                meta=meta,
            )
            if current.maintenance:
                alert("maintenance_on", rec, None, current.status, current.failing)
                rec = dataclasses.replace(rec, maintenance=True, last_alert_at=now)
        else:
            if meta != rec.meta:
                rec = dataclasses.replace(rec, meta=meta)
            if current.status != rec.observed_status:
                rec = dataclasses.replace(rec, observed_status=current.status, observed_since=now)
            if current.maintenance != rec.maintenance:
                kind: AlertKind = "maintenance_on" if current.maintenance else "maintenance_off"
                alert(kind, rec, rec.alerted_status, current.status, current.failing)
                rec = dataclasses.replace(rec, maintenance=current.maintenance, last_alert_at=now)
        if not rec.maintenance:
            rec = _status_step(rec, current.failing, now, config, alert)
        return rec

    if changed is None:
        records: dict[str, InstanceRecord] = {}
        for key, instance in snapshot.instances.items():
            if not config.ignores_instance(instance.service_name, instance.node):
                records[key] = step(key, instance, previous.instances.get(key))
        gone = [rec for key, rec in previous.instances.items() if key not in snapshot.instances]
    else:
        records = dict(previous.instances)
        touched = {*changed, *snapshot.meta}
        touched.update(key for key, rec in previous.instances.items() if _clock_may_move(rec, config))
        for key in [key for key in snapshot.instances if key in touched]:  # in snapshot order, as a full diff
            instance = snapshot.instances[key]
            if config.ignores_instance(instance.service_name, instance.node):
                records.pop(key, None)
            else:
                records[key] = step(key, instance, previous.instances.get(key))
        gone = [records.pop(key) for key in previous.instances if key in touched and key not in snapshot.instances]

    for rec in gone:
        if config.ignores_instance(rec.service_name, rec.node):
            continue
        if rec.alerted_status is not None or rec.maintenance:
            alert("disappeared", rec, rec.alerted_status, "absent", ())
    return alerts, WatchState(instances=records)


def _clock_may_move(rec: InstanceRecord, config: WatchConfig) -> bool:
    """Whether ``_status_step`` could change this record with no change in Consul: a pending threshold or
    a reminder."""
    if rec.maintenance:
        return False
    if rec.observed_status != rec.alerted_status:
        return True
    return config.reminder_interval is not None and rec.alerted_status == "critical" and rec.last_alert_at is not None


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
