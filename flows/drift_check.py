"""The scheduled drift check: has a workspace left its Terraform state? Told on change, never every run.

One deployment, every 5 minutes, for all workspaces: each run checks every workspace of ``icd.toml`` whose
``drift_interval_seconds`` (default 1 h) has passed since its last check, and leaves the others. One schedule
per workspace would need a deployment per workspace, re-created whenever ``icd.toml`` changes; with one,
a new workspace is checked within 5 minutes of being configured, and an interval is honoured to 5 minutes.

Per workspace (``tasks/drift.py``, ``icd/deploy/drift.py``):

- skipped while a deploy of it is in progress (its queue has a live holder); the run's state message says so,
  and the workspace is checked at the next run that finds it free. The check reads the queue, never takes it,
  and never takes Terraform's state lock (``plan -refresh-only -lock=false``); it never applies;
- a refresh-only plan with the variables of what the workspace runs now, and Consul's instances of its service;
- told through the notifier on first detection, when the drifted set changes, when it is resolved; a check
  that fails is told once, and again when it works. ``icd.drift.detected`` / ``icd.drift.resolved`` events,
  a ``drift-<workspace>`` table artifact.

Reconciling is a normal deploy of the version the workspace runs (the notice gives the command): planned,
approved and applied as usual. ``workspaces`` and ``force`` run a check by hand (``force``: whatever the
interval).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed

from blocks.consul import ConsulConnection
from blocks.notifier import load_notifier
from blocks.registry import ArtifactRegistry
from icd.config import load_config
from icd.deploy.drift import decide, due
from icd.errors import DeployError
from icd.text import one_line
from tasks.drift import check_drift, deploy_in_progress, drift_store, publish_drift, tell_drift


@flow(name="drift-check")
def drift_check(
    workspaces: list[str] | None = None,
    force: bool = False,
    registry_block: str = "registry",
    notifier_block: str = "ops-slack",
    consul_block: str = "consul",
) -> State[Any]:
    """Check each due workspace (``workspaces``: only these; ``force``: due or not). Ends Completed with one
    line per workspace in its state message: not due, skipped (a deploy in progress), clean, drifted, failing."""
    logger = get_run_logger()
    config = load_config()
    registry = cast(ArtifactRegistry, ArtifactRegistry.load(registry_block))
    consul = cast(ConsulConnection, ConsulConnection.load(consul_block))
    notifier = load_notifier(notifier_block)
    store = drift_store(registry)
    run_id = str(flow_run.id)
    said: list[str] = []
    for workspace in workspaces or sorted(config.workspaces):
        settings = config.workspace(workspace)
        now = datetime.now(UTC)
        memory = store.load(workspace)
        if not force and not due(memory, settings.drift_interval_seconds, now):
            continue
        if holder := deploy_in_progress(registry, workspace):
            said.append(f"{workspace}: skipped, a deploy of it is in progress ({holder})")
            continue
        service_name = config.namespace(settings.namespace).service_name
        report, version, error = None, None, None
        try:
            checked = check_drift(registry, consul, workspace, settings, service_name=service_name, run_id=run_id)
            report, version = checked.report, checked.version
        except DeployError as exc:
            error = str(exc)
            logger.warning("drift check of %s failed: %s", workspace, error)
        decision = decide(memory, workspace, report=report, error=error, now=now, run_id=run_id)
        if not store.save(decision.memory):
            said.append(f"{workspace}: another check came first; nothing told")
            continue
        tell_drift(
            notifier,
            decision,
            report=report,
            error=error,
            namespace=settings.namespace,
            version=version,
            previous=memory,
            run_id=run_id,
        )
        if report is not None:
            publish_drift(report, decision.tell)
        told = f" (told: {decision.tell})" if decision.tell else ""
        if error is not None:
            said.append(f"{workspace}: check failed{told}: {one_line(error, 120)}")
        elif report is not None and report.drifted:
            said.append(f"{workspace}: {len(report.items)} drifted{told}")
        else:
            said.append(f"{workspace}: clean{told}")
    message = "; ".join(said) or "no workspace due"
    logger.info("drift-check: %s", message)
    return Completed(message=one_line(message, 1000))
