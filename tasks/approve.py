"""Step 6: the approval. Show the plan where the operator approves (the run's plan artifacts and the form's
text), fix the deadline once, and wait for an answer that can be acted on.

The wait itself suspends the flow (``suspend_flow_run`` can't run inside a task), so
:func:`wait_for_approval` is a plain function the flow calls: no process waits while an operator reads the
plan, and on resume the flow re-runs from the top and finds each answered question recorded
(``once_per_run``). The form and the rules an answer must pass are in ``icd/deploy/approval.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import Pause
from prefect.flow_runs import suspend_flow_run

from icd.config import ApprovalPolicy
from icd.deploy.approval import (
    APPROVE_ACTION,
    MAX_APPROVAL_ATTEMPTS,
    REJECT_ACTION,
    ApprovalDecision,
    ApprovalRules,
    InvalidApproval,
    PlanApproval,
    approval_form,
    check_approval,
    describe_suspension,
)
from icd.deploy.plan import PlannedDeploy
from icd.deploy.record import artifact_key
from icd.deploy.rollout import RolloutPath
from icd.deploy.votes import ApprovalRequest, read_votes, record_request
from icd.notify.message import Action, Confirm, Notification, NotificationReceipt
from icd.registry.models import ArtifactVersion
from icd.text import markdown_inline, operator_time
from tasks.policies import ONCE_PER_RUN, once_per_run


@dataclass(frozen=True)
class PublishedPlan:
    form_markdown: str  # the approval form's compact description, linking to the full plan
    artifact_id: str  # the full plan's Markdown artifact


@task(name="publish-plan", persist_result=True, cache_policy=ONCE_PER_RUN)
def publish_plan(
    planned: PlannedDeploy, *, run_url: str | None, ui_url: str | None = None, rollout: RolloutPath | None = None
) -> PublishedPlan:
    """Publish the full plan (Markdown) and its resource changes (a table) as artifacts of the run; return
    the approval form's compact description, which links to the full plan. A rollout's path is part of what
    is approved: it heads both."""
    extra = {"Run": run_url or "-"}
    if rollout is not None:
        extra = {"Rollout": rollout.describe(), "This plan": f"batch 1 of {rollout.total}", **extra}
    markdown = planned.view.markdown(workspace=planned.workspace, extra=extra)
    plan_artifact = create_markdown_artifact(
        markdown, key=artifact_key("plan", planned.workspace), description=f"Plan {planned.plan_sha256[:12]}"
    )
    if planned.view.table_rows():
        create_table_artifact(
            planned.view.table_rows(),
            key=artifact_key("plan-resources", planned.workspace),
            description=planned.view.version_diff,
        )
    # The form is only ever read in the Prefect UI, so a path relative to the UI's root works when the UI's
    # address is not configured; the configured address also works behind a path prefix.
    details_url = f"{(ui_url or '').rstrip('/')}/artifacts/artifact/{plan_artifact}"
    form = planned.view.approval_markdown(workspace=planned.workspace, details_url=details_url)
    if rollout is not None:
        form = f"**Rollout:** {markdown_inline(rollout.describe())} This plan is batch 1.\n\n{form}"
    return PublishedPlan(form, str(plan_artifact))


@task(name="approval-deadline", persist_result=True, cache_policy=ONCE_PER_RUN)
def approval_deadline(plan_sha256: str, timeout_seconds: int) -> datetime:
    """When the approval wait ends: fixed at the first suspension, never moved by a re-ask."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=timeout_seconds)


