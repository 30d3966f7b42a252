"""Step 4: the workspace. Claim it (or leave the request queued and end), check it is still wanted, give it
back, and end a waiting run whose plan a newer request replaced (``icd/deploy/queue.py`` has the rules).

Every change is a compare-and-swap of the workspace's record in S3, retried on the faults a retry can fix;
what the queue decided is told to the loop as events (``icd/deploy/dispatch.py``).
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ArtifactRegistry
from icd import events
from icd.deploy.approval import annotate_plan, end_waiting_run
from icd.deploy.dispatch import checkpoint, dispatch_next, superseded_event
from icd.deploy.queue import (
    CheckpointResult,
    Claimed,
    ClaimResult,
    DeployRequest,
    Holder,
    InProgress,
    NoticeRef,
    Phase,
    Queued,
    Released,
    RunRef,
    Superseded,
)
from icd.text import markdown_inline
from tasks.policies import ONCE_PER_RUN, registry_blip


@task(
    name="claim-workspace",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **registry_blip(),
)
def claim_workspace(registry: ArtifactRegistry, workspace: str, run: RunRef, own: DeployRequest | None) -> ClaimResult:
    """Take the workspace for its newest request (``own``: this run's, when it was started by hand)."""
    claimed = registry.workspace_queue().claim(workspace, run, own=own)
    logger = get_run_logger()
    if isinstance(claimed, Claimed):
        took = f"; took it over from run {claimed.took_over.run_name}" if claimed.took_over else ""
        logger.info("holding workspace %s for %s%s", workspace, claimed.holder.request.what, took)
        if claimed.reclaimed is not None:
            logger.warning("reclaimed %s from run %s, which has ended", workspace, claimed.reclaimed.run_name)
    replaced = claimed.superseded if isinstance(claimed, Claimed | Queued | InProgress) else None
    if own is not None and replaced is not None and not replaced.same_target(own):
        events.emit(superseded_event(replaced, own, run_id=None, by_run_id=run.id))
    return claimed


@task(
    name="checkpoint-workspace",
    cache_policy=NO_CACHE,
    **registry_blip(),
)
def checkpoint_workspace(
    registry: ArtifactRegistry,
    run_id: str,
    mine: DeployRequest,
    *,
    advance_to: Phase | None = None,
    expires_at: datetime | None = None,
    plan_sha256: str | None = None,
    plan_artifact_id: str | None = None,
    notice: NoticeRef | None = None,
    retake: bool = False,
) -> CheckpointResult:
    """Is this run's target still the one wanted? If so, move on to ``advance_to``; if not, the workspace is
    given up (or was taken over) and the newest request gets its run."""
    details = {
        key: value
        for key, value in (
            ("expires_at", expires_at),
            ("plan_sha256", plan_sha256),
            ("plan_artifact_id", plan_artifact_id),
            ("notice", notice),
        )
        if value is not None
    }
    result = checkpoint(registry.workspace_queue(), run_id, mine, advance_to=advance_to, retake=retake, details=details)
    if isinstance(result, Superseded):
        get_run_logger().info("superseded by %s: %s is given up", result.by.what, mine.workspace)
    return result


@task(
    name="release-workspace",
    cache_policy=NO_CACHE,
    **registry_blip(),
)
def release_workspace(registry: ArtifactRegistry, workspace: str, run_id: str) -> Released:
    """Give the workspace back (idempotent); the newest pending request gets its run."""
    released = registry.workspace_queue().release(workspace, run_id)
    dispatch_next(released.dispatch)
    if released.was_holder:
        after = f"; next: {released.dispatch.what}" if released.dispatch else ""
        get_run_logger().info("released workspace %s%s", workspace, after)
    return released


@task(name="supersede-waiting-run", persist_result=True, cache_policy=ONCE_PER_RUN)
def supersede_waiting_run(old: Holder, by: DeployRequest, taker: RunRef, *, message: str) -> bool:
    """End a run that waited for approval of what is no longer wanted: it has no process to do it itself.

    Its state becomes Cancelled named Superseded (only if it still waits: one answered meanwhile finds out
    itself before applying anything) and its plan artifact, which the approval form links to, says so first.
    True when this call ended it.
    """
    ended = end_waiting_run(UUID(old.run_id), name="Superseded", message=message)
    if old.plan_artifact_id:
        note = (
            f"> **Superseded: this plan can no longer be approved.** {markdown_inline(by.what)} is planned in run "
            f"{markdown_inline(taker.name)} ({taker.id})."
        )
        annotate_plan(old.plan_artifact_id, note)
    events.emit(superseded_event(old.request, by, run_id=old.run_id, by_run_id=taker.id))
    get_run_logger().info(
        "run %s (%s) superseded%s", old.run_name, old.request.what, "" if ended else ": it was answered meanwhile"
    )
    return ended
