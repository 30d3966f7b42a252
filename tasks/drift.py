"""The drift check's steps for one workspace: is a deploy in progress, what drifted, tell it, show it.

Thin: the report, the ignore list, the fingerprint and the wording are ``icd/deploy/drift.py``. The check
plans with the variables of what the workspace runs now (its state, ``ArtifactRegistry.running``), never a
new version, refresh-only and without the state lock (``Terraform.refresh_plan``); it never applies.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from blocks.consul import ConsulConnection
from blocks.registry import ArtifactRegistry
from icd import events
from icd.config import WorkspaceConfig
from icd.deploy.drift import (
    Decision,
    DriftMemory,
    DriftReport,
    DriftStore,
    build_report,
    deploy_run_of,
    drift_notice,
    table_rows,
)
from icd.deploy.record import applied_seconds, artifact_key
from icd.deploy.rollout import Slot, encode_instances
from icd.deploy.running import Running
from icd.health.consul import consul_call
from icd.health.snapshot import ServiceEntry, parse_service_entries
from icd.notify.message import Notifier
from icd.paths import PROJECT_ROOT, state_home
from icd.service.contract import ROLLOUT_VARIABLE, StackVariables
from tasks.notify import notify
from tasks.plan import workdir_opener

# How many of a workspace's latest deploy records are searched for the run that last applied it.
_RECORDS_SEARCHED = 20


def drift_store(registry: ArtifactRegistry) -> DriftStore:
    """Where each workspace's last told drift is kept: beside the registry (``icd/deploy/drift.py`` says why)."""
    return DriftStore(registry.s3_client(), registry.bucket, registry.prefix)


@task(name="deploy-in-progress", cache_policy=NO_CACHE)
def deploy_in_progress(registry: ArtifactRegistry, workspace: str) -> str | None:
    """Who holds the workspace's queue now (a deploy in progress), or None. Read only: the check never takes
    the lock a deploy needs. A holder whose run has ended holds nothing."""
    queue = registry.workspace_queue()
    holder = queue.holder(workspace)
    if holder is None or queue.holder_dead(holder, datetime.now(UTC)):
        return None
    return f"run {holder.run_name or holder.run_id} ({holder.phase})"


def _consul_entries(consul: ConsulConnection, service_name: str) -> list[ServiceEntry]:
    client = consul.get_client()
    _, entries = consul_call(f"read the instances of {service_name}", client.health.service, service_name)
    return parse_service_entries(entries or ())


def last_applying_run(workspace: str) -> str | None:
    """The run that last applied ``workspace``, from its deploy records; None when Prefect can't say."""
    try:
        with get_client(sync_client=True) as client:
            records = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("deploy", workspace)])),
                sort=ArtifactSort.CREATED_DESC,
                limit=_RECORDS_SEARCHED,
            )
    except Exception as exc:  # noqa: BLE001  # a fact for the notice only
        get_run_logger().warning("could not read the deploy records of %s (%s)", workspace, exc)
        return None
    for record in records:
        if isinstance(record.data, str) and applied_seconds(record.data) is not None and record.flow_run_id:
            return str(record.flow_run_id)
    return None


def running_variables(
    running: Running, settings: WorkspaceConfig, *, service_name: str, consul_addr: str, deploy_run_id: str
) -> dict[str, str]:
    """The stack variables of what runs now, from its state: its artifact and build label, not a new version's
    (docs/service-contract.md#stack-variables), and a rolling-out workspace's ``instances`` as its slots run
    them (without it the fleet stack would plan a single instance). ``deploy_run_id`` is no trigger: any
    value plans the same."""
    if not running.artifact_ids:
        raise ValueError(f"the state of {running.workspace} names no artifact")
    variables = StackVariables(
        artifact_id=running.artifact_ids[0],
        artifact_version=running.build_label or "",
        namespace=settings.namespace,
        service_name=service_name,
        consul_addr=consul_addr,
        deploy_run_id=deploy_run_id,
        workspace=running.workspace,
        instance_root=str(state_home() / "instances" / running.workspace),
    ).as_vars()
    # As the deploy does (tasks/context.py): only a rolling-out workspace's stack declares ``instances``. A
    # counted resource has no gaps, so slot order is list order.
    if settings.rollout is not None and running.slots:
        slots = [Slot(artifact, label) for _, (artifact, label) in sorted(running.slots.items())]
        variables[ROLLOUT_VARIABLE] = encode_instances(slots)
    return variables


@dataclass(frozen=True)
class Checked:
    report: DriftReport
    version: int | None  # the registered version the workspace runs, for the reconcile command


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(
    registry: ArtifactRegistry,
    consul: ConsulConnection,
    workspace: str,
    settings: WorkspaceConfig,
    *,
    service_name: str,
    run_id: str,
) -> Checked:
    """Plan the workspace refresh-only with what it runs, compare Consul, apply the ignore list. Raises a
    ``DeployError`` (Terraform, S3, Consul) when it can't tell."""
    running = registry.running(workspace, settings.namespace)
    entries = _consul_entries(consul, service_name)
    plan = None
    if running is not None:
        touched = deploy_run_of(running.service_ids, entries)
        variables = running_variables(
            running,
            settings,
            service_name=service_name,
            consul_addr=consul.address,
            deploy_run_id=touched or "drift-check",
        )
        name = f"drift-{workspace}-{run_id[:8]}"
        stack_dir = str(PROJECT_ROOT / settings.stack)
        terraform = workdir_opener(registry, workspace, stack_dir, "plan")(name)
        try:
            plan = terraform.refresh_plan(variables=variables, out=Path("drift.tfplan"))
        finally:
            shutil.rmtree(terraform.working_dir, ignore_errors=True)
    report = build_report(
        workspace,
        plan=plan,
        state_service_ids=running.service_ids if running else [],
        consul_entries=entries,
        ignores=settings.drift_ignore,
        recorded_run=None,
    )
    if report.drifted and report.touched_by is None:
        report = DriftReport(report.workspace, report.items, report.ignored, last_applying_run(workspace))
    version = running.version.version if running is not None and running.version is not None else None
    return Checked(report, version)


@task(name="tell-drift", cache_policy=NO_CACHE)
def tell_drift(
    notifier: Notifier,
    decision: Decision,
    *,
    report: DriftReport | None,
    error: str | None,
    namespace: str,
    version: int | None,
    previous: DriftMemory | None,
    run_id: str,
) -> None:
    """Tell operators through the notifier (best effort), and make a drift's change an event."""
    if decision.tell is None:
        return
    notice = drift_notice(
        decision,
        report=report,
        error=error,
        namespace=namespace,
        version=version,
        previous=previous,
        link_url=notifier.flow_run_url(run_id),
    )
    notify(notifier, notice)
    if decision.tell in ("detected", "changed", "resolved"):
        events.emit(
            events.drift_changed(
                workspace=decision.memory.workspace,
                namespace=namespace,
                version=version,
                fingerprint=decision.memory.fingerprint,
                resources=report.addresses if report is not None else (),
                run_id=run_id,
            )
        )


@task(name="publish-drift", cache_policy=NO_CACHE)
def publish_drift(report: DriftReport, told: str | None) -> None:
    rows: Sequence[dict[str, str]] = table_rows(report)
    create_table_artifact(
        key=artifact_key("drift", report.workspace),
        table=list(rows),
        description=(
            f"Drift of {report.workspace}: {len(report.items)} item(s) left the state, {len(report.ignored)} "
            f"ignored; {('told: ' + told) if told else 'nothing new to tell'}."
        ),
    )
