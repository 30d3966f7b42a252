"""icd/deploy/approval.describe_suspension: the waiting run says what it waits for, and an answer given while
it was being said is not lost (against a real Prefect server)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.schemas.objects import State
from prefect.input.run_input import keyset_from_paused_state
from prefect.states import Running, Suspended

from examples.local_env import api_client
from icd.deploy.approval import PlanApproval, approval_form, describe_suspension

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
