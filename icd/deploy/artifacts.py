"""What a Packer run built, and proof that what is deployed is what was built.

A local image is keyed ``local`` with its absolute path (the manifest's ``custom_data.image_path``) and
its SHA-256, recorded in the (sealed) registry record. Before a plan and again right before an apply, the
deploy re-hashes the file and compares: an image swapped on disk after it was registered, or a record
pointing elsewhere, fails the deploy naming the version and what differs. Cloud images (an AMI id) have no
bytes to hash here; their id comes from the sealed record and is checked against the plan's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from icd.errors import ArtifactIntegrityError, PackerError
from icd.registry.models import ArtifactVersion
from icd.service.contract import IMAGE_PATH_KEY, LOCAL_IMAGE_BUILDERS
from icd.tools.packer import PackerBuild

LOCAL = "local"


@dataclass(frozen=True)
class BuiltArtifact:
    namespace: str
    build_label: str
    commit: str
    ref: str
    packer_run_uuid: str
    builder_type: str
    artifacts: dict[str, str]
    artifact_sha256: dict[str, str] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def collect_artifacts(build: PackerBuild) -> tuple[str, dict[str, str], dict[str, str]]:
    """Flatten a Packer run into (builder type, platform -> artifact id, platform -> sha256)."""
    artifacts: dict[str, str] = {}
    digests: dict[str, str] = {}
    builder_types: list[str] = []
    for entry in build.builds:
        builder_types.append(entry.builder_type)
        # Contract: docs/service-contract.md#manifest (the pre-flight check reports a manifest without it).
        image_path = entry.custom_data.get(IMAGE_PATH_KEY)
        if image_path and entry.builder_type in LOCAL_IMAGE_BUILDERS:
            path = Path(image_path)
            if not path.is_file():
                raise PackerError(f"the build reported image {path} but no such file exists")
            artifacts[LOCAL] = str(path)
            digests[LOCAL] = sha256_file(path)
            continue
        artifacts.update(entry.artifact_ids)
    if not artifacts:
        raise PackerError(
            "the build produced no artifact ids: a local image must be named in the manifest's "
            "custom_data.image_path (see docs/service-contract.md#manifest)"
        )
    return "+".join(sorted(set(builder_types))), artifacts, digests


def artifact_for(version: ArtifactVersion, platform: str) -> str:
    """The artifact id ``version`` has for ``platform``; a clear error when it has none."""
    try:
        return version.artifacts[platform]
    except KeyError:
        raise ArtifactIntegrityError(
            f"{version.namespace} v{version.version} has no {platform!r} artifact (it has {sorted(version.artifacts)})"
        ) from None


def verify_image(version: ArtifactVersion, platform: str) -> str:
    """The artifact id to deploy, after proving its bytes are the registered ones (local images).

    Raises :class:`ArtifactIntegrityError` naming the version, the file and both digests.
    """
    artifact_id = artifact_for(version, platform)
    if platform != LOCAL:
        return artifact_id
    expected = version.artifact_sha256.get(LOCAL)
    label = f"{version.namespace} v{version.version}"
    if not expected:
        raise ArtifactIntegrityError(f"{label} records no sha256 for its local image; refusing to deploy it unverified")
    path = Path(artifact_id)
    if not path.is_file():
        raise ArtifactIntegrityError(f"{label}: its image {path} is missing on this worker")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactIntegrityError(
            f"{label}: image {path} has sha256 {actual}, but the registry recorded {expected}; "
            "the image was changed after it was built, nothing was deployed"
        )
    return artifact_id
