"""deploy-artifact: one version into one workspace, from plan to a healthy, promoted deploy.

    lock workspace -> plan (Terraform) -> notify -> suspend for approval -> apply exactly the approved plan
    -> health gate (Consul) -> promote channel -> record + notify -> icd.channel.moved

What the workspace deploys, how, and what a healthy deploy moves come from ``icd.toml``; a run is started
by an ``icd.plan.requested`` event (a registration or a channel move, see ``icd/events.py``), by
``push-to-deploy`` (one click: build a ref and deploy it) or by hand with a workspace and a version.

The approval wait uses ``suspend_flow_run``: no process waits, and the run survives worker and server
restarts. On resume the flow re-runs from the top, so every step before the wait is a task cached per run
and per inputs (``tasks/policies.py``); code here outside tasks is free of side effects.

Every run ends in one place, :func:`finish`: it records the deploy, notifies operators and returns the
final state. Outcomes an operator expects are named states (``Deployed``, ``NothingToDeploy``,
``Rejected``, ``StalePlan``, ``LockHeld``, ``LockLost``, ``RolledBack``, ``Unhealthy``; ``ApprovalTimedOut``
is set by ``flows/deploy_ended.py``); a fault (a broken template, a tampered plan, S3 down after retries)
ends ``Failed`` with its reason, and is told too. The workspace lock is released on every path except
the suspension itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any, Literal, cast

from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import State
from prefect.exceptions import Pause
from prefect.flow_runs import suspend_flow_run
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed
from pydantic import Field

from blocks.consul import ConsulConnection
from blocks.notifier import SlackNotifier
from blocks.registry import ArtifactRegistry
from icd.config import load_config
from icd.deploy.apply import AppliedDeploy, StalePlan
from icd.deploy.approval import (
    MAX_APPROVAL_ATTEMPTS,
    ApprovalDecision,
    InvalidApproval,
    PlanApproval,
    approval_form,
    check_approval,
    describe_suspension,
)
from icd.deploy.artifacts import artifact_for
from icd.deploy.lock import LockHeld, WorkspaceLease
from icd.deploy.plan import PlannedDeploy
from icd.errors import DeployError
from icd.notify.message import Notification, Severity
from icd.paths import PROJECT_ROOT, state_home
from icd.registry.models import ArtifactVersion, ChannelMoved
from icd.rules import PLAN_AND_APPLY_MARGIN_SECONDS, Workspace
from icd.service.contract import SERVICE_ID_OUTPUT, StackVariables
from icd.text import one_line, operator_time
from tasks.announce import announce_channel_move, announce_teardown
from tasks.apply import apply_plan
from tasks.approve import publish_plan
from tasks.gate import close_window, gate_health, open_window
from tasks.lock import lock_workspace, renew_workspace_lock, unlock_workspace
from tasks.notify import notify
from tasks.plan import plan_deploy
from tasks.policies import ONCE_PER_RUN, once_per_run
from tasks.promote import promote_channel
from tasks.record import record_deploy

StateKind = Literal["completed", "cancelled", "failed"]
_STATES = {"completed": Completed, "cancelled": Cancelled, "failed": Failed}


@dataclass(frozen=True)
class DeployContext:
    run_id: str
    run_name: str
    namespace: str
    workspace: str
    follows: str  # the channel the workspace follows (latest or a channel)
    promotes: str | None  # the channel a healthy deploy moves, if any
    stack_dir: str
    service_name: str
    platform: str
    registry: ArtifactRegistry
    notifier: SlackNotifier
    consul: ConsulConnection
    notifier_block: str
    teardown: bool = False  # destroy what the workspace runs, through the same plan-approve-apply path

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

    def tell(self, notification: Notification) -> None:
        """Notify operators, best effort (``tasks/notify.py``): a Slack failure never changes the outcome."""
        notify(self.notifier, notification, notifier_block=self.notifier_block)


@dataclass(frozen=True)
class Outcome:
    """How a run ends: its final state, the operator's message and the deploy record's facts."""

    kind: StateKind
    name: str
    title: str
    message: str
    severity: Severity
    record: Mapping[str, str] = field(default_factory=dict)
    facts: Mapping[str, str] = field(default_factory=dict)


def finish(ctx: DeployContext, outcome: Outcome) -> State[Any]:
    """The one place a run ends: record the deploy, tell operators, return the final state."""
    if outcome.record:
        record_deploy(ctx.workspace, {"outcome": outcome.name, **outcome.record})
    ctx.tell(ctx.notice(outcome.title, outcome.message, outcome.severity, facts=outcome.facts))
    get_run_logger().info("push-to-deploy finished: %s: %s", outcome.name, outcome.message)
    return _STATES[outcome.kind](name=outcome.name, message=one_line(outcome.message, 500))


def fault(ctx: DeployContext, exc: BaseException, facts: Mapping[str, str] | None = None) -> Outcome:
    reason = str(exc) or type(exc).__name__
    return Outcome(
        "failed",
        "Failed",
        f"Deploy failed on {ctx.workspace}: {type(exc).__name__}",
        reason,
        "critical",
        record={**(facts or {}), "error": reason},
    )


@task(name="approval-deadline", persist_result=True, cache_policy=ONCE_PER_RUN)
def approval_deadline(plan_sha256: str, timeout_seconds: int) -> datetime:
    """When the approval wait ends: fixed at the first suspension, never moved by a re-ask."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=timeout_seconds)


