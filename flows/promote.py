"""promote: an operator moves a channel to a version, with who and why; its followers are planned.

The same as ``icd-registry promote`` (both call ``icd/operations.py``), for operators in the Prefect UI.
Moving ``production`` plans every workspace that follows ``org/name@production``.
"""

from __future__ import annotations

from typing import Annotated, cast

from prefect import flow, get_run_logger
from pydantic import Field

from blocks.registry import ArtifactRegistry
from icd import operations
from icd.config import load_config
from icd.rules import Channel, Namespace
from icd.text import version_label


@flow(name="promote")
def promote(
    namespace: Namespace,
    version: Annotated[int, Field(ge=1)],
    channel: Channel,
    by: Annotated[str, Field(min_length=1, description="Who promotes; recorded in the channel's history.")],
    why: Annotated[str, Field(min_length=1, description="Why; recorded in the channel's history.")],
    registry_block: str = "registry",
) -> list[str]:
    """Point ``channel`` of ``namespace`` at ``version``; returns the workspaces asked to plan it."""
    block = cast(ArtifactRegistry, ArtifactRegistry.load(registry_block))
    done = operations.promote(
        block.registry(), block.workspace_queue(), load_config(), namespace, version, channel, by=by, why=why
    )
    moved = done.assignment
    get_run_logger().info(
        "%s@%s: %s -> %s by %s; plans requested for: %s",
        namespace,
        channel,
        version_label(moved.from_version),
        version_label(moved.to_version),
        moved.assigned_by,
        ", ".join(done.plans_requested) or "none",
    )
    return done.plans_requested
