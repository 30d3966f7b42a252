"""The health watch loop: blocking queries on Consul, the engine, the CAS-written state, delivery.

Why not consul-alerts: it waits a fixed change threshold (60 s by default) before it even looks, keeps its
state in memory plus a KV tree without compare-and-swap, and so can lose an alert across a restart or send
it twice from two instances. Here:

* **One request per round.** A round is one blocking query on ``/v1/health/state/any`` with the last
  ``X-Consul-Index``: Consul answers the moment anything changes, so a flip is seen within milliseconds.
  Under churn the answer is still every row, but only the rows whose ``ModifyIndex`` moved are parsed
  again and only their instances (plus the records a clock can move) are evaluated (``HealthStateParser``,
  ``evaluate(changed=...)``), so a round costs about the JSON decoding of the answer, not ten thousand
  objects rebuilt and diffed.
  Service Meta (``artifact_version``, ``commit``, ``deploy_run_id``) is not part of that answer; it is
  fetched lazily with one ``/v1/health/service/:name`` per service that has a transition (or is inside a
  deploy window), and remembered in the persisted state.
* **Exactly one owner per transition.** The new state is written with CAS (``state.py``) before anything
  is sent; a run that loses the swap re-reads the winner's state and finds nothing left to report.
* **At-least-once delivery.** A round with alerts writes the new state together with an *outbox* (the
  rendered notifications) in ONE CAS write, then sends, then removes what it sent. A crash or a Slack
  outage in between loses nothing: the outbox is re-sent once it is older than ``OUTBOX_STALE_SECONDS``,
  by this run or the next, under the same dedup key ``kind:node/service_id:from->to@index``. Sending
  before persisting would risk a lost alert, and losing an alert is worse than repeating one.
* **No blind gap between scheduled runs.** A scheduled run announces itself once it watches, and past its
  window watches on until a newer run has (``handover.py``), so a late start of the next run is covered.
* **Expected transitions are recorded, not paged.** Alerts covered by an open deploy window (``windows.py``)
  go to ``on_alerts`` (the flow turns every alert into a Prefect event) but not to the notifier: the
  deploy's health gate sends the one message about it.
* **Damped transitions are recorded, not sent,** the same way: a recovery still inside its hold, each change
  of a flapping instance (``engine.py``). Every change is an event; operators get the announcements.
* **Silenced transitions are recorded, not sent, and page no one** (``silences.py``). The silence book is
  read again before every round that has alerts (as the deploy windows are), so a silence or an
  acknowledgement counts from the next transition on. The watch ends what is due (a silence whose time is
  up, an until-recovered one whose instances pass again, an acknowledgement whose incident is over) with
  CAS on the book, and its end notice goes through the outbox like an alert. The book is read once as a
  run starts, so a quiet round stays one request: the end of a timed silence is told on time when the run
  has read it, and otherwise by the next run (the schedule's, within 10 minutes) or the next round with
  alerts, whichever comes first.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import consul

from icd.errors import ConsulError, NotificationError
from icd.health.config import WatchConfig
from icd.health.consul import consul_call
from icd.health.engine import Alert, WatchState, evaluate, next_wakeup, services_needing_meta
from icd.health.handover import OVERTIME_POLL_SECONDS, HandOver
from icd.health.render import alert_notification
from icd.health.silence_store import SilenceStore
from icd.health.silences import SilenceBook, close, due, ended_notification
from icd.health.snapshot import HealthSnapshot, HealthStateParser, parse_service_meta
from icd.health.state import HealthStateStore, StoredState
from icd.health.windows import read_deploy_windows
from icd.notify.message import Notification, Sender

# An unsent outbox is (re)sent once it is this old: a live run that just wrote it is never doubled.
OUTBOX_STALE_SECONDS = 30.0
# The longest one blocking query waits (Consul caps ?wait at 10 minutes).
MAX_QUERY_WAIT_SECONDS = 300.0
_MAX_CAS_ATTEMPTS = 5
# After a failed attempt to end a due silence, it is not woken for again for this long (no spinning).
SILENCES_RETRY_SECONDS = 60.0
_UNDER_CONSUL_JITTER = 16 / 17  # a wait of w comes back within w * 17/16

Logger = logging.LoggerAdapter[Any] | logging.Logger


def query_health_state(client: consul.Consul, *, index: int, wait_seconds: float) -> tuple[int, list[Any]]:
    """One blocking query on ``/v1/health/state/any``: its ``X-Consul-Index`` and rows; returns at once when
    ``index`` is 0 or stale."""
    kwargs: dict[str, Any] = {}
    if index > 0:
        kwargs = {"index": str(index), "wait": f"{max(1, int(wait_seconds * 1000))}ms"}
    new_index, entries = consul_call("query health state", client.health.state, "any", **kwargs)
    return int(new_index), list(entries or ())


def fetch_service_meta(client: consul.Consul, service_name: str) -> dict[str, dict[str, str]]:
    _, entries = consul_call(f"describe service {service_name}", client.health.service, service_name)
    return parse_service_meta(entries or ())


@dataclass(frozen=True)
class WatchReport:
    rounds: int
    alerts_sent: int
    alerts_recorded: int  # damped, silenced, or expected during a deploy: recorded, not sent
    conflicts: int
    snapshot: HealthSnapshot | None
    state: WatchState
    overtime_seconds: float = 0.0  # watched past the window, until the next run took over
    silences: SilenceBook | None = None  # the silence book as last read


class _Delivery:
    """Sends the outbox and removes what was sent, with CAS; a failed send stays for a later attempt."""

    def __init__(self, store: HealthStateStore, sender: Sender, log: Logger, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.sender = sender
        self.log = log
        self.clock = clock
        self.sent = 0

    def send(self, notifications: Sequence[Notification], stored: StoredState) -> StoredState:
        """Post, then remove what was posted from the outbox of ``stored`` (the state as last written)."""
        return self.remove(self.post(notifications), stored)

    def post(self, notifications: Sequence[Notification]) -> set[str | None]:
        """Post each notification; the dedup keys of those Slack took."""
        delivered: set[str | None] = set()
        for notification in notifications:
            try:
                self.sender.send(notification)
            except NotificationError as exc:
                # Keep watching: the outbox stays written and is re-sent once it is stale.
                self.log.error("Could not send %r (kept for a later attempt): %s", notification.title, exc)
                continue
            delivered.add(notification.dedup_key)
            self.sent += 1
        return delivered

    def remove(self, delivered: set[str | None], stored: StoredState) -> StoredState:
        for attempt in range(_MAX_CAS_ATTEMPTS):
            if attempt:
                stored = self.store.load()  # another writer came in between: remove from what it wrote
            if not delivered:
                return stored
            left = tuple(n for n in stored.outbox if n.dedup_key not in delivered)
            if left == stored.outbox:
                return stored
            result = self.store.save(
                stored.state, cas=stored.modify_index, outbox=left, outbox_since=stored.outbox_since if left else None
            )
            if result.written:
                return (
                    self.store.load()
                    if result.modify_index is None
                    else StoredState(stored.state, left, stored.outbox_since if left else None, result.modify_index)
                )
        raise ConsulError(f"the watch state lost {_MAX_CAS_ATTEMPTS} compare-and-swap races in a row")

    def enqueue(self, notifications: Sequence[Notification], stored: StoredState) -> StoredState:
        """Add to the outbox (with CAS, so a crash before sending loses nothing), then send."""
        for attempt in range(_MAX_CAS_ATTEMPTS):
            if attempt:
                stored = self.store.load()
            outbox = (*stored.outbox, *notifications)
            since = stored.outbox_since or self.clock()
            result = self.store.save(stored.state, cas=stored.modify_index, outbox=outbox, outbox_since=since)
            if result.written:
                saved = (
                    StoredState(stored.state, outbox, since, result.modify_index)
                    if result.modify_index is not None
                    else self.store.load()
                )
                return self.send(notifications, saved)
        raise ConsulError(f"the watch state lost {_MAX_CAS_ATTEMPTS} compare-and-swap races in a row")

    def flush_stale(self, stored: StoredState) -> StoredState:
        """Claim and send an outbox that nobody sent for ``OUTBOX_STALE_SECONDS`` (a crash, an outage)."""
        now = self.clock()
        if not stored.outbox or (
            stored.outbox_since is not None and (now - stored.outbox_since).total_seconds() < OUTBOX_STALE_SECONDS
        ):
            return stored
        claimed = self.store.save(stored.state, cas=stored.modify_index, outbox=stored.outbox, outbox_since=now)
        if not claimed.written:
            return self.store.load()
        self.log.warning("Sending %d notification(s) left unsent earlier", len(stored.outbox))
        if claimed.modify_index is None:
            return self.send(stored.outbox, self.store.load())
        return self.send(
            stored.outbox, dataclasses.replace(stored, outbox_since=now, modify_index=claimed.modify_index)
        )


class _Silences:
    """The silence book as last read, re-read before a round with alerts; ends what is due."""

    def __init__(
        self,
        client: consul.Consul,
        watch_name: str,
        log: Logger,
        on_change: Callable[[SilenceBook], None] | None = None,
    ) -> None:
        self.store = SilenceStore(client)
        self.watch_name = watch_name
        self.log = log
        self.on_change = on_change
        self.book = SilenceBook()
        self._quiet_until = 0.0  # after a failed close, no wake-up for a due end until this (monotonic) time

    def refresh(self) -> SilenceBook:
        try:
            self.book = self.store.load().book
        except ConsulError as exc:
            # A broken book must not stop alerts: the last one read still applies (none: everything pages).
            self.log.error("Could not read the silences (the last read still applies): %s", exc)
        return self.book

    def close_due(self, state: WatchState, now: datetime) -> list[Notification]:
        """End what is due, with CAS on the book; the end notices this run now owns."""
        if not due(self.book, state.instances, now, watch=self.watch_name):
            return []
        try:
            self.book, endings = self.store.change(
                lambda book: close(book, state.instances, now, watch=self.watch_name)
            )
        except ConsulError as exc:
            self.log.error("Could not end the silences that are due (tried again later): %s", exc)
            self._quiet_until = time.monotonic() + SILENCES_RETRY_SECONDS
            return []
        if endings:
            self.log.info("Silence(s) ended: %s", ", ".join(f"{e.silence.id} ({e.why})" for e in endings))
            _observe(self.on_change, self.book, self.log, "the silences")
        return [ended_notification(ending.silence, ending.why) for ending in endings]

    def wakeup(self) -> datetime | None:
        """When the next timed silence ends (to tell it on time); None right after a failed attempt, so a book
        that can't be written does not make the watch spin."""
        return None if time.monotonic() < self._quiet_until else self.book.next_end()


