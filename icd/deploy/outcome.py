"""How a deploy run ends: a named final state, the operator's message and the deploy record's facts.

Expected outcomes (``Deployed``, ``NothingToDeploy``, ``Rejected``, ``Superseded``, ``Queued``, ``StalePlan``,
``LockLost``, ``RolledBack``, ...) are values built here, pure, so their wording is tested as a table; a
fault (a broken template, a tampered plan, S3 down after retries) becomes ``Failed`` through :func:`fault`.
The flow turns an ``Outcome`` into a Prefect state, records it and tells operators, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from icd.deploy.approval import ApprovalDecision
from icd.deploy.plan import PlannedDeploy
from icd.deploy.queue import DeployRequest, Holder, InProgress, NothingQueued, Queued
from icd.notify.message import NotificationReceipt, Severity
from icd.text import operator_time, version_label

StateKind = Literal["completed", "cancelled", "failed"]


@dataclass(frozen=True)
class Outcome:
    kind: StateKind
    name: str
    title: str
    message: str
    severity: Severity
    record: Mapping[str, str] = field(default_factory=dict)  # the deploy record's facts; empty: no record
    facts: Mapping[str, str] = field(default_factory=dict)  # extra facts of the notification
    # False for endings nobody needs to hear about in chat (a request queued behind a busy run, a plan
    # superseded before anyone was asked): the run's state message says it, and an event records it.
    tell: bool = True
    thread: NotificationReceipt | None = None  # the approval notice: how it ended is told in its thread
    # Why the same target is queued again once the run has released the workspace ("" for never): a rollout
    # whose later batch left the approved path asks an operator again, from what runs now.
    again: str = ""


def decision_record(planned: PlannedDeploy, decision: ApprovalDecision, run: str, at: datetime) -> dict[str, str]:
    """The deploy record's facts once an operator decided."""
    return {
        "artifact": planned.view.version_diff,
        "plan sha256": planned.plan_sha256,
        "decided by": decision.approver,
        # "slack": the identity is Slack's, from a signed click; "ui": a name as typed (docs/operations.md).
        "decided in": "Slack (signed click)" if decision.source == "slack" else "Prefect UI / API (typed name)",
        "comment": decision.comment or "-",
        "decided at": operator_time(at),
        "run": run,
    }


def unclaimed(workspace: str, claim: Queued | InProgress | NothingQueued) -> Outcome:
    """How a run ends that did not get the workspace: it holds nothing, its request (if any) stays queued."""
    if isinstance(claim, Queued):
        return queued(workspace, claim.request, claim.behind)
    if isinstance(claim, InProgress):
        return in_progress(workspace, claim.holder.request, claim.holder)
    return nothing_queued(workspace, claim.holder)


def fault(workspace: str, exc: BaseException, facts: Mapping[str, str] | None = None) -> Outcome:
    reason = str(exc) or type(exc).__name__
    title = f"Deploy failed on {workspace}: {type(exc).__name__}"
    return Outcome("failed", "Failed", title, reason, "critical", record={**(facts or {}), "error": reason})


def queued(workspace: str, request: DeployRequest, behind: Holder) -> Outcome:
    message = (
        f"{request.what} is queued: run {behind.run_name} is {behind.phase} {behind.request.what} on {workspace}; "
        "the newest request is planned when it ends (a newer one replaces this one)"
    )
    return Outcome("completed", "Queued", f"Queued for {workspace}: {request.what}", message, "info", tell=False)


def in_progress(workspace: str, request: DeployRequest, holder: Holder) -> Outcome:
    message = f"run {holder.run_name} is {holder.phase} {request.what} on {workspace} already; nothing more to do"
    title = f"Already in progress on {workspace}: {request.what}"
    return Outcome("completed", "AlreadyInProgress", title, message, "info", tell=False)


def nothing_queued(workspace: str, holder: Holder | None) -> Outcome:
    who = f"; run {holder.run_name} holds it ({holder.request.what})" if holder else ""
    message = f"nothing is queued for {workspace} any more: another run took the newest request{who}"
    return Outcome("completed", "NothingQueued", f"Nothing queued for {workspace}", message, "info", tell=False)


