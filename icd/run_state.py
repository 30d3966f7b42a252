"""What the Prefect API says of another flow run's state, for code that must decide whether that run can still act.

Three answers: its state type (None for a run with no state yet), :data:`GONE` (deleted, or never known), or
:class:`Unknown` (the API failed). What "unknown" means differs by caller, and each says so where it asks: a
workspace lock's holder is treated as holding it (``icd.deploy.queue.prefect_run_alive``), a build claim's holder
as building (``tasks.build.run_may_be_building``), a run as not being cancelled
(``flows.deploy_artifact.being_cancelled``), a run as no longer waiting for its answer
(``icd.interactions.approvals.run_still_waiting``). ``tests/test_run_state_reads.py`` pins each caller's answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import TERMINAL_STATES, StateType
from prefect.exceptions import ObjectNotFound

GONE: Final = "gone"


@dataclass(frozen=True)
class Unknown:
    """The API could not say; ``cause`` names the exception's type (its text could hold anything)."""

    cause: str


RunState = StateType | None | Literal["gone"] | Unknown


def flow_run_state(run_id: str) -> RunState:
    """The state type of flow run ``run_id``, :data:`GONE`, or :class:`Unknown`; never raises."""
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(run_id))
    except ObjectNotFound:
        return GONE
    except Exception as exc:  # noqa: BLE001  # any failure of the API is "can't tell": the caller says what that means
        return Unknown(type(exc).__name__)
    return run.state.type if run.state is not None else None


def has_ended(state: RunState) -> bool:
    """A run that can no longer act: gone, or in a final state. An unknown one has not (as far as anyone can tell)."""
    return state == GONE or (isinstance(state, StateType) and state in TERMINAL_STATES)
