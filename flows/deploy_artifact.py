"""deploy-artifact: the workspace's newest request, from plan to a healthy, promoted deploy.

    claim the workspace -> plan -> still wanted? -> notify -> suspend for approval -> still wanted?
    -> apply exactly the approved plan -> health gate (Consul) -> promote -> release (the next request's run)

Started by the workspace queue (``icd/deploy/queue.py``; ``icd.plan.dispatched`` names the run) when a request
finds the workspace free or only waiting for approval of an older target (this run then supersedes it), or by
hand with a workspace and a version (the newest request, so it wins). A run never waits for the workspace: it
takes it, or leaves its request queued and ends (``Queued``), holding no worker slot. The approval wait
suspends the flow (``tasks/approve.py``); on resume it re-runs from the top, each earlier stretch read back
from its record (``once_per_run``), so code here outside tasks has no side effects. Every run ends in
:func:`finish`; the outcomes and their wording are ``icd/deploy/outcome.py``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State, StateType
from prefect.exceptions import Pause
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed
from pydantic import Field

from icd import events
from icd.deploy import outcome as outcomes
from icd.deploy.apply import AppliedDeploy, StalePlan
from icd.deploy.approval import ApprovalDecision, end_waiting_run
from icd.deploy.dispatch import checkpoint
from icd.deploy.outcome import Outcome
from icd.deploy.plan import PlannedDeploy
from icd.deploy.queue import Claimed, DeployRequest, Lost, NoticeRef, RunRef, Superseded
from icd.deploy.rollout import RolloutPath, batch_line, describe_mix, deviation
from icd.errors import (
    ConfigError,
    ConflictError,
    ContractBreachError,
    DeployError,
    RegistryStorageError,
    RunRecordStoreError,
    UnexpectedError,
)
from icd.health.gate import BatchGateResult, InstanceHealth
from icd.notify.message import NotificationReceipt, Severity
from icd.registry.models import ArtifactVersion, ChannelMoved
from icd.rules import PLAN_AND_APPLY_MARGIN_SECONDS, Workspace
from icd.run_state import flow_run_state
from icd.service.contract import SERVICE_ID_OUTPUT, SERVICE_IDS_OUTPUT, cite
from icd.text import one_line
from tasks.announce import announce_channel_move, announce_teardown
from tasks.apply import apply_plan
from tasks.approve import AwaitingApproval, approval_deadline, approval_notice, publish_plan, wait_for_approval
from tasks.context import DeployContext, deploy_context, run_thread_key, tell_without_context
from tasks.gate import close_window, gate_batch, gate_health, open_window
from tasks.github_status import deploy_status, deployment_reported, superseded_status
from tasks.notify import notify_now, update_notice, update_notice_now
from tasks.plan import plan_deploy, read_version, resolve_version
from tasks.policies import once_per_run, retried
from tasks.promote import empty_channel, promote_channel
from tasks.provenance import record_deployment
from tasks.queue import checkpoint_workspace, claim_workspace, release_workspace, supersede_waiting_run
from tasks.record import record_deploy
from tasks.rollout import announce_batch, ask_again, plan_rollout, publish_instances

_STATES = {"completed": Completed, "cancelled": Cancelled, "failed": Failed}
_MARGIN = timedelta(seconds=PLAN_AND_APPLY_MARGIN_SECONDS)


def finish(ctx: DeployContext, outcome: Outcome) -> State[Any]:
    """The one place a run ends: record the deploy, tell operators, return the final state."""
    if outcome.record:
        record_deploy(ctx.workspace, {"outcome": outcome.name, **outcome.record})
    if outcome.tell:
        notice = ctx.notice(outcome.title, outcome.message, outcome.severity, facts=outcome.facts)
        ctx.tell(notice, reply_to=outcome.thread)
    # The channel's one line for this deploy (its approval notice, if it asked) now says how it ended.
    ctx.close_thread(outcome.title, outcome.message, outcome.severity, outcome.name)
    deploy_status(ctx, outcome.name, detail=outcome.title)  # GitHub: the deployment's final state
    get_run_logger().info("deploy-artifact finished: %s: %s", outcome.name, outcome.message)
    return _STATES[outcome.kind](name=outcome.name, message=one_line(outcome.message, 500))


def finish_unconfigured(workspace: str, run: RunRef, notifier_block: str, outcome: Outcome) -> State[Any]:
    """:func:`finish` for a run ``icd.toml`` can't describe: there is no context, so operators are told through
    the notifier block alone. Nothing is released here (there is no registry to do it with): a run that had
    claimed the workspace before (a typo made while it awaited approval) is released by deploy-ended."""
    record_deploy(workspace, {"outcome": outcome.name, **outcome.record})
    tell_without_context(workspace, run, notifier_block, outcome.title, outcome.message, outcome.severity)
    get_run_logger().error("deploy-artifact finished: %s: %s", outcome.name, outcome.message)
    return _STATES[outcome.kind](name=outcome.name, message=one_line(outcome.message, 500))


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
    request_id: Annotated[
        str, Field(description="Set by the workspace queue: deploy its newest request. Empty: deploy `version`.")
    ] = "",
) -> State[Any]:
    """Plan the workspace's newest request into ``workspace``, wait for approval, apply, gate on health, promote.

    With ``teardown``, the plan destroys what the workspace runs (``version`` only fills the stack's
    variables); it waits for approval and applies like any plan, then no gate and no promotion.
    """
    run = RunRef(str(flow_run.id), str(flow_run.name))
    try:
        ctx = deploy_context(
            workspace,
            run,
            registry_block=registry_block,
            notifier_block=notifier_block,
            consul_block=consul_block,
            teardown=teardown,
        )
    except ConfigError as exc:  # a typo in icd.toml, the workspace removed: told like any failure
        return finish_unconfigured(workspace, run, notifier_block, outcomes.fault(workspace, exc))
    try:
        claim = once_per_run("claim", lambda: claimed_and_queued(ctx, None if request_id else ctx.own_request(version)))
    except DeployError as exc:
        # The claim's record or the queue could not be read (S3 down on resume): this run may hold the workspace.
        return end_on_fault(ctx, exc)
    except Exception as exc:
        end_on_bug(ctx, exc)  # after the claim, this run may hold the workspace
        raise
    if not isinstance(claim, Claimed):
        return finish(ctx, claim)
    deployment_reported(ctx, claim.holder.request.version)  # a re-run read "queued" back with its claim
    # Everything after the claim, including what runs again on resume, is inside the release path.
    try:
        outcome = deploy(ctx, claim.holder.request)
    except Pause:
        raise  # suspended for approval: the workspace stays held without a process
    except DeployError as exc:
        return end_on_fault(ctx, exc)
    except Exception as exc:
        end_on_bug(ctx, exc)  # then raised on, so that the run ends Failed with its traceback
        raise
    except BaseException:  # Prefect's signals (a cancellation), an interpreter exit: released, nothing more
        give_back(ctx)
        raise
    released = give_back(ctx)
    if outcome.again:
        outcome = asked_again(ctx, outcome, claim.holder.request.version, released=released)
    return finish(ctx, outcome)


def asked_again(ctx: DeployContext, outcome: Outcome, version: int, *, released: bool) -> Outcome:
    """Queue the same version again (``outcome.again``), only once the workspace is free: a request for the
    target its holder serves would be dropped. When that can't be done, the run's message says so."""
    if not released:
        note = "the workspace could not be released now (S3 unreachable), so it was not asked again: re-run it"
        return replace(outcome, message=f"{outcome.message}. But {note}")
    try:
        ask_again(ctx.registry, ctx.workspace, ctx.namespace, version, by=f"run {ctx.run.name}", why=outcome.again)
    except DeployError as exc:
        get_run_logger().error("could not ask %s v%d again on %s: %s", ctx.namespace, version, ctx.workspace, exc)
        return replace(
            outcome, message=f"{outcome.message}. But asking again failed ({one_line(str(exc), 200)}): re-run it"
        )
    return outcome


def end_on_fault(ctx: DeployContext, exc: DeployError) -> State[Any]:
    """A fault ends the run Failed, naming it; operators are told whether the workspace could be released."""
    told = outcomes.fault(ctx.workspace, exc)
    # With S3 failing, one try: the release is S3 too, and deploy-ended retries it until S3 answers.
    if not give_back(ctx, patient=not isinstance(exc, RunRecordStoreError | RegistryStorageError)):
        pending = "the workspace could not be released now (S3 unreachable): deploy-ended releases it once S3 answers"
        told = replace(told, message=f"{told.message}; {pending}", record={**told.record, "workspace": pending})
    return finish(ctx, told)


def end_on_bug(ctx: DeployContext, exc: Exception) -> None:
    """An exception the code does not expect (a bug): the workspace is released and operators are told, as for
    a fault, naming only its type (its text could hold anything). Unless the run is being cancelled: an
    exception then is the cancellation's (Prefect refuses to suspend a run it is cancelling), so the workspace
    is released and deploy-ended tells of the cancellation, once."""
    if being_cancelled(ctx.run_id):
        give_back(ctx)
        return
    end_on_fault(ctx, UnexpectedError(f"{type(exc).__name__} raised by deploy-artifact (the run's log has it)"))


def being_cancelled(run_id: str) -> bool:
    """Whether the server is cancelling this run (or has); False when it can't say (the exception is then told as
    a bug, which it may be)."""
    return flow_run_state(run_id) in (StateType.CANCELLING, StateType.CANCELLED)


def give_back(ctx: DeployContext, *, patient: bool = True) -> bool:
    """Release the workspace; the run still ends as it should if the lock's store (S3) can't be reached: a
    lock whose run has ended holds nothing, the next request takes the workspace, and deploy-ended retries
    the release until S3 answers. False when it could not be released now."""
    release = release_workspace if patient else release_workspace.with_options(retries=0)
    try:
        release(ctx.registry, ctx.workspace, ctx.run_id)
    except DeployError as exc:
        get_run_logger().error(
            "could not release %s (%s); deploy-ended releases it once S3 answers", ctx.workspace, exc
        )
        return False
    return True


def claimed_and_queued(ctx: DeployContext, own: DeployRequest | None) -> Claimed | Outcome:
    """The claim, and GitHub told the deployment is queued: one stretch, so a re-run after approval reads both
    back with one record instead of replaying the report from its cache (a task run and 4 S3 requests)."""
    claim = claim_and_take_over(ctx, own)
    if isinstance(claim, Claimed):
        deploy_status(ctx, "queued", version=claim.holder.request.version)
    return claim


def claim_and_take_over(ctx: DeployContext, own: DeployRequest | None) -> Claimed | Outcome:
    """Take the workspace for its newest request, or end at once; a run that only waited for approval of an
    older target is superseded here (it has no process to do it itself), in its own thread."""
    claim = claim_workspace(ctx.registry, ctx.workspace, ctx.run, own)
    if not isinstance(claim, Claimed):
        return outcomes.unclaimed(ctx.workspace, claim)
    old = claim.took_over
    if old is None:
        return claim
    told = outcomes.superseded(ctx.workspace, old.request, claim.holder.request, taken_by=claim.holder, asked=True)
    if supersede_waiting_run(old, claim.holder.request, ctx.run, message=told.message):
        superseded_status(ctx, run_id=old.run_id, version=old.request.version, detail=told.title)
        # Told in the old run's thread, under its key, and its notice rewritten: the old run has no process.
        thread = NotificationReceipt(old.notice.channel, old.notice.ts) if old.notice else None
        text = f"Run {old.run_name}: {told.message}"
        told_there = ctx.notice(told.title, text, told.severity, facts=told.facts)
        ctx.tell(replace(told_there, thread_key=run_thread_key(old.run_id)), reply_to=thread)
        if thread is not None:
            ending = replace(
                told_there,
                text=f"{text} Details in the thread.",
                fields={**told_there.fields, "artifact": old.request.what, "run": old.run_name, "ended": told.name},
                link_url=ctx.notifier.flow_run_url(old.run_id),
                link_text="Open the run",
                thread_key=run_thread_key(old.run_id),
                kind="approval",
            )
            update_notice(ctx.notifier, thread, ending)
    return claim


def deploy(ctx: DeployContext, mine: DeployRequest) -> Outcome:
    """Plan and ask, then act on the answer."""
    # On a re-run after a resume this is read back, not replayed: no task runs, no log lines again.
    asked = once_per_run("plan-and-ask", lambda: plan_and_ask(ctx, mine))
    if isinstance(asked, Outcome):
        return asked
    # From here on (and again on resume, from the record) every message of this run replies to the notice.
    ctx.start_thread(asked.notice, asked.planned.view.version_diff)
    rules = ctx.approval_rules(asked.version)
    decision = wait_for_approval(
        asked,
        run_id=UUID(ctx.run_id),
        tell=ctx.warn,
        on_suspended=lambda: still_wanted_while_waiting(ctx, mine, asked),
        rules=rules,
        request=ctx.approval_request(asked, rules),
    )
    # The notice says at once who decided, from where, and why; its buttons go (from Slack or from the UI).
    ctx.decided(decision)
    if decision.approved:
        deploy_status(ctx, "approved", detail=f"approved by {decision.approver}")
    return act_on(ctx, mine, asked, decision)


def act_on(ctx: DeployContext, mine: DeployRequest, asked: AwaitingApproval, decision: ApprovalDecision) -> Outcome:
    """Rejected: nothing. Approved: apply only what is still wanted, under a lease that covers the apply, the
    gate and a rollback."""
    planned = asked.planned
    record = outcomes.decision_record(planned, decision, ctx.run_url or ctx.run_id, datetime.now(UTC))
    if not decision.approved:
        rejected = outcomes.rejected(ctx.workspace, planned.view.version_diff, decision, record)
        # Nothing is applied; the decision is kept signed all the same, for the audit chain.
        record_deployment(ctx.registry, ctx.run_id, planned, decision, {}, rejected)
        return rejected
    # The lease covers the apply, the gate and a rollback; a rollout's, its whole progress deadline.
    seconds = asked.rollout.progress_deadline_seconds if asked.rollout else ctx.settings.health_deadline_seconds
    expires = datetime.now(UTC) + timedelta(seconds=seconds) + 2 * _MARGIN
    begun = checkpoint_workspace(ctx.registry, ctx.run_id, mine, advance_to="applying", expires_at=expires, retake=True)
    if isinstance(begun, Superseded):
        by, taker = begun.by, begun.taken_by
        return outcomes.superseded(
            ctx.workspace, mine, by, taken_by=taker, asked=True, record=record, thread=asked.notice
        )
    if isinstance(begun, Lost):
        return outcomes.lock_lost(ctx.workspace, begun.holder, record)
    if ctx.teardown:
        return tear_down(ctx, mine, planned, decision, record)
    if asked.rollout is not None:
        return roll_out(ctx, mine, asked, decision, record)
    return apply_and_gate(ctx, asked.version, planned, decision, record)


def plan_and_ask(ctx: DeployContext, mine: DeployRequest) -> AwaitingApproval | Outcome:
    """Plan, make sure the plan is still wanted, publish it, fix the deadline and tell operators."""
    version = resolve_version(
        ctx.registry, ctx.namespace, mine.version, follows=None if ctx.teardown else ctx.settings.channel
    )
    if isinstance(version, str):
        return outcomes.not_current(ctx.workspace, mine, version)
    # A workspace that rolls out plans its first batch; the operator approves the whole path with it.
    rollout = None
    if ctx.settings.rollout is not None and not ctx.teardown:
        rollout = plan_rollout(ctx.registry, ctx.workspace, ctx.settings, version)
    first = rollout.slots_after(0) if rollout is not None else ()
    planned = plan_deploy(ctx.registry, ctx.plan_request(version, plan_id=ctx.run_id, instances=first))
    view = planned.view
    # A teardown whose plan destroys no resource has nothing to do (outputs left in the state don't count).
    if not planned.has_changes or (ctx.teardown and not view.destroy):
        return outcomes.nothing_to_deploy(ctx.workspace, ctx.namespace, view.version_diff, teardown=ctx.teardown)
    # Requests that came while this one planned: nobody is asked to approve what is already out of date.
    still = checkpoint_workspace(ctx.registry, ctx.run_id, mine)
    if isinstance(still, Superseded):
        return outcomes.superseded(ctx.workspace, mine, still.by, taken_by=still.taken_by, asked=False)
    published = publish_plan(planned, run_url=ctx.run_url, ui_url=ctx.notifier.ui_url, rollout=rollout)
    deadline = approval_deadline(planned.plan_sha256, ctx.settings.approval_timeout_seconds)
    asking = approval_notice(
        planned,
        deadline,
        run_id=ctx.run_id,
        run_name=ctx.run.name,
        run_url=ctx.run_url,
        version=version,
        rules=ctx.approval_rules(version),
        rollout=rollout,
        reason=mine.reason,
    )
    notice = ctx.tell(replace(asking, thread_key=ctx.thread_key))
    deploy_status(ctx, "waiting")
    return AwaitingApproval(version, planned, published, deadline, notice, rollout)


def still_wanted_while_waiting(ctx: DeployContext, mine: DeployRequest, asked: AwaitingApproval) -> None:
    """Once suspended, hold the workspace as *awaiting approval*, unless a newer request came meanwhile: then
    end Superseded here. The server refuses tasks of a suspended run, hence library calls only."""
    notice = NoticeRef(channel=asked.notice.channel, ts=asked.notice.ts) if asked.notice else None
    details = {
        "expires_at": asked.deadline + _MARGIN,
        "plan_sha256": asked.planned.plan_sha256,
        "plan_artifact_id": asked.published.artifact_id,
        "notice": notice,
    }
    try:
        waiting = retried(
            lambda: checkpoint(
                ctx.registry.workspace_queue(), ctx.run_id, mine, advance_to="awaiting", details=details
            ),
            RegistryStorageError,
            ConflictError,
            what=f"recording that run {ctx.run.name} awaits approval on {ctx.workspace}",
        )
    except DeployError as exc:
        # The run is Suspended already: the server refuses its tasks (finish would wait on them for ever), so it
        # stays waiting for its answer, which re-checks the queue before applying (act_on). Operators are told.
        why = f"could not record that it awaits approval ({one_line(str(exc), 300)}); it still waits for an answer"
        told = ctx.notice(f"Queue not updated on {ctx.workspace}", f"Run {ctx.run.name}: {why}.", "warning")
        notify_now(ctx.notifier, told, reply_to=asked.notice)
        events.flush()
        return
    if isinstance(waiting, Superseded):
        ended = outcomes.superseded(ctx.workspace, mine, waiting.by, taken_by=waiting.taken_by, asked=True)
        if end_waiting_run(UUID(ctx.run_id), name=ended.name, message=ended.message):
            superseded_status(ctx, run_id=ctx.run_id, version=asked.version.version, detail=ended.title)
            told = ctx.notice(ended.title, ended.message, ended.severity, facts=ended.facts)
            notify_now(ctx.notifier, told, reply_to=asked.notice)
            if asked.notice is not None:
                ending = ctx.ending_notice(ended.title, ended.message, ended.severity, ended.name)
                update_notice_now(ctx.notifier, asked.notice, ending)
    events.flush()  # the process ends with the suspension: what it emitted must be sent first


def running_label(ctx: DeployContext, planned: PlannedDeploy) -> str:
    """The build label of what the workspace runs before this apply ("" for nothing), for the deploy window:
    the one source of "what ran before" is the plan's view of the state."""
    previous = planned.view.from_version
    return read_version(ctx.registry, ctx.namespace, previous).build_label if previous else ""