def superseded(
    workspace: str,
    mine: DeployRequest,
    by: DeployRequest,
    *,
    taken_by: Holder | None = None,
    asked: bool,
    record: Mapping[str, str] | None = None,
    thread: NotificationReceipt | None = None,
) -> Outcome:
    """This run's target is no longer wanted. ``asked``: operators were asked to approve it (tell them)."""
    where = f"planned in run {taken_by.run_name}" if taken_by is not None else "which gets its own run"
    message = f"superseded by {by.what}, {where}; nothing of {mine.what} was applied"
    title = f"Superseded on {workspace}: {mine.what} -> {by.what}"
    facts = {"superseded by": by.what, **({"by run": taken_by.run_name} if taken_by else {})}
    # A plan nobody was asked about leaves no deploy record either: the workspace's record stays the last
    # one an operator saw.
    kept = {"outcome": "superseded, nothing applied", **(record or {}), "superseded by": by.what} if asked else {}
    return Outcome("cancelled", "Superseded", title, message, "info", kept, facts, tell=asked, thread=thread)


def not_current(workspace: str, mine: DeployRequest, reason: str) -> Outcome:
    """The version asked for is no longer where the workspace's channel points: nothing to plan."""
    message = f"superseded: {reason}; nothing planned"
    return Outcome("cancelled", "Superseded", f"Superseded on {workspace}: {mine.what}", message, "info", tell=False)


def nothing_to_deploy(workspace: str, namespace: str, version_diff: str, *, teardown: bool) -> Outcome:
    message = (
        f"nothing of {namespace} runs in {workspace}; nothing to tear down"
        if teardown
        else f"{version_diff}: the plan has no changes; nothing to deploy"
    )
    return Outcome("completed", "NothingToDeploy", f"Nothing to deploy to {workspace}", message, "info")


def rejected(workspace: str, version_diff: str, decision: ApprovalDecision, record: Mapping[str, str]) -> Outcome:
    message = f"rejected by {decision.approver}: {decision.comment or 'no comment'}; nothing applied"
    return Outcome("cancelled", "Rejected", f"Plan rejected: {version_diff} on {workspace}", message, "info", record)


def lock_lost(workspace: str, holder: Holder | None, record: Mapping[str, str]) -> Outcome:
    who = f"run {holder.run_name} holds {workspace} now" if holder else f"nobody holds {workspace} now"
    message = (
        f"the workspace lock was broken or lapsed while this run waited, and {who}; nothing applied. "
        "Re-run to plan afresh."
    )
    title = f"Approved plan not applied on {workspace}: lock lost"
    return Outcome(
        "cancelled", "LockLost", title, message, "warning", {"outcome": "lock lost, nothing applied", **record}
    )


def stale_plan(workspace: str, reason: str, plan_sha256: str, record: Mapping[str, str], *, teardown: bool) -> Outcome:
    """The approved plan no longer matches the state or the channel: nothing was applied."""
    what, again = (
        ("Stale teardown plan", "Ask for the teardown again") if teardown else ("Stale plan", "Push again or re-run")
    )
    return Outcome(
        "cancelled",
        "StalePlan",
        f"{what} not applied on {workspace}",
        f"{reason}. {again} to plan afresh.",
        "warning",
        {"outcome": "stale plan, nothing applied", **record},
        {"plan sha256": plan_sha256},
    )


def deployed(
    workspace: str,
    version_diff: str,
    approver: str,
    waited: float,
    plan_sha256: str,
    promotes: str | None,
    record: Mapping[str, str],
) -> Outcome:
    return Outcome(
        "completed",
        "Deployed",
        f"Deployed {version_diff} to {workspace}",
        f"Approved by {approver}; healthy in Consul after {waited:.1f}s.",
        "success",
        {"outcome": "deployed", **record},
        {"plan sha256": plan_sha256, **({"channel": promotes} if promotes else {})},
    )


def deployed_channel_moved(
    workspace: str, version_diff: str, channel: str, version: int, moved_to: int | None, record: Mapping[str, str]
) -> Outcome:
    return Outcome(
        "completed",
        "DeployedChannelMoved",
        f"Deployed {version_diff} to {workspace}; channel {channel} not moved",
        f"Applied and healthy, but channel {channel} moved to {version_label(moved_to)} meanwhile and was left there; "
        "promote by "
        f"hand if v{version} should win.",
        "warning",
        {"outcome": "deployed, channel moved meanwhile", **record},
    )