def _observe(observer: Callable[[SilenceBook], None] | None, book: SilenceBook, log: Logger, what: str) -> None:
    if observer is None:
        return
    try:
        observer(book)
    except Exception:  # an observer (the UI's table) must never stop the watch
        log.exception("Could not report %s to the observer", what)


class _Overtime:
    """Whether a run whose window is over watches on: only until the next scheduled run is watching.

    Consul (the successor) and Prefect (the schedule) are asked at most once per ``OVERTIME_POLL_SECONDS``:
    under churn a round comes every ``min_round_seconds``, and each need not cost two more requests.
    """

    def __init__(self, hand_over: HandOver | None, log: Logger) -> None:
        self.hand_over = hand_over
        self.log = log
        self.seconds: float | None = None  # None until the window is over and this run watches on
        self._asked_at = 0.0  # the overtime at which the successor and the schedule were last asked

    def watch_on(self, overtime: float) -> bool:
        hand_over = self.hand_over
        if hand_over is None:
            return False
        due = self.seconds is None or overtime - self._asked_at >= OVERTIME_POLL_SECONDS
        if due:
            self._asked_at = overtime
            successor = hand_over.successor()
            if successor is not None:
                if self.seconds is not None:
                    self.log.info("Run %s is watching now: handed over after %.1f s of overtime", successor, overtime)
                return False
        if overtime >= hand_over.max_overtime_seconds:
            self.log.warning(
                "No newer run took over within %.0f s after the window: stopping; the next run reports what "
                "changed meanwhile",
                hand_over.max_overtime_seconds,
            )
            return False
        if due and not hand_over.successor_expected():
            self.log.info("No next run is expected (the deployment is paused or has no active schedule): stopping")
            return False
        if self.seconds is None:
            self.log.info(
                "Window over and no newer run is watching yet: watching on until one is (at most %.0f s)",
                hand_over.max_overtime_seconds,
            )
        self.seconds = overtime
        return True