def apply_and_gate(
    ctx: DeployContext,
    version: ArtifactVersion,
    planned: PlannedDeploy,
    decision: ApprovalDecision,
    record: dict[str, str],
) -> Outcome:
    from_label = running_label(ctx, planned)
    health_deadline = ctx.settings.health_deadline_seconds
    seconds = health_deadline + PLAN_AND_APPLY_MARGIN_SECONDS
    open_window(
        ctx.consul,
        ctx.service_name,
        deploy_run_id=ctx.run_id,
        from_version=from_label,
        to_version=version.build_label,
        seconds=seconds,
    )
    try:
        deploy_status(ctx, "applying")
        applied = apply_plan(
            ctx.registry, planned, approved_sha256=decision.plan_sha256, watch=ctx.watch_apply("apply")
        )
        if isinstance(applied, StalePlan):
            return outcomes.stale_plan(ctx.workspace, applied.reason, planned.plan_sha256, record, teardown=False)
        deploy_status(ctx, "applied", outputs=applied.outputs)  # the environment's URL, from the outputs
        gate = gate_health(
            ctx.consul,
            service_name=ctx.service_name,
            # Contract: docs/service-contract.md#stack-outputs (optional: without it the gate matches on Meta).
            service_id=str(applied.outputs[SERVICE_ID_OUTPUT]) if applied.outputs.get(SERVICE_ID_OUTPUT) else None,
            deploy_run_id=ctx.run_id,
            deadline_seconds=health_deadline,
        )
        record |= {
            "applied in": f"{applied.duration_seconds:.1f}s",
            "outputs": ", ".join(f"{k}={v}" for k, v in sorted(applied.outputs.items())),
            "health": f"{gate.status} after {gate.waited_seconds:.1f}s",
        }
        health, outputs = record["health"], applied.outputs
        try:
            if not gate.healthy:
                detail = f"{gate.output[:300] or gate.status}; looked for {gate.criteria}; found {gate.found}"
                ended = handle_unhealthy(ctx, version, planned, record, detail)
            else:
                ended = promote(ctx, version, planned, decision, applied, gate.waited_seconds, record)
        except DeployError as exc:
            # The apply happened: its signed record says how the run ended, a fault after the apply too.
            failed = outcomes.fault(ctx.workspace, exc)
            record_deployment(ctx.registry, ctx.run_id, planned, decision, outputs, failed, gate=health)
            raise
        record_deployment(ctx.registry, ctx.run_id, planned, decision, outputs, ended, gate=health)
        return ended
    finally:
        close_window(ctx.consul, ctx.service_name, deploy_run_id=ctx.run_id)


