"""Watch Consul health: every transition is a Prefect event and, unless a deploy expects it or damping holds
it back, one Slack message; the table artifact shows current health."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import consul
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.runtime import deployment, flow_run
from prefect.variables import Variable

from blocks.consul import ConsulConnection
from icd import events
from icd.health.config import WatchConfig
from icd.health.engine import Alert
from icd.health.handover import HandOver
from icd.health.render import health_table
from icd.health.watch import WatchReport, watch
from icd.notify.message import Notification, Notifier
from tasks.notify import notify
from tasks.silences import publish_silences


def artifact_key(watch_name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", watch_name.lower()).strip("-")
    return f"consul-health-{slug}" if slug and slug != "default" else "consul-health"


def emit_transitions(alerts: Sequence[Alert]) -> None:
    """Every alert the watch owns, damped or not, as an ``icd.health.*`` event about the instance."""
    for alert in alerts:
        flap = alert.flap
        events.emit(
            events.health_transition(
                kind=alert.kind,
                status=alert.status,
                previous=alert.previous_status,
                service_name=alert.service_name,
                service_id=alert.service_id,
                node=alert.node,
                meta=alert.meta,
                expected=alert.expected_by is not None,
                failing=[f"{check.name}: {check.output}" for check in alert.failing_checks],
                dedup_key=alert.dedup_key,
                announced=not alert.damped and alert.silenced_by is None,
                page=alert.page,
                flap=None if flap is None else {"changes": flap.changes, "span_seconds": flap.span.total_seconds()},
                silenced_by=alert.silenced_by,
                acknowledged_by=alert.acknowledged_by,
            )
        )


# icd-setup starts the first watch run at once (the schedule's first run comes an interval later): tagged so,
# it is treated as a run of the schedule (it hands over to the next one and ends if the deployment is paused).
FIRST_WATCH_TAG = "icd-first-watch"
HEALTH_WATCH_DEPLOYMENT = "consul-health/consul-health"
_WATCHING = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


@dataclass(frozen=True)
class ScheduledRun:
    """This flow run, when its deployment's schedule started it (not a manual or direct run)."""

    run_id: str
    deployment_id: uuid.UUID

    def deployment_active(self) -> bool:
        """Whether the schedule still starts runs: the deployment is not paused and a schedule is active.

        When the Prefect API can't say, True: a watch that goes on is safer than one that stops.
        """
        try:
            with get_client(sync_client=True) as client:
                found = client.read_deployment(self.deployment_id)
        except Exception as exc:  # noqa: BLE001  # any API failure means "unknown", not "stop watching"
            get_run_logger().warning("Could not read the deployment (%s); assuming its schedule runs on", exc)
            return True
        return not found.paused and any(schedule.active for schedule in found.schedules)


def scheduled_run() -> ScheduledRun | None:
    """This run, if the schedule of a deployment created it (or icd-setup, as its first run); None for a manual
    run or a direct call."""
    run_id, deployment_id = flow_run.id, deployment.id
    if not run_id or not deployment_id:
        return None
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
    scheduled = run.auto_scheduled or FIRST_WATCH_TAG in (run.tags or ())
    return ScheduledRun(run_id, uuid.UUID(str(deployment_id))) if scheduled else None


def start_first_watch() -> str | None:
    """Start a ``consul-health`` run now, for ``icd-setup``: the schedule's first run comes an interval (10 min)
    after the deployment is created, and nothing would watch meanwhile. Tagged ``FIRST_WATCH_TAG``, it is a run
    of the schedule: it hands over to the next one, and ends at once if the deployment is paused. None (nothing
    started) when a watch run is running already, or starts within a minute."""
    soon = datetime.now(UTC) + timedelta(seconds=60)
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(HEALTH_WATCH_DEPLOYMENT)
        pending = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_WATCHING))),
            limit=50,
        )
        if any(run.state_type != StateType.SCHEDULED or _starts_before(run, soon) for run in pending):
            return None
        run = client.create_flow_run_from_deployment(found.id, tags=[FIRST_WATCH_TAG])
    return str(run.id)


def _starts_before(run: FlowRun, moment: datetime) -> bool:
    start = run.next_scheduled_start_time or run.expected_start_time
    return start is not None and start <= moment


def hand_over(
    client: consul.Consul, watch_name: str, run: ScheduledRun | None, max_overtime_seconds: float
) -> HandOver | None:
    """A scheduled run hands over to the next one (see ``icd/health/handover.py``); other runs just end."""
    if run is None or max_overtime_seconds <= 0:
        return None
    return HandOver(client, watch_name, run.run_id, run.deployment_active, max_overtime_seconds)


@task(name="watch-health", cache_policy=NO_CACHE)
def watch_health(
    consul: ConsulConnection,
    notifier: Notifier,
    config: WatchConfig,
    *,
    window_seconds: float,
    watch_name: str,
    min_round_seconds: float = 0.2,
    scheduled: ScheduledRun | None = None,
    max_overtime_seconds: float = 0.0,
) -> WatchReport:
    client = consul.get_client()
    return watch(
        client,
        notifier.sender(get_run_logger()),
        config,
        window_seconds,
        watch_name=watch_name,
        logger=get_run_logger(),
        deploy_run_url=notifier.flow_run_url,
        on_alerts=emit_transitions,
        min_round_seconds=min_round_seconds,
        hand_over=hand_over(client, watch_name, scheduled, max_overtime_seconds),
        on_silences=publish_silences,
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
    if report.silences is not None and report.silences.silences:
        publish_silences(report.silences)


def _blind_marker(watch_name: str) -> str:
    return f"icd-health-blind-{artifact_key(watch_name)}"


@task(name="report-watch-sight", cache_policy=NO_CACHE)
def report_sight(notifier: Notifier, watch_name: str, *, error: str | None) -> None:
    """Tell operators once when the watch goes blind (Consul unreachable) and once when it sees again.

    The marker lives in a Prefect variable, not in Consul: Consul is what can't be reached.
    """
    marker = _blind_marker(watch_name)
    blind_since: object = Variable.get(marker, default=None)
    if error is not None and blind_since is None:
        Variable.set(marker, "blind", overwrite=True)
        notify(
            notifier,
            Notification(
                title=f"Health watch {watch_name!r} is blind: Consul can't be reached",
                text=f"No health transition is seen or alerted until Consul answers again. {error}",
                severity="critical",
                fields={"watch": watch_name},
                kind="health",
            ),
        )
    elif error is None and blind_since is not None:
        Variable.unset(marker)
        notify(
            notifier,
            Notification(
                title=f"Health watch {watch_name!r} sees again",
                text="Consul answers; transitions missed meanwhile are reported now.",
                severity="success",
                fields={"watch": watch_name},
                kind="health",
            ),
        )
    elif error is not None:
        get_run_logger().error("the health watch is still blind: %s", error)