def approval_notice(
    planned: PlannedDeploy,
    deadline: datetime,
    *,
    run_id: str,
    run_name: str,
    run_url: str | None,
    version: ArtifactVersion | None = None,
    rules: ApprovalRules | None = None,
    rollout: RolloutPath | None = None,
    reason: str = "",
) -> Notification:
    """The "approve me" message: what changes (versions, commit and author, resource counts), the plan's
    whole hash, the deadline, who may approve, Approve and Reject (each asks "are you sure?" first), the
    link to the run. The buttons carry the run and the plan hash: a click approves that plan or nothing."""
    view = planned.view
    facts = {"workspace": planned.workspace, "artifact": view.version_diff}
    if version is not None:
        facts["commit"] = version.git_commit[:12]
        author = version.labels.get("commit_author") or ""
        pushed_by = version.labels.get("pushed_by") or ""
        facts["author"] = ", ".join(filter(None, [author, f"pushed by {pushed_by}" if pushed_by else ""])) or "-"
    if reason:  # why it is asked (a rollout that left its approved path is asked again)
        facts["reason"] = reason
    if rollout is not None:
        facts["rollout"] = rollout.describe()
        facts["first batch"] = f"slots {', '.join(str(slot) for slot in rollout.batches[0])}"
    facts |= {"changes": view.counts, "plan sha256": planned.plan_sha256, "run": run_name}
    policy = rules.policy if rules is not None else ApprovalPolicy()
    if policy != ApprovalPolicy():
        facts["approval"] = policy.describe()
    if policy.prevent_self_review and rules is not None and not rules.authors:
        facts["self-review"] = "not checked: the commit's author is not in icd.toml's [people]"
    target = json.dumps({"run": run_id, "plan": planned.plan_sha256}, separators=(",", ":"))
    what = f"{view.version_diff} on {planned.workspace} ({view.counts})"
    return Notification(
        title=f"Plan waiting for approval: {view.version_diff} on {planned.workspace}",
        text=f"{view.headline(planned.workspace)}. {_where_to_answer(policy)} before {operator_time(deadline)}.",
        severity="warning",
        fields=facts,
        link_url=run_url,
        link_text="Review and approve",
        dedup_key=f"plan-{planned.plan_sha256}",
        kind="approval",
        actions=tuple(
            action
            for action in (
                Action(
                    APPROVE_ACTION,
                    "Approve",
                    target,
                    style="primary",
                    confirm=Confirm("Apply this plan?", f"Apply {what}, plan {planned.plan_sha256[:12]}.", "Approve"),
                ),
                Action(
                    REJECT_ACTION,
                    "Reject",
                    target,
                    style="danger",
                    confirm=Confirm(
                        "Reject this plan?", f"Nothing of {what} is applied; you give a reason next.", "Reject"
                    ),
                ),
            )
            # Approve only where the workspace takes approvals from Slack; Reject always (it applies nothing).
            if action.id != APPROVE_ACTION or "slack" in policy.sources
        ),
    )


def _where_to_answer(policy: ApprovalPolicy) -> str:
    """Where this workspace takes an approval (a message without buttons still links to the UI)."""
    if "ui" not in policy.sources:
        return "Approve or reject here in Slack (approvals only from Slack)"
    if "slack" not in policy.sources:
        return "Approve in the Prefect UI (reject here or there)"
    return "Approve or reject here or in the Prefect UI"


@dataclass(frozen=True)
class AwaitingApproval:
    """Everything the run needs after the approval wait, recorded once before the first suspension."""

    version: ArtifactVersion
    planned: PlannedDeploy
    published: PublishedPlan
    deadline: datetime
    notice: NotificationReceipt | None  # the "approve me" message, for replies in its thread
    rollout: RolloutPath | None = None  # what the approval covers beyond the first batch's plan


# Tell operators a warning about this run: (title, text, facts); the flow adds the workspace and the run's link.
TellWarning = Callable[[str, str, dict[str, str]], object]
OnSuspended = Callable[[], None]


