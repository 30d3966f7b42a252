"""Requests into the workspace queue, and the events that tell the loop (and operators) what became of them.

Every path that wants a workspace planned comes through :func:`submit`: a registration and a channel move
(``tasks/announce.py``, ``icd/operations.py``), a teardown, a run started by hand (its claim), a run that
ends (:func:`dispatch_next`). Each request is an ``icd.plan.requested`` event; a request that replaced a
pending one adds ``icd.plan.superseded``; and only when the queue says a run must start is a
``deploy-artifact`` run created, with ``icd.plan.dispatched`` naming it.

The run is created through the API, not by an event trigger: a trigger's firing is fire-and-forget, and in
``bench/storm.py``'s baseline 400 dispatch events made 25 runs; an API call fails loudly and Prefect's client
retries it. Its idempotency key is the request's id, so asking twice for one request (a stale ask repeated)
makes one run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from icd import events
from icd.deploy.queue import CheckpointResult, DeployRequest, Phase, Requested, Superseded, WorkspaceQueue

Emit = Callable[[events.EventSpec], object]
DEPLOY_DEPLOYMENT = "deploy-artifact/deploy-artifact"


def start_deploy_run(request: DeployRequest) -> str:
    """Create the ``deploy-artifact`` run of ``request`` (once per request id); its id."""
    from prefect.deployments import run_deployment  # Prefect's client, imported only when a run is started

    run = run_deployment(
        DEPLOY_DEPLOYMENT,
        parameters={
            "workspace": request.workspace,
            "version": request.version,
            "teardown": request.teardown,
            "request_id": request.id,
        },
        timeout=0,
        as_subflow=False,
        idempotency_key=f"icd-request-{request.id}",
        tags=["deploy"],
    )
    return str(run.id)  # type: ignore[union-attr]  # the sync call returns the run itself


def request_from_event(spec: events.EventSpec, *, now: datetime | None = None) -> DeployRequest:
    """The queue's request for an ``icd.plan.requested`` event (same id)."""
    payload = spec.payload
    return DeployRequest(
        id=str(payload["request_id"]),
        workspace=str(payload["workspace"]),
        namespace=str(payload["namespace"]),
        version=int(payload["version"]),
        teardown=bool(payload.get("teardown", False)),
        by=str(payload.get("by", "")),
        cause=str(payload.get("because", "")),
        reason=str(payload.get("reason", "")),
        requested_at=now or datetime.now(UTC),
    )


def dispatch_next(request: DeployRequest | None, *, emit: Emit | None = None) -> str | None:
    """Start the ``deploy-artifact`` run of ``request`` (the queue decided one is needed); its id."""
    if request is None:
        return None
    run_id = start_deploy_run(request)  # looked up now, so a fast test can replace it
    (emit or events.emit)(
        events.plan_dispatched(
            workspace=request.workspace,
            namespace=request.namespace,
            version=request.version,
            teardown=request.teardown,
            request_id=request.id,
            run_id=run_id,
        )
    )
    return run_id


def superseded_event(
    old: DeployRequest, by: DeployRequest, *, run_id: str | None, by_run_id: str | None
) -> events.EventSpec:
    return events.plan_superseded(
        workspace=old.workspace,
        namespace=old.namespace,
        version=old.version,
        by_version=by.version,
        run_id=run_id,
        by_run_id=by_run_id,
    )


def submit(queue: WorkspaceQueue, spec: events.EventSpec, *, emit: Emit | None = None) -> Requested:
    """Queue one ``icd.plan.requested`` (emitted first, so the Event Feed shows every request), then tell
    what the queue made of it."""
    emit = emit or events.emit  # looked up now, so whoever replaced ``events.emit`` (a test) is obeyed
    request = request_from_event(spec)
    emit(spec)
    result = queue.request(request)
    if result.superseded is not None and not result.superseded.same_target(request):
        emit(superseded_event(result.superseded, request, run_id=None, by_run_id=None))
    dispatch_next(result.dispatch, emit=emit)
    return result


def describe(result: Requested) -> str:
    """What became of a request, in a few words for a log line or a command's output."""
    if result.in_progress is not None:
        return f"already in progress in run {result.in_progress.run_name}"
    if result.dispatch is not None:
        return "a run is starting"
    if result.behind is not None:
        return f"queued behind run {result.behind.run_name} ({result.behind.phase})"
    return "queued; a run for it is on its way"


def checkpoint(
    queue: WorkspaceQueue,
    run_id: str,
    mine: DeployRequest,
    *,
    advance_to: Phase | None = None,
    retake: bool = False,
    details: Mapping[str, object] | None = None,
    emit: Emit | None = None,
) -> CheckpointResult:
    """The queue's checkpoint of a holder (``details``: what the holder records as it moves on: its new
    expiry, its plan), and the events it calls for: a superseded holder is an ``icd.plan.superseded``, and
    the request that superseded it gets its run."""
    result = queue.checkpoint(run_id, mine, advance_to=advance_to, retake=retake, **(details or {}))
    if isinstance(result, Superseded):
        taker = result.taken_by.run_id if result.taken_by else None
        (emit or events.emit)(superseded_event(mine, result.by, run_id=run_id, by_run_id=taker))
        dispatch_next(result.dispatch, emit=emit)
    return result