def tear_down(
    ctx: DeployContext, mine: DeployRequest, planned: PlannedDeploy, decision: ApprovalDecision, record: dict[str, str]
) -> Outcome:
    """Apply the approved destroy plan. The stack's destroy step stops the instance and deregisters it from
    Consul, inside a deploy window, so the health watch records the instance leaving instead of paging;
    nothing is gated (there is nothing left to be healthy). The workspace's own channel is emptied: it no
    longer lists the workspace at its last version, and the next plan there starts from nothing deployed."""
    view = planned.view
    from_label = running_label(ctx, planned)
    open_window(
        ctx.consul,
        ctx.service_name,
        deploy_run_id=ctx.run_id,
        from_version=from_label,
        to_version="",  # nothing comes after a teardown
        seconds=PLAN_AND_APPLY_MARGIN_SECONDS,
    )
    try:
        deploy_status(ctx, "applying")
        applied = apply_plan(
            ctx.registry, planned, approved_sha256=decision.plan_sha256, watch=ctx.watch_apply("teardown")
        )
    finally:
        close_window(ctx.consul, ctx.service_name, deploy_run_id=ctx.run_id)
    if isinstance(applied, StalePlan):
        return outcomes.stale_plan(ctx.workspace, applied.reason, planned.plan_sha256, record, teardown=True)
    record = {**record, "applied in": f"{applied.duration_seconds:.1f}s"}
    if ctx.promotes is not None:
        try:
            empty_channel(
                ctx.registry,
                namespace=ctx.namespace,
                channel=ctx.promotes,
                assigned_by=decision.approver,
                reason=f"{ctx.workspace} torn down by {ctx.run.name}: {mine.reason or 'no reason given'}",
                metadata={
                    "flow_run_id": ctx.run_id,
                    "requested_by": mine.by,
                    "approved_by": decision.approver,
                    "approved_via": decision.source,
                    "comment": decision.comment,
                },
            )
        except DeployError as exc:
            # The destroy is applied: the run is a teardown that happened, with a channel left to clear by hand.
            left = f"channel {ctx.promotes} still lists it ({one_line(str(exc), 200)}); clear it with icd-registry"
            get_run_logger().error("%s torn down, but %s", ctx.workspace, left)
            record = {**record, "channel": left}
    announce_teardown(ctx.workspace, ctx.namespace, version=view.from_version, by=decision.approver, run_id=ctx.run_id)
    ended = outcomes.torn_down(ctx.workspace, view.version_diff, decision.approver, planned.plan_sha256, record)
    record_deployment(ctx.registry, ctx.run_id, planned, decision, applied.outputs, ended)
    return ended


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
    deployed = outcomes.deployed(
        ctx.workspace, diff, decision.approver, waited, planned.plan_sha256, ctx.promotes, record
    )
    if planned.promoted is None or ctx.promotes is None:
        return deployed
    moved = promote_channel(
        ctx.registry,
        namespace=ctx.namespace,
        channel=ctx.promotes,
        version=version.version,
        assigned_by=decision.approver,
        reason=f"deployed by {ctx.run.name}",
        metadata={
            "plan_sha256": applied.plan_sha256,
            "flow_run_id": ctx.run_id,
            "approved_by": decision.approver,
            "approved_via": decision.source,
            "comment": decision.comment,
        },
        expected_version=planned.promoted.version,
    )
    if isinstance(moved, ChannelMoved):
        return outcomes.deployed_channel_moved(
            ctx.workspace, diff, ctx.promotes, version.version, moved.actual_version, record
        )
    announce_channel_move(
        ctx.registry,
        ctx.namespace,
        ctx.promotes,
        from_version=moved.from_version,
        to_version=version.version,
        by=decision.approver,
        reason=f"deployed to {ctx.workspace} by {ctx.run.name}",
        skip=ctx.workspace,
    )
    return deployed


