"""The human approval step: a typed form the Prefect UI renders, and the rules an answer must pass.

The flow suspends (``suspend_flow_run``), so no process waits while an operator reads the plan; on resume
the flow re-runs from the top and ``suspend_flow_run`` returns the stored answer. An answer that breaks a
rule applies nothing. What the form's schema can say (a hash that is not the plan's, an approver of spaces)
Prefect refuses before the run resumes, and the run waits under the same question; what only the flow can
judge (an approver of zero-width characters) resumes it, and the flow asks again under a new pause key. The
plan stays where it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.input import RunInput
from pydantic import Field, create_model

from icd.config import ApprovalPolicy
from icd.deploy.approvers import Refused, Vote, judge_answer
from icd.text import hash_difference, markdown_inline, normalize_identity, one_line

MAX_APPROVAL_ATTEMPTS = 5
# The approval notice's buttons (``Action.id``); icd/interactions/approvals.py acts on them.
APPROVE_ACTION = "approve"
REJECT_ACTION = "reject"


# A name with a character that is not a space: the form itself refuses an approver of spaces only. The flow
# still checks the whole name (``normalize_identity``): one of zero-width characters alone is refused there.
APPROVER_PATTERN = r"\S"
BLANK_APPROVER = "the approver name is blank"


class PlanApproval(RunInput):
    """Approve or reject the Terraform plan shown on this run.

    Few words per field: Prefect's Resume modal gives the plan summary (the form's description) only the
    height the fields leave over, and the summary must show the plan table without scrolling.
    """

    # No default and no description: the empty select says "choose one", the summary above says what.
    decision: Literal["approve", "reject"]
    # The pattern is in the JSON schema only (the form and Prefect's resume check it): a Pydantic check on load
    # would fail the flow instead of asking again, and the flow's own check is ``check_approval``.
    approver: str = Field(
        description="Your name: recorded, with the comment, in the deploy record.",
        json_schema_extra={"pattern": APPROVER_PATTERN},
    )
    comment: str = ""
    plan_sha256: str = ""


@dataclass(frozen=True)
class ApprovalDecision:
    approved: bool
    approver: str  # every approver, by label ("slack:T1/U1 (Alice), slack:T1/U2 (Bob)"), or the typed name
    comment: str
    plan_sha256: str
    source: str = "ui"  # "slack": proven by Slack's signature; "ui": a typed name (the form, icd-approve)


@dataclass(frozen=True)
class ApprovalRules:
    """What an answer is judged by besides the plan hash: the workspace's policy and who wrote the commit."""

    workspace: str
    policy: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    authors: tuple[str, ...] = ()  # their Slack ids ([people] of icd.toml)
    author_names: tuple[str, ...] = ()  # their GitHub login and e-mail, for a name typed in the UI


@dataclass(frozen=True)
class InvalidApproval:
    """An answer that can't be acted on; the flow asks again."""

    reason: str


def check_approval(
    answer: PlanApproval,
    *,
    expected_sha256: str,
    rules: ApprovalRules | None = None,
    votes: Sequence[Vote] = (),
) -> ApprovalDecision | InvalidApproval:
    """The answer as the run acts on it, or why it can't be: a blank approver, a stale hash, or the
    workspace's approval policy (``icd/deploy/approvers.py``) against the signed Slack ``votes`` recorded."""
    approver = normalize_identity(answer.approver)
    if approver is None:
        return InvalidApproval(BLANK_APPROVER)
    comment = answer.comment.strip()
    given = answer.plan_sha256.strip().lower()
    # A rejection needs no hash: rejecting a stale plan is as good as rejecting the current one.
    if answer.decision == "approve" and given != expected_sha256:
        return InvalidApproval(
            f"the plan hash {hash_difference(given, expected_sha256)}; a stale or mistyped plan hash is never applied"
        )
    rules = rules or ApprovalRules(workspace="")
    judged = judge_answer(
        decision=answer.decision,
        approver=approver,
        plan_sha256=expected_sha256,
        workspace=rules.workspace,
        policy=rules.policy,
        votes=votes,
        authors=rules.authors,
        author_names=rules.author_names,
    )
    if isinstance(judged, Refused):
        return InvalidApproval(judged.reason)
    if answer.decision == "reject":
        return ApprovalDecision(False, judged.approver, comment, given, judged.source)
    return ApprovalDecision(True, judged.approver, comment, given, judged.source)


def approval_form(expected_sha256: str, summary_markdown: str, *, refusal: str = "") -> type[PlanApproval]:
    """The form of one question: the plan hash fixed, the plan summary as its description.

    The hash is a JSON Schema ``const`` (and the default): Prefect's form shows it disabled, and Prefect
    refuses any other hash before the run resumes (from the form or the API alike), so the run goes on
    waiting under the same question; the flow checks it again. The decision and the approver stay required,
    with no default, so nothing is approved by accident. A previous answer the flow refused (an approver of
    zero-width characters) is named first, in one line where it can be, so that it, the headline and the
    plan table all show without scrolling.
    """
    header = f"**Answer not accepted:** {markdown_inline(refusal)}\n\n" if refusal else ""
    # No description: Prefect's form says under the label that the value "is a const and cannot be changed".
    fixed = Field(default=expected_sha256, json_schema_extra={"const": expected_sha256})
    form = create_model(PlanApproval.__name__, __base__=PlanApproval, plan_sha256=(str, fixed))
    return form.with_initial_data(description=header + summary_markdown)


