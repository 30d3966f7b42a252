"""Saved Terraform plan files kept durably in S3, next to the artifact registry.

A flow suspended for approval re-runs from the top on resume, possibly on another worker, so the plan it
shows to the approver must outlive the worker's disk. Plans are written once (``IfNoneMatch="*"``) at
``<prefix><workspace>/<plan_id>.tfplan`` with their SHA-256 in the object metadata, and every read checks
the bytes against it and against the hash the operator approved, so the plan that is applied is provably
the plan that was approved.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from icd.errors import InvalidInputError, PlanIntegrityError, VersionNotFoundError
from icd.registry.s3 import S3Objects
from icd.rules import check_workspace

_PLAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA_METADATA = "sha256"


@dataclass(frozen=True)
class StoredPlan:
    key: str
    sha256: str
    size: int


class PlanStore:
    """Write-once plan files per (workspace, plan id), verified on every read."""

    def __init__(self, s3_client: object, bucket: str, prefix: str = "") -> None:
        self._objects = S3Objects(s3_client, bucket)  # type: ignore[arg-type]  # any boto3 S3 client
        self.bucket = bucket
        self.prefix = prefix

    def key_for(self, workspace: str, plan_id: str) -> str:
        check_workspace(workspace)
        if not isinstance(plan_id, str) or not _PLAN_ID.fullmatch(plan_id):
            raise InvalidInputError(
                f"invalid plan id {plan_id!r}: 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        return f"{self.prefix}{workspace}/{plan_id}.tfplan"

    def put(
        self, workspace: str, plan_id: str, plan_bytes: bytes, *, metadata: Mapping[str, str] | None = None
    ) -> StoredPlan:
        """Store the plan once. The same bytes again return the same result; other bytes raise.

        Raises :class:`PlanIntegrityError` when a different plan is already stored under this key.
        """
        key = self.key_for(workspace, plan_id)
        digest = hashlib.sha256(plan_bytes).hexdigest()
        created = self._objects.write(
            key,
            plan_bytes,
            if_match=None,
            content_type="application/octet-stream",
            metadata={**(metadata or {}), _SHA_METADATA: digest},
        )
        if not created:
            existing = self.sha256_of(workspace, plan_id)
            if existing != digest:
                raise PlanIntegrityError(
                    f"a different plan is already stored for workspace {workspace!r} plan {plan_id!r} "
                    f"(sha256 {existing}, this one {digest}); plans are write-once"
                )
        return StoredPlan(key=key, sha256=digest, size=len(plan_bytes))

    def get(self, workspace: str, plan_id: str, *, expected_sha256: str | None = None) -> bytes:
        """The plan bytes, checked against the SHA-256 recorded at upload (and ``expected_sha256``).

        Raises :class:`VersionNotFoundError` when absent and :class:`PlanIntegrityError` on any mismatch.
        """
        key = self.key_for(workspace, plan_id)
        found = self._objects.read(key)
        if found is None:
            raise VersionNotFoundError(
                f"no saved plan for workspace {workspace!r} plan {plan_id!r} at s3://{self.bucket}/{key}"
            )
        actual = hashlib.sha256(found.body).hexdigest()
        checks = [("recorded at upload", found.metadata.get(_SHA_METADATA))]
        if expected_sha256 is not None:
            checks.append(("approved", expected_sha256))
        for label, wanted in checks:
            if wanted != actual:
                raise PlanIntegrityError(
                    f"saved plan s3://{self.bucket}/{key} has sha256 {actual}, but {wanted} was {label}; "
                    "refusing to use it"
                )
        return found.body

    def sha256_of(self, workspace: str, plan_id: str) -> str | None:
        """The SHA-256 recorded at upload, or None when no plan is stored."""
        metadata = self._objects.head(self.key_for(workspace, plan_id))
        if metadata is None:
            return None
        recorded = metadata.get(_SHA_METADATA)
        return str(recorded) if recorded is not None else None

    def plans_of(self, namespace: str, version: int) -> list[PlanOfVersion]:
        """Every stored plan of ``namespace`` ``version``, in any workspace (the audit's "each plan"): its
        workspace, plan id (the deploy run's id, or ``<run id>-rollback``) and recorded SHA-256."""
        found = []
        for key in self._objects.list_keys(self.prefix):
            workspace, _, name = key.removeprefix(self.prefix).partition("/")
            if not name.endswith(".tfplan"):
                continue
            metadata = self._objects.head(key) or {}
            if metadata.get("namespace") == namespace and metadata.get("version") == str(version):
                found.append(PlanOfVersion(workspace, name.removesuffix(".tfplan"), str(metadata.get(_SHA_METADATA))))
        return sorted(found, key=lambda plan: (plan.workspace, plan.plan_id))


@dataclass(frozen=True)
class PlanOfVersion:
    workspace: str
    plan_id: str
    sha256: str
