"""Step 9: move the channel to the deployed version, only if it is still where the plan saw it
(``expected_version``): a promotion that happened meanwhile is never undone. A teardown empties the
workspace's own channel instead."""

from __future__ import annotations

from collections.abc import Mapping

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ArtifactRegistry
from icd.errors import ConflictError, RegistryStorageError
from icd.registry.models import ChannelAssignment, ChannelMoved
from icd.text import version_label
from tasks.policies import transient


@task(
    name="promote-channel",
    cache_policy=NO_CACHE,
    **transient(RegistryStorageError, ConflictError, delays=(1, 2, 4, 8)),
)
def promote_channel(
    registry: ArtifactRegistry,
    *,
    namespace: str,
    channel: str,
    version: int,
    assigned_by: str,
    reason: str,
    metadata: Mapping[str, str],
    expected_version: int | None,
) -> ChannelAssignment | ChannelMoved:
    moved = registry.registry().assign_channel(
        namespace,
        channel,
        version,
        assigned_by=assigned_by,
        reason=reason,
        metadata=dict(metadata),
        expected_version=expected_version,
    )
    logger = get_run_logger()
    if isinstance(moved, ChannelMoved):
        logger.warning(
            "channel %s of %s moved to %s meanwhile; left as it is",
            channel,
            namespace,
            version_label(moved.actual_version),
        )
    else:
        logger.info("channel %s of %s: %s -> v%d", channel, namespace, version_label(moved.from_version), version)
    return moved


@task(
    name="empty-channel",
    cache_policy=NO_CACHE,
    **transient(RegistryStorageError, ConflictError, delays=(1, 2, 4, 8)),
)
def empty_channel(
    registry: ArtifactRegistry,
    *,
    namespace: str,
    channel: str,
    assigned_by: str,
    reason: str,
    metadata: Mapping[str, str],
) -> ChannelAssignment | None:
    """After a teardown: the workspace's channel points at nothing, the move (who, why) in its history."""
    emptied = registry.registry().empty_channel(
        namespace, channel, assigned_by=assigned_by, reason=reason, metadata=dict(metadata)
    )
    logger = get_run_logger()
    if emptied is None:
        logger.info("channel %s of %s points at nothing already", channel, namespace)
    else:
        logger.info(
            "channel %s of %s: %s -> nothing (%s)", channel, namespace, version_label(emptied.from_version), reason
        )
    return emptied
