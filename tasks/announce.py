"""Tell the loop what happened to the registry: events, and a plan request per following workspace.

``icd.artifact.registered`` after a build, ``icd.channel.moved`` after a promotion or an operator's move;
each comes with one ``icd.plan.requested`` per workspace of ``icd.toml`` that follows what moved, which the
``deploy-artifact`` deployment's trigger turns into runs (see ``icd/events.py``). Cached per run, so a
resumed run does not announce twice.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from icd import events
from icd.config import load_config
from tasks.policies import ONCE_PER_RUN


def _announce(cause: events.EventSpec, *, plan: bool, skip: str | None) -> list[str]:
    requests = events.plan_requests(load_config(), cause, skip=skip) if plan else []
    for spec in (cause, *requests):
        events.emit(spec)
    workspaces = [str(spec.payload["workspace"]) for spec in requests]
    get_run_logger().info(
        "%s %s; plans requested for: %s", cause.event, cause.resource_id, ", ".join(workspaces) or "none"
    )
    return workspaces


@task(name="announce-registration", persist_result=True, cache_policy=ONCE_PER_RUN)
def announce_registration(
    namespace: str, version: int, *, commit: str, ref: str, build_run_id: str | None, plan: bool
) -> list[str]:
    """Emit ``icd.artifact.registered``; with ``plan``, request plans of the workspaces following latest."""
    cause = events.artifact_registered(
        namespace=namespace, version=version, commit=commit, ref=ref, build_run_id=build_run_id
    )
    return _announce(cause, plan=plan, skip=None)


@task(name="announce-channel-move", persist_result=True, cache_policy=ONCE_PER_RUN)
def announce_channel_move(
    namespace: str, channel: str, *, from_version: int | None, to_version: int, by: str, reason: str, skip: str | None
) -> list[str]:
    """Emit ``icd.channel.moved`` and request plans of the workspaces following the channel (but ``skip``)."""
    cause = events.channel_moved(
        namespace=namespace, channel=channel, from_version=from_version, to_version=to_version, by=by, reason=reason
    )
    return _announce(cause, plan=True, skip=skip)


@task(name="announce-teardown", persist_result=True, cache_policy=ONCE_PER_RUN)
def announce_teardown(workspace: str, namespace: str, *, version: int | None, by: str, run_id: str) -> None:
    """Emit ``icd.workspace.torn-down`` once the destroy is applied."""
    events.emit(
        events.workspace_torn_down(workspace=workspace, namespace=namespace, version=version, by=by, run_id=run_id)
    )
    get_run_logger().info("workspace %s torn down (%s v%s)", workspace, namespace, version)