def torn_down(workspace: str, version_diff: str, approver: str, plan_sha256: str, record: Mapping[str, str]) -> Outcome:
    return Outcome(
        "completed",
        "TornDown",
        f"Tore down {workspace}",
        f"{version_diff} in {workspace}, approved by {approver}. Remove the workspace from icd.toml, or the next "
        "version plans it again.",
        "warning" if "channel" in record else "success",
        {"outcome": "torn down", **record},
        {"plan sha256": plan_sha256, **({"channel": record["channel"]} if "channel" in record else {})},
    )


def unhealthy(
    workspace: str, namespace: str, version: int, detail: str, why: str, record: Mapping[str, str]
) -> Outcome:
    return Outcome(
        "failed",
        "Unhealthy",
        f"{namespace} v{version} is unhealthy on {workspace}",
        f"Health gate failed ({why}): {detail}",
        "critical",
        {"outcome": f"unhealthy ({why})", **record},
    )


def rolled_back(workspace: str, version: int, previous: int, detail: str, record: Mapping[str, str]) -> Outcome:
    return Outcome(
        "failed",
        "RolledBack",
        f"Rolled back {workspace} to v{previous}",
        f"v{version} failed its health gate: {detail}. v{previous} is applied again; no channel moved.",
        "critical",
        {"outcome": f"rolled back to v{previous}", **record},
    )


def rollback_failed(
    workspace: str, namespace: str, version: int, previous: int, detail: str, reason: str, record: Mapping[str, str]
) -> Outcome:
    return Outcome(
        "failed",
        "RollbackFailed",
        f"{namespace} v{version} is unhealthy on {workspace}",
        f"Health gate failed: {detail}. The rollback to v{previous} went stale: {reason}",
        "critical",
        {"outcome": "unhealthy; rollback plan went stale", **record},
    )


def rollout_superseded(
    workspace: str,
    mine: DeployRequest,
    by: DeployRequest,
    *,
    taken_by: Holder | None,
    done: str,
    record: Mapping[str, str],
    thread: NotificationReceipt | None,
) -> Outcome:
    """A newer request came between two batches: latest wins, so this rollout applies nothing more and the
    newer target is planned from the instances as they are (``done`` says which)."""
    where = f"planned in run {taken_by.run_name}" if taken_by is not None else "which gets its own run"
    message = f"superseded by {by.what} between batches, {where}; {done}; nothing more of {mine.what} is applied"
    title = f"Rollout superseded on {workspace}: {mine.what} -> {by.what}"
    facts = {"superseded by": by.what, "instances": done}
    kept = {"outcome": "rollout superseded between batches", **record, "superseded by": by.what}
    return Outcome("cancelled", "Superseded", title, message, "warning", kept, facts, thread=thread)


def rollout_deviated(workspace: str, version_diff: str, batch: str, why: str, record: Mapping[str, str]) -> Outcome:
    """A later batch's plan left the approved path: nothing more is applied and the rollout is asked again."""
    message = (
        f"the plan of {batch} is not on the approved path: {why}. Nothing more was applied; a new plan from what "
        "runs now asks for approval again"
    )
    return Outcome(
        "cancelled",
        "Deviated",
        f"Rollout stopped on {workspace}: {version_diff}, {batch} deviates",
        message,
        "warning",
        {"outcome": f"rollout stopped at {batch}: plan deviated", **record, "deviation": why},
        {"deviation": why},
        again=f"the rollout's {batch} deviated from the approved path: {why}",
    )


def rollout_halted(
    workspace: str, namespace: str, version: int, detail: str, why: str, where: str, record: Mapping[str, str]
) -> Outcome:
    """A batch failed its gate and nothing is reverted (``why``): the rollout stops where it is and says what
    runs there now."""
    return Outcome(
        "failed",
        "Unhealthy",
        f"{namespace} v{version} is unhealthy on {workspace}; rollout stopped",
        f"{detail}. {why}: the rollout stopped where it is ({where}); nothing was reverted.",
        "critical",
        {"outcome": f"unhealthy; rollout stopped ({why})", **record, "instances": where},
    )
