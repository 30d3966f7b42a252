"""Steps 6-8 for a workspace that rolls out in batches (``icd/deploy/rollout.py``): the path the operator
approves, each batch told (an event, a line in the deploy's thread, the UI's table of instances by version),
and a rollout that must be asked again.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from blocks.registry import ArtifactRegistry
from icd import events
from icd.config import RolloutPolicy, WorkspaceConfig
from icd.deploy.artifacts import artifact_for
from icd.deploy.dispatch import describe, submit
from icd.deploy.record import artifact_key
from icd.deploy.rollout import RolloutPath, Slot, describe_mix, plan_path, start_slots
from icd.registry.models import ArtifactVersion
from tasks.policies import registry_blip


@task(
    name="plan-rollout",
    cache_policy=NO_CACHE,
    **registry_blip(),
)
def plan_rollout(
    registry: ArtifactRegistry, workspace: str, settings: WorkspaceConfig, version: ArtifactVersion
) -> RolloutPath:
    """The path from what each slot runs now (the workspace's state) to the policy's instances of ``version``."""
    policy = settings.rollout or RolloutPolicy()
    running = registry.running(workspace, version.namespace)
    reg = registry.registry()
    start = start_slots(
        running.slots if running is not None else {},
        lambda artifact: reg.find_by_artifact_id(version.namespace, artifact),
    )
    path = plan_path(
        workspace=workspace,
        target=Slot(artifact_for(version, settings.platform), version.build_label, version.version),
        start=start,
        instances=policy.instances,
        max_parallel=policy.batch_size,
        min_healthy_seconds=policy.min_healthy_time_seconds,
        healthy_deadline_seconds=settings.batch_deadline_seconds,
        progress_deadline_seconds=policy.progress_deadline_seconds,
        auto_revert=settings.auto_revert,
    )
    get_run_logger().info("rollout of %s: %s", workspace, path.describe())
    return path


@task(name="publish-instances", cache_policy=NO_CACHE)
def publish_instances(workspace: str, rows: Sequence[dict[str, str]], description: str) -> None:
    """The UI's table of the workspace's instances by version, as of the last batch."""
    create_table_artifact(list(rows), key=artifact_key("instances", workspace), description=description)


@task(name="announce-batch", cache_policy=NO_CACHE)
def announce_batch(spec: events.EventSpec) -> None:
    events.emit(spec)


@task(
    name="ask-again",
    cache_policy=NO_CACHE,
    **registry_blip(),
)
def ask_again(registry: ArtifactRegistry, workspace: str, namespace: str, version: int, *, by: str, why: str) -> str:
    """Queue the same version for the workspace again, so a new run plans from what runs now and asks an
    operator, naming ``why`` (a rollout that left its approved path)."""
    spec = events.plan_requested(
        workspace=workspace, namespace=namespace, version=version, by=by, cause="icd.rollout.deviated", reason=why
    )
    outcome = describe(submit(registry.workspace_queue(), spec))
    get_run_logger().info("%s v%d asked again on %s: %s", namespace, version, workspace, outcome)
    return outcome


def instances_now(registry: ArtifactRegistry, workspace: str, namespace: str) -> str | None:
    """What a rolled-out workspace runs, by version ("1 x v3 (slot 0), 3 x v2 (slots 1, 2, 3)"), from its state;
    None when the state lists no instance slots. For a run that died between batches."""
    running = registry.running(workspace, namespace)
    if running is None or not running.slots:
        return None
    reg = registry.registry()
    return describe_mix(start_slots(running.slots, lambda artifact: reg.find_by_artifact_id(namespace, artifact)))
