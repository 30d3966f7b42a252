"""Silences and acknowledgements of health alerts: Alertmanager's silences, made small. Pure: no I/O, no clock.

* **A silence** matches alerts by service, node and check (each exact or a glob; node and check default to
  ``*``), from ``starts_at`` to ``ends_at``, or "until it recovers" (``ends_at`` is None): then it ends once
  every instance it matches is passing again and told so. It names who made it and why. A silenced
  transition is still an alert and an event (labelled ``icd.silenced=<id>``), but it is not sent and pages
  no one. A check matcher silences an alert when every failing check it names matches (another check
  failing still pages); an alert with no failing checks (a recovery, a departure) is matched by instance.
* **An acknowledgement** is one person taking one incident of one instance: reminders stop, and the alerts
  of that incident show who took it. It ends with the incident (the instance is told passing, or leaves).
* **The book** holds both, in one document (``silence_store.py``), read by the health watch before it
  decides what an alert does. Ended silences are kept for ``KEEP_ENDED`` so ``list`` can show what just
  ended, then dropped.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from icd.errors import InvalidInputError
from icd.health.engine import InstanceRecord
from icd.health.snapshot import FailingCheck
from icd.notify.message import Notification
from icd.rules import check_name
from icd.text import IDENTITY_MAX, consul_meta_value, normalize_identity, operator_time

SCHEMA = 1
MAX_SILENCE = timedelta(days=30)  # a forgotten silence ends; a longer one is made again, on purpose
KEEP_ENDED = timedelta(days=7)
REASON_MAX = 500
RECOVERED = "recovery"  # ``ended_by`` of an until-recovered silence whose instances passed again

SilenceState = Literal["pending", "active", "ended"]
_GLOB_CHARS = re.compile(r"[*?\[\]]")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_GLOB_NODE = re.compile(r"[A-Za-z0-9._*?\[\]-]{1,128}")
_GLOB_SERVICE = re.compile(r"[a-z0-9*?\[\]-]{1,63}")
_CHECK_MAX = 200


def check_service_matcher(value: str) -> str:
    """A service name (the project's name rule) or a glob over the same characters."""
    if not _GLOB_CHARS.search(value):
        return check_name(value, what="service")
    if not _GLOB_SERVICE.fullmatch(value):
        raise InvalidInputError(f"invalid service matcher {value!r}: a service name or a glob of one (*, ?, [..])")
    return value


def check_node_matcher(value: str) -> str:
    """A Consul node name (letters, digits, '.', '_', '-') or a glob of one."""
    pattern = _GLOB_NODE if _GLOB_CHARS.search(value) else _NODE
    if not pattern.fullmatch(value):
        raise InvalidInputError(f"invalid node matcher {value!r}: a node name (letters, digits, . _ -) or a glob")
    return value


def check_check_matcher(value: str) -> str:
    """A check's name or ID, or a glob: one printable line."""
    cleaned = consul_meta_value(value)
    if not cleaned or cleaned != value or len(value) > _CHECK_MAX:
        raise InvalidInputError(f"invalid check matcher {value!r}: one printable line of at most {_CHECK_MAX}")
    return value


def check_by(value: str) -> str:
    """Who acts: an operator's name as recorded (``normalize_identity``); a blank one is refused."""
    by = normalize_identity(value)
    if by is None:
        raise InvalidInputError("--by must name who you are: a blank or invisible name is refused")
    return by


def check_reason(value: str) -> str:
    reason = consul_meta_value(value)[:REASON_MAX]
    if not reason:
        raise InvalidInputError("--why must say why: a blank reason is refused")
    return reason


def _glob(value: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern)


class Silence(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    service: str
    node: str = "*"
    check: str = "*"
    starts_at: datetime
    ends_at: datetime | None  # None: until every matched instance is passing again
    created_by: str
    reason: str
    created_at: datetime
    ended_at: datetime | None = None  # ended before ends_at: expired by hand, or recovered
    ended_by: str | None = None  # who expired it, or RECOVERED
    end_told: bool = False  # operators were told it ended
    watch: str | None = None  # until recovered: the health watch (its name) whose instances say it recovered

    @property
    def until_recovered(self) -> bool:
        return self.ends_at is None

    def end(self) -> datetime | None:
        """When it ended or ends; None for an until-recovered silence still waiting for its recovery."""
        return self.ended_at or self.ends_at

    def state(self, now: datetime) -> SilenceState:
        end = self.end()
        if end is not None and now >= end:
            return "ended"
        return "pending" if now < self.starts_at else "active"

    def covers_instance(self, service: str, node: str) -> bool:
        return _glob(service, self.service) and _glob(node, self.node)

    def covers(self, service: str, node: str, failing: Sequence[FailingCheck]) -> bool:
        if not self.covers_instance(service, node):
            return False
        return self.check == "*" or all(_glob(c.name, self.check) or _glob(c.check_id, self.check) for c in failing)

    def matchers(self) -> str:
        return f"service={self.service} node={self.node} check={self.check}"

    def span(self) -> str:
        until = "it recovers" if self.ends_at is None else operator_time(self.ends_at)
        return f"from {operator_time(self.starts_at)} until {until}"


class Acknowledgement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    instance: str  # node/service_id
    service: str
    by: str
    why: str = ""
    at: datetime
    watch: str = "default"  # the health watch whose state said the incident was on; it ends it


def in_incident(rec: InstanceRecord) -> bool:
    """Whether operators were told the instance is not passing, or a failure is being held back."""
    return rec.alerted_status not in (None, "passing") or rec.observed_status != "passing"


class SilenceBook(BaseModel):
    """Every silence and acknowledgement; the health watch asks it about each alert (``engine.Hush``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA
    silences: tuple[Silence, ...] = ()
    acknowledgements: dict[str, Acknowledgement] = {}

    def silencing(self, service: str, node: str, failing: Sequence[FailingCheck], now: datetime) -> str | None:
        """The id of the first active silence that matches this alert, or None."""
        for silence in self.silences:
            if silence.state(now) == "active" and silence.covers(service, node, failing):
                return silence.id
        return None

    def acknowledged_by(self, instance: str) -> str | None:
        ack = self.acknowledgements.get(instance)
        return ack.by if ack is not None else None

    def find(self, silence_id: str) -> Silence | None:
        return next((s for s in self.silences if s.id == silence_id), None)

    def current(self, now: datetime) -> list[Silence]:
        """Active and pending silences, the soonest start first."""
        return sorted((s for s in self.silences if s.state(now) != "ended"), key=lambda s: (s.starts_at, s.id))

    def next_end(self) -> datetime | None:
        """The earliest time a timed silence ends that operators were not told about yet."""
        return min((s.ends_at for s in self.silences if s.ends_at and not s.end_told and not s.ended_at), default=None)

    def with_silence(self, silence: Silence, now: datetime) -> SilenceBook:
        kept = tuple(s for s in self.silences if not _stale(s, now))
        return self.model_copy(update={"silences": (*kept, silence)})


def _stale(silence: Silence, now: datetime) -> bool:
    end = silence.end()
    return end is not None and silence.end_told and now - end > KEEP_ENDED


def new_silence(
    *,
    service: str,
    node: str = "*",
    check: str = "*",
    starts_at: datetime,
    ends_at: datetime | None,
    by: str,
    why: str,
    now: datetime,
    watch: str = "default",
) -> Silence:
    """A checked silence; :class:`InvalidInputError` for a bad matcher, name, reason or span. An
    until-recovered silence is ended by the health watch ``watch`` (another may ignore its instances)."""
    if starts_at.tzinfo is None or (ends_at is not None and ends_at.tzinfo is None):
        raise InvalidInputError("a silence's start and end need a time zone (e.g. 2026-12-05T14:00:00+00:00)")
    if ends_at is not None:
        if ends_at <= max(starts_at, now):
            raise InvalidInputError(f"the silence would end at {operator_time(ends_at)}, which is not in the future")
        if ends_at - starts_at > MAX_SILENCE:
            raise InvalidInputError(f"a silence lasts at most {MAX_SILENCE.days} days; make a new one after that")
    elif starts_at > now:
        raise InvalidInputError("a silence until recovery starts now: it silences what is failing now")
    return Silence(
        id=secrets.token_hex(4),
        service=check_service_matcher(service),
        node=check_node_matcher(node),
        check=check_check_matcher(check),
        starts_at=starts_at,
        ends_at=ends_at,
        created_by=check_by(by),
        reason=check_reason(why),
        created_at=now,
        watch=watch if ends_at is None else None,
    )


ExpireOutcome = Literal["expired", "unknown", "already ended"]


def expire(book: SilenceBook, silence_id: str, *, by: str, now: datetime) -> tuple[SilenceBook, ExpireOutcome]:
    """End a silence now, by hand; the caller tells operators (``end_told`` is set)."""
    found = book.find(silence_id)
    if found is None:
        return book, "unknown"
    if found.state(now) == "ended":
        return book, "already ended"
    ended = found.model_copy(update={"ended_at": now, "ended_by": check_by(by), "end_told": True})
    return _replace(book, ended), "expired"


def _replace(book: SilenceBook, silence: Silence) -> SilenceBook:
    return book.model_copy(update={"silences": tuple(silence if s.id == silence.id else s for s in book.silences)})


AckOutcome = Literal["taken", "already yours", "taken by another", "not in an incident", "unknown instance"]


def acknowledge(
    book: SilenceBook,
    records: Mapping[str, InstanceRecord],
    instance: str,
    *,
    by: str,
    why: str,
    now: datetime,
    watch: str = "default",
) -> tuple[SilenceBook, AckOutcome]:
    """``by`` takes the current incident of ``instance`` (``node/service_id``, as the state of the health watch
    ``watch`` names it, in ``records``); that watch ends it with the incident."""
    by = check_by(by)
    rec = records.get(instance)
    if rec is None:
        return book, "unknown instance"
    if not in_incident(rec):
        return book, "not in an incident"
    held = book.acknowledgements.get(instance)
    if held is not None:
        return book, "already yours" if held.by == by else "taken by another"
    ack = Acknowledgement(
        instance=instance,
        service=rec.service_name,
        by=by,
        why=consul_meta_value(why)[:REASON_MAX],
        at=now,
        watch=watch,
    )
    return book.model_copy(update={"acknowledgements": {**book.acknowledgements, instance: ack}}), "taken"


@dataclass(frozen=True)
class Ending:
    """A silence that ended and has not been told: ``why`` is "time" or "recovered"."""

    silence: Silence
    why: Literal["time", "recovered"]


def due(book: SilenceBook, records: Mapping[str, InstanceRecord], now: datetime, *, watch: str) -> bool:
    """Whether :func:`close` by the health watch ``watch`` (whose state is ``records``) would change anything:
    a silence ended untold, an until-recovered silence of this watch whose instances all pass, an
    acknowledgement of this watch whose incident is over."""
    if any(_ack_over(ack, records, watch) for ack in book.acknowledgements.values()):
        return True
    return any(_ending(s, records, now, watch) is not None for s in book.silences)


def _ack_over(ack: Acknowledgement, records: Mapping[str, InstanceRecord], watch: str) -> bool:
    if ack.watch != watch:
        return False  # another watch may not see the instance at all (it ignores it): that one ends it
    rec = records.get(ack.instance)
    return rec is None or not in_incident(rec)


def _ending(silence: Silence, records: Mapping[str, InstanceRecord], now: datetime, watch: str) -> Ending | None:
    if silence.end_told:
        return None
    state = silence.state(now)
    if state == "ended":
        return Ending(silence, "time")
    if state == "active" and silence.until_recovered and silence.watch == watch:
        matched = (r for r in records.values() if silence.covers_instance(r.service_name, r.node))
        if not any(in_incident(r) for r in matched):
            return Ending(silence, "recovered")
    return None


def close(
    book: SilenceBook, records: Mapping[str, InstanceRecord], now: datetime, *, watch: str
) -> tuple[SilenceBook, list[Ending]]:
    """Mark what ended as told (the caller tells it) and drop acknowledgements whose incident is over, as the
    health watch ``watch`` sees them."""
    endings: list[Ending] = []
    silences: list[Silence] = []
    for silence in book.silences:
        ending = _ending(silence, records, now, watch)
        if ending is not None:
            endings.append(ending)
            update: dict[str, object] = {"end_told": True}
            if ending.why == "recovered":
                update |= {"ended_at": now, "ended_by": RECOVERED}
            silence = silence.model_copy(update=update)
        if not _stale(silence, now):
            silences.append(silence)
    acks = {key: ack for key, ack in book.acknowledgements.items() if not _ack_over(ack, records, watch)}
    return book.model_copy(update={"silences": tuple(silences), "acknowledgements": acks}), endings


# --- what operators read ---------------------------------------------------------------------------------


def added_notification(silence: Silence, now: datetime) -> Notification:
    starts = "now" if silence.starts_at <= now else f"at {operator_time(silence.starts_at)}"
    return Notification(
        title=f"Silence {silence.id} on {silence.service} starts {starts}",
        text=(
            f"Health alerts matching {silence.matchers()} are recorded but not sent and page no one, "
            f"{silence.span()}. Set by {silence.created_by}: {silence.reason}"
        ),
        severity="info",
        fields=_fields(silence),
        dedup_key=f"silence-added:{silence.id}",
        kind="health",
    )


def ended_notification(silence: Silence, why: Literal["time", "recovered", "expired"]) -> Notification:
    how = {
        "time": "its time is up",
        "recovered": "what it matched is passing again",
        "expired": f"expired by {silence.ended_by}",
    }[why]
    return Notification(
        title=f"Silence {silence.id} on {silence.service} ended: {how}",
        text=f"Health alerts matching {silence.matchers()} are sent and page again. It was set by "
        f"{silence.created_by}: {silence.reason}",
        severity="info",
        fields=_fields(silence),
        dedup_key=f"silence-ended:{silence.id}",
        kind="health",
    )


def acknowledged_notification(ack: Acknowledgement) -> Notification:
    node, _, service_id = ack.instance.partition("/")
    because = f": {ack.why}" if ack.why else ""
    return Notification(
        title=f"{ack.service} on {node}: taken by {ack.by}",
        text=f"`{service_id}`: {ack.by} took this incident{because}. No more reminders until it recovers.",
        severity="info",
        fields={"Service": ack.service, "Instance": service_id, "Node": node, "Taken by": ack.by},
        dedup_key=f"acknowledged:{ack.instance}@{ack.at:%Y%m%dT%H%M%SZ}",
        kind="health",
    )


def _fields(silence: Silence) -> dict[str, str]:
    return {
        "Silence": silence.id,
        "Service": silence.service,
        "Node": silence.node,
        "Check": silence.check,
        "By": silence.created_by,
    }


def table_rows(silences: Iterable[Silence], now: datetime) -> list[dict[str, str]]:
    """One row per silence, for ``list`` and the UI's table artifact (operator text stays one line)."""
    return [
        {
            "id": s.id,
            "state": s.state(now),
            "service": s.service,
            "node": s.node,
            "check": s.check,
            "starts": operator_time(s.starts_at),
            "ends": "until recovered" if s.ends_at is None else operator_time(s.ends_at),
            "by": s.created_by[:IDENTITY_MAX],
            "why": s.reason,
        }
        for s in silences
    ]
