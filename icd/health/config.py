"""What the health watch ignores, how it damps flapping checks, and how often it reminds.

The damping defaults are on and page at once: a change away from passing is announced the moment it is seen
(fast paging), and what follows is held back until it means something (see ``engine.py``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from icd.health.snapshot import CheckHealth

# The shipped damping, in seconds (and a count): the flow's parameters default to these, docs/operations.md
# sets them beside Alertmanager's group_wait / group_interval / repeat_interval.
DEFAULT_RECOVERY_HOLD_SECONDS = 60.0
DEFAULT_FLAP_CHANGES = 5
DEFAULT_FLAP_WINDOW_SECONDS = 600.0
DEFAULT_STABLE_AFTER_SECONDS = 300.0
DEFAULT_REMINDER_MINUTES = 60.0


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


@dataclass(frozen=True)
class WatchConfig:
    """Glob patterns to ignore, flap damping and the reminder interval.

    * ``thresholds`` maps a service name or glob to seconds any new status must persist before it is
      announced (an exact name wins over globs); none by default, so a failure pages at once.
    * ``recovery_hold``: a return to passing is announced only once it held this long, so an instance
      bouncing back and forth is one incident, with one page.
    * ``flap_changes`` status changes within ``flap_window`` mark an instance as flapping: one "flapping"
      notice, then no notice per change, until no change for ``stable_after`` ("stable again").
      ``flap_changes`` of 0 turns flap detection off.
    * ``reminder_interval`` of ``None`` turns reminders off.

    Every change is still an alert handed to the observer (a Prefect event), damped or not.
    """

    ignore_services: tuple[str, ...] = ()
    ignore_checks: tuple[str, ...] = ()
    ignore_nodes: tuple[str, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)
    recovery_hold: timedelta = timedelta(seconds=DEFAULT_RECOVERY_HOLD_SECONDS)
    flap_changes: int = DEFAULT_FLAP_CHANGES
    flap_window: timedelta = timedelta(seconds=DEFAULT_FLAP_WINDOW_SECONDS)
    stable_after: timedelta = timedelta(seconds=DEFAULT_STABLE_AFTER_SECONDS)
    reminder_interval: timedelta | None = timedelta(minutes=DEFAULT_REMINDER_MINUTES)

    def threshold_for(self, service_name: str) -> timedelta:
        seconds = self.thresholds.get(service_name)
        if seconds is None:
            seconds = next(
                (s for pattern, s in self.thresholds.items() if fnmatch.fnmatchcase(service_name, pattern)),
                0.0,
            )
        return timedelta(seconds=seconds)

    def hold_for(self, service_name: str, status: str) -> timedelta:
        """How long ``status`` must persist before it is announced: a recovery waits for the longer of the
        service's threshold and the recovery hold; anything else for the threshold only."""
        threshold = self.threshold_for(service_name)
        return max(threshold, self.recovery_hold) if status == "passing" else threshold

    def ignores_instance(self, service_name: str, node: str) -> bool:
        return _matches(service_name, self.ignore_services) or _matches(node, self.ignore_nodes)

    def ignores_check(self, check: CheckHealth) -> bool:
        return _matches(check.check_id, self.ignore_checks) or _matches(check.name, self.ignore_checks)


NO_DAMPING = WatchConfig(recovery_hold=timedelta(0), flap_changes=0)
"""Every change announced as it is seen: how the watch behaved before damping (the benchmark's baseline)."""
