"""A forked run says its pull step ran through its own events worker, instead of a connection of its own.

Prefect's ``run_steps`` reports each pull step of a deployment (ours: ``set_working_directory``) with an event,
``prefect.flow-run.pull-step.executed`` (or ``.failed``), sent through a new events client: a WebSocket
opened, authenticated, one event, a checkpoint, closed, about 40 ms before every run starts. A run has an
events worker already (Prefect's ``EventsWorker``, which sends its task runs' events), and the warm worker's
runs drain it when they end (``warm_worker._exit_like_the_interpreter``), so the same event goes that way,
without the wait. Installed in the fork server (``fork_server_preload``): only the warm worker's runs.
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

from prefect.events import RelatedResource, emit_event
from prefect.logging.loggers import get_logger


async def emit_pull_step_event(
    serialized_step: dict[str, Any],
    *,
    event_type: str,
    deployment: Any | None = None,
    flow_run: Any | None = None,
    logger: Any | None = None,
) -> None:
    """The event Prefect's ``_emit_pull_step_event`` sends, with the same resource, related and payload."""
    flow_run_id = flow_run.id if flow_run else None
    if flow_run_id is None and (from_environment := os.getenv("PREFECT__FLOW_RUN_ID")):
        flow_run_id = UUID(from_environment)
    if not flow_run_id:
        return
    related = (
        [
            RelatedResource(
                {"prefect.resource.id": f"prefect.deployment.{deployment.id}", "prefect.resource.role": "deployment"}
            )
        ]
        if deployment
        else []
    )
    try:
        emit_event(
            event=event_type,
            resource={"prefect.resource.id": f"prefect.flow-run.{flow_run_id}"},
            related=related,
            payload=serialized_step,
        )
    except Exception:  # noqa: BLE001 - as Prefect's: an event that can't be sent never fails the step
        (logger or get_logger(__name__)).warning("Failed to emit pull-step event for flow run %s", flow_run_id)


def install() -> None:
    import prefect.deployments.steps.core

    prefect.deployments.steps.core._emit_pull_step_event = emit_pull_step_event
