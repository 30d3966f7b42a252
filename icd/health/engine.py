"""The pure transitions engine: previous state + a Consul snapshot -> the alerts to send and the new state.

``evaluate(previous, snapshot, now, config, deploy_windows)`` does no I/O, reads no clock and is tested as
tables; ``watch.py`` is the thin I/O around it.

* **Transitions, per service instance.** An instance's status is the aggregate of its checks
  (``snapshot.aggregate``); every change of that status is an alert (a Prefect event, for the record),
  naming the failing checks. A check that changes while the aggregate stays the same is not an alert.
* **Damping: what operators are told.** An alert is *announced* (a Slack message) or *damped* (recorded
  only). A change away from passing is announced at once; a return to passing only once it has held for
  ``recovery_hold``, so a check that bounces back is one incident. ``flap_changes`` changes within
  ``flap_window`` make the instance *flapping*: one "flapping" alert with the count and the span, every
  further change damped, until no change for ``stable_after`` ("settled": stable again). A status announced
  after being held back is a "settled" alert too. Per-service ``thresholds`` hold back any change.
* **One page per incident.** An incident runs from the first change away from passing to the announcement
  of passing again. Its first critical alert outside a deploy window carries ``page`` (the automation that
  pages matches that label); later ones, reminders included, don't.
* **Maintenance** is tracked apart from health: turning it on/off alerts once, and status changes while in
  maintenance are held back until it ends (then what operators were told is compared with what is).
* **Flap damping and reminders** run on the clock; ``next_wakeup`` says when one falls due.
* **Silences and acknowledgements** (``silences.py``, handed in as a ``Hush``): an alert a silence matches
  is still an alert (an event) but is not sent and never pages, so its incident can still page once the
  silence ends. An acknowledged instance gets no reminders, and its alerts name who took it.
* **Restarts and gaps.** The first run (no state) treats every instance as new: passing ones are silent,
  others alert once. Service Meta learnt for an instance is kept in its record, so an instance that
  disappears can still be named with the version it ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol

from icd.health.config import WatchConfig
from icd.health.snapshot import (
    FailingCheck,
    HealthSnapshot,
    InstanceHealth,
    InstanceStatus,
    aggregate,
    instance_key,
)
from icd.health.windows import DeployWindow
from icd.notify.message import Severity

AlertKind = Literal[
    "status", "appeared", "disappeared", "maintenance_on", "maintenance_off", "reminder", "flapping", "settled"
]


class Hush(Protocol):
    """What silences and acknowledgements say about an alert (``silences.SilenceBook``)."""

    def silencing(self, service: str, node: str, failing: Sequence[FailingCheck], now: datetime) -> str | None:
        """The id of an active silence matching the alert, or None."""
        ...

    def acknowledged_by(self, instance: str) -> str | None:
        """Who took the current incident of the instance (``node/service_id``), or None."""
        ...


class _NoHush:
    def silencing(self, service: str, node: str, failing: Sequence[FailingCheck], now: datetime) -> str | None:
        return None

    def acknowledged_by(self, instance: str) -> str | None:
        return None


NO_HUSH: Hush = _NoHush()


@dataclass(frozen=True)
class InstanceRecord:
    """What the watch last knew about an instance.

    ``alerted_status`` is the status operators were last told (``None``: never announced, e.g. a new
    instance still inside its threshold). ``observed_status`` is what Consul says now, ``observed_since``
    when it started saying so; they differ while a change is held back (a recovery, a threshold) or while
    the instance flaps. ``recent_changes`` are the times of its last few status changes (at most
    ``flap_changes``, within ``flap_window``); ``flapping_since`` is the first change of the burst that made
    it flap and ``flap_changes`` the changes counted since; ``paged`` says whether this incident has paged.
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
    recent_changes: tuple[datetime, ...] = ()
    flapping_since: datetime | None = None
    flap_changes: int = 0
    paged: bool = False


@dataclass(frozen=True)
class WatchState:
    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class FlapSummary:
    """A burst of status changes of one instance: how many, from the first to the last."""

    changes: int
    first: datetime
    last: datetime

    @property
    def span(self) -> timedelta:
        return self.last - self.first


