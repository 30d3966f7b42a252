"""What the health watch ignores, how long a new status must persist, and how often it reminds."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from icd.health.snapshot import CheckHealth


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


@dataclass(frozen=True)
class WatchConfig:
    """Glob patterns to ignore, per-service flap damping and the reminder interval.

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
