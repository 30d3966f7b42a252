"""The scheduled Consul health flow: watch for a window, alert every transition once, publish current health.

Schedule it every minute with ``window_seconds`` a little shorter (e.g. 50 s for a 60 s interval) so runs do
not pile up; should two overlap anyway, the CAS-written state in Consul KV keeps them from alerting the
same transition twice (see ``tasks/health_watch.py``). Inside the window a change is seen at once through a
blocking query, so the only delay between a check failing and the Slack message is a few HTTP round trips.

The work is done by ``tasks.health_watch.watch``, a plain function that tests drive without a Prefect
server; this module only loads the blocks, builds the config and publishes the table artifact.
"""

from __future__ import annotations

import re
from datetime import timedelta

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from blocks.consul import ConsulConnection
from blocks.notifier import SlackNotifier
from tasks.errors import ConsulError, NotificationError
from tasks.health_watch import WatchConfig, WatchReport, health_table, watch


def build_watch_config(
    *,
    ignore_services: list[str] | None,
    ignore_checks: list[str] | None,
    ignore_nodes: list[str] | None,
    thresholds: dict[str, float] | None,
    reminder_minutes: float,
) -> WatchConfig:
    """Flow parameters -> engine config; ``reminder_minutes <= 0`` turns reminders off."""
    return WatchConfig(
        ignore_services=tuple(ignore_services or ()),
        ignore_checks=tuple(ignore_checks or ()),
        ignore_nodes=tuple(ignore_nodes or ()),
        thresholds=dict(thresholds or {}),
        reminder_interval=timedelta(minutes=reminder_minutes) if reminder_minutes > 0 else None,
    )


def artifact_key(watch_name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", watch_name.lower()).strip("-")
    return f"consul-health-{slug}" if slug and slug != "default" else "consul-health"


@flow(name="consul-health")
def consul_health(
    consul_block: str = "consul",
    notifier_block: str = "ops-slack",
    window_seconds: float = 50,
    watch_name: str = "default",
    ignore_services: list[str] | None = None,
    ignore_checks: list[str] | None = None,
    ignore_nodes: list[str] | None = None,
    thresholds: dict[str, float] | None = None,
    reminder_minutes: float = 60,
) -> dict[str, int]:
    """Watch Consul health for ``window_seconds`` and notify every transition through the notifier block.

    ``ignore_*`` take glob patterns; ``thresholds`` maps a service name or glob to the seconds a new
    status must persist before it alerts (flap damping). Returns counts of rounds, alerts and CAS
    conflicts; raises ``ConsulError`` / ``NotificationError`` on faults (an unsent alert stays in the
    persisted outbox and the next run sends it).
    """
    logger = get_run_logger()
    # `load` is async-dispatched; from this synchronous flow it returns the block itself.
    connection = ConsulConnection.load(consul_block)
    if not isinstance(connection, ConsulConnection):
        raise ConsulError(f"block {consul_block!r} is not a Consul Connection block")
    notifier = SlackNotifier.load(notifier_block)
    if not isinstance(notifier, SlackNotifier):
        raise NotificationError(f"block {notifier_block!r} is not a Slack Notifier block")
    config = build_watch_config(
        ignore_services=ignore_services,
        ignore_checks=ignore_checks,
        ignore_nodes=ignore_nodes,
        thresholds=thresholds,
        reminder_minutes=reminder_minutes,
    )
    report = watch(connection.get_client(), notifier, config, window_seconds, watch_name=watch_name, logger=logger)
    publish_health_artifact(report, config, watch_name)
    return {"rounds": report.rounds, "alerts_sent": report.alerts_sent, "conflicts": report.conflicts}


def publish_health_artifact(report: WatchReport, config: WatchConfig, watch_name: str) -> None:
    if report.snapshot is None:
        return
    rows = health_table(report.snapshot, report.state, config)
    unhealthy = sum(1 for row in rows if row["status"] != "passing")
    create_table_artifact(
        key=artifact_key(watch_name),
        table=rows,
        description=(
            f"Consul health ({watch_name}) at index {report.snapshot.index}: {len(rows)} instance(s), "
            f"{unhealthy} not passing; {report.alerts_sent} alert(s) sent this run."
        ),
    )
