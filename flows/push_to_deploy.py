"""push-to-deploy: one run takes a git push to a deployed, healthy, promoted artifact.

    resolve source -> build (Packer) -> register (S3 registry) -> lock workspace -> plan (Terraform)
    -> summarize + notify -> suspend for approval -> apply exactly the approved plan -> health gate
    (Consul) -> promote channel -> notify

The approval wait uses ``suspend_flow_run``: no process waits, and the run survives worker and server
restarts. On resume the flow re-runs from the top, so every step before the wait is a task whose result is
cached per run (see ``tasks/run_cache.py``); code in this function outside tasks must be free of side
effects or idempotent.

Outcomes an operator expects are returned as the run's final state, never raised: ``Deployed``,
``NothingToDeploy``, ``Rejected``, ``StalePlan``, ``LockHeld``, ``RolledBack`` (``ApprovalTimedOut`` is set by
``flows/approval_housekeeping.py``, since a suspended run has no process to notice its own timeout).
Faults (a broken template, a tampered plan, S3 down after retries) raise and fail the run. The workspace
lock is released on every path except the suspension itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.exceptions import Pause
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed

from blocks.consul import ConsulConnection
from blocks.notifier import SlackNotifier
from blocks.registry import ArtifactRegistry
from tasks import workspace_lock
from tasks.approval import MAX_APPROVAL_ATTEMPTS, ApprovalDecision, approval_form, check_approval
from tasks.deploy import (
    AppliedDeploy,
    PlannedDeploy,
    StalePlan,
    apply_plan,
    build_artifact,
    find_existing_build,
    next_build_label,
    plan_deploy,
    promote_channel,
    register_artifact,
    state_home,
)
from tasks.errors import ConsulError, TransientNotificationError
from tasks.health_gate import wait_until_healthy
from tasks.health_watch import close_deploy_window, open_deploy_window
from tasks.notifications import Notification, Severity
from tasks.registry import ArtifactVersion, validate_namespace
from tasks.retries import retry_on
from tasks.run_cache import run_scoped_cache_key
from tasks.source import resolve_source
from tasks.toolpaths import PROJECT_ROOT
from tasks.workspace_lock import LockHeld, WorkspaceLease

# The lease covers the approval wait plus this much for planning before it and applying after it.
PLAN_AND_APPLY_MARGIN_SECONDS = 1800


@dataclass(frozen=True)
class DeployContext:
    run_id: str
    run_name: str
    namespace: str
    workspace: str
    channel: str
    stack_dir: str
    service_name: str
    artifact_platform: str
    registry: ArtifactRegistry
    notifier: SlackNotifier
    consul: ConsulConnection

    @property
    def run_url(self) -> str | None:
        return self.notifier.flow_run_url(self.run_id)

    def notice(
        self,
        title: str,
        text: str,
        severity: Severity,
        *,
        facts: Mapping[str, str] | None = None,
        link_text: str | None = None,
        dedup_key: str | None = None,
    ) -> Notification:
        """A notification about this deploy: it always names the workspace and links to the run."""
        return Notification(
            title=title,
            text=text,
            severity=severity,
            fields={"workspace": self.workspace, **(facts or {})},
            link_url=self.run_url,
            link_text=link_text,
            dedup_key=dedup_key,
        )


def _artifact_key(kind: str, workspace: str) -> str:
    return f"{kind}-{workspace}".replace("_", "-").lower()


# --- small tasks whose side effects must happen once per run, even though the flow re-runs on resume ---


@task(
    name="notify-once",
    persist_result=True,
    cache_key_fn=run_scoped_cache_key,
    retries=3,
    retry_delay_seconds=[2, 5, 10],
    retry_condition_fn=retry_on(TransientNotificationError),
)
def notify_once(notifier: SlackNotifier, notification: Notification, *, step: str) -> str:
    return notifier.send(notification).ts


@task(
    name="notify",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[2, 5, 10],
    retry_condition_fn=retry_on(TransientNotificationError),
)
def notify(notifier: SlackNotifier, notification: Notification) -> str:
    return notifier.send(notification).ts


@task(name="lock-workspace", persist_result=True, cache_key_fn=run_scoped_cache_key)
def lock_workspace(
    workspace: str, *, run_id: str, run_name: str, lease_seconds: float, wait_seconds: float
) -> WorkspaceLease | LockHeld:
    logger = get_run_logger()
    logger.info("waiting up to %.0fs for workspace %s", wait_seconds, workspace)
    result = workspace_lock.acquire(
        workspace,
        holder_flow_run_id=run_id,
        holder_name=run_name,
        lease_seconds=lease_seconds,
        wait_seconds=wait_seconds,
    )
    if isinstance(result, WorkspaceLease):
        logger.info("holding workspace %s (lease %s until %s)", workspace, result.lease_id, result.expires_at)
    return result


@task(name="unlock-workspace", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 9])
def unlock_workspace(lease: WorkspaceLease) -> None:
    workspace_lock.release(lease)
    get_run_logger().info("released workspace %s", lease.workspace)


@task(name="publish-plan", persist_result=True, cache_key_fn=run_scoped_cache_key)
def publish_plan(planned: PlannedDeploy, *, run_url: str | None, step: str = "deploy") -> str:
    markdown = planned.view.markdown(workspace=planned.workspace, extra={"Run": run_url or "-"})
    create_markdown_artifact(
        markdown, key=_artifact_key("plan", planned.workspace), description=f"Plan {planned.plan_sha256[:12]}"
    )
    if planned.view.table_rows():
        create_table_artifact(
            planned.view.table_rows(),
            key=_artifact_key("plan-resources", planned.workspace),
            description=planned.view.version_diff,
        )
    return markdown


@task(name="record-deploy", cache_policy=NO_CACHE)
def record_deploy(workspace: str, lines: dict[str, str]) -> None:
    body = "\n".join(f"| {key} | {value} |" for key, value in lines.items())
    create_markdown_artifact(
        f"## Deploy record: `{workspace}`\n\n| | |\n|---|---|\n{body}\n",
        key=_artifact_key("deploy", workspace),
        description=lines.get("outcome", ""),
    )


# --- the approval wait ---------------------------------------------------------------------------------


def wait_for_approval(
    ctx: DeployContext, planned: PlannedDeploy, markdown: str, timeout_seconds: int
) -> ApprovalDecision:
    """Suspend until an operator answers; an answer that can't be acted on is reported and asked again."""
    logger = get_run_logger()
    for attempt in range(MAX_APPROVAL_ATTEMPTS):
        form = approval_form(planned.plan_sha256, markdown)
        answer = suspend_flow_run(wait_for_input=form, timeout=timeout_seconds, key=f"approval-{attempt}")
        checked = check_approval(answer, expected_sha256=planned.plan_sha256)
        if isinstance(checked, ApprovalDecision):
            return checked
        logger.warning("approval %d not accepted: %s", attempt + 1, checked.reason)
        notify_once(
            ctx.notifier,
            ctx.notice(
                f"Approval not accepted for {ctx.workspace}",
                f"{checked.reason}. The plan is still waiting; answer the form again.",
                "warning",
                facts={"plan": planned.plan_sha256[:12]},
                link_text="Open the run",
            ),
            step=f"invalid-approval-{attempt}",
        )
    return ApprovalDecision(False, "push-to-deploy", "too many invalid approval answers", planned.plan_sha256)