@flow(name="deploy-artifact", log_prints=False)
def deploy_artifact(
    workspace: Workspace,
    version: Annotated[int, Field(ge=1, description="The registry version to deploy.")],
    registry_block: str = "registry",
    notifier_block: str = "ops-slack",
    consul_block: str = "consul",
    teardown: Annotated[
        bool,
        Field(description="Destroy what the workspace runs instead (icd-registry teardown); approved like any plan."),
    ] = False,
) -> State[Any]:
    """Plan ``version`` into ``workspace``, wait for approval, apply, gate on health, promote.

    With ``teardown``, the plan destroys what the workspace runs (``version`` only fills the stack's
    variables); it waits for approval and applies like any plan, then no gate and no promotion.

    Everything else (namespace, stack, service, platform, channels, approval and health settings) is the
    workspace's entry in ``icd.toml``.
    """
    config = load_config()
    settings = config.workspace(workspace)
    ctx = DeployContext(
        run_id=str(flow_run.id),
        run_name=str(flow_run.name),
        namespace=settings.namespace,
        workspace=workspace,
        follows=settings.channel,
        promotes=config.promoted_channel(workspace),
        stack_dir=str(PROJECT_ROOT / settings.stack),  # an absolute stack stays as it is
        service_name=config.namespace(settings.namespace).service_name,
        platform=settings.platform,
        registry=cast(ArtifactRegistry, ArtifactRegistry.load(registry_block)),
        notifier=cast(SlackNotifier, SlackNotifier.load(notifier_block)),
        consul=cast(ConsulConnection, ConsulConnection.load(consul_block)),
        notifier_block=notifier_block,
        teardown=teardown,
    )
    lease = once_per_run(
        "workspace-lock",
        lambda: lock_workspace(
            workspace,
            run_id=ctx.run_id,
            run_name=ctx.run_name,
            lease_seconds=settings.approval_timeout_seconds + PLAN_AND_APPLY_MARGIN_SECONDS,
            wait_seconds=settings.lock_wait_seconds,
        ),
    )
    if isinstance(lease, LockHeld):
        holder = lease.holder.holder_name if lease.holder else "an unknown run"
        message = f"workspace {workspace} stayed locked by {holder} for {lease.waited_seconds:.0f}s; nothing deployed"
        return finish(
            ctx, Outcome("cancelled", "LockHeld", f"Deploy skipped: {workspace} is locked", message, "warning")
        )
    # Everything after the lock, including what runs again on resume, is inside the release path.
    try:
        outcome = deploy_version(
            ctx,
            lease,
            version,
            settings.approval_timeout_seconds,
            settings.health_deadline_seconds,
            settings.rollback_on_unhealthy,
        )
    except Pause:
        raise  # suspended for approval: the lock must outlive this process
    except DeployError as exc:
        outcome = fault(ctx, exc)
    except BaseException:
        unlock_workspace(lease)
        raise
    unlock_workspace(lease)
    return finish(ctx, outcome)


