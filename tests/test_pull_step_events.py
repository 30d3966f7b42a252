"""A forked run's pull-step event (prefect_patches/pull_step_events.py) is the event Prefect's own code sends."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import prefect.deployments.steps.core as steps
import pytest
from prefect.events import Event

from prefect_patches import pull_step_events

STEP = {"prefect.deployments.steps.set_working_directory": {"directory": "/srv/service"}}
RUN = SimpleNamespace(id=UUID("6f9c1e5a-0000-4000-8000-000000000001"))
DEPLOYMENT = SimpleNamespace(id=UUID("0d7e5c3b-0000-4000-8000-000000000002"))


def _what(event: Event) -> tuple[str, dict[str, str], list[dict[str, str]], dict[str, Any]]:
    return event.event, dict(event.resource), [dict(related) for related in event.related], event.payload


@pytest.mark.parametrize(
    ("event_type", "flow_run", "deployment", "from_environment"),
    [
        pytest.param("prefect.flow-run.pull-step.executed", RUN, DEPLOYMENT, None, id="executed"),
        pytest.param("prefect.flow-run.pull-step.failed", RUN, DEPLOYMENT, None, id="failed"),
        pytest.param("prefect.flow-run.pull-step.executed", None, None, str(RUN.id), id="the-run-from-the-env"),
        pytest.param("prefect.flow-run.pull-step.executed", None, DEPLOYMENT, None, id="no-run-no-event"),
    ],
)
def test_the_event_is_prefects_own(
    monkeypatch: pytest.MonkeyPatch,
    event_type: str,
    flow_run: Any,
    deployment: Any,
    from_environment: str | None,
) -> None:
    assert steps._emit_pull_step_event is not pull_step_events.emit_pull_step_event, "installed in the tests"
    if from_environment:
        monkeypatch.setenv("PREFECT__FLOW_RUN_ID", from_environment)
    else:
        monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    prefects: list[Event] = []
    ours: list[Event] = []

    class RecordingClient:  # what get_events_client gives Prefect's function
        async def __aenter__(self) -> RecordingClient:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def emit(self, event: Event) -> None:
            prefects.append(event)

    monkeypatch.setattr(steps, "get_events_client", lambda **_: RecordingClient())
    monkeypatch.setattr(pull_step_events, "emit_event", lambda **fields: ours.append(Event(**fields)))
    kwargs = {"event_type": event_type, "deployment": deployment, "flow_run": flow_run}

    asyncio.run(steps._emit_pull_step_event(STEP, **kwargs))
    asyncio.run(pull_step_events.emit_pull_step_event(STEP, **kwargs))

    assert [_what(event) for event in ours] == [_what(event) for event in prefects]
    assert len(ours) == (0 if flow_run is None and from_environment is None else 1)


def test_an_event_that_cannot_be_sent_is_logged_and_never_fails_the_step(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As Prefect's own: emit_event raises EventTooLarge, say; the pull step still succeeded.
    def refuse(**_: Any) -> None:
        raise ValueError("event too large")

    monkeypatch.setattr(pull_step_events, "emit_event", refuse)

    asyncio.run(
        pull_step_events.emit_pull_step_event(STEP, event_type="prefect.flow-run.pull-step.executed", flow_run=RUN)
    )

    assert f"Failed to emit pull-step event for flow run {RUN.id}" in caplog.text
