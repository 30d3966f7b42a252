"""icd/deploy/approval.describe_suspension: the waiting run says what it waits for, and an answer given while
it was being said is not lost (against a real Prefect server)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect import flow
from prefect.client.schemas.objects import State
from prefect.input.run_input import keyset_from_paused_state
from prefect.states import Running, Suspended

from examples.local_env import api_client
from icd.deploy.approval import (
    BLANK_APPROVER,
    InvalidApproval,
    PlanApproval,
    approval_form,
    check_approval,
    describe_suspension,
    give_answer,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

ANSWER = {"decision": "approve", "approver": "alice", "comment": "", "plan_sha256": "ab" * 32}
WAITING = "Waiting for approval: Deploy acmeinc/web v1 -> v2 on staging; answer before 2026-11-28 10:00 UTC"


@flow
def _waits_for_an_answer() -> None:
    """Only its runs are used: the test drives their states as the engine and an operator would."""


def _suspended_run() -> tuple[UUID, State[Any]]:
    """A run suspended for the approval form as ``suspend_flow_run`` leaves it: Suspended (no message) with
    the form's schema saved under its keyset."""
    client = api_client()
    # Only a deployment's run can be rescheduled on resume, as the deploy flow's runs are.
    flow_id = client.create_flow(_waits_for_an_answer)
    deployment_id = client.create_deployment(flow_id=flow_id, name="waits")
    run = client.create_flow_run_from_deployment(deployment_id, state=Running())
    proposed: State[Any] = Suspended(timeout_seconds=600, pause_key="approval-0")
    proposed.state_details.run_input_keyset = keyset_from_paused_state(proposed)
    suspended = client.set_flow_run_state(run.id, proposed, force=True).state
    assert suspended is not None
    approval_form("ab" * 32, "the plan").save(proposed.state_details.run_input_keyset, flow_run_id=run.id)
    return run.id, suspended


def _answer_of(run_id: UUID, suspended: State[Any]) -> PlanApproval:
    keyset = suspended.state_details.run_input_keyset
    assert keyset is not None
    return PlanApproval.load(keyset, flow_run_id=run_id)


def test_a_waiting_run_says_what_it_waits_for_and_is_answered_as_usual() -> None:
    run_id, suspended = _suspended_run()
    describe_suspension(run_id, suspended, WAITING)
    state = api_client().read_flow_run(run_id).state
    assert state is not None
    assert (state.type.value, state.name, state.message) == ("PAUSED", "Suspended", WAITING)
    assert state.state_details.pause_key == "approval-0"

    api_client().resume_flow_run(run_id, run_input=ANSWER)
    resumed = api_client().read_flow_run(run_id).state
    assert resumed is not None
    assert (resumed.type.value, resumed.name) == ("SCHEDULED", "Resuming")
    assert _answer_of(run_id, suspended).approver == "alice"


def test_an_answer_given_before_the_message_is_written_is_not_lost() -> None:
    run_id, suspended = _suspended_run()
    api_client().resume_flow_run(run_id, run_input=ANSWER)  # the moment the run suspends, before the message
    describe_suspension(run_id, suspended, WAITING)
    state = api_client().read_flow_run(run_id).state
    assert state is not None
    assert (state.type.value, state.name) == ("SCHEDULED", "Resuming"), "the answer resumes the run"
    assert _answer_of(run_id, suspended).model_dump(exclude={"metadata"}) == ANSWER
    history = [s.message for s in api_client().read_flow_run_states(run_id)]
    assert WAITING in history, "the message was written meanwhile"


@pytest.mark.parametrize(
    ("change", "refused_field"),
    [
        ({"plan_sha256": "0" * 64}, "plan_sha256"),  # a stale or mistyped hash: the form's is fixed
        ({"approver": "   "}, "approver"),  # spaces only
        ({"approver": ""}, "approver"),
        ({"decision": "reject", "plan_sha256": "cd" * 32}, "plan_sha256"),
    ],
)
def test_an_answer_the_form_refuses_never_resumes_the_run(change: dict[str, str], refused_field: str) -> None:
    """Refused by Prefect against the form's schema before the run resumes (the UI's Resume form shows the
    reason and no "resumed" toast): the run waits under the same question, with nothing stored."""
    run_id, suspended = _suspended_run()
    describe_suspension(run_id, suspended, WAITING)
    refused = give_answer(run_id, {**ANSWER, **change})
    assert isinstance(refused, InvalidApproval)
    assert refused.reason.startswith(f"Validation failed for field '{refused_field}'"), refused.reason
    state = api_client().read_flow_run(run_id).state
    assert state is not None
    assert (state.type.value, state.state_details.pause_key, state.message) == ("PAUSED", "approval-0", WAITING)
    keyset = suspended.state_details.run_input_keyset
    assert keyset is not None
    with pytest.raises(httpx.HTTPStatusError):  # nothing stored: the next answer is the one read
        api_client().read_flow_run_input(run_id, keyset["response"])
    assert give_answer(run_id, ANSWER) is None, "the same question is answered as usual"
    assert _answer_of(run_id, suspended).approver == "alice"


def test_the_form_fixes_the_plan_hash_and_leaves_invisible_names_to_the_flow() -> None:
    form = approval_form("ab" * 32, "the plan")
    schema = form.model_json_schema()["properties"]
    assert schema["plan_sha256"]["const"] == schema["plan_sha256"]["default"] == "ab" * 32
    assert schema["approver"]["pattern"] == r"\S"
    assert set(form.model_json_schema()["required"]) == {"decision", "approver"}, "no default for either"
    # A zero-width space passes the schema (it is no space) and is refused by the flow, which asks again.
    invisible = form(decision="approve", approver="\u200b", plan_sha256="ab" * 32)
    assert check_approval(invisible, expected_sha256="ab" * 32) == InvalidApproval(BLANK_APPROVER)


def test_an_answer_without_a_hash_answers_for_the_plan_of_its_form() -> None:
    """The hash is optional, its default the form's own: a script that sends none rejects (or approves) the
    plan it was asked about, never another."""
    run_id, suspended = _suspended_run()
    assert give_answer(run_id, {"decision": "reject", "approver": "bench"}) is None
    keyset = suspended.state_details.run_input_keyset
    assert keyset is not None
    # As the flow reads it on resume: with the class of the form it asked with (``suspend_flow_run``).
    assert approval_form("ab" * 32, "the plan").load(keyset, flow_run_id=run_id).plan_sha256 == "ab" * 32