# --- the flow --------------------------------------------------------------------------------------------


@flow(name="push-to-deploy", log_prints=False)
def push_to_deploy(
    repo: str,
    ref: str = "main",
    namespace: str = "acmeinc/web",
    workspace: str = "staging",
    approval_timeout_seconds: int = 3600,
    channel: str = "",
    template_dir: str = "packer",
    packer_only: list[str] | None = None,
    stack_dir: str = "examples/stacks/local",
    service_name: str = "web",
    artifact_platform: str = "local",
    health_deadline_seconds: float = 60.0,
    rollback_on_unhealthy: bool = True,
    lock_wait_seconds: float = 3600.0,
    rebuild: bool = False,
    registry_block: str = "registry",
    notifier_block: str = "ops-slack",
    consul_block: str = "consul",
) -> State[Any]:
    """Build, plan, wait for approval, apply and promote one push.

    Args:
        repo: git repository (path or URL) holding the app and its Packer template.
        ref: branch, tag or commit to deploy.
        namespace: registry namespace, ``org/name``.
        workspace: Terraform workspace; one deploy at a time per workspace.
        approval_timeout_seconds: how long the plan waits for an operator before the run is cancelled.
        channel: registry channel promoted on success (default: the workspace name).
        template_dir: Packer template directory inside the repository.
        packer_only: Packer sources to build (default: the offline local image).
        stack_dir: Terraform stack, absolute or relative to this project.
        service_name: the Consul service the instance registers.
        artifact_platform: which artifact id the stack deploys (``local``, or a region for AMIs).
        health_deadline_seconds: how long the new instance has to pass its Consul checks.
        rollback_on_unhealthy: apply the channel's previous version if the new one is unhealthy.
        lock_wait_seconds: how long to queue behind another deploy of the same workspace.
        rebuild: build even if this commit was already built into a deployable version.
    """
    logger = get_run_logger()
    validate_namespace(namespace)
    workspace_lock.validate_workspace(workspace)
    if approval_timeout_seconds < 1:
        raise ValueError("approval_timeout_seconds must be positive")
    ctx = DeployContext(
        run_id=str(flow_run.id),
        run_name=str(flow_run.name),
        namespace=namespace,
        workspace=workspace,
        channel=channel or workspace,
        stack_dir=str(PROJECT_ROOT / stack_dir),  # an absolute stack_dir stays as it is
        service_name=service_name,
        artifact_platform=artifact_platform,
        registry=cast(ArtifactRegistry, ArtifactRegistry.load(registry_block)),
        notifier=cast(SlackNotifier, SlackNotifier.load(notifier_block)),
        consul=cast(ConsulConnection, ConsulConnection.load(consul_block)),
    )
    home = state_home()
    source = resolve_source(repo, ref, str(home / "runs" / ctx.run_id / "src"))
    version = None
    if not rebuild:
        version = find_existing_build(
            ctx.registry,
            namespace,
            commit=source.commit,
            service_name=service_name,
            platform=artifact_platform,
        )
    if version is None:
        label = next_build_label(ctx.registry, namespace)
        built = build_artifact(
            source,
            namespace=namespace,
            template_subdir=template_dir,
            only=packer_only if packer_only is not None else ["null.local_image"],
            build_label=label,
            output_dir=str(home / "images" / namespace.replace("/", "__") / ctx.run_id),
            service_name=service_name,
        )
        version = register_artifact(
            ctx.registry, built, created_by=f"flow-run/{ctx.run_name}", service_name=service_name
        )
    else:
        logger.info("reusing %s v%d, already built from %s", namespace, version.version, source.commit[:12])
    ctx.registry.registry().resolve_deployable(namespace, version.version)

    lease = lock_workspace(
        workspace,
        run_id=ctx.run_id,
        run_name=ctx.run_name,
        lease_seconds=approval_timeout_seconds + PLAN_AND_APPLY_MARGIN_SECONDS,
        wait_seconds=lock_wait_seconds,
    )
    if isinstance(lease, LockHeld):
        holder = lease.holder.holder_name if lease.holder else "an unknown run"
        message = f"workspace {workspace} stayed locked by {holder} for {lease.waited_seconds:.0f}s; nothing deployed"
        notify_once(
            ctx.notifier,
            ctx.notice(f"Deploy skipped: {workspace} is locked", message, "warning"),
            step="lock-held",
        )
        return Cancelled(name="LockHeld", message=message)

    try:
        outcome = _deploy_under_lock(
            ctx, version, approval_timeout_seconds, health_deadline_seconds, rollback_on_unhealthy
        )
    except Pause:
        raise  # suspended for approval: the lock must outlive this process
    except BaseException:
        unlock_workspace(lease)
        raise
    unlock_workspace(lease)
    logger.info("push-to-deploy finished: %s", outcome.name)
    return outcome


