"""Everything that happens is a Prefect event; deployment triggers and automations react to them.

The loop, as events (each shows in the UI's Event Feed with its resources, so an operator can follow a push
to production and a health change to the deploy that caused it):

    icd.push.received        a verified webhook push of a mapped branch        -> build-artifact
    icd.push.refused         a webhook request refused, and why; signed ones   -> automation -> notification
    icd.artifact.registered  a new version of a namespace                      -> icd.plan.requested
    icd.channel.moved        a promotion, rollback or operator moved a channel -> icd.plan.requested
    icd.version.revoked      a version may no longer be deployed               -> operators are told
    icd.plan.requested       one workspace should plan one version             -> the workspace queue
    icd.plan.dispatched      the queue started a deploy-artifact run for a workspace's newest request
    icd.plan.superseded      a request or a waiting plan was replaced by a newer one (latest wins)
    icd.health.<status>      an instance's health transition (critical, ...); the one labelled
                             icd.page=true per incident                        -> automation -> notification
    icd.health.flapping      an instance changes too often: one notice; .settled when it held again
    icd.drift.detected       a workspace left its state (first seen, or the drifted set changed)
    icd.drift.resolved       a workspace told drifted matches its state again

Fan-out (one registration, several workspaces) is :func:`plan_requests` over ``icd.toml``. Requests are not
runs: each goes into its workspace's queue (``icd/deploy/queue.py``), where a newer one replaces an older
one, and the queue starts a ``deploy-artifact`` run (``icd.plan.dispatched``) only when one must start: 200
registrations make a handful of runs (``icd/deploy/dispatch.py`` says why it starts them through the API).

Resources follow Prefect's conventions: ``prefect.resource.id`` is stable (``icd.artifact.acmeinc/web.v3``),
labels carry the values triggers match on (``icd.namespace``, ``icd.version``, ...), related resources carry
their ``prefect.resource.role``. Builders are pure (tested as tables); :func:`emit` sends.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from icd import text
from icd.config import PipelineConfig

PUSH_RECEIVED = "icd.push.received"
PUSH_REFUSED = "icd.push.refused"
ARTIFACT_REGISTERED = "icd.artifact.registered"
CHANNEL_MOVED = "icd.channel.moved"
VERSION_REVOKED = "icd.version.revoked"
PLAN_REQUESTED = "icd.plan.requested"
PLAN_DISPATCHED = "icd.plan.dispatched"
PLAN_SUPERSEDED = "icd.plan.superseded"
TEARDOWN_REQUESTED = "icd.teardown.requested"
WORKSPACE_TORN_DOWN = "icd.workspace.torn-down"
HEALTH_PREFIX = "icd.health."
DRIFT_DETECTED = "icd.drift.detected"
DRIFT_RESOLVED = "icd.drift.resolved"
# One per batch of a rollout: icd.rollout.batch.healthy, .failed, .reverted
ROLLOUT_BATCH_PREFIX = "icd.rollout.batch."
# Deliveries of one GitHub webhook share this namespace: a redelivery gets the same event id.
_DELIVERY_NAMESPACE = uuid.UUID("6f1e6d4e-51c1-4b8e-9a43-0e3c0c5d3a11")


@dataclass(frozen=True)
class EventSpec:
    """One event, ready to emit: what happened, to which resource, what else it concerns."""

    event: str
    resource: Mapping[str, str]
    related: Sequence[Mapping[str, str]] = ()
    payload: Mapping[str, Any] = field(default_factory=dict)
    id: uuid.UUID | None = None

    @property
    def resource_id(self) -> str:
        return self.resource["prefect.resource.id"]


def artifact_resource(namespace: str, version: int | str, role: str | None = None) -> dict[str, str]:
    resource = {
        "prefect.resource.id": f"icd.artifact.{namespace}.v{version}",
        "prefect.resource.name": f"{namespace} v{version}",
        "icd.namespace": namespace,
        "icd.version": str(version),
    }
    if role:
        resource["prefect.resource.role"] = role
    return resource


def flow_run_resource(flow_run_id: str, role: str) -> dict[str, str]:
    return {"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": role}


def delivery_event_id(delivery: str, namespace: str) -> uuid.UUID:
    """One delivery, one event per namespace it builds: a redelivery maps to the same ids."""
    return uuid.uuid5(_DELIVERY_NAMESPACE, f"{delivery}/{namespace}")


def push_received(
    *, repository: str, branch: str, commit: str, namespace: str, delivery: str, pusher: str
) -> EventSpec:
    return EventSpec(
        PUSH_RECEIVED,
        {
            "prefect.resource.id": f"icd.repository.{repository}",
            "prefect.resource.name": repository,
            "icd.namespace": namespace,
            "icd.branch": branch,
            "icd.commit": commit,
        },
        payload={
            "repository": repository,
            "branch": branch,
            "commit": commit,
            "namespace": namespace,
            "delivery": delivery,
            "pusher": pusher,
        },
        id=delivery_event_id(delivery, namespace),
    )


def push_refused(
    *,
    reason: str,
    status: int,
    signed: bool,
    detail: str,
    delivery: str = "",
    event_type: str = "",
    repository: str = "",
    size: int = 0,
    count: int = 1,
    since: str | None = None,
) -> EventSpec:
    """A webhook request ``icd-inbound`` refused; ``count`` > 1: that many alike, aggregated since ``since``.

    ``signed``: the body's signature was verified, so GitHub sent it (the ``icd-refused-push`` automation
    tells operators). Everything that came with the request is made safe to show as is: one line, visible
    characters, bounded, Slack's control characters escaped. A signed delivery refused again is the same event.
    """
    delivery, event_type, repository, detail = (
        _from_request(delivery),
        _from_request(event_type),
        _from_request(repository),
        _from_request(detail, limit=300),
    )
    related = [{"prefect.resource.id": f"icd.repository.{repository}", "prefect.resource.role": "repository"}]
    once = signed and bool(delivery) and count == 1
    return EventSpec(
        PUSH_REFUSED,
        {
            "prefect.resource.id": "icd.webhook.github",
            "prefect.resource.name": "GitHub webhook (icd-inbound)",
            "icd.reason": reason,
            "icd.signed": "true" if signed else "false",
            "icd.status": str(status),
        },
        related if repository else [],
        {
            "reason": reason,
            "status": status,
            "signed": signed,
            "detail": detail,
            "delivery": delivery,
            "event_type": event_type,
            "repository": repository,
            "size": size,
            "count": count,
            "since": since,
        },
        id=uuid.uuid5(_DELIVERY_NAMESPACE, f"refused:{reason}:{delivery}") if once else None,
    )


def _from_request(value: str, limit: int = 120) -> str:
    return text.slack_mrkdwn(text.consul_meta_value(text.one_line(value, limit)))


def artifact_registered(*, namespace: str, version: int, commit: str, ref: str, build_run_id: str | None) -> EventSpec:
    related = [{"prefect.resource.id": f"icd.commit.{commit}", "prefect.resource.role": "commit"}]
    if build_run_id:
        related.append(flow_run_resource(build_run_id, "build-run"))
    return EventSpec(
        ARTIFACT_REGISTERED,
        {**artifact_resource(namespace, version), "icd.commit": commit},
        related,
        {"namespace": namespace, "version": version, "commit": commit, "ref": ref},
    )


def channel_moved(
    *, namespace: str, channel: str, from_version: int | None, to_version: int, by: str, reason: str
) -> EventSpec:
    return EventSpec(
        CHANNEL_MOVED,
        {
            "prefect.resource.id": f"icd.channel.{namespace}@{channel}",
            "prefect.resource.name": f"{namespace}@{channel}",
            "icd.namespace": namespace,
            "icd.channel": channel,
            "icd.version": str(to_version),
        },
        [artifact_resource(namespace, to_version, "artifact-version")],
        {
            "namespace": namespace,
            "channel": channel,
            "from_version": from_version,
            "version": to_version,
            "by": by,
            "reason": reason,
        },
    )


def version_revoked(*, namespace: str, version: int, by: str, reason: str) -> EventSpec:
    return EventSpec(
        VERSION_REVOKED,
        artifact_resource(namespace, version),
        payload={"namespace": namespace, "version": version, "by": by, "reason": reason},
    )


def teardown_requested(*, workspace: str, namespace: str, version: int, by: str, reason: str) -> EventSpec:
    """An operator asks to destroy what ``workspace`` runs; ``deploy-artifact``'s trigger plans the destroy,
    which waits for approval like any plan. ``version`` only fills the stack's variables."""
    return EventSpec(
        TEARDOWN_REQUESTED,
        _workspace_resource(workspace, namespace, version),
        [artifact_resource(namespace, version, "artifact-version")],
        {"workspace": workspace, "namespace": namespace, "version": version, "by": by, "reason": reason},
    )