def stack_variables(ctx: DeployContext, version: ArtifactVersion) -> dict[str, str]:
    """What every stack is given. Contract: docs/service-contract.md#stack-variables (the pre-flight check
    reports a stack that doesn't declare one of them)."""
    return StackVariables(
        artifact_id=artifact_for(version, ctx.platform),
        artifact_version=version.build_label,
        namespace=ctx.namespace,
        service_name=ctx.service_name,
        consul_addr=ctx.consul.address,
        deploy_run_id=ctx.run_id,
        workspace=ctx.workspace,
        instance_root=str(state_home() / "instances" / ctx.workspace),
    ).as_vars()


def plan(ctx: DeployContext, version: ArtifactVersion, *, plan_id: str) -> PlannedDeploy:
    return plan_deploy(
        ctx.registry,
        workspace=ctx.workspace,
        stack_dir=ctx.stack_dir,
        version=version,
        platform=ctx.platform,
        follows=ctx.follows,
        promotes=ctx.promotes,
        variables=stack_variables(ctx, version),
        plan_id=plan_id,
        destroy=ctx.teardown,
    )


@dataclass(frozen=True)
class AwaitingApproval:
    """Everything the run needs after the approval wait, recorded once before the first suspension."""

    version: ArtifactVersion
    planned: PlannedDeploy
    form_markdown: str
    deadline: datetime


def plan_and_ask(ctx: DeployContext, number: int, approval_timeout_seconds: int) -> AwaitingApproval | Outcome:
    """Plan, publish the plan, fix the deadline and tell operators: what precedes the first suspension."""
    version = ctx.registry.registry().resolve_deployable(ctx.namespace, number)
    planned = plan(ctx, version, plan_id=ctx.run_id)
    view = planned.view
    # A teardown whose plan destroys no resource has nothing to do (outputs left in the state don't count).
    if not planned.has_changes or (ctx.teardown and not view.destroy):
        message = (
            f"nothing of {ctx.namespace} runs in {ctx.workspace}; nothing to tear down"
            if ctx.teardown
            else f"{view.version_diff}: the plan has no changes; nothing to deploy"
        )
        return Outcome("completed", "NothingToDeploy", f"Nothing to deploy to {ctx.workspace}", message, "info")

    form_markdown = publish_plan(planned, run_url=ctx.run_url, ui_url=ctx.notifier.prefect_ui_url)
    deadline = approval_deadline(planned.plan_sha256, approval_timeout_seconds)
    ctx.tell(
        ctx.notice(
            f"Plan waiting for approval: {view.version_diff} on {ctx.workspace}",
            f"{view.headline(ctx.workspace)}. Approve or reject in the Prefect UI before {operator_time(deadline)}.",
            "warning",
            facts={"artifact": view.version_diff, "plan sha256": planned.plan_sha256, "run": ctx.run_name},
            link_text="Review and approve",
            dedup_key=f"plan-{planned.plan_sha256}",
        ),
    )
    return AwaitingApproval(version, planned, form_markdown, deadline)


