"""Refused webhook requests: every one counted, each told, none a flood.

Every refusal is counted by whether it was signed and why (``GET /health`` shows the counts). Each is told
as an ``icd.push.refused`` event and a warning log line, within an allowance per window of each
(signed, reason): unsigned requests come from anyone on the internet, so at most one is told per reason per
window; signed ones come from GitHub (or someone holding the secret), so up to ten are told one by one. The
rest of a window are held and told as one summary when it ends, with their count and since when: a flood of
junk costs a handful of events an hour, never one per request, and a summary of signed ones pages once.

Pure: the clock is passed in; ``cli/inbound.py`` records each refusal and asks :meth:`RefusalLedger.due` for
the summaries of ended windows a few times per window.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from icd import events
from icd.inbound.github import Refusal

WINDOW_SECONDS = 60.0
SIGNED_PER_WINDOW = 10
UNSIGNED_PER_WINDOW = 1


@dataclass
class _Window:
    opened: datetime
    told: int = 0
    held: int = 0
    held_since: datetime | None = None
    last_held: Refusal | None = None


class RefusalLedger:
    def __init__(
        self,
        *,
        window_seconds: float = WINDOW_SECONDS,
        signed_per_window: int = SIGNED_PER_WINDOW,
        unsigned_per_window: int = UNSIGNED_PER_WINDOW,
    ) -> None:
        self.window = timedelta(seconds=window_seconds)
        self._allowance = {True: signed_per_window, False: unsigned_per_window}
        self._counts: Counter[tuple[bool, str]] = Counter()
        self._windows: dict[tuple[bool, str], _Window] = {}

    def record(self, refusal: Refusal, now: datetime) -> list[events.EventSpec]:
        """Count ``refusal``; the events to tell now (none when it is held for its window's summary)."""
        key = (refusal.signed, refusal.reason)
        self._counts[key] += 1
        told = self._close_if_ended(key, now)
        window = self._windows.setdefault(key, _Window(now))
        if window.told < self._allowance[refusal.signed]:
            window.told += 1
            return [*told, refused_event(refusal)]
        window.held += 1
        window.held_since = window.held_since or now
        window.last_held = refusal
        return told

    def due(self, now: datetime) -> list[events.EventSpec]:
        """The summaries of the windows that ended by ``now``."""
        return [summary for key in list(self._windows) for summary in self._close_if_ended(key, now)]

    def held(self) -> list[events.EventSpec]:
        """The summaries of every window, ended or not (what would be lost at shutdown)."""
        return [_summary(window, window.last_held) for window in self._windows.values() if window.last_held]

    def counts(self) -> dict[str, dict[str, int]]:
        """Refusals since start, by ``signed`` / ``unsigned`` and reason."""
        counted: dict[str, dict[str, int]] = {"signed": {}, "unsigned": {}}
        for (signed, reason), count in sorted(self._counts.items()):
            counted["signed" if signed else "unsigned"][reason] = count
        return counted

    def _close_if_ended(self, key: tuple[bool, str], now: datetime) -> list[events.EventSpec]:
        window = self._windows.get(key)
        if window is None or now - window.opened < self.window:
            return []
        del self._windows[key]
        if window.last_held is None:
            return []
        # The summary is told now, so it counts against a new window: a steady flood is one event a window.
        self._windows[key] = _Window(now, told=1)
        return [_summary(window, window.last_held)]


def refused_event(refusal: Refusal, *, count: int = 1, since: datetime | None = None) -> events.EventSpec:
    return events.push_refused(
        reason=refusal.reason,
        status=refusal.status,
        signed=refusal.signed,
        detail=refusal.detail,
        delivery=refusal.delivery,
        event_type=refusal.event_type,
        repository=refusal.repository,
        size=refusal.size,
        count=count,
        since=since.isoformat() if since else None,
    )


def _summary(window: _Window, last: Refusal) -> events.EventSpec:
    return refused_event(last, count=window.held, since=window.held_since)


def log_line(spec: events.EventSpec) -> str:
    """The warning line for one ``icd.push.refused`` event: its payload, already made safe to show."""
    payload: dict[str, Any] = dict(spec.payload)
    what = "signed" if payload["signed"] else "unsigned"
    many = f"{payload['count']} {what} requests since {payload['since']}" if payload["count"] > 1 else what
    facts = ", ".join(
        f"{name} {payload[name]}" for name in ("delivery", "event_type", "repository", "size") if payload[name]
    )
    return f"refused ({many}): {payload['status']} {payload['reason']}: {payload['detail']}" + (
        f" ({facts})" if facts else ""
    )