def describe_suspension(flow_run_id: UUID, suspended: State[Any], message: str) -> None:
    """Put ``message`` on a run's suspended state, without swallowing an answer given meanwhile.

    Prefect's ``suspend_flow_run`` takes no message, so the state it wrote is written again, forced, with
    one. An answer given between the two writes (a script, a chat button or a test answering at once) has
    already moved the run to ``Resuming`` and stored its input: the forced write puts the run back to
    waiting, and that answer would be lost until the deadline. So, after the write: if the run still shows
    the written state while an answer is stored, the answer is given again through Prefect's own resume (its
    stored copy removed first). The server stores an answer and the resumed state in one transaction, so a
    stored answer is one that was accepted; an answer given after the write has already moved the run on,
    and stands.
    """
    described = suspended.model_copy(update={"message": one_line(message, 1000)})
    keyset = suspended.state_details.run_input_keyset
    with get_client(sync_client=True) as client:
        written = client.set_flow_run_state(flow_run_id, described, force=True).state
        if written is None or not keyset:
            return
        try:
            answer = client.read_flow_run_input(flow_run_id, keyset["response"])
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == httpx.codes.NOT_FOUND:
                return  # nobody has answered yet: the run waits, described
            raise
        current = client.read_flow_run(flow_run_id).state
        if current is None or current.id != written.id:
            return  # answered after the write: that resume stands
        client.delete_flow_run_input(flow_run_id, keyset["response"])
        client.resume_flow_run(flow_run_id, run_input=json.loads(answer))


def end_waiting_run(flow_run_id: UUID, *, name: str, message: str) -> bool:
    """End a run that waits for approval as Cancelled, named ``name`` (``Superseded``), with ``message``.

    A suspended run has no process: whoever supersedes it ends it. Only a run that still waits is ended
    (not forced): one an operator answered meanwhile is resuming, and finds out itself that its workspace was
    taken, before anything is applied. True when this call ended it.
    """
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id).state
        if current is None or current.type != StateType.PAUSED:
            return False
        ended: State[Any] = Cancelled(name=name, message=one_line(message, 1000))
        result = client.set_flow_run_state(flow_run_id, ended)
    return result.status == SetStateStatus.ACCEPT


def annotate_plan(artifact_id: str, note_markdown: str) -> None:
    """Put ``note_markdown`` at the top of a run's plan artifact (the full plan the approval form links to),
    so whoever opens it from an old link or message reads first that the plan can't be approved any more."""
    from prefect.client.schemas.actions import ArtifactUpdate

    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts(artifact_filter=_artifact_id_filter(artifact_id), limit=1)
        if not artifact:
            return
        current = str(artifact[0].data or "")
        if current.startswith(note_markdown):
            return
        client.update_artifact(UUID(artifact_id), ArtifactUpdate(data=f"{note_markdown}\n\n{current}"))


def _artifact_id_filter(artifact_id: str) -> Any:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    return ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)]))


# How Prefect's resume names an answer its schema check refused ("Cannot resume this run: Reason: Validation
# failed for field 'plan_sha256'. Failure reason: ...").
SCHEMA_REFUSAL = "Validation failed for"
# How long an answer is given again while the run is still suspending (a moment, under load a few seconds).
ANSWER_PATIENCE_SECONDS = 15.0


class RunNotWaiting(RuntimeError):
    """The run does not wait for this answer any more (answered meanwhile, ended, past its deadline)."""


def give_answer(
    flow_run_id: UUID, run_input: dict[str, Any], *, patience: float = ANSWER_PATIENCE_SECONDS
) -> InvalidApproval | None:
    """Resume a waiting run with an answer, as the UI's Resume form does (``POST /flow_runs/{id}/resume``);
    ``None`` when the run took it.

    Prefect checks an answer against the form's schema before the run resumes: one the schema refuses (a
    plan hash that is not the plan's, an approver of spaces) is returned with Prefect's reason, and the run
    goes on waiting under the same question. Prefect writes a run's Suspended state before it saves the
    form's schema, and refuses an answer in between ("Run input schema not found"): a script or a chat button
    that answers the moment the run waits would be told no. Within ``patience`` the answer is given again.
    Anything else the server answers (the run was answered meanwhile, has ended or timed out) raises
    :class:`RunNotWaiting` with its reason: only an accepted resume returns ``None`` (Prefect's own helper
    returns quietly when the server aborts the resume of a run that stopped waiting a moment before).
    """
    import time

    deadline = time.monotonic() + patience
    with get_client(sync_client=True) as client:
        while True:
            result = client.resume_flow_run(flow_run_id, run_input=run_input)
            if result.status == SetStateStatus.ACCEPT:
                return None
            reason = str(getattr(result.details, "reason", "") or result.status.value)
            if SCHEMA_REFUSAL in reason:
                return InvalidApproval(reason[reason.index(SCHEMA_REFUSAL) :])
            if "schema not found" not in reason or time.monotonic() >= deadline:
                raise RunNotWaiting(f"Cannot resume this run: {reason}")
            time.sleep(0.2)