def _suspend(
    form: type[PlanApproval],
    *,
    run_id: UUID,
    deadline: datetime,
    key: str,
    message: str,
    on_suspended: OnSuspended,
    request: ApprovalRequest,
) -> PlanApproval:
    """``suspend_flow_run`` until ``deadline`` (fixed at the first suspension: a re-ask never extends it),
    with ``message`` as the suspended run's state message; ``on_suspended`` runs once the run waits. What the
    run asks is kept on it first, for the Slack buttons (``icd/deploy/votes.py``)."""
    record_request(run_id, request)
    # Rounded up: the server expires the wait no earlier than the deadline operators were told.
    remaining = max(1, math.ceil((deadline - datetime.now(UTC)).total_seconds()))
    try:
        return suspend_flow_run(wait_for_input=form, timeout=remaining, key=key)
    except Pause as pause:
        if pause.state is not None:
            try:
                describe_suspension(run_id, pause.state, message)
                on_suspended()
            except Exception:  # noqa: BLE001  # the run is suspended either way: it must end as suspended
                # Raised instead of the Pause, a failure here would reach the flow's fault path, whose tasks
                # the server refuses on a suspended run: the process would wait on them until the deadline.
                get_run_logger().exception("run %s is suspended, but saying what it waits for failed", run_id)
        raise


def _ask(
    waiting: AwaitingApproval,
    form: type[PlanApproval],
    *,
    run_id: UUID,
    attempt: int,
    status: str,
    tell: TellWarning,
    on_suspended: OnSuspended,
    rules: ApprovalRules,
    request: ApprovalRequest,
) -> ApprovalDecision | InvalidApproval:
    """One question: suspend, then check the answer against the policy and the signed Slack votes recorded;
    a refused one is logged and told once."""
    key = f"approval-{attempt}"
    answer = _suspend(
        form,
        run_id=run_id,
        deadline=waiting.deadline,
        key=key,
        message=status,
        on_suspended=on_suspended,
        request=request,
    )
    planned = waiting.planned
    votes = read_votes(run_id, planned.plan_sha256)
    checked = check_approval(answer, expected_sha256=planned.plan_sha256, rules=rules, votes=votes)
    if isinstance(checked, InvalidApproval):
        get_run_logger().warning("approval %d not accepted: %s", attempt + 1, checked.reason)
        tell(
            f"Approval not accepted for {planned.workspace}",
            f"{checked.reason}. The plan is still waiting; answer the form again.",
            {"plan": planned.plan_sha256[:12], "attempt": str(attempt + 1)},
        )
    return checked


def wait_for_approval(
    waiting: AwaitingApproval,
    *,
    run_id: UUID,
    tell: TellWarning,
    on_suspended: OnSuspended,
    rules: ApprovalRules,
    request: ApprovalRequest,
) -> ApprovalDecision:
    """Suspend until an operator answers; an answer that can't be acted on is reported and asked again.

    Each answered question is recorded (``once_per_run``), so the re-run after the next answer reads the
    earlier verdicts instead of loading, logging and reporting them again. ``on_suspended`` runs in the
    process that suspended, once the run waits (the flow checks there that its plan is still wanted).
    """
    planned = waiting.planned
    refusal = ""
    status_line = (
        f"Waiting for approval: {planned.view.headline(planned.workspace)}; "
        f"answer before {operator_time(waiting.deadline)}"
    )
    for attempt in range(MAX_APPROVAL_ATTEMPTS):
        form = approval_form(planned.plan_sha256, waiting.published.form_markdown, refusal=refusal)
        # The run page shows the first 70 characters of a state message: the reason comes first.
        status = f"Answer not accepted: {refusal}. {status_line}" if refusal else status_line
        question = partial(
            _ask,
            waiting,
            form,
            run_id=run_id,
            attempt=attempt,
            status=status,
            tell=tell,
            on_suspended=on_suspended,
            rules=rules,
            request=request,
        )
        checked = once_per_run(f"approval-{attempt}", question)
        if isinstance(checked, ApprovalDecision):
            return checked
        refusal = checked.reason
    return ApprovalDecision(False, "push-to-deploy", "too many invalid approval answers", planned.plan_sha256)