def handle_unhealthy(
    ctx: DeployContext, version: ArtifactVersion, planned: PlannedDeploy, record: dict[str, str], detail: str
) -> Outcome:
    previous = planned.view.from_version
    if not ctx.settings.rollback_on_unhealthy or previous is None:
        why = "rollback disabled" if not ctx.settings.rollback_on_unhealthy else "no previous version to roll back to"
        return outcomes.unhealthy(ctx.workspace, ctx.namespace, version.version, detail, why, record)
    # The deployment's policy (rollback_on_unhealthy) is the approval for restoring a known-good version,
    # verified exactly like a forward deploy (sealed record, image digest, plan hash, state), though it is not
    # where the channel points.
    target = resolve_version(ctx.registry, ctx.namespace, previous)
    assert isinstance(target, ArtifactVersion)  # without `follows` it is a version or an exception
    rollback = plan_deploy(ctx.registry, ctx.plan_request(target, plan_id=f"{ctx.run_id}-rollback", rollback=True))
    if rollback.has_changes:
        applied = apply_plan(
            ctx.registry, rollback, approved_sha256=rollback.plan_sha256, watch=ctx.watch_apply("rollback")
        )
        if isinstance(applied, StalePlan):
            return outcomes.rollback_failed(
                ctx.workspace, ctx.namespace, version.version, previous, detail, applied.reason, record
            )
    record = {**record, "rollback plan": rollback.plan_sha256}
    # GitHub: the restored commit's deployment is live again; this run's own ends as a failure (finish).
    deploy_status(ctx, "Deployed", version=previous, detail=f"v{previous} restored: v{version.version} was unhealthy")
    return outcomes.rolled_back(ctx.workspace, version.version, previous, detail, record)


