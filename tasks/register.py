"""Step 3: record the build as its commit's version of the namespace in the registry, with its signed provenance."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.registry import ArtifactRegistry
from icd.deploy.artifacts import BuiltArtifact
from icd.errors import ConflictError, RegistryStorageError
from icd.registry.models import RegistrationResult
from icd.registry.provenance import BuildFacts
from tasks.policies import ONCE_PER_RUN, transient


@task(
    name="register-artifact",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **transient(RegistryStorageError, ConflictError, delays=(1, 2, 4, 8)),
)
def register_artifact(
    registry: ArtifactRegistry,
    built: BuiltArtifact,
    *,
    created_by: str,
    service_name: str,
    build_run_id: str,
    rebuild_of: int | None,
    provenance: dict[str, str] | None = None,
    build_facts: BuildFacts | None = None,
) -> RegistrationResult:
    """Register the build as its commit's version (or, with ``rebuild_of``, the rebuild of that version).

    The registry keeps one version per commit: when another build of the commit is registered already, that
    version comes back and this build is left unregistered (its image unused).

    With ``build_facts`` the version this build registered gets its signed SLSA provenance, written once
    beside it (a retry finds it there); a registry block without a provenance key is refused before anything
    is registered, since deploys refuse a version without provenance.
    """
    reg = registry.registry()
    if build_facts is not None:
        reg.provenance_public_keys()  # ProvenanceError when the block has no key: nothing registered unsigned
    result = reg.register(
        built.namespace,
        git_commit=built.commit,
        git_ref=built.ref,
        packer_run_uuid=built.packer_run_uuid,
        builder_type=built.builder_type,
        artifacts=built.artifacts,
        artifact_sha256=built.artifact_sha256,
        created_by=created_by,
        # The run that built it: a run that takes over an unfinished build of the commit announces the
        # version if that run registered it and never got to (flows/build_artifact.py).
        # ``provenance``: who wrote and who pushed the commit, for the approval notice and its policy.
        labels={
            "build_label": built.build_label,
            "service_name": service_name,
            "build_run_id": build_run_id,
            **(provenance or {}),
        },
        rebuild_of=rebuild_of,
    )
    version = result.version
    log = get_run_logger()
    if version.packer_run_uuid != built.packer_run_uuid:
        log.warning(
            "%s@%s is v%d already, built by %s: this build (packer run %s) is not registered",
            built.namespace,
            built.commit[:12],
            version.version,
            version.created_by,
            built.packer_run_uuid,
        )
    else:
        verb = "registered" if result.created else "already registered as"
        log.info("%s %s v%d", verb, built.namespace, version.version)
        if build_facts is not None:
            reg.write_provenance(version, build_facts)
            log.info("signed the provenance of %s v%d", built.namespace, version.version)
    return result
