"""Step 5: plan the version into the workspace; the saved plan goes to S3 before anyone is asked."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from prefect import get_run_logger, task

from blocks.registry import ArtifactRegistry
from icd.deploy.plan import PlannedDeploy, make_plan
from icd.deploy.workdir import open_terraform
from icd.errors import StateLockedError
from icd.paths import state_home
from icd.registry.models import ArtifactVersion
from icd.tools.terraform import Terraform
from tasks.policies import ONCE_PER_RUN, retry_on


def workdir_opener(registry: ArtifactRegistry, workspace: str, stack_dir: str) -> Callable[[str], Terraform]:
    """``open_workdir(name)`` for the library's plan and apply: a fresh, initialised copy of the stack."""
    logger = get_run_logger()

    def open_workdir(name: str) -> Terraform:
        return open_terraform(
            Path(stack_dir),
            state_home() / "runs" / name,
            backend=registry.state_backend(),
            workspace=workspace,
            env=registry.terraform_env(),
            on_line=logger.info,
        )

    return open_workdir


@task(
    name="plan-deploy",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    retries=3,
    retry_delay_seconds=[5, 15, 30],
    retry_condition_fn=retry_on(StateLockedError),
)
def plan_deploy(
    registry: ArtifactRegistry,
    *,
    workspace: str,
    stack_dir: str,
    version: ArtifactVersion,
    platform: str,
    follows: str,
    promotes: str | None,
    variables: Mapping[str, str],
    plan_id: str,
    destroy: bool = False,
) -> PlannedDeploy:
    planned = make_plan(
        registry=registry.registry(),
        plans=registry.plan_store(),
        open_workdir=workdir_opener(registry, workspace, stack_dir),
        workspace=workspace,
        version=version,
        platform=platform,
        follows=follows,
        promotes=promotes,
        variables=variables,
        plan_id=plan_id,
        destroy=destroy,
    )
    if planned.has_changes:
        get_run_logger().info("plan %s stored for %s", planned.plan_sha256, workspace)
    else:
        get_run_logger().info("plan for %s has no changes", workspace)
    return planned
