"""Saved Terraform plan files kept durably in S3, next to the artifact registry.

A flow suspended for approval re-runs from the top on resume, possibly on another worker, so the plan it
shows to the approver must outlive the worker's disk. Plans are written once (``IfNoneMatch="*"``) at
``<prefix><workspace>/<run_id>.tfplan`` with their SHA-256 in the object metadata, and every read checks
the bytes against it, so the plan that is applied is provably the plan that was approved.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from tasks.errors import PlanIntegrityError, VersionNotFoundError
from tasks.registry import S3Client, is_conflict, is_not_found, storage_error, validate_channel_name

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA_METADATA = "sha256"


@dataclass(frozen=True)
class StoredPlan:
    key: str
    sha256: str
    size: int


class PlanStore:
    """Write-once plan files per (workspace, run id), verified on every read."""

    def __init__(self, s3_client: S3Client, bucket: str, prefix: str = "") -> None:
        self._client = s3_client
        self.bucket = bucket
        self.prefix = prefix

    def key_for(self, workspace: str, run_id: str) -> str:
        validate_channel_name(workspace, what="workspace")
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise ValueError(
                f"invalid run id {run_id!r}: 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        return f"{self.prefix}{workspace}/{run_id}.tfplan"

    def put(
        self,
        workspace: str,
        run_id: str,
        plan_bytes: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> StoredPlan:
        """Store the plan once. The same bytes again return the same result; other bytes raise.

        Raises :class:`PlanIntegrityError` when a different plan is already stored under this key.
        """
        key = self.key_for(workspace, run_id)
        digest = hashlib.sha256(plan_bytes).hexdigest()
        stored = StoredPlan(key=key, sha256=digest, size=len(plan_bytes))
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=plan_bytes,
                ContentType="application/octet-stream",
                Metadata={**(metadata or {}), _SHA_METADATA: digest},
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if not is_conflict(exc):
                raise storage_error(exc, bucket=self.bucket, key=key) from exc
            existing = self.sha256_of(workspace, run_id)
            if existing != digest:
                raise PlanIntegrityError(
                    f"a different plan is already stored for workspace {workspace!r} run {run_id!r} "
                    f"(sha256 {existing}, this one {digest}); plans are write-once"
                ) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        return stored

    def get(self, workspace: str, run_id: str, *, expected_sha256: str | None = None) -> bytes:
        """The plan bytes, checked against the SHA-256 recorded at upload (and ``expected_sha256``).

        Raises :class:`VersionNotFoundError` when absent and :class:`PlanIntegrityError` on any mismatch.
        """
        key = self.key_for(workspace, run_id)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            body: bytes = response["Body"].read()
        except ClientError as exc:
            if is_not_found(exc):
                raise VersionNotFoundError(
                    f"no saved plan for workspace {workspace!r} run {run_id!r} at s3://{self.bucket}/{key}"
                ) from exc
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        recorded = response.get("Metadata", {}).get(_SHA_METADATA)
        actual = hashlib.sha256(body).hexdigest()
        checks = [("recorded at upload", recorded)]
        if expected_sha256 is not None:
            checks.append(("expected by the caller", expected_sha256))
        for label, wanted in checks:
            if wanted != actual:
                raise PlanIntegrityError(
                    f"saved plan s3://{self.bucket}/{key} has sha256 {actual}, but {wanted} was {label}; "
                    "refusing to use it"
                )
        return body

    def sha256_of(self, workspace: str, run_id: str) -> str | None:
        """The SHA-256 recorded at upload, or None when no plan is stored."""
        key = self.key_for(workspace, run_id)
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        recorded = response.get("Metadata", {}).get(_SHA_METADATA)
        return str(recorded) if recorded is not None else None

    def delete(self, workspace: str, run_id: str) -> None:
        """Remove the plan; deleting an absent plan is not an error."""
        key = self.key_for(workspace, run_id)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
