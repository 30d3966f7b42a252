"""Tell the loop what happened to the registry: events, and a queued request per following workspace.

``icd.artifact.registered`` after a build, ``icd.channel.moved`` after a promotion or an operator's move;
each comes with one ``icd.plan.requested`` per workspace of ``icd.toml`` that follows what moved, queued in
that workspace's queue (``icd/deploy/dispatch.py``), which starts a ``deploy-artifact`` run only when one
is needed. Cached per run, so a resumed run does not announce twice.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.registry import ArtifactRegistry
from icd import events
from icd.config import load_config
from icd.deploy.dispatch import describe, submit
from icd.text import version_label
from tasks.policies import ONCE_PER_RUN


def _announce(registry: ArtifactRegistry, cause: events.EventSpec, *, plan: bool, skip: str | None) -> list[str]:
    events.emit(cause)
    requests = events.plan_requests(load_config(), cause, skip=skip) if plan else []
    queue = registry.workspace_queue() if requests else None
    outcomes = [f"{spec.payload['workspace']} ({describe(submit(queue, spec))})" for spec in requests if queue]
    get_run_logger().info(
        "%s %s; plans requested for: %s", cause.event, cause.resource_id, ", ".join(outcomes) or "none"
    )
    return [str(spec.payload["workspace"]) for spec in requests]


@task(name="announce-registration", persist_result=True, cache_policy=ONCE_PER_RUN)
def announce_registration(
    registry: ArtifactRegistry,
    namespace: str,
    version: int,
    *,
    commit: str,
    ref: str,
    build_run_id: str | None,
    plan: bool,
) -> list[str]:
    """Emit ``icd.artifact.registered``; with ``plan``, request plans of the workspaces following latest."""
    cause = events.artifact_registered(
        namespace=namespace, version=version, commit=commit, ref=ref, build_run_id=build_run_id
    )
    return _announce(registry, cause, plan=plan, skip=None)


@task(name="announce-channel-move", persist_result=True, cache_policy=ONCE_PER_RUN)
def announce_channel_move(
    registry: ArtifactRegistry,
    namespace: str,
    channel: str,
    *,
    from_version: int | None,
    to_version: int,
    by: str,
    reason: str,
    skip: str | None,
) -> list[str]:
    """Emit ``icd.channel.moved`` and request plans of the workspaces following the channel (but ``skip``)."""
    cause = events.channel_moved(
        namespace=namespace, channel=channel, from_version=from_version, to_version=to_version, by=by, reason=reason
    )
    return _announce(registry, cause, plan=True, skip=skip)


@task(name="announce-teardown", persist_result=True, cache_policy=ONCE_PER_RUN)
def announce_teardown(workspace: str, namespace: str, *, version: int | None, by: str, run_id: str) -> None:
    """Emit ``icd.workspace.torn-down`` once the destroy is applied."""
    events.emit(
        events.workspace_torn_down(workspace=workspace, namespace=namespace, version=version, by=by, run_id=run_id)
    )
    get_run_logger().info("workspace %s torn down (%s %s)", workspace, namespace, version_label(version))