def _stack_variables(ctx: DeployContext, version: ArtifactVersion) -> dict[str, str]:
    try:
        artifact_id = version.artifacts[ctx.artifact_platform]
    except KeyError:
        raise ValueError(
            f"{ctx.namespace} v{version.version} has no {ctx.artifact_platform!r} artifact "
            f"(it has {sorted(version.artifacts)})"
        ) from None
    return {
        "artifact_id": artifact_id,
        "artifact_version": _build_label(version),
        "namespace": ctx.namespace,
        "service_name": ctx.service_name,
        "consul_addr": ctx.consul.address,
        "deploy_run_id": ctx.run_id,
        "instance_root": str(state_home() / "instances" / ctx.workspace),
    }


def _deploy_under_lock(
    ctx: DeployContext,
    version: ArtifactVersion,
    approval_timeout_seconds: int,
    health_deadline_seconds: float,
    rollback_on_unhealthy: bool,
) -> State[Any]:
    planned = plan_deploy(
        ctx.registry,
        workspace=ctx.workspace,
        stack_dir=ctx.stack_dir,
        version=version,
        variables=_stack_variables(ctx, version),
        plan_id=ctx.run_id,
        channel=ctx.channel,
    )
    view = planned.view
    if not planned.has_changes:
        message = f"{view.version_diff}: the plan has no changes; nothing to deploy"
        notify_once(
            ctx.notifier,
            ctx.notice(f"Nothing to deploy to {ctx.workspace}", message, "info"),
            step="no-changes",
        )
        return Completed(name="NothingToDeploy", message=message)

    markdown = publish_plan(planned, run_url=ctx.run_url)
    notify_once(
        ctx.notifier,
        ctx.notice(
            f"Plan waiting for approval: {view.version_diff} on {ctx.workspace}",
            f"{view.counts}. Approve or reject in the Prefect UI within {approval_timeout_seconds // 60} min.",
            "warning",
            facts={"artifact": view.version_diff, "plan sha256": planned.plan_sha256, "run": ctx.run_name},
            link_text="Review and approve",
            dedup_key=f"plan-{planned.plan_sha256}",
        ),
        step="plan-waiting",
    )
    decision = wait_for_approval(ctx, planned, markdown, approval_timeout_seconds)
    base_record = {
        "artifact": view.version_diff,
        "plan sha256": planned.plan_sha256,
        "decided by": decision.approver,
        "comment": decision.comment or "-",
        "decided at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": ctx.run_url or ctx.run_id,
    }
    if not decision.approved:
        message = f"rejected by {decision.approver}: {decision.comment or 'no comment'}; nothing applied"
        record_deploy(ctx.workspace, {"outcome": "rejected", **base_record})
        notify(
            ctx.notifier,
            ctx.notice(f"Plan rejected: {view.version_diff} on {ctx.workspace}", message, "info"),
        )
        return Cancelled(name="Rejected", message=message)

    return _apply_and_promote(
        ctx, version, planned, decision, base_record, health_deadline_seconds, rollback_on_unhealthy
    )