def roll_out(
    ctx: DeployContext, mine: DeployRequest, asked: AwaitingApproval, decision: ApprovalDecision, record: dict[str, str]
) -> Outcome:
    """Apply the approved rollout a batch at a time (``icd/deploy/rollout.py``).

    Batch 1 applies the approved plan itself. Before each later batch the run asks the queue whether it is
    still wanted (latest wins between batches) and renews its lease, then plans the batch and applies it
    only if that plan stays on the approved path. Every batch's new instances must pass their Consul checks
    for ``min_healthy`` within the batch deadline (and the rollout's progress deadline) before the next one
    starts. A failed batch reverts every slot to what ran before (``auto_revert``), or stops where it is.
    """
    path, version, first = asked.rollout, asked.version, asked.planned
    assert path is not None
    ends = time.monotonic() + path.progress_deadline_seconds
    open_window(
        ctx.consul,
        ctx.service_name,
        deploy_run_id=ctx.run_id,
        from_version=path.outgoing_build_label,
        to_version=version.build_label,
        seconds=path.progress_deadline_seconds + PLAN_AND_APPLY_MARGIN_SECONDS,
    )
    done: list[str] = []  # each applied batch's line and plan hash, for the signed deployment record
    applied: AppliedDeploy | None = None

    def midway(ended: Outcome, batches_applied: int, *, say_mix: bool = True) -> Outcome:
        """An ending before the last batch: what the applied batches left is said, recorded and signed."""
        if batches_applied == 0:
            return ended
        mix = describe_mix(path.slots_after(batches_applied - 1))
        if say_mix:
            ended = replace(
                ended,
                message=f"{ended.message}. Batches 1-{batches_applied} of {path.total} were applied before it: "
                f"{ctx.workspace} runs {mix}",
            )
        ended = replace(ended, record={**ended.record, "instances": mix})
        outputs = applied.outputs if applied is not None else {}
        record_deployment(ctx.registry, ctx.run_id, first, decision, outputs, ended, gate="; ".join(done))
        return ended

    applied_batches = 0
    try:
        deploy_status(ctx, "applying")
        waited = 0.0
        for batch in range(path.total):
            name = f"batch {batch + 1}/{path.total}"
            plan, approved_sha = first, decision.plan_sha256
            if batch > 0:
                left = max(ends - time.monotonic(), 0.0)
                kept = checkpoint_workspace(
                    ctx.registry,
                    ctx.run_id,
                    mine,
                    advance_to="applying",
                    expires_at=datetime.now(UTC) + timedelta(seconds=left) + 2 * _MARGIN,
                )
                if isinstance(kept, Superseded):
                    where = describe_mix(path.slots_after(batch - 1))
                    superseded = outcomes.rollout_superseded(
                        ctx.workspace,
                        mine,
                        kept.by,
                        taken_by=kept.taken_by,
                        done=where,
                        record=record,
                        thread=asked.notice,
                    )
                    return midway(superseded, batch, say_mix=False)  # its message names the mix already
                if isinstance(kept, Lost):
                    return midway(outcomes.lock_lost(ctx.workspace, kept.holder, record), batch)
                plan = plan_deploy(
                    ctx.registry,
                    ctx.plan_request(version, plan_id=f"{ctx.run_id}-b{batch + 1}", instances=path.slots_after(batch)),
                )
                why = deviation(path, batch, plan.deltas, first.deltas)
                if why is not None:
                    return midway(
                        outcomes.rollout_deviated(ctx.workspace, first.view.version_diff, name, why, record), batch
                    )
                approved_sha = plan.plan_sha256  # on the approved path: the rollout's approval covers it
            result = apply_plan(ctx.registry, plan, approved_sha256=approved_sha, watch=ctx.watch_apply(name))
            if isinstance(result, StalePlan):
                stale = outcomes.stale_plan(ctx.workspace, result.reason, plan.plan_sha256, record, teardown=False)
                return midway(stale, batch)
            applied, applied_batches = result, batch + 1
            ids = batch_service_ids(applied.outputs, path.new_slots(batch))
            # A batch that moves no slot (everything on the version already) has nothing to gate.
            gate = (
                gate_within_progress(ctx, path, ids, left=ends - time.monotonic())
                if ids
                else BatchGateResult(True, 0.0, ())
            )
            waited += gate.waited_seconds
            line = batch_line(name, gate)
            done.append(f"{line} (plan {plan.plan_sha256})")  # signed with the deployment record: each batch's plan
            record[name] = line
            tell_batch(ctx, path, batch, gate, applied.outputs, line)
            if not gate.healthy:
                ended = batch_failed(ctx, version, path, batch, gate, record)
                record_deployment(
                    ctx.registry, ctx.run_id, first, decision, applied.outputs, ended, gate="; ".join(done)
                )
                return ended
        assert applied is not None  # a rollout path always has a batch (an empty one plans no changes)
        # The channel records the plan the operator approved (batch 1); the batches are in the deploy record.
        ended = promote(ctx, version, first, decision, replace(applied, plan_sha256=first.plan_sha256), waited, record)
        record_deployment(ctx.registry, ctx.run_id, first, decision, applied.outputs, ended, gate="; ".join(done))
        return ended
    except DeployError as exc:
        # A fault after a batch was applied: its signed record says what was applied and what runs now.
        midway(outcomes.fault(ctx.workspace, exc), applied_batches)
        raise
    finally:
        close_window(ctx.consul, ctx.service_name, deploy_run_id=ctx.run_id)


