"""Step 2: bake the commit into an image with Packer, unless this commit is already built."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from blocks.registry import ArtifactRegistry
from icd.deploy.artifacts import LOCAL, BuiltArtifact, collect_artifacts
from icd.deploy.source import SourceCheckout
from icd.errors import ConflictError, PackerError, RegistryStorageError
from icd.registry.models import ArtifactVersion
from icd.service.contract import PackerVariables
from icd.tools import packer
from tasks.policies import ONCE_PER_RUN, retry_on

BUILD_TIMEOUT_SECONDS = 3600.0


@task(
    name="find-existing-build",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    retries=3,
    retry_delay_seconds=[1, 3, 9],
    retry_condition_fn=retry_on(RegistryStorageError, ConflictError),
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
    retries=3,
    retry_delay_seconds=[1, 3, 9],
    retry_condition_fn=retry_on(RegistryStorageError),
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
