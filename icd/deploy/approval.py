"""The human approval step: a typed form the Prefect UI renders, and the rules an answer must pass.

The flow suspends (``suspend_flow_run``), so no process waits while an operator reads the plan; on resume
the flow re-runs from the top and ``suspend_flow_run`` returns the stored answer. An answer that breaks a
rule (no approver name, a hash that is not the plan's) applies nothing: the flow asks again under a new
pause key, and the plan stays where it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.input import RunInput
from pydantic import Field

from icd.text import hash_difference, markdown_inline, normalize_identity, one_line

MAX_APPROVAL_ATTEMPTS = 5


class PlanApproval(RunInput):
    """Approve or reject the Terraform plan shown on this run."""

    decision: Literal["approve", "reject"] = Field(
        description="Approve applies exactly the plan shown; reject discards it. No default: choose one."
    )
    approver: str = Field(description="Your name. Recorded with the deploy.")
    comment: str = Field(default="", description="Why; shown in the deploy record and notifications.")
    plan_sha256: str = Field(
        default="",
        description="The plan being approved (pre-filled). Leave as is: it guards against a stale plan.",
    )


@dataclass(frozen=True)
class ApprovalDecision:
    approved: bool
    approver: str
    comment: str
    plan_sha256: str


@dataclass(frozen=True)
class InvalidApproval:
    """An answer that can't be acted on; the flow asks again."""

    reason: str


def check_approval(answer: PlanApproval, *, expected_sha256: str) -> ApprovalDecision | InvalidApproval:
    approver = normalize_identity(answer.approver)
    if approver is None:
        return InvalidApproval("the approver name is required and must contain visible characters")
    comment = answer.comment.strip()
    if answer.decision == "reject":
        # A rejection needs no hash: rejecting a stale plan is as good as rejecting the current one.
        return ApprovalDecision(False, approver, comment, answer.plan_sha256.strip())
    given = answer.plan_sha256.strip().lower()
    if given != expected_sha256:
        return InvalidApproval(
            f"the plan hash {hash_difference(given, expected_sha256)}; a stale or mistyped plan hash is never applied"
        )
    return ApprovalDecision(True, approver, comment, given)


def approval_form(expected_sha256: str, summary_markdown: str, *, refusal: str = "") -> type[PlanApproval]:
    """The form with the plan hash pre-filled and the plan summary as its description.

    Only the hash is pre-filled: ``with_initial_data`` turns every field it fills into an optional one, and
    the decision and the approver must stay required, with no default, so nothing is approved by accident.
    A previous answer that was refused is named at the top.
    """
    header = f"**Your previous answer was not accepted:** {markdown_inline(refusal)}\n\n" if refusal else ""
    return PlanApproval.with_initial_data(description=header + summary_markdown, plan_sha256=expected_sha256)


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


# How long an answer is given again while the run is still suspending (a moment, under load a few seconds).
ANSWER_PATIENCE_SECONDS = 15.0


def give_answer(flow_run_id: UUID, run_input: dict[str, Any], *, patience: float = ANSWER_PATIENCE_SECONDS) -> None:
    """Resume a waiting run with an answer, as the UI's Resume form does (``resume_flow_run``).

    Prefect writes a run's Suspended state before it saves the form's schema, and refuses an answer in
    between ("Run input schema not found"): a script or a chat button that answers the moment the run waits
    would be told no. Within ``patience`` the answer is given again; any other refusal is raised at once.
    """
    import time

    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + patience
    while True:
        try:
            resume_flow_run(flow_run_id, run_input=run_input)
            return
        except RuntimeError as exc:
            if "schema not found" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.2)