def gate_within_progress(ctx: DeployContext, path: RolloutPath, ids: Sequence[str], *, left: float) -> BatchGateResult:
    """The batch's gate, within what is left of the rollout's progress deadline: a batch whose instances could
    no longer stay healthy for ``min_healthy`` before it passes fails without waiting."""
    deadline = min(path.healthy_deadline_seconds, left)
    if deadline <= path.min_healthy_seconds or deadline <= 0:
        why = f"the rollout's progress deadline ({path.progress_deadline_seconds:g} s) left no time for this batch"
        return BatchGateResult(False, 0.0, tuple(InstanceHealth(sid, "missing", why, 0.0) for sid in ids))
    return gate_batch(
        ctx.consul,
        service_name=ctx.service_name,
        service_ids=ids,
        deploy_run_id=ctx.run_id,
        min_healthy_seconds=path.min_healthy_seconds,
        deadline_seconds=deadline,
    )


def batch_service_ids(outputs: Mapping[str, Any], slots: Sequence[int]) -> list[str]:
    """The Consul service IDs of ``slots``, from the stack's list output (docs/service-contract.md#rollout)."""
    ids = outputs.get(SERVICE_IDS_OUTPUT)
    if not isinstance(ids, list) or any(slot >= len(ids) for slot in slots):
        raise ContractBreachError(
            f"the stack's {SERVICE_IDS_OUTPUT!r} output ({ids!r}) does not list slots {list(slots)}; "
            f"see {cite('rollout')}"
        )
    return [str(ids[slot]) for slot in slots]