def _apply_and_promote(
    ctx: DeployContext,
    version: ArtifactVersion,
    planned: PlannedDeploy,
    decision: ApprovalDecision,
    base_record: dict[str, str],
    health_deadline_seconds: float,
    rollback_on_unhealthy: bool,
) -> State[Any]:
    view = planned.view
    consul = ctx.consul.get_client()
    from_label = _label_of(ctx, view.from_version)
    window_open = False
    if from_label is not None:
        open_deploy_window(
            consul,
            ctx.service_name,
            deploy_run_id=ctx.run_id,
            from_version=from_label,
            to_version=_build_label(version),
            duration=timedelta(seconds=health_deadline_seconds + PLAN_AND_APPLY_MARGIN_SECONDS),
        )
        window_open = True
    try:
        applied = apply_plan(ctx.registry, planned, approved_sha256=decision.plan_sha256, stack_dir=ctx.stack_dir)
        if isinstance(applied, StalePlan):
            record_deploy(ctx.workspace, {"outcome": "stale plan, nothing applied", **base_record})
            notify(
                ctx.notifier,
                ctx.notice(
                    f"Stale plan not applied on {ctx.workspace}",
                    f"{applied.reason}. Push again or re-run to plan afresh.",
                    "warning",
                    facts={"plan sha256": planned.plan_sha256},
                ),
            )
            return Cancelled(name="StalePlan", message=applied.reason)

        previous = promote_channel(
            ctx.registry,
            namespace=ctx.namespace,
            channel=ctx.channel,
            version=version.version,
            assigned_by=decision.approver,
            reason=f"deployed by {ctx.run_name}",
            metadata={
                "plan_sha256": planned.plan_sha256,
                "flow_run_id": ctx.run_id,
                "approved_by": decision.approver,
                "comment": decision.comment,
            },
        )
        gate = gate_health(ctx, applied, health_deadline_seconds)
        record = {
            **base_record,
            "applied in": f"{applied.duration_seconds:.1f}s",
            "outputs": ", ".join(f"{k}={v}" for k, v in sorted(applied.outputs.items())),
            "health": f"{gate.status} after {gate.waited_seconds:.1f}s",
        }
        if gate.healthy:
            record_deploy(ctx.workspace, {"outcome": "deployed", **record})
            notify(
                ctx.notifier,
                ctx.notice(
                    f"Deployed {view.version_diff} to {ctx.workspace}",
                    f"Approved by {decision.approver}; healthy in Consul after {gate.waited_seconds:.1f}s.",
                    "success",
                    facts={"plan sha256": planned.plan_sha256, "channel": ctx.channel},
                ),
            )
            return Completed(name="Deployed", message=f"{view.version_diff} deployed to {ctx.workspace}")

        return _handle_unhealthy(ctx, version, previous, record, gate.output, rollback_on_unhealthy)
    finally:
        if window_open:
            try:
                close_deploy_window(consul, ctx.service_name, deploy_run_id=ctx.run_id)
            except ConsulError as exc:
                get_run_logger().warning("could not close the deploy window: %s", exc)


