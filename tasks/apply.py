"""Step 7: apply exactly the approved plan, or nothing (see ``icd/deploy/apply.py`` for every check)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ArtifactRegistry
from icd.deploy.apply import AppliedDeploy, StalePlan, apply_approved
from icd.deploy.plan import PlannedDeploy
from icd.errors import StateLockedError
from icd.tools.terraform import ApplyWatch
from tasks.plan import workdir_opener
from tasks.policies import transient


@task(
    name="apply-plan",
    cache_policy=NO_CACHE,
    **transient(StateLockedError, delays=(5, 15, 30)),
)
def apply_plan(
    registry: ArtifactRegistry, planned: PlannedDeploy, *, approved_sha256: str, watch: ApplyWatch | None = None
) -> AppliedDeploy | StalePlan:
    """``watch`` (``DeployContext.watch_apply``) stops an apply that is stuck, with ``ToolStuckError``: not
    retried, the run ends Failed through ``finish``."""
    result = apply_approved(
        registry=registry.registry(),
        plans=registry.plan_store(),
        open_workdir=workdir_opener(registry, planned.workspace, planned.stack_dir, "apply"),
        read_state=lambda: registry.workspace_state(planned.workspace)[0],
        planned=planned,
        approved_sha256=approved_sha256,
        platform=planned.platform,
        watch=watch,
    )
    if isinstance(result, AppliedDeploy):
        get_run_logger().info("applied plan %s in %.1fs", approved_sha256[:12], result.duration_seconds)
    return result
