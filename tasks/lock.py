"""Step 4: take the workspace for the whole deploy (plan, approval wait, apply, gate), and give it back."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from icd.deploy import lock
from icd.deploy.lock import LockHeld, WorkspaceLease
from icd.text import operator_time
from tasks.policies import ONCE_PER_RUN


@task(name="lock-workspace", persist_result=True, cache_policy=ONCE_PER_RUN)
def lock_workspace(
    workspace: str, *, run_id: str, run_name: str, lease_seconds: float, wait_seconds: float
) -> WorkspaceLease | LockHeld:
    logger = get_run_logger()
    logger.info("waiting up to %.0fs for workspace %s", wait_seconds, workspace)
    result = lock.acquire(
        workspace,
        holder_flow_run_id=run_id,
        holder_name=run_name,
        lease_seconds=lease_seconds,
        wait_seconds=wait_seconds,
    )
    if isinstance(result, WorkspaceLease):
        until = operator_time(result.expires_at)
        logger.info("holding workspace %s (lease %s until %s)", workspace, result.lease_id, until)
    return result


@task(name="unlock-workspace", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 9])
def unlock_workspace(lease: WorkspaceLease) -> None:
    lock.release(lease)
    get_run_logger().info("released workspace %s", lease.workspace)


@task(name="renew-workspace-lock", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[1, 3, 9])
def renew_workspace_lock(lease: WorkspaceLease, *, seconds: float) -> WorkspaceLease | LockHeld:
    renewed = lock.renew(lease, seconds)
    if isinstance(renewed, WorkspaceLease):
        get_run_logger().info("holding workspace %s until %s", lease.workspace, operator_time(renewed.expires_at))
    return renewed