def tell_batch(
    ctx: DeployContext, path: RolloutPath, batch: int, gate: BatchGateResult, outputs: Mapping[str, Any], line: str
) -> None:
    """One batch, told everywhere it is read: an event, a line in the deploy's thread, the UI's table of the
    instances by version, and the deploy record (so a run that dies between batches leaves what it did)."""
    announce_batch(
        events.rollout_batch(
            workspace=ctx.workspace,
            namespace=ctx.namespace,
            version=path.target.version or 0,
            outcome="healthy" if gate.healthy else "failed",
            batch=batch + 1,
            batches=path.total,
            instances=[instance.service_id for instance in gate.instances],
            detail=line,
            run_id=ctx.run_id,
        )
    )
    severity: Severity = "info" if gate.healthy else "critical"
    ctx.tell(ctx.notice(f"Rollout on {ctx.workspace}: {line.split(':')[0]}", line, severity))
    ids = outputs.get(SERVICE_IDS_OUTPUT)
    slots = path.slots_after(batch)
    rows = [
        {
            "slot": str(index),
            "version": slot.label,
            "service id": str(ids[index]) if isinstance(ids, list) and index < len(ids) else "-",
            "moved in": next(
                (f"batch {b + 1}" for b, moved in enumerate(path.batches) if index in moved and b <= batch), "-"
            ),
        }
        for index, slot in enumerate(slots)
    ]
    publish_instances(ctx.workspace, rows, f"{ctx.workspace}: {describe_mix(slots)}")
    record_deploy(
        ctx.workspace,
        {"outcome": f"rolling out ({line})", "instances": describe_mix(slots), "run": ctx.run_url or ctx.run_id},
    )


