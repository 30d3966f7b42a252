"""Where an artifact came from and who let it run: SLSA provenance and deployment records, signed with Ed25519.

The registry's HMAC seal (``icd/registry/signing.py``) proves a record was written by someone holding the
registry's secret, but only that secret can check it. The provenance of an artifact and the record of each
deploy are meant to be checked by others too (an auditor, ``icd-audit``, any DSSE tool), so they are signed
with a public-key scheme in the formats those tools read:

* at build, a SLSA Provenance v1 in-toto Statement (https://slsa.dev/spec/v1.0/provenance): the image's
  sha256 as subject, the repository, ref, commit, Packer template digest and ``packer_only`` as the build's
  external parameters, the build-artifact run and its start and finish as run details;
* at apply, a deployment record (plan hash, approvers and their source, the apply run, the outputs, the
  gate's verdict);

each in a DSSE envelope (https://github.com/secure-systems-lab/dsse): the payload base64, signed over
``PAE("DSSEv1", payloadType, payload)``, so the signed bytes are exactly the stored ones and no JSON
canonicalisation is trusted. The key is one Ed25519 key held in the ``ArtifactRegistry`` block; its keyid is
the sha256 of its raw public key. Everything here is pure (no S3, no Prefect): the registry stores the
envelopes, and the deploy verifies before plan and apply (``icd/deploy/artifacts.py``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from icd.errors import ProvenanceError
from icd.registry.models import ArtifactVersion

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PROVENANCE_TYPE = "https://slsa.dev/provenance/v1"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
DEPLOYMENT_PAYLOAD_TYPE = "application/vnd.icd.deployment+json"
# Ours: what a build of this type does is docs/service-contract.md (Packer, then the registry).
BUILD_TYPE = "urn:immutable-cd:buildtype:packer-build-artifact:v1"
DEPLOYMENT_TYPE = "urn:immutable-cd:deployment:v1"
# A cloud image (an AMI id) has no bytes to hash here: its subject digest is the sha256 of its id, said so in
# the subject's annotations, so a verifier compares like with like.
DIGEST_OF_ID = "artifact-id"
_SEED_BYTES = 32


# --- keys ---------------------------------------------------------------------------------------------


def generate_key_text() -> str:
    """A new Ed25519 private key as the base64 of its 32-byte seed (what ``icd-setup blocks`` stores)."""
    return base64.b64encode(os.urandom(_SEED_BYTES)).decode()


def load_private_key(text: str) -> Ed25519PrivateKey:
    """The key held in the block: a PEM (PKCS#8) Ed25519 key, or the base64 of its raw 32-byte seed.

    The message of a failure never contains the key."""
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(stripped.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ProvenanceError(f"the provenance key is a {type(key).__name__}, not an Ed25519 key")
            return key
        seed = base64.b64decode(stripped, validate=True)
    except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error) as exc:
        raise ProvenanceError(
            f"the registry block's provenance_key is neither an Ed25519 PEM key nor base64 ({type(exc).__name__})"
        ) from exc
    if len(seed) != _SEED_BYTES:
        raise ProvenanceError(f"the provenance key's seed is {len(seed)} bytes; an Ed25519 seed is {_SEED_BYTES}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The keyid of a public key in every envelope: the sha256 (hex) of its raw 32 bytes."""
    return hashlib.sha256(raw_public_key(key)).hexdigest()


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key given as the base64 of its raw 32 bytes (how ``icd-audit`` may be handed one)."""
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ProvenanceError(f"not a base64 Ed25519 public key ({type(exc).__name__})") from exc


# --- statements ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildFacts:
    """What the build knows of itself, beyond the registry record, for its provenance."""

    repository: str
    ref: str
    commit: str
    template_digest: str  # template_digest() of the checked-out Packer template directory
    packer_only: tuple[str, ...]  # the sources built (empty: every source)
    build_run_id: str
    started_on: datetime
    finished_on: datetime


def builder_id(bucket: str, prefix: str) -> str:
    """This installation's build-artifact deployment: the one that writes into this registry."""
    return f"urn:immutable-cd:builder:s3:{quote(bucket, safe='')}:{quote(prefix, safe='')}:build-artifact"


def template_digest(directory: Path) -> str:
    """The sha256 of a Packer template directory: every regular file (sorted relative path, NUL, the file's
    sha256, newline), so any change of content, name or set of files changes it. Nothing is followed out of
    the directory (symlinks are hashed as their target text)."""
    digest = hashlib.sha256()
    files = sorted(path for path in directory.rglob("*") if path.is_symlink() or path.is_file())
    for path in files:
        relative = path.relative_to(directory).as_posix()
        content = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        digest.update(f"{relative}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return digest.hexdigest()


def subject_digest(version: ArtifactVersion, platform: str) -> str:
    """The sha256 the provenance names for ``platform``'s artifact: the image's bytes, or for a cloud image
    without bytes here, its id's."""
    recorded = version.artifact_sha256.get(platform)
    if recorded:
        return recorded
    return hashlib.sha256(version.artifacts[platform].encode()).hexdigest()


def _dependency_uri(repository: str, ref: str) -> str:
    base = repository if "://" in repository or repository.startswith("git@") else f"file://{repository}"
    return f"git+{base}@{ref}"


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("provenance timestamps must be timezone-aware (UTC)")
    return moment.isoformat().replace("+00:00", "Z")


def build_statement(version: ArtifactVersion, facts: BuildFacts, *, builder: str) -> dict[str, Any]:
    """The SLSA Provenance v1 statement of a registered version: one subject per platform's artifact."""
    subjects = []
    for platform, artifact_id in sorted(version.artifacts.items()):
        annotations = {"platform": platform}
        if not version.artifact_sha256.get(platform):
            annotations["digestOf"] = DIGEST_OF_ID
        subjects.append(
            {"name": artifact_id, "digest": {"sha256": subject_digest(version, platform)}, "annotations": annotations}
        )
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PROVENANCE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "repository": facts.repository,
                    "ref": facts.ref,
                    "commit": facts.commit,
                    "templateDigest": {"sha256": facts.template_digest},
                    "packerOnly": list(facts.packer_only),
                },
                # Set by the registry, not by whoever started the build.
                "internalParameters": {
                    "namespace": version.namespace,
                    "version": version.version,
                    "packerRunUuid": version.packer_run_uuid,
                    "builderType": version.builder_type,
                },
                "resolvedDependencies": [
                    {"uri": _dependency_uri(facts.repository, facts.ref), "digest": {"gitCommit": facts.commit}}
                ],
            },
            "runDetails": {
                "builder": {"id": builder},
                "metadata": {
                    "invocationId": facts.build_run_id,
                    "startedOn": _timestamp(facts.started_on),
                    "finishedOn": _timestamp(facts.finished_on),
                },
            },
        },
    }