@dataclass(frozen=True)
class Alert:
    """One thing the watch saw. ``damped``: recorded (an event), not announced to operators; ``page``: the
    alert that pages for its incident; ``flap``: the burst a flapping, settled or reminder alert is about;
    ``status_since``: when a settled status began; ``silenced_by``: the silence that keeps it from being sent
    and from paging; ``acknowledged_by``: who took the incident."""

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
    damped: bool = False
    page: bool = False
    flap: FlapSummary | None = None
    status_since: datetime | None = None
    silenced_by: str | None = None
    acknowledged_by: str | None = None

    @property
    def dedup_key(self) -> str:
        """Same transition, same key: a re-send after a crash is recognisable as the same alert."""
        # Alerts due on the clock may share a snapshot index with another round: they are keyed by time.
        moment = self.at.strftime("%Y%m%dT%H%M%SZ") if self.kind in ("reminder", "settled") else str(self.index)
        return f"{self.kind}:{self.node}/{self.service_id}:{self.previous_status}->{self.status}@{moment}"

    @property
    def announced(self) -> bool:
        """Whether operators get a message: not damped, not expected by a deploy (its gate tells them), not
        silenced."""
        return not self.damped and self.expected_by is None and self.silenced_by is None

    @property
    def severity(self) -> Severity:
        if self.expected_by is not None:
            return "info"
        if self.kind in ("disappeared", "maintenance_on", "flapping"):
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
    hush: Hush = NO_HUSH,
) -> tuple[list[Alert], WatchState]:
    """Diff ``snapshot`` against ``previous``: the alerts to send and the state to persist. No I/O.

    ``changed`` is a shortcut for a watch that keeps evaluating: when ``previous`` is the state evaluated
    from the snapshot before this one (by this config), ``changed`` names the instances whose checks
    changed, appeared or went away since (``HealthStateParser`` says which). Only those, the records a
    clock can move (a hold, a flap settling or a reminder falling due) and the instances ``snapshot.meta``
    describes are looked at; every other record stays as it is, which is what the full diff would find too.
    ``None`` diffs every instance. ``hush`` says which alerts are silenced and which incidents are taken.
    """
    alerts: list[Alert] = []

    def expected_by(rec: InstanceRecord) -> DeployWindow | None:
        window = deploy_windows.get(rec.service_name)
        covered = window is not None and window.covers(rec.meta, now, instance_key(rec.node, rec.service_id))
        return window if covered else None

    def alert(
        kind: AlertKind,
        rec: InstanceRecord,
        prev: str | None,
        status: str,
        failing: tuple[FailingCheck, ...],
        *,
        damped: bool = False,
        page: bool = False,
        flap: FlapSummary | None = None,
    ) -> Alert:
        expected = expected_by(rec)
        silenced = hush.silencing(rec.service_name, rec.node, failing, now)
        made = Alert(
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
            expected_by=expected,
            damped=damped,
            page=page and expected is None and silenced is None,  # a deploy's own, or silenced: never pages
            flap=flap,
            status_since=rec.observed_since if kind == "settled" else None,
            silenced_by=silenced,
            acknowledged_by=hush.acknowledged_by(instance_key(rec.node, rec.service_id)),
        )
        alerts.append(made)
        return made

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
                return dataclasses.replace(rec, maintenance=True, last_alert_at=now)
            return _on_change(rec, None, current.failing, now, config, alert, expected=expected_by(rec) is not None)
        if meta != rec.meta:
            rec = dataclasses.replace(rec, meta=meta)
        observed_before = rec.observed_status
        if current.status != rec.observed_status:
            rec = dataclasses.replace(rec, observed_status=current.status, observed_since=now)
        maintenance_ended = rec.maintenance and not current.maintenance
        if current.maintenance != rec.maintenance:
            kind: AlertKind = "maintenance_on" if current.maintenance else "maintenance_off"
            alert(kind, rec, rec.alerted_status, current.status, current.failing)
            rec = dataclasses.replace(rec, maintenance=current.maintenance, last_alert_at=now)
        if rec.maintenance:
            return rec  # changes are held back while in maintenance
        if maintenance_ended:
            # What changed during maintenance is one change: from what operators were told to what is.
            if rec.observed_status != rec.alerted_status:
                expected = expected_by(rec) is not None
                return _on_change(rec, rec.alerted_status, current.failing, now, config, alert, expected=expected)
        elif rec.observed_status != observed_before:
            expected = expected_by(rec) is not None
            return _on_change(rec, observed_before, current.failing, now, config, alert, expected=expected)
        taken = hush.acknowledged_by(key) is not None
        return _on_clock(rec, current.failing, now, config, alert, acknowledged=taken)

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
    """Whether ``_on_clock`` could change this record with no change in Consul: a held-back change, a
    flap that may settle, or a reminder."""
    if rec.maintenance:
        return False
    if rec.flapping_since is not None or rec.observed_status != rec.alerted_status:
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
        *,
        damped: bool = False,
        page: bool = False,
        flap: FlapSummary | None = None,
    ) -> Alert: ...