def deploy_version(
    ctx: DeployContext,
    lease: WorkspaceLease,
    number: int,
    approval_timeout_seconds: int,
    health_deadline_seconds: float,
    rollback_on_unhealthy: bool,
) -> Outcome:
    # On a re-run after a resume this is read back, not replayed: no task runs, no log lines again.
    asked = once_per_run("plan-and-ask", lambda: plan_and_ask(ctx, number, approval_timeout_seconds))
    if isinstance(asked, Outcome):
        return asked
    version, planned, view = asked.version, asked.planned, asked.planned.view
    decision = wait_for_approval(ctx, planned, asked.form_markdown, asked.deadline)
    record = {
        "artifact": view.version_diff,
        "plan sha256": planned.plan_sha256,
        "decided by": decision.approver,
        "comment": decision.comment or "-",
        "decided at": operator_time(datetime.now(UTC)),
        "run": ctx.run_url or ctx.run_id,
    }
    if not decision.approved:
        message = f"rejected by {decision.approver}: {decision.comment or 'no comment'}; nothing applied"
        return Outcome(
            "cancelled", "Rejected", f"Plan rejected: {view.version_diff} on {ctx.workspace}", message, "info", record
        )
    # The lease was sized for the approval wait; the apply, the gate and a rollback must not outlive it, however
    # late the approval came.
    renewed = renew_workspace_lock(lease, seconds=health_deadline_seconds + 2 * PLAN_AND_APPLY_MARGIN_SECONDS)
    if isinstance(renewed, LockHeld):
        holder = renewed.holder.holder_name if renewed.holder else "another run"
        message = (
            f"the workspace lock lapsed or was broken while this run waited, and {holder} holds {ctx.workspace} "
            "now; nothing applied. Re-run to plan afresh."
        )
        return Outcome(
            "cancelled",
            "LockLost",
            f"Approved plan not applied on {ctx.workspace}: lock lost",
            message,
            "warning",
            {"outcome": "lock lost, nothing applied", **record},
        )
    try:
        return apply_and_gate(ctx, version, planned, decision, record, health_deadline_seconds, rollback_on_unhealthy)
    finally:
        if renewed.lease_id != lease.lease_id:
            unlock_workspace(renewed)  # taken again after the first lease was lost; the caller releases that one


def suspend_for_approval(form: type[PlanApproval], *, deadline: datetime, key: str, message: str) -> PlanApproval:
    """``suspend_flow_run`` until ``deadline`` (fixed at the first suspension: a re-ask never extends it),
    with ``message`` as the suspended run's state message, so the run page says what it waits for."""
    # Rounded up: the server expires the wait no earlier than the deadline operators were told.
    remaining = max(1, math.ceil((deadline - datetime.now(UTC)).total_seconds()))
    try:
        return suspend_flow_run(wait_for_input=form, timeout=remaining, key=key)
    except Pause as pause:
        if pause.state is not None:
            describe_suspension(flow_run.id, pause.state, message)
        raise


def ask_for_approval(
    ctx: DeployContext,
    planned: PlannedDeploy,
    form: type[PlanApproval],
    *,
    deadline: datetime,
    attempt: int,
    status: str,
) -> ApprovalDecision | InvalidApproval:
    """One question: suspend, then check the answer; a refused one is logged and told once."""
    answer = suspend_for_approval(form, deadline=deadline, key=f"approval-{attempt}", message=status)
    checked = check_approval(answer, expected_sha256=planned.plan_sha256)
    if isinstance(checked, InvalidApproval):
        get_run_logger().warning("approval %d not accepted: %s", attempt + 1, checked.reason)
        ctx.tell(
            ctx.notice(
                f"Approval not accepted for {ctx.workspace}",
                f"{checked.reason}. The plan is still waiting; answer the form again.",
                "warning",
                facts={"plan": planned.plan_sha256[:12], "attempt": str(attempt + 1)},
                link_text="Open the run",
            ),
        )
    return checked


def wait_for_approval(
    ctx: DeployContext, planned: PlannedDeploy, markdown: str, deadline: datetime
) -> ApprovalDecision:
    """Suspend until an operator answers; an answer that can't be acted on is reported and asked again.

    Each answered question is recorded (``once_per_run``), so the re-run after the next answer reads the
    earlier verdicts instead of loading, logging and reporting them again.
    """
    refusal = ""
    waiting = f"Waiting for approval: {planned.view.headline(ctx.workspace)}; answer before {operator_time(deadline)}"
    for attempt in range(MAX_APPROVAL_ATTEMPTS):
        form = approval_form(planned.plan_sha256, markdown, refusal=refusal)
        # The run page shows the first 70 characters of a state message: the reason comes first.
        status = f"Answer not accepted: {refusal}. {waiting}" if refusal else waiting
        question = partial(ask_for_approval, ctx, planned, form, deadline=deadline, attempt=attempt, status=status)
        checked = once_per_run(f"approval-{attempt}", question)
        if isinstance(checked, ApprovalDecision):
            return checked
        refusal = checked.reason
    return ApprovalDecision(False, "push-to-deploy", "too many invalid approval answers", planned.plan_sha256)