def workspace_torn_down(*, workspace: str, namespace: str, version: int | None, by: str, run_id: str) -> EventSpec:
    return EventSpec(
        WORKSPACE_TORN_DOWN,
        _workspace_resource(workspace, namespace, version),
        [flow_run_resource(run_id, "deploy-run")],
        {"workspace": workspace, "namespace": namespace, "version": version, "by": by},
    )


def drift_changed(
    *,
    workspace: str,
    namespace: str,
    version: int | None,
    fingerprint: str | None,
    resources: Sequence[str],
    run_id: str | None,
) -> EventSpec:
    """``icd.drift.detected`` (a drifted set, ``fingerprint`` names it), or ``icd.drift.resolved`` when
    ``fingerprint`` is None: the workspace matches its state again. One event per change, never per check."""
    return EventSpec(
        DRIFT_DETECTED if fingerprint else DRIFT_RESOLVED,
        _workspace_resource(workspace, namespace, version),
        [flow_run_resource(run_id, "drift-check-run")] if run_id else [],
        {
            "workspace": workspace,
            "namespace": namespace,
            "version": version,
            "fingerprint": fingerprint,
            "resources": list(resources),
        },
    )


def rollout_batch(
    *,
    workspace: str,
    namespace: str,
    version: int,
    outcome: str,
    batch: int,
    batches: int,
    instances: Sequence[str],
    detail: str,
    run_id: str,
) -> EventSpec:
    """``icd.rollout.batch.<outcome>``: batch ``batch`` of ``batches`` (1-based) of a rollout to ``version``
    ended ``healthy`` or ``failed`` (its new ``instances``, by Consul service ID, and what the gate saw)."""
    return EventSpec(
        f"{ROLLOUT_BATCH_PREFIX}{outcome}",
        _workspace_resource(workspace, namespace, version),
        [flow_run_resource(run_id, "deploy-run")],
        {
            "workspace": workspace,
            "namespace": namespace,
            "version": version,
            "batch": batch,
            "batches": batches,
            "instances": list(instances),
            "detail": detail,
        },
    )