def _on_change(
    rec: InstanceRecord,
    previous: str | None,
    failing: tuple[FailingCheck, ...],
    now: datetime,
    config: WatchConfig,
    alert: _AlertSink,
    *,
    expected: bool,
) -> InstanceRecord:
    """The instance's status just changed from ``previous`` (``None``: first seen) to ``rec.observed_status``:
    record it, and announce it unless damping holds it back. A change a deploy ``expected`` is never held: it
    is recorded, not told, either way, and a hold would tell it once the deploy's window has closed."""
    status = rec.observed_status
    kind: AlertKind = "appeared" if previous is None else "status"
    if previous is None and status == "passing":
        return dataclasses.replace(rec, alerted_status="passing")  # a healthy newcomer is not news
    recent = _recent_changes(rec.recent_changes, now, config)
    rec = dataclasses.replace(rec, recent_changes=recent)
    # A failure pages once per incident, at once, unless the service's threshold holds it back.
    pages = status == "critical" and not rec.paged and config.threshold_for(rec.service_name) <= timedelta(0)
    if rec.flapping_since is not None:
        seen = alert(kind, rec, previous, status, failing, damped=True, page=pages)
        return dataclasses.replace(rec, flap_changes=rec.flap_changes + 1, paged=rec.paged or seen.page)
    if config.flap_changes > 0 and len(recent) >= config.flap_changes:
        seen = alert(kind, rec, previous, status, failing, damped=True, page=pages)
        rec = dataclasses.replace(
            rec, flapping_since=recent[0], flap_changes=len(recent), paged=rec.paged or seen.page, last_alert_at=now
        )
        alert("flapping", rec, rec.alerted_status, status, failing, flap=FlapSummary(len(recent), recent[0], now))
        return rec
    if rec.alerted_status is None and status == "passing":
        # A newcomer held back by its threshold became healthy before anyone was told: still not news.
        alert(kind, rec, previous, status, failing, damped=True)
        return dataclasses.replace(rec, alerted_status="passing")
    if status == rec.alerted_status and not pages:
        # Back to what operators were told (a recovery that did not hold): nothing new to tell.
        alert(kind, rec, previous, status, failing, damped=True)
        return rec
    if not expected and now - rec.observed_since < config.hold_for(rec.service_name, status):
        alert(kind, rec, previous, status, failing, damped=True)  # announced as "settled" once it held
        return rec
    return _announced(rec, alert(kind, rec, previous, status, failing, page=pages), now)


def _on_clock(
    rec: InstanceRecord,
    failing: tuple[FailingCheck, ...],
    now: datetime,
    config: WatchConfig,
    alert: _AlertSink,
    *,
    acknowledged: bool = False,
) -> InstanceRecord:
    """No change in Consul: announce what has held long enough (a flap settling, a held-back change), remind
    (unless someone took the incident)."""
    status = rec.observed_status
    pages = status == "critical" and not rec.paged
    reminder = None if acknowledged else config.reminder_interval
    reminder_due = reminder is not None and rec.last_alert_at is not None and now - rec.last_alert_at >= reminder
    if rec.flapping_since is not None:
        burst = FlapSummary(rec.flap_changes, rec.flapping_since, rec.observed_since)
        if now - rec.observed_since >= config.stable_after:
            settled = alert("settled", rec, rec.alerted_status, status, failing, page=pages, flap=burst)
            rec = dataclasses.replace(rec, flapping_since=None, flap_changes=0, recent_changes=())
            return _announced(rec, settled, now)
        if reminder_due:
            alert("reminder", rec, rec.alerted_status, status, failing, flap=burst)
            return dataclasses.replace(rec, last_alert_at=now)
        return rec
    if status != rec.alerted_status:
        if now - rec.observed_since < config.hold_for(rec.service_name, status):
            return rec
        return _announced(rec, alert("settled", rec, rec.alerted_status, status, failing, page=pages), now)
    if reminder_due and rec.alerted_status == "critical":
        alert("reminder", rec, rec.alerted_status, rec.alerted_status, failing)
        return dataclasses.replace(rec, last_alert_at=now)
    return rec


def _announced(rec: InstanceRecord, told: Alert, now: datetime) -> InstanceRecord:
    """Operators now know ``told.status``; passing ends the incident, so the next failure pages again."""
    paged = False if told.status == "passing" else rec.paged or told.page
    return dataclasses.replace(rec, alerted_status=told.status, last_alert_at=now, paged=paged)


def _recent_changes(changes: tuple[datetime, ...], now: datetime, config: WatchConfig) -> tuple[datetime, ...]:
    """The change times that can still make a flap: within ``flap_window``, the last ``flap_changes``."""
    if config.flap_changes <= 0:
        return ()
    kept = tuple(moment for moment in changes if now - moment < config.flap_window)
    return (*kept, now)[-config.flap_changes :]


def next_wakeup(state: WatchState, config: WatchConfig, acknowledged: Collection[str] = ()) -> datetime | None:
    """When ``evaluate`` would next alert with no change in Consul: a held-back change, a flap settling or a
    reminder falls due (none for the ``acknowledged`` instances)."""
    due: list[datetime] = []
    for key, rec in state.instances.items():
        if rec.maintenance:
            continue
        reminder = None if key in acknowledged else config.reminder_interval
        if rec.flapping_since is not None:
            due.append(rec.observed_since + config.stable_after)
            if reminder is not None and rec.last_alert_at is not None:
                due.append(rec.last_alert_at + reminder)
        elif rec.observed_status != rec.alerted_status:
            due.append(rec.observed_since + config.hold_for(rec.service_name, rec.observed_status))
        elif reminder is not None and rec.alerted_status == "critical" and rec.last_alert_at is not None:
            due.append(rec.last_alert_at + reminder)
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