def batch_failed(
    ctx: DeployContext,
    version: ArtifactVersion,
    path: RolloutPath,
    batch: int,
    gate: BatchGateResult,
    record: dict[str, str],
) -> Outcome:
    """Put back what ran before on every slot (``auto_revert``), verified and applied like any rollback; or,
    with nothing to revert to, stop where the rollout is and say what runs."""
    detail = batch_line(f"batch {batch + 1}/{path.total}", gate)
    revert = path.revert_to if path.auto_revert else None
    previous = revert[0].version if revert else None
    if revert is None or previous is None:
        why = (
            "auto_revert is off"
            if not path.auto_revert
            else "nothing to revert to (no single registered version ran on every instance before)"
        )
        where = describe_mix(path.slots_after(batch))
        return outcomes.rollout_halted(ctx.workspace, ctx.namespace, version.version, detail, why, where, record)
    target = resolve_version(ctx.registry, ctx.namespace, previous)
    assert isinstance(target, ArtifactVersion)  # without `follows` it is a version or an exception
    back = plan_deploy(
        ctx.registry, ctx.plan_request(target, plan_id=f"{ctx.run_id}-revert", rollback=True, instances=revert)
    )
    if back.has_changes:
        applied = apply_plan(ctx.registry, back, approved_sha256=back.plan_sha256, watch=ctx.watch_apply("revert"))
        if isinstance(applied, StalePlan):
            return outcomes.rollback_failed(
                ctx.workspace, ctx.namespace, version.version, previous, detail, applied.reason, record
            )
    record = {**record, "revert plan": back.plan_sha256, "instances": describe_mix(revert)}
    deploy_status(ctx, "Deployed", version=previous, detail=f"v{previous} restored: v{version.version} was unhealthy")
    return outcomes.rolled_back(ctx.workspace, version.version, previous, detail, record)
