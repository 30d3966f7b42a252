"""The scheduled Consul health flow: watch for a window, record every transition once as an event, tell
operators what damping lets through, publish current health.

No blind gaps: the deployment runs every 10 minutes and watches for 11, so the next run is normally watching
before the last one stops. A late next run (a busy worker, a restart, a server outage) is covered too: past
its window a scheduled run watches on until the next one is watching, for at most ``max_overtime_seconds``
(``icd/health/handover.py``). While two overlap, the CAS-written state in Consul KV keeps them from alerting
the same transition twice (see ``icd/health/state.py``). Inside a window a change is seen at once through a
blocking query, so a check failing reaches Slack in a few HTTP round trips.

Damping is on by default (``icd/health/config.py``): a failure is told and pages at once, a recovery once it
held ``recovery_hold_seconds``, and an instance that changes ``flap_changes`` times within
``flap_window_seconds`` gets one "flapping" notice, then one "stable again" after ``stable_after_seconds``
without a change. ``recovery_hold_seconds=0`` and ``flap_changes=0`` announce every change as it is seen.

Paused means stopped: a run the schedule created before its deployment was paused (``update_deployment
(paused=True)`` leaves those behind; only ``pause_deployment`` deletes them) ends without watching, and a
run in overtime stops as soon as the deployment is paused.
"""

from __future__ import annotations

from datetime import timedelta
from typing import cast

from prefect import flow, get_run_logger

from blocks.consul import ConsulConnection
from blocks.notifier import load_notifier
from icd.errors import ConsulError
from icd.health.config import (
    DEFAULT_FLAP_CHANGES,
    DEFAULT_FLAP_WINDOW_SECONDS,
    DEFAULT_RECOVERY_HOLD_SECONDS,
    DEFAULT_REMINDER_MINUTES,
    DEFAULT_STABLE_AFTER_SECONDS,
    WatchConfig,
)
from tasks.watch import publish_health, report_sight, scheduled_run, watch_health


def build_watch_config(
    *,
    ignore_services: list[str] | None,
    ignore_checks: list[str] | None,
    ignore_nodes: list[str] | None,
    thresholds: dict[str, float] | None,
    reminder_minutes: float = DEFAULT_REMINDER_MINUTES,
    recovery_hold_seconds: float = DEFAULT_RECOVERY_HOLD_SECONDS,
    flap_changes: int = DEFAULT_FLAP_CHANGES,
    flap_window_seconds: float = DEFAULT_FLAP_WINDOW_SECONDS,
    stable_after_seconds: float = DEFAULT_STABLE_AFTER_SECONDS,
) -> WatchConfig:
    """Flow parameters -> engine config; ``reminder_minutes <= 0`` turns reminders off, ``flap_changes <= 0``
    flap detection."""
    return WatchConfig(
        ignore_services=tuple(ignore_services or ()),
        ignore_checks=tuple(ignore_checks or ()),
        ignore_nodes=tuple(ignore_nodes or ()),
        thresholds=dict(thresholds or {}),
        recovery_hold=timedelta(seconds=max(0.0, recovery_hold_seconds)),
        flap_changes=max(0, flap_changes),
        flap_window=timedelta(seconds=max(0.0, flap_window_seconds)),
        stable_after=timedelta(seconds=max(0.0, stable_after_seconds)),
        reminder_interval=timedelta(minutes=reminder_minutes) if reminder_minutes > 0 else None,
    )


@flow(name="consul-health")
def consul_health(
    consul_block: str = "consul",
    notifier_block: str = "ops-slack",
    window_seconds: float = 660,
    watch_name: str = "default",
    ignore_services: list[str] | None = None,
    ignore_checks: list[str] | None = None,
    ignore_nodes: list[str] | None = None,
    thresholds: dict[str, float] | None = None,
    reminder_minutes: float = DEFAULT_REMINDER_MINUTES,
    recovery_hold_seconds: float = DEFAULT_RECOVERY_HOLD_SECONDS,
    flap_changes: int = DEFAULT_FLAP_CHANGES,
    flap_window_seconds: float = DEFAULT_FLAP_WINDOW_SECONDS,
    stable_after_seconds: float = DEFAULT_STABLE_AFTER_SECONDS,
    min_round_seconds: float = 0.2,
    max_overtime_seconds: float = 600,
) -> dict[str, int]:
    """Watch Consul health for ``window_seconds``: every transition is an ``icd.health.*`` event; the notifier
    block gets what damping lets through.

    ``ignore_*`` take glob patterns; ``thresholds`` maps a service name or glob to the seconds a new
    status must persist before it is told. A recovery is told once it held ``recovery_hold_seconds``;
    ``flap_changes`` changes within ``flap_window_seconds`` make one "flapping" notice instead of a message
    per change, until ``stable_after_seconds`` without a change ("stable again"). A scheduled run watches past
    its window until the next run is watching, for at most ``max_overtime_seconds`` (0: never). Returns counts
    of rounds, alerts, CAS conflicts and seconds of overtime; raises ``ConsulError`` when Consul fails (an
    unsent alert stays in the persisted outbox).
    """
    scheduled = scheduled_run()
    if scheduled is not None and not scheduled.deployment_active():
        get_run_logger().info("The deployment is paused: this run, scheduled before that, ends without watching")
        return {"rounds": 0, "alerts_sent": 0, "alerts_recorded": 0, "conflicts": 0, "overtime_seconds": 0}
    config = build_watch_config(
        ignore_services=ignore_services,
        ignore_checks=ignore_checks,
        ignore_nodes=ignore_nodes,
        thresholds=thresholds,
        reminder_minutes=reminder_minutes,
        recovery_hold_seconds=recovery_hold_seconds,
        flap_changes=flap_changes,
        flap_window_seconds=flap_window_seconds,
        stable_after_seconds=stable_after_seconds,
    )
    notifier = load_notifier(notifier_block)
    try:
        report = watch_health(
            cast(ConsulConnection, ConsulConnection.load(consul_block)),
            notifier,
            config,
            window_seconds=window_seconds,
            watch_name=watch_name,
            min_round_seconds=min_round_seconds,
            scheduled=scheduled,
            max_overtime_seconds=max_overtime_seconds,
        )
    except ConsulError as exc:
        report_sight(notifier, watch_name, error=str(exc))
        raise
    report_sight(notifier, watch_name, error=None)
    publish_health(report, config, watch_name)
    return {
        "rounds": report.rounds,
        "alerts_sent": report.alerts_sent,
        "alerts_recorded": report.alerts_recorded,
        "conflicts": report.conflicts,
        "overtime_seconds": round(report.overtime_seconds),
    }