def apply_approved(ctx: DeployContext, planned: PlannedDeploy, approved_sha256: str) -> AppliedDeploy | StalePlan:
    """Apply exactly the saved plan whose sha256 was approved (the task checks it against the plan store)."""
    return apply_plan(
        ctx.registry, planned, approved_sha256=approved_sha256, stack_dir=ctx.stack_dir, platform=ctx.platform
    )


def stale_plan(
    ctx: DeployContext, stale: StalePlan, planned: PlannedDeploy, record: dict[str, str], *, what: str, again: str
) -> Outcome:
    """The approved plan no longer matches the state: nothing was applied."""
    return Outcome(
        "cancelled",
        "StalePlan",
        f"{what} not applied on {ctx.workspace}",
        f"{stale.reason}. {again} to plan afresh.",
        "warning",
        {"outcome": "stale plan, nothing applied", **record},
        {"plan sha256": planned.plan_sha256},
    )


def apply_and_gate(
    ctx: DeployContext,
    version: ArtifactVersion,
    planned: PlannedDeploy,
    decision: ApprovalDecision,
    record: dict[str, str],
    health_deadline_seconds: float,
    rollback_on_unhealthy: bool,
) -> Outcome:
    if ctx.teardown:
        return tear_down(ctx, planned, decision, record)
    view = planned.view
    previous = view.from_version  # the one source of "what ran before": the plan's view of the state
    from_label = ctx.registry.registry().get(ctx.namespace, previous).build_label if previous else ""
    open_window(
        ctx.consul,
        ctx.service_name,
        deploy_run_id=ctx.run_id,
        from_version=from_label,
        to_version=version.build_label,
        seconds=health_deadline_seconds + PLAN_AND_APPLY_MARGIN_SECONDS,
    )
    try:
        applied = apply_approved(ctx, planned, decision.plan_sha256)
        if isinstance(applied, StalePlan):
            return stale_plan(ctx, applied, planned, record, what="Stale plan", again="Push again or re-run")
        gate = gate_health(
            ctx.consul,
            service_name=ctx.service_name,
            # Contract: docs/service-contract.md#stack-outputs (optional: without it the gate matches on Meta).
            service_id=str(applied.outputs[SERVICE_ID_OUTPUT]) if applied.outputs.get(SERVICE_ID_OUTPUT) else None,
            deploy_run_id=ctx.run_id,
            deadline_seconds=health_deadline_seconds,
        )
        record |= {
            "applied in": f"{applied.duration_seconds:.1f}s",
            "outputs": ", ".join(f"{k}={v}" for k, v in sorted(applied.outputs.items())),
            "health": f"{gate.status} after {gate.waited_seconds:.1f}s",
        }
        if not gate.healthy:
            detail = f"{gate.output[:300] or gate.status}; looked for {gate.criteria}; found {gate.found}"
            return handle_unhealthy(ctx, version, planned, record, detail, rollback_on_unhealthy)
        return promote(ctx, version, planned, decision, applied, gate.waited_seconds, record)
    finally:
        close_window(ctx.consul, ctx.service_name, deploy_run_id=ctx.run_id)


def tear_down(
    ctx: DeployContext, planned: PlannedDeploy, decision: ApprovalDecision, record: dict[str, str]
) -> Outcome:
    """Apply the approved destroy plan. The stack's destroy step stops the instance and deregisters it from
    Consul; nothing is gated (there is nothing left to be healthy) and no channel moves."""
    applied = apply_approved(ctx, planned, decision.plan_sha256)
    if isinstance(applied, StalePlan):
        again = "Ask for the teardown again"
        return stale_plan(ctx, applied, planned, record, what="Stale teardown plan", again=again)
    announce_teardown(
        ctx.workspace, ctx.namespace, version=planned.view.from_version, by=decision.approver, run_id=ctx.run_id
    )
    return Outcome(
        "completed",
        "TornDown",
        f"Tore down {ctx.workspace}",
        f"{planned.view.version_diff} in {ctx.workspace}, approved by {decision.approver}. Remove the workspace "
        "from icd.toml, or the next version plans it again.",
        "success",
        {"outcome": "torn down", **record, "applied in": f"{applied.duration_seconds:.1f}s"},
        {"plan sha256": planned.plan_sha256},
    )