def _workspace_resource(workspace: str, namespace: str, version: int | None) -> dict[str, str]:
    return {
        "prefect.resource.id": f"icd.workspace.{workspace}",
        "prefect.resource.name": workspace,
        "icd.workspace": workspace,
        "icd.namespace": namespace,
        **({"icd.version": str(version)} if version is not None else {}),
    }


def plan_requests(config: PipelineConfig, cause: EventSpec, *, skip: str | None = None) -> list[EventSpec]:
    """One ``icd.plan.requested`` per workspace following what ``cause`` moved (``skip``: the workspace whose
    own deploy moved it). A registration plans followers of ``latest``; a channel move, followers of it."""
    namespace = str(cause.payload["namespace"])
    version = int(cause.payload["version"])
    if cause.event == ARTIFACT_REGISTERED:
        channel = "latest"
    elif cause.event == CHANNEL_MOVED:
        channel = str(cause.payload["channel"])
    else:
        return []
    by = str(cause.payload.get("by") or f"registration of v{version}")
    return [
        plan_requested(
            workspace=workspace,
            namespace=namespace,
            version=version,
            by=by,
            cause=cause.event,
            cause_id=cause.resource_id,
        )
        for workspace in config.followers(namespace, channel)
        if workspace != skip
    ]


def plan_requested(
    *,
    workspace: str,
    namespace: str,
    version: int,
    by: str,
    cause: str,
    cause_id: str | None = None,
    teardown: bool = False,
    request_id: uuid.UUID | None = None,
    reason: str = "",
) -> EventSpec:
    """One request for a workspace (its id is the request's id in the queue, new unless given); ``reason``:
    why, when the asker said (a teardown's)."""
    related = [artifact_resource(namespace, version, "artifact-version")]
    if cause_id:
        related.append({"prefect.resource.id": cause_id, "prefect.resource.role": "cause"})
    request_id = request_id or uuid.uuid4()
    return EventSpec(
        PLAN_REQUESTED,
        _workspace_resource(workspace, namespace, version),
        related,
        {
            "workspace": workspace,
            "namespace": namespace,
            "version": version,
            "teardown": teardown,
            "because": cause,
            "by": by,
            "request_id": str(request_id),
            **({"reason": reason} if reason else {}),
        },
        id=request_id,
    )


