"""Step 5: plan the version into the workspace; the saved plan goes to S3 before anyone is asked.

``resolve-version`` reads what is to be planned from the registry (retried like every registry read: an S3
blip must not fail a deploy), and says when the version is no longer the one the workspace's channel points
at; ``plan-deploy`` makes the plan of a :class:`~icd.deploy.plan.PlanRequest`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ArtifactRegistry
from icd.deploy.credentials import UNSCOPED_WARNING, TerraformStep
from icd.deploy.plan import PlannedDeploy, PlanRequest, make_plan, not_current
from icd.deploy.workdir import open_terraform
from icd.errors import StateLockedError
from icd.paths import state_home
from icd.registry.models import ArtifactVersion
from icd.tools.terraform import Terraform
from tasks.policies import ONCE_PER_RUN, registry_blip, transient


def workdir_opener(
    registry: ArtifactRegistry, workspace: str, stack_dir: str, step: TerraformStep
) -> Callable[[str], Terraform]:
    """``open_workdir(name)`` for the library's plan and apply: a fresh, initialised copy of the stack, whose
    Terraform gets credentials for this step and this workspace's state only (``ArtifactRegistry.terraform_env``).
    """
    logger = get_run_logger()

    def open_workdir(name: str) -> Terraform:
        env, scoped = registry.terraform_env(workspace, step, run_label=name[:8])
        deadline = None
        if scoped is None:
            logger.warning(UNSCOPED_WARNING)
        else:
            logger.info(scoped.describe())
            deadline = time.monotonic() + scoped.seconds_left_for_tools(datetime.now(UTC))
        return open_terraform(
            Path(stack_dir),
            state_home() / "runs" / name,
            backend=registry.state_backend(),
            workspace=workspace,
            env=env,
            on_line=logger.info,
            deadline=deadline,
        )

    return open_workdir


@task(
    name="resolve-version",
    cache_policy=NO_CACHE,
    **registry_blip(),
)
def resolve_version(
    registry: ArtifactRegistry, namespace: str, version: int, *, follows: str | None = None
) -> ArtifactVersion | str:
    """The version if it may be deployed (``RevokedVersionError`` if not); with ``follows``, a reason instead
    when it is not where that channel points now (a newer request supersedes it)."""
    reg = registry.registry()
    with reg.one_view():  # the version and the channel checked against one index: read once
        found = reg.resolve_deployable(namespace, version)
        reason = not_current(reg, namespace, version, follows) if follows is not None else None
    if reason:
        get_run_logger().info("not planning v%d: %s", version, reason)
        return reason
    return found


@task(
    name="read-version",
    cache_policy=NO_CACHE,
    **registry_blip(),
)
def read_version(registry: ArtifactRegistry, namespace: str, version: int) -> ArtifactVersion:
    """A version's record, revoked or not (what ran before a deploy, for its label)."""
    return registry.registry().get(namespace, version)


@task(
    name="plan-deploy",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **transient(StateLockedError, delays=(5, 15, 30)),
)
def plan_deploy(registry: ArtifactRegistry, request: PlanRequest) -> PlannedDeploy:
    # One view of the registry for the whole plan: what runs, the channels, and the plan's summary look up the
    # same versions (the running one twice) and the same index; each is read once. The apply checks afresh.
    with registry.registry().one_view():
        running = registry.running(request.workspace, request.version.namespace)
        planned = make_plan(
            replace(request, running_version=running.version.version if running and running.version else None),
            registry=registry.registry(),
            plans=registry.plan_store(),
            open_workdir=workdir_opener(registry, request.workspace, request.stack_dir, "plan"),
        )
    if planned.has_changes:
        get_run_logger().info("plan %s stored for %s", planned.plan_sha256, request.workspace)
    else:
        get_run_logger().info("plan for %s has no changes", request.workspace)
    return planned