def promote(
    ctx: DeployContext,
    version: ArtifactVersion,
    planned: PlannedDeploy,
    decision: ApprovalDecision,
    applied: AppliedDeploy,
    waited: float,
    record: dict[str, str],
) -> Outcome:
    diff = planned.view.version_diff
    deployed = Outcome(
        "completed",
        "Deployed",
        f"Deployed {diff} to {ctx.workspace}",
        f"Approved by {decision.approver}; healthy in Consul after {waited:.1f}s.",
        "success",
        {"outcome": "deployed", **record},
        {"plan sha256": planned.plan_sha256, **({"channel": ctx.promotes} if ctx.promotes else {})},
    )
    if planned.promoted is None or ctx.promotes is None:
        return deployed
    moved = promote_channel(
        ctx.registry,
        namespace=ctx.namespace,
        channel=ctx.promotes,
        version=version.version,
        assigned_by=decision.approver,
        reason=f"deployed by {ctx.run_name}",
        metadata={
            "plan_sha256": applied.plan_sha256,
            "flow_run_id": ctx.run_id,
            "approved_by": decision.approver,
            "comment": decision.comment,
        },
        expected_version=planned.promoted.version,
    )
    if isinstance(moved, ChannelMoved):
        return Outcome(
            "completed",
            "DeployedChannelMoved",
            f"Deployed {diff} to {ctx.workspace}; channel {ctx.promotes} not moved",
            f"Applied and healthy, but channel {ctx.promotes} moved to v{moved.actual_version} meanwhile and was "
            f"left there; promote by hand if v{version.version} should win.",
            "warning",
            {"outcome": "deployed, channel moved meanwhile", **record},
        )
    announce_channel_move(
        ctx.namespace,
        ctx.promotes,
        from_version=moved.from_version,
        to_version=version.version,
        by=decision.approver,
        reason=f"deployed to {ctx.workspace} by {ctx.run_name}",
        skip=ctx.workspace,
    )
    return deployed


def handle_unhealthy(
    ctx: DeployContext,
    version: ArtifactVersion,
    planned: PlannedDeploy,
    record: dict[str, str],
    detail: str,
    rollback_on_unhealthy: bool,
) -> Outcome:
    previous = planned.view.from_version
    title = f"{ctx.namespace} v{version.version} is unhealthy on {ctx.workspace}"
    if not rollback_on_unhealthy or previous is None:
        why = "rollback disabled" if not rollback_on_unhealthy else "no previous version to roll back to"
        return Outcome(
            "failed",
            "Unhealthy",
            title,
            f"Health gate failed ({why}): {detail}",
            "critical",
            {"outcome": f"unhealthy ({why})", **record},
        )
    # The deployment's policy (rollback_on_unhealthy) is the approval for restoring a known-good version,
    # verified exactly like a forward deploy (sealed record, image digest, plan hash, state).
    target = ctx.registry.registry().resolve_deployable(ctx.namespace, previous)
    rollback = plan(ctx, target, plan_id=f"{ctx.run_id}-rollback")
    if rollback.has_changes:
        applied = apply_approved(ctx, rollback, rollback.plan_sha256)
        if isinstance(applied, StalePlan):
            return Outcome(
                "failed",
                "RollbackFailed",
                title,
                f"Health gate failed: {detail}. The rollback to v{previous} went stale: {applied.reason}",
                "critical",
                {"outcome": "unhealthy; rollback plan went stale", **record},
            )
    return Outcome(
        "failed",
        "RolledBack",
        f"Rolled back {ctx.workspace} to v{previous}",
        f"v{version.version} failed its health gate: {detail}. v{previous} is applied again; no channel moved.",
        "critical",
        {"outcome": f"rolled back to v{previous}", **record, "rollback plan": rollback.plan_sha256},
    )