@dataclass(frozen=True)
class DeploymentFacts:
    """One apply and how it ended, for the signed deployment record."""

    workspace: str
    namespace: str
    version: int
    artifact_id: str
    artifact_sha256: str
    plan_sha256: str
    approver: str  # every approver, as ApprovalDecision.approver has them
    approval_source: str  # ApprovalDecision.source: "slack" (signed click) or "ui" (typed name)
    approval_comment: str
    apply_run_id: str
    outputs: Mapping[str, Any]
    verdict: str  # how the run ended: Deployed, RolledBack, Unhealthy, TornDown, ...
    gate: str  # the health gate's status and wait ("passing after 3.2s"; "" when nothing was gated)
    detail: str
    recorded_at: datetime


def deployment_statement(facts: DeploymentFacts) -> dict[str, Any]:
    return {
        "_type": DEPLOYMENT_TYPE,
        "workspace": facts.workspace,
        "artifact": {
            "namespace": facts.namespace,
            "version": facts.version,
            "name": facts.artifact_id,
            "digest": {"sha256": facts.artifact_sha256},
        },
        "plan": {"sha256": facts.plan_sha256},
        "approval": {
            "approvers": facts.approver,
            "source": facts.approval_source,
            "comment": facts.approval_comment,
        },
        "apply": {"runId": facts.apply_run_id, "outputs": dict(facts.outputs)},
        "verdict": {"outcome": facts.verdict, "gate": facts.gate, "detail": facts.detail},
        "recordedAt": _timestamp(facts.recorded_at),
    }


# --- envelopes ----------------------------------------------------------------------------------------


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, so the type can't be swapped under a signature."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(body), body)


def sign_envelope(
    statement: Mapping[str, Any], private_key: Ed25519PrivateKey, *, payload_type: str = IN_TOTO_PAYLOAD_TYPE
) -> dict[str, Any]:
    """A DSSE envelope of ``statement`` signed by ``private_key``."""
    body = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    signature = private_key.sign(pae(payload_type, body))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }


@dataclass(frozen=True)
class VerifiedStatement:
    """An envelope whose signature checked: its statement, and which key signed it."""

    statement: dict[str, Any]
    keyid: str
    payload_type: str