@dataclass(frozen=True)
class GateOutcome:
    healthy: bool
    status: str
    output: str
    waited_seconds: float


@task(name="health-gate", cache_policy=NO_CACHE)
def gate_health(ctx: DeployContext, applied: AppliedDeploy, deadline_seconds: float) -> GateOutcome:
    service_id = applied.outputs.get("service_id")
    result = wait_until_healthy(
        ctx.consul.get_client(),
        service_name=ctx.service_name,
        service_id=str(service_id) if service_id else None,
        expect_meta={"deploy_run_id": ctx.run_id},
        deadline_seconds=deadline_seconds,
    )
    get_run_logger().info("health gate: %s after %.1fs", result.status, result.waited_seconds)
    return GateOutcome(result.healthy, str(result.status), result.output, result.waited_seconds)


def _build_label(version: ArtifactVersion) -> str:
    """The version baked into the image and its Consul service ID (see ``next_build_label``)."""
    return version.labels.get("build_label", str(version.version))


def _label_of(ctx: DeployContext, version: int | None) -> str | None:
    return None if version is None else _build_label(ctx.registry.registry().get(ctx.namespace, version))


def _handle_unhealthy(
    ctx: DeployContext,
    version: ArtifactVersion,
    previous: int | None,
    record: dict[str, str],
    check_output: str,
    rollback_on_unhealthy: bool,
) -> State[Any]:
    title = f"{ctx.namespace} v{version.version} is unhealthy on {ctx.workspace}"
    if not rollback_on_unhealthy or previous is None:
        why = "rollback disabled" if not rollback_on_unhealthy else "no previous version to roll back to"
        record_deploy(ctx.workspace, {"outcome": f"unhealthy ({why})", **record})
        notify(
            ctx.notifier,
            ctx.notice(title, f"Health gate failed ({why}): {check_output[:300]}", "critical"),
        )
        return Failed(name="Unhealthy", message=f"{title}; {why}")

    target = ctx.registry.registry().resolve_deployable(ctx.namespace, previous)
    notify(
        ctx.notifier,
        ctx.notice(title, f"Health gate failed: {check_output[:300]}. Rolling back to v{previous}.", "critical"),
    )
    rollback_plan = plan_deploy(
        ctx.registry,
        workspace=ctx.workspace,
        stack_dir=ctx.stack_dir,
        version=target,
        variables=_stack_variables(ctx, target),
        plan_id=f"{ctx.run_id}-rollback",
        channel=ctx.channel,
        step="rollback",
    )
    if rollback_plan.has_changes:
        # The deployment's policy (rollback_on_unhealthy) is the approval for restoring a known-good version.
        applied = apply_plan(
            ctx.registry, rollback_plan, approved_sha256=rollback_plan.plan_sha256, stack_dir=ctx.stack_dir
        )
        if isinstance(applied, StalePlan):
            record_deploy(ctx.workspace, {"outcome": "unhealthy; rollback plan went stale", **record})
            return Failed(name="RollbackFailed", message=applied.reason)
    promote_channel(
        ctx.registry,
        namespace=ctx.namespace,
        channel=ctx.channel,
        version=previous,
        assigned_by=f"flow-run/{ctx.run_name}",
        reason=f"rollback: v{version.version} failed its health gate",
        metadata={
            "plan_sha256": rollback_plan.plan_sha256,
            "flow_run_id": ctx.run_id,
            "rollback_from": str(version.version),
        },
    )
    record_deploy(
        ctx.workspace,
        {"outcome": f"rolled back to v{previous}", **record, "rollback plan": rollback_plan.plan_sha256},
    )
    notify(
        ctx.notifier,
        ctx.notice(
            f"Rolled back {ctx.workspace} to v{previous}",
            f"v{version.version} failed its health gate; v{previous} is applied "
            f"and the {ctx.channel} channel points at it again.",
            "warning",
        ),
    )
    return Failed(name="RolledBack", message=f"v{version.version} unhealthy; rolled back to v{previous}")