def watch(
    client: consul.Consul,
    sender: Sender,
    config: WatchConfig,
    window_seconds: float,
    *,
    watch_name: str = "default",
    logger: Logger | None = None,
    clock: Callable[[], datetime] | None = None,
    deploy_run_url: Callable[[str], str | None] | None = None,
    on_alerts: Callable[[Sequence[Alert]], None] | None = None,
    stop: threading.Event | None = None,
    max_wait_seconds: float = MAX_QUERY_WAIT_SECONDS,
    min_round_seconds: float = 0.0,
    hand_over: HandOver | None = None,
    on_silences: Callable[[SilenceBook], None] | None = None,
) -> WatchReport:
    """Watch Consul for ``window_seconds`` (or until ``stop`` is set), record every transition, send what
    damping lets through, and persist the state with CAS. With ``hand_over`` (a scheduled run), announce this
    run once it watches and, past the window, watch on until a newer run has announced itself (``handover.py``).

    A plain function (no Prefect context needed) so tests drive it directly; the flow wraps it. One blocking
    query waits at most ``max_wait_seconds``, which bounds how long ``stop`` takes to be noticed. Raises
    ``ConsulError`` when Consul fails; a notifier failure is logged and the alert stays in the outbox.
    ``on_silences`` is told the silence book whenever this watch ends a silence.
    """
    log = logger or logging.getLogger(__name__)
    now_fn = clock or (lambda: datetime.now(UTC))
    store = HealthStateStore(client, watch_name)
    delivery = _Delivery(store, sender, log, now_fn)
    parser = HealthStateParser()
    stored = store.load()
    # The state evaluated from the last snapshot: while ``stored.state`` is this very object, the next round
    # need only look at the instances that changed. Any state read back from Consul is diffed in full.
    evaluated: WatchState | None = None
    deadline = time.monotonic() + window_seconds
    index = 0
    rounds = recorded = conflicts = 0
    snapshot: HealthSnapshot | None = None
    overtime = _Overtime(hand_over, log)
    silences = _Silences(client, watch_name, log, on_silences)
    silences.refresh()
    run_name = hand_over.run_id if hand_over is not None else uuid.uuid4().hex[:8]
    log.info("Watching Consul health as %r (run %s) for %.0f s", watch_name, run_name, window_seconds)

    pace = stop or threading.Event()  # waited on between rounds; set only by the caller, to stop
    last_round = -min_round_seconds
    while True:
        stored = delivery.flush_stale(stored)
        if (spacing := last_round + min_round_seconds - time.monotonic()) > 0:
            pace.wait(spacing)
        if stop is not None and stop.is_set():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if not overtime.watch_on(-remaining):
                break
            remaining = OVERTIME_POLL_SECONDS
        wakeups = [
            moment
            for moment in (next_wakeup(stored.state, config, silences.book.acknowledgements), silences.wakeup())
            if moment is not None
        ]
        wakeup = min(wakeups, default=None)
        wait = min(remaining, max_wait_seconds)
        if wakeup is not None:
            # Consul adds up to wait/16 to a blocking query (jitter): ask for less, so a due hold, flap end or
            # reminder is not up to 19 s late; a query that comes back early just waits out the rest.
            wait = min(wait, max(0.0, (wakeup - now_fn()).total_seconds()) * _UNDER_CONSUL_JITTER)
        last_round = time.monotonic()
        new_index, entries = query_health_state(client, index=index, wait_seconds=wait)
        rounds += 1
        # Consul's index can go backwards (a restore, a new leader); then start over with a plain read.
        index = new_index if new_index >= index else 0
        parsed = parser.parse(new_index, entries)
        snapshot = parsed.snapshot
        changed = parsed.changed if stored.state is evaluated else None
        for _attempt in range(_MAX_CAS_ATTEMPTS):
            now = now_fn()
            alerts, new_state = evaluate(stored.state, snapshot, now, config, {}, changed=changed, hush=silences.book)
            if not alerts and new_state == stored.state:
                evaluated = stored.state
                break
            windows = read_deploy_windows(client)
            hush = silences.refresh()
            for service_name in sorted(services_needing_meta(stored.state, new_state, alerts, windows, now)):
                snapshot = snapshot.with_meta(fetch_service_meta(client, service_name))
            alerts, new_state = evaluate(stored.state, snapshot, now, config, windows, changed=changed, hush=hush)
            to_send = [alert_notification(a, deploy_run_url, watch=watch_name) for a in alerts if a.announced]
            # Another run's unsent outbox is kept as it is; it is sent once stale.
            outbox = (*stored.outbox, *to_send)
            since = stored.outbox_since or (now if outbox else None)
            # With alerts to send, the new ModifyIndex is read back after posting them: the won CAS already
            # makes them ours, and the read-back is one round trip an operator need not wait for.
            result = store.save(
                new_state, cas=stored.modify_index, outbox=outbox, outbox_since=since, confirm=not to_send
            )
            if not result.written:
                # Another run persisted first and owns whatever it found; diff against its state instead.
                conflicts += 1
                stored = store.load()
                changed = None
                continue
            evaluated = new_state
            _report(alerts, log, on_alerts)
            recorded += len(alerts) - len(to_send)
            delivered = delivery.post(to_send)
            if to_send and result.writer is not None:  # saved unconfirmed (above): read the index back now
                result = store.confirm(result.writer)
            stored = (
                StoredState(new_state, outbox, since, result.modify_index)
                if result.modify_index is not None
                else store.load()
            )
            stored = delivery.remove(delivered, stored)
            break
        else:
            raise ConsulError(f"the watch state lost {_MAX_CAS_ATTEMPTS} compare-and-swap races in a row")
        if notices := silences.close_due(stored.state, now_fn()):
            stored = delivery.enqueue(notices, stored)
        if hand_over is not None and rounds == 1:
            hand_over.announce(now_fn())  # this run watches now: one in overtime may stop
    log.info(
        "Watch ended after %d round(s): %d alert(s) sent, %d recorded only (damped or expected), %d CAS conflict(s)",
        rounds,
        delivery.sent,
        recorded,
        conflicts,
    )
    return WatchReport(
        rounds=rounds,
        alerts_sent=delivery.sent,
        alerts_recorded=recorded,
        conflicts=conflicts,
        snapshot=snapshot,
        state=stored.state,
        overtime_seconds=overtime.seconds or 0.0,
        silences=silences.book,
    )


def _report(alerts: Sequence[Alert], log: Logger, on_alerts: Callable[[Sequence[Alert]], None] | None) -> None:
    for alert in alerts:
        why = (
            " (expected during a deploy)"
            if alert.expected_by is not None
            else f" (silenced by {alert.silenced_by})"
            if alert.silenced_by is not None
            else " (damped)"
            if alert.damped
            else ""
        )
        log.info(
            "Alert %s: %s %s -> %s%s%s",
            alert.dedup_key,
            alert.service_name,
            alert.previous_status,
            alert.status,
            why,
            " (pages)" if alert.page else "",
        )
    if on_alerts is not None and alerts:
        try:
            on_alerts(alerts)
        except Exception:  # an observer (event emission) must never stop the watch
            log.exception("Could not report %d alert(s) to the observer", len(alerts))