def _key_map(public_keys: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    if isinstance(public_keys, Mapping):
        return dict(public_keys)
    return {key_id(key): key for key in public_keys}


def verify_envelope(
    envelope: Any,
    public_keys: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey],
    *,
    payload_type: str = IN_TOTO_PAYLOAD_TYPE,
    where: str = "the envelope",
) -> VerifiedStatement:
    """The statement of ``envelope`` if one of ``public_keys`` signed it; :class:`ProvenanceError` saying why not
    (not an envelope, wrong payloadType, unsigned, signed by another key, payload changed after signing)."""
    keys = _key_map(public_keys)
    if not isinstance(envelope, Mapping) or not {"payloadType", "payload"} <= envelope.keys():
        raise ProvenanceError(f"{where} is not a DSSE envelope (it needs payloadType, payload and signatures)")
    if envelope["payloadType"] != payload_type:
        raise ProvenanceError(
            f"{where} has payloadType {str(envelope['payloadType'])[:80]!r}, expected {payload_type!r}"
        )
    try:
        body = base64.b64decode(str(envelope["payload"]), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ProvenanceError(f"{where}'s payload is not base64") from exc
    signatures = envelope.get("signatures")
    if not isinstance(signatures, Sequence) or not signatures:
        raise ProvenanceError(f"{where} is unsigned: it carries no signature")
    signed = pae(payload_type, body)
    named: list[str] = []
    for entry in signatures:
        if not isinstance(entry, Mapping):
            continue
        keyid = str(entry.get("keyid") or "")
        named.append(keyid or "(no keyid)")
        try:
            signature = base64.b64decode(str(entry.get("sig") or ""), validate=True)
        except (ValueError, binascii.Error):
            continue
        # The keyid is only a hint (DSSE): without one, every trusted key is tried.
        candidates = [(keyid, keys[keyid])] if keyid in keys else ([] if keyid else list(keys.items()))
        for candidate_id, key in candidates:
            try:
                key.verify(signature, signed)
            except InvalidSignature:
                continue
            return VerifiedStatement(_parse(body, where), candidate_id, payload_type)
    if "(no keyid)" in named:
        raise ProvenanceError(
            f"no provenance key of this registry verifies {where}'s signature: "
            "it was changed after it was signed, or signed by another key"
        )
    if not any(name in keys for name in named):
        trusted = ", ".join(sorted(keyid[:16] for keyid in keys)) or "none"
        raise ProvenanceError(
            f"{where} is signed by key {', '.join(name[:16] for name in named)}, not by this registry's "
            f"provenance key ({trusted})"
        )
    raise ProvenanceError(f"{where}'s signature does not match its payload: it was changed after it was signed")


def _parse(body: bytes, where: str) -> dict[str, Any]:
    try:
        statement = json.loads(body)
    except ValueError as exc:
        raise ProvenanceError(f"{where}'s signed payload is not JSON") from exc
    if not isinstance(statement, dict):
        raise ProvenanceError(f"{where}'s signed payload is not a JSON object")
    return statement


def verify_provenance(
    envelope: Any,
    version: ArtifactVersion,
    platform: str,
    public_keys: Mapping[str, Ed25519PublicKey] | Iterable[Ed25519PublicKey],
    *,
    builder: str,
) -> VerifiedStatement:
    """The provenance of ``version``'s ``platform`` artifact, proven: signed by one of ``public_keys``, a SLSA
    v1 statement from ``builder``, for this version and commit, naming the image's digest. ``envelope`` None
    (nothing stored) is refused too. :class:`ProvenanceError` names the version and the first broken link."""
    label = f"{version.namespace} v{version.version}"
    if envelope is None:
        raise ProvenanceError(
            f"{label} has no provenance (registered before provenance existed, or its record was removed); "
            f"refusing to deploy it: rebuild commit {version.git_commit[:12]} to get a signed version"
        )
    verified = verify_envelope(envelope, public_keys, where=f"the provenance of {label}")
    statement = verified.statement
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PROVENANCE_TYPE:
        raise ProvenanceError(f"the provenance of {label} is not a SLSA v1 provenance statement")
    predicate = statement.get("predicate") or {}
    definition = predicate.get("buildDefinition") or {}
    internal = definition.get("internalParameters") or {}
    external = definition.get("externalParameters") or {}
    signed_builder = ((predicate.get("runDetails") or {}).get("builder") or {}).get("id")
    if signed_builder != builder:
        raise ProvenanceError(f"the provenance of {label} names builder {signed_builder!r}, not this one ({builder})")
    if (internal.get("namespace"), internal.get("version")) != (version.namespace, version.version):
        raise ProvenanceError(
            f"the provenance of {label} is that of {internal.get('namespace')} v{internal.get('version')}"
        )
    if external.get("commit") != version.git_commit:
        raise ProvenanceError(
            f"the provenance of {label} names commit {external.get('commit')}, the registry {version.git_commit}"
        )
    artifact_id = version.artifacts.get(platform)
    if artifact_id is None:
        raise ProvenanceError(f"{label} has no {platform!r} artifact")
    expected = subject_digest(version, platform)
    digests = [
        (subject.get("digest") or {}).get("sha256")
        for subject in statement.get("subject") or []
        if isinstance(subject, Mapping) and subject.get("name") == artifact_id
    ]
    if not digests:
        raise ProvenanceError(f"the provenance of {label} names no subject {artifact_id}")
    if expected not in digests:
        raise ProvenanceError(
            f"the provenance of {label} gives {artifact_id} sha256 {digests[0]}, but the image's is {expected}; "
            "nothing was deployed"
        )
    return verified


@dataclass(frozen=True)
class CheckedEnvelope:
    """A stored envelope and what checking it found: ``verified``, or the ``problem`` that broke it."""

    where: str
    envelope: Any
    verified: VerifiedStatement | None
    problem: str = ""
