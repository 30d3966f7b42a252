"""Step 3: record the build as the next version of its namespace in the registry."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.registry import ArtifactRegistry
from icd.deploy.artifacts import BuiltArtifact
from icd.errors import ConflictError, RegistryStorageError
from icd.registry.models import ArtifactVersion
from tasks.policies import ONCE_PER_RUN, retry_on


@task(
    name="register-artifact",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    retries=4,
    retry_delay_seconds=[1, 2, 4, 8],
    retry_condition_fn=retry_on(RegistryStorageError, ConflictError),
)
def register_artifact(
    registry: ArtifactRegistry, built: BuiltArtifact, *, created_by: str, service_name: str
) -> ArtifactVersion:
    result = registry.registry().register(
        built.namespace,
        git_commit=built.commit,
        git_ref=built.ref,
        packer_run_uuid=built.packer_run_uuid,
        builder_type=built.builder_type,
        artifacts=built.artifacts,
        artifact_sha256=built.artifact_sha256,
        created_by=created_by,
        labels={"build_label": built.build_label, "service_name": service_name},
    )
    verb = "registered" if result.created else "already registered as"
    get_run_logger().info("%s %s v%d", verb, built.namespace, result.version.version)
    return result.version