def plan_dispatched(
    *, workspace: str, namespace: str, version: int, teardown: bool, request_id: str, run_id: str
) -> EventSpec:
    """The workspace queue started the ``deploy-artifact`` run ``run_id`` for its newest request."""
    return EventSpec(
        PLAN_DISPATCHED,
        _workspace_resource(workspace, namespace, version),
        [artifact_resource(namespace, version, "artifact-version"), flow_run_resource(run_id, "deploy-run")],
        {
            "workspace": workspace,
            "namespace": namespace,
            "version": version,
            "teardown": teardown,
            "request_id": request_id,
        },
    )


def plan_superseded(
    *, workspace: str, namespace: str, version: int, by_version: int, run_id: str | None, by_run_id: str | None
) -> EventSpec:
    """A request (``run_id`` None: it never had a run) or a run's plan replaced by a newer target."""
    related: list[Mapping[str, str]] = [artifact_resource(namespace, version, "artifact-version")]
    if run_id:
        related.append(flow_run_resource(run_id, "superseded-run"))
    if by_run_id:
        related.append(flow_run_resource(by_run_id, "superseding-run"))
    return EventSpec(
        PLAN_SUPERSEDED,
        _workspace_resource(workspace, namespace, version),
        related,
        {
            "workspace": workspace,
            "namespace": namespace,
            "version": version,
            "by_version": by_version,
            "run_id": run_id,
        },
    )


def health_transition(
    *,
    kind: str,
    status: str,
    previous: str | None,
    service_name: str,
    service_id: str,
    node: str,
    meta: Mapping[str, str] | None,
    expected: bool,
    failing: Sequence[str],
    dedup_key: str,
    announced: bool = True,
    page: bool = False,
    flap: Mapping[str, float] | None = None,
    silenced_by: str | None = None,
    acknowledged_by: str | None = None,
) -> EventSpec:
    """``icd.health.<status>`` (``<kind>`` for appear/leave/maintenance/flapping/settled), about the service
    instance. ``icd.page`` labels the one alert of an incident that pages; ``announced`` is False for a damped
    or silenced transition (recorded, not sent); ``flap`` gives a burst's ``changes`` and ``span_seconds``.
    A silenced one carries ``icd.silenced=<silence id>``; one whose incident someone took, ``acknowledged_by``."""
    meta = meta or {}
    name = status if kind in ("status", "appeared", "reminder") else kind.replace("_", "-")
    related: list[Mapping[str, str]] = []
    if meta.get("namespace") and meta.get("artifact_version"):
        related.append(artifact_resource(meta["namespace"], meta["artifact_version"], "artifact-version"))
    if meta.get("deploy_run_id"):
        related.append(flow_run_resource(meta["deploy_run_id"], "deploy-run"))
    return EventSpec(
        f"{HEALTH_PREFIX}{name}",
        {
            "prefect.resource.id": f"icd.instance.{node}/{service_id}",
            "prefect.resource.name": f"{service_id} on {node}",
            "icd.service": service_name,
            "icd.node": node,
            "icd.status": status,
            "icd.expected": "true" if expected else "false",
            "icd.page": "true" if page else "false",
            **({"icd.silenced": silenced_by} if silenced_by is not None else {}),
        },
        related,
        {
            "kind": kind,
            "previous": previous,
            "status": status,
            "failing_checks": list(failing),
            "expected_during_deploy": expected,
            "announced": announced,
            "dedup_key": dedup_key,
            **({"flap": dict(flap)} if flap is not None else {}),
            **({"silenced_by": silenced_by} if silenced_by is not None else {}),
            **({"acknowledged_by": acknowledged_by} if acknowledged_by is not None else {}),
        },
        id=uuid.uuid5(_DELIVERY_NAMESPACE, dedup_key),
    )


def emit(spec: EventSpec) -> bool:
    """Send one event to the Prefect API; False when events are off or no API is configured."""
    from prefect.events import emit_event  # the library imports Prefect's client only when it emits

    sent = emit_event(
        spec.event,
        resource=dict(spec.resource),
        related=[dict(item) for item in spec.related],
        payload=dict(spec.payload),
        id=spec.id,
    )
    return sent is not None


def flush() -> None:
    """Wait until every emitted event reached the API (commands and the webhook exit right after)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
