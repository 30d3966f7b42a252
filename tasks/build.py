"""Step 2: claim the commit's build, then bake it into an image with Packer, unless it is already built."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from prefect import get_run_logger, task

from blocks.registry import ArtifactRegistry
from icd.deploy.artifacts import LOCAL, BuiltArtifact, collect_artifacts
from icd.deploy.source import SourceCheckout
from icd.errors import PackerError, RegistryStorageError
from icd.registry.models import ArtifactVersion, BuildClaimed, BuildHeld
from icd.run_state import Unknown, flow_run_state, has_ended
from icd.service.contract import PackerVariables
from icd.tools import packer
from tasks.policies import ONCE_PER_RUN, registry_blip, transient

BUILD_TIMEOUT_SECONDS = 3600.0
# The claim is taken right before Packer, which is killed at its timeout; ten minutes more cover the
# registration with its retries and the announce. A holder that crashed frees the claim sooner: its run ends.
CLAIM_LEASE = timedelta(seconds=BUILD_TIMEOUT_SECONDS + 600)
logger = logging.getLogger(__name__)


def run_may_be_building(run_id: str) -> bool:
    """For a build claim's holder: False once its Prefect flow run has ended (or was deleted); True while it
    runs, and when the API can't say (the claim's lease still bounds the wait)."""
    state = flow_run_state(run_id)
    if isinstance(state, Unknown):  # any API failure means "can't tell", never "ended"
        logger.warning("could not read flow run %s (%s); its build claim stands", run_id, state.cause)
        return True
    return not has_ended(state)


@task(
    name="claim-build",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **registry_blip(),
)
def claim_build(
    registry: ArtifactRegistry, namespace: str, *, commit: str, run_id: str, run_name: str
) -> BuildClaimed | BuildHeld:
    """Take the build of this commit for this run, or learn which live run has it (``icd/registry``)."""
    outcome = registry.registry().claim_build(
        namespace, commit, run_id=run_id, run_name=run_name, lease=CLAIM_LEASE, run_alive=run_may_be_building
    )
    log = get_run_logger()
    if isinstance(outcome, BuildHeld):
        holder = outcome.holder
        log.info(
            "%s@%s is being built by run %s (%s)", namespace, commit[:12], holder.holder_run_name, holder.holder_run_id
        )
    elif outcome.taken_over is not None:
        left = outcome.taken_over
        log.info(
            "took over the build of %s@%s from run %s (%s), which left it unfinished",
            namespace,
            commit[:12],
            left.holder_run_name,
            left.holder_run_id,
        )
    return outcome


@task(
    name="release-build-claim",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **registry_blip(),
)
def release_build_claim(registry: ArtifactRegistry, namespace: str, *, commit: str, run_id: str, outcome: str) -> bool:
    """Give the commit's build back, saying how it ended; False if this run no longer held it."""
    released = registry.registry().release_build(namespace, commit, run_id=run_id, outcome=outcome)
    if not released:
        get_run_logger().warning(
            "the build claim of %s@%s was no longer this run's (its lease ran out)", namespace, commit[:12]
        )
    return released


@task(
    name="find-existing-build",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **registry_blip(),
)
def find_existing_build(
    registry: ArtifactRegistry, namespace: str, *, commit: str, service_name: str, platform: str
) -> ArtifactVersion | None:
    """The newest deployable version already built from this commit, so a re-push does not rebuild.

    Immutable artifacts make this safe: the same commit and template give the same image, and reusing it
    is what lets an unchanged push plan "no changes". A local image that is gone from this worker's disk
    can't be reused.
    """
    found = registry.registry().find_build(namespace, commit=commit, service_name=service_name, platform=platform)
    if found is not None and platform == LOCAL and not Path(found.artifacts[LOCAL]).is_file():
        return None
    return found


@task(
    name="next-build-label",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **transient(RegistryStorageError),
)
def next_build_label(registry: ArtifactRegistry, namespace: str) -> str:
    return registry.registry().next_build_label(namespace)


# No retries: a failed build fails the same way again, and a retry would only hide it.
@task(name="build-artifact", persist_result=True, cache_policy=ONCE_PER_RUN)
def build_artifact(
    source: SourceCheckout,
    *,
    namespace: str,
    template_subdir: str,
    only: list[str],
    build_label: str,
    output_dir: str,
    service_name: str,
) -> BuiltArtifact:
    logger = get_run_logger()
    template_dir = source.path / template_subdir
    if not template_dir.is_dir():
        raise PackerError(f"no Packer template directory {template_subdir!r} in {source.repo}@{source.ref}")
    result = packer.build(
        template_dir,
        # Contract: docs/service-contract.md#packer-variables (the pre-flight check reports an undeclared one).
        PackerVariables(
            namespace=namespace,
            version=build_label,
            commit=source.commit,
            output_dir=output_dir,
            service_name=service_name,
        ).as_vars(),
        # Contract: docs/service-contract.md#sources-built (an empty list builds every source).
        only=only or None,
        timeout=BUILD_TIMEOUT_SECONDS,
        on_progress=logger.info,
    )
    builder_type, artifacts, digests = collect_artifacts(result)
    logger.info("packer run %s built %s", result.packer_run_uuid, artifacts)
    return BuiltArtifact(
        namespace=namespace,
        build_label=build_label,
        commit=source.commit,
        ref=source.ref,
        packer_run_uuid=result.packer_run_uuid,
        builder_type=builder_type,
        artifacts=artifacts,
        artifact_sha256=digests,
    )
