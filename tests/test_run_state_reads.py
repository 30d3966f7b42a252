"""The four places that read another flow run's state (through ``icd.run_state.flow_run_state``), each answering
what "the API can't say" means for it:

* ``icd.deploy.queue.prefect_run_alive``: may a workspace lock's holder still act? None when unknown (its caller
  treats the lock as held);
* ``tasks.build.run_may_be_building``: may a build claim's holder still build? True when unknown (the claim's lease
  still bounds the wait);
* ``flows.deploy_artifact.being_cancelled``: is this run being cancelled (then an exception is the cancellation's,
  not a bug)? False when unknown (the exception is told as a bug, which it may be);
* ``icd.interactions.approvals.run_still_waiting``: may a Slack vote's progress be shown on the run's notice? False
  when unknown (the notice is left as it is: the run's own rewrite must not get its buttons back).

Against the session's Prefect server, with runs put in each state; "unknown" is a server that does not answer.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Cancelled, Cancelling, Completed, Crashed, Failed, Paused, Pending, Running, Scheduled

from examples.local_env import PrefectServer, free_port
from flows.deploy_artifact import being_cancelled
from icd.deploy.queue import prefect_run_alive
from icd.interactions.approvals import run_still_waiting
from tasks.build import run_may_be_building


@flow(name="state-read-subject")
def subject() -> None:
    """Never run: its runs are only put in states."""


READERS: dict[str, Callable[[str], Any]] = {
    "prefect_run_alive": prefect_run_alive,
    "run_may_be_building": run_may_be_building,
    "being_cancelled": being_cancelled,
    "run_still_waiting": run_still_waiting,
}

# state -> what each reader answers (prefect_run_alive, run_may_be_building, being_cancelled, run_still_waiting)
ANSWERS: dict[str, tuple[Any, ...]] = {
    "Scheduled": (True, True, False, False),
    "Pending": (True, True, False, False),
    "Running": (True, True, False, False),
    "Suspended": (True, True, False, True),  # waiting for an approval: it still holds what it holds
    "Cancelling": (True, True, True, False),
    "Cancelled": (False, False, True, False),
    "Completed": (False, False, False, False),
    "Failed": (False, False, False, False),
    "Crashed": (False, False, False, False),
}
STATES = {
    "Scheduled": Scheduled,
    "Pending": Pending,
    "Running": Running,
    "Suspended": lambda: Paused(name="Suspended", reschedule=True, timeout_seconds=3600, pause_key="approval"),
    "Cancelling": Cancelling,
    "Cancelled": Cancelled,
    "Completed": Completed,
    "Failed": Failed,
    "Crashed": Crashed,
}


def _run_in(client: SyncPrefectClient, state: str) -> str:
    run = client.create_flow_run(subject, state=Pending())
    client.set_flow_run_state(run.id, STATES[state](), force=True)
    assert client.read_flow_run(run.id).state.name == state  # type: ignore[union-attr]
    return str(run.id)


@pytest.mark.parametrize("state", list(ANSWERS))
def test_each_reader_answers_for_a_run_in_each_state(prefect_server: PrefectServer, state: str) -> None:
    with get_client(sync_client=True) as client:
        run_id = _run_in(client, state)
    answers = tuple(read(run_id) for read in READERS.values())
    assert answers == ANSWERS[state]


def test_a_run_the_server_does_not_know_has_ended_for_each_reader(prefect_server: PrefectServer) -> None:
    gone = str(uuid.uuid4())
    assert [read(gone) for read in READERS.values()] == [False, False, False, False]


def test_when_the_server_does_not_answer_each_reader_says_what_unknown_means_for_it() -> None:
    down = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with (
        temporary_settings(updates={PREFECT_API_URL: down, PREFECT_CLIENT_MAX_RETRIES: 0}),
        ThreadPoolExecutor(len(READERS)) as pool,  # at once: each waits out the client's connection retries
    ):
        asked = [pool.submit(contextvars.copy_context().run, read, str(uuid.uuid4())) for read in READERS.values()]
        answers = [future.result() for future in asked]
    assert answers == [None, True, False, False]
