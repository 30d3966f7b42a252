"""Watch Consul health: every transition alerts once, through the notifier; the table shows current health."""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from blocks.consul import ConsulConnection
from blocks.notifier import SlackNotifier
from icd.health.config import WatchConfig
from icd.health.render import health_table
from icd.health.watch import WatchReport, watch


def artifact_key(watch_name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", watch_name.lower()).strip("-")
    return f"consul-health-{slug}" if slug and slug != "default" else "consul-health"


@task(name="watch-health", cache_policy=NO_CACHE)
def watch_health(
    consul: ConsulConnection, notifier: SlackNotifier, config: WatchConfig, *, window_seconds: float, watch_name: str
) -> WatchReport:
    return watch(
        consul.get_client(),
        notifier.sender(),
        config,
        window_seconds,
        watch_name=watch_name,
        logger=get_run_logger(),
        deploy_run_url=notifier.flow_run_url,
    )


@task(name="publish-health", cache_policy=NO_CACHE)
def publish_health(report: WatchReport, config: WatchConfig, watch_name: str) -> None:
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
