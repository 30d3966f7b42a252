"""An HCP Packer-like artifact registry kept in one S3 bucket, safe for concurrent writers.

Every namespace (``org/name``) has numbered, immutable versions (the build facts of one Packer run) and
named channels pointing at them. ``latest`` follows the newest non-revoked version on its own; other
channels (``production``, ...) move only through :meth:`Registry.assign_channel` and keep their history.

Key layout, all under ``prefix`` (which should end in ``/`` when not empty)::

    namespaces/<org>/<name>/index.json               last version number + packer_run_uuid -> version
    namespaces/<org>/<name>/versions/00000001.json   the build facts of v1; written once, never rewritten
    namespaces/<org>/<name>/revocations/00000001.json  revocation of v1; written once, never rewritten
    namespaces/<org>/<name>/channels/<channel>.json  current pointer plus the channel's full history

Concurrency rests on S3 conditional writes only (no lock service):

* ``index.json`` is updated with compare-and-swap (``IfMatch=<etag>``, or ``IfNoneMatch="*"`` when it does
  not exist yet). One successful swap both reserves the next version number and records the Packer run,
  so two writers can never get the same number and the same run can never get two numbers.
* Version and revocation objects are created with ``IfNoneMatch="*"``: a second writer gets a 412 and
  reads what the first wrote. Revocation is a separate object, so the build facts in the version object
  stay byte-for-byte immutable; reads merge the two.
* A channel object is replaced with compare-and-swap; the pointer and its history change in the same write,
  so history can never disagree with the pointer.

Each swap retries a bounded number of times with jittered backoff and then raises :class:`ConflictError`.
A failure between reserving a number and writing its version object leaves a reservation that the next
``register`` of the same Packer run completes; other writers are never blocked by it.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias, TypeVar

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import (
    ConflictError,
    InvalidChannelError,
    InvalidNamespaceError,
    RegistryStorageError,
    RevokedVersionError,
    VersionNotFoundError,
)

# boto3 clients are generated at runtime and this project ships no stubs for them.
S3Client: TypeAlias = Any
RecordT = TypeVar("RecordT", bound=BaseModel)

LATEST = "latest"
DEFAULT_MAX_ATTEMPTS = 40

_NAME_PART = re.compile(r"[a-z0-9_-]{1,64}")
_CHANNEL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_NAMESPACE_RULE = (
    "a namespace is 'org/name': exactly one '/', each part 1-64 characters of lowercase letters, digits, '-' or '_'"
)
_CHANNEL_RULE = "must start with a lowercase letter, then up to 63 lowercase letters, digits, '-' or '_'"
_VERSION_DIGITS = 8
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


# --- names ---------------------------------------------------------------------------------------------


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` unchanged if it follows the ``org/name`` rule; raise otherwise."""
    parts = namespace.split("/") if isinstance(namespace, str) else []
    if len(parts) != 2 or not all(_NAME_PART.fullmatch(part) for part in parts):
        raise InvalidNamespaceError(f"invalid namespace {namespace!r}: {_NAMESPACE_RULE}")
    return namespace


def validate_channel_name(name: str, *, what: str = "channel") -> str:
    """Return ``name`` unchanged if it is a lowercase identifier; raise :class:`InvalidChannelError`."""
    if not isinstance(name, str) or not _CHANNEL_NAME.fullmatch(name):
        raise InvalidChannelError(f"invalid {what} name {name!r}: {_CHANNEL_RULE}")
    return name


# --- records -------------------------------------------------------------------------------------------


class _Record(BaseModel):
    # Unknown fields are ignored so that older readers survive objects written by a newer version.
    model_config = ConfigDict(frozen=True)


class Revocation(_Record):
    revoked_at: datetime
    reason: str
    revoked_by: str


class ArtifactVersion(_Record):
    """The build facts of one Packer run, plus revocation metadata merged in on read."""

    namespace: str
    version: int = Field(ge=1)
    git_commit: str
    git_ref: str
    packer_run_uuid: str
    builder_type: str
    artifacts: dict[str, str]
    artifact_sha256: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    created_by: str
    parent_version: int | None = None
    built_for: str = LATEST
    labels: dict[str, str] = Field(default_factory=dict)
    revocation: Revocation | None = None

    def is_revoked(self, at: datetime | None = None) -> bool:
        """Whether the version is revoked at ``at`` (default: now); a future revocation is not yet."""
        if self.revocation is None:
            return False
        return self.revocation.revoked_at <= (at or datetime.now(UTC))


class RegistrationResult(_Record):
    version: ArtifactVersion
    created: bool


class ChannelAssignment(_Record):
    channel: str
    from_version: int | None
    to_version: int | None
    assigned_by: str
    assigned_at: datetime
    reason: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)


class ChannelPointer(_Record):
    namespace: str
    channel: str
    version: int
    updated_at: datetime
    updated_by: str


class _ChannelDocument(_Record):
    channel: str
    version: int | None
    history: list[ChannelAssignment]


class _NamespaceIndex(_Record):
    last_version: int = 0
    runs: dict[str, int] = Field(default_factory=dict)


# --- S3 boundary ---------------------------------------------------------------------------------------


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def is_conflict(exc: ClientError) -> bool:
    """A conditional write lost: the key exists (IfNoneMatch) or changed (IfMatch)."""
    return _error_code(exc) in _CONFLICT_CODES


def is_not_found(exc: ClientError) -> bool:
    return _error_code(exc) in _NOT_FOUND_CODES


def storage_error(exc: Exception, *, bucket: str, key: str = "") -> RegistryStorageError:
    """Build the error to raise for a failed S3 call; names bucket and key, never credentials."""
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return RegistryStorageError(
                f"S3 bucket {bucket!r} does not exist (or is not visible to these credentials); "
                "create it or fix the registry block's bucket"
            )
        message = exc.response.get("Error", {}).get("Message", "")
        return RegistryStorageError(f"S3 refused a request for {where}: {code} {message}".rstrip())
    return RegistryStorageError(f"S3 could not be reached for {where}: {type(exc).__name__}")


class _S3Objects:
    """Thin JSON-object access with conditional writes; translates botocore errors into ours."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def read(self, key: str) -> tuple[bytes, str] | None:
        """Body and ETag, or None when the key does not exist."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read(), response["ETag"]
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, bucket=self.bucket, key=key) from exc

    def write(self, key: str, body: bytes, *, if_match: str | None) -> bool:
        """Create (``if_match=None``) or swap; False when the condition failed (someone else won)."""
        condition = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", **condition)
        except ClientError as exc:
            # An IfMatch against a key deleted meanwhile is a lost race too.
            if is_conflict(exc) or (if_match is not None and is_not_found(exc)):
                return False
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, bucket=self.bucket, key=key) from exc
        return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        yield from (key for key, _ in self._list(prefix, delimiter=None))

    def list_folders(self, prefix: str) -> Iterator[str]:
        yield from (folder for _, folder in self._list(prefix, delimiter="/") if folder)

    def _list(self, prefix: str, *, delimiter: str | None) -> Iterator[tuple[str, str]]:
        options = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            options["Delimiter"] = delimiter
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**options):
                for item in page.get("Contents", []):
                    yield item["Key"], ""
                for folder in page.get("CommonPrefixes", []):
                    yield "", folder["Prefix"]
        except ClientError as exc:
            raise storage_error(exc, bucket=self.bucket, key=prefix) from exc
        except BotoCoreError as exc:
            raise storage_error(exc, bucket=self.bucket, key=prefix) from exc


# --- the registry --------------------------------------------------------------------------------------


class Registry:
    """Artifact versions and channels for many namespaces in one S3 bucket. Thread-safe."""

    def __init__(
        self,
        s3_client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.max_attempts = max_attempts
        self._objects = _S3Objects(s3_client, bucket)
        self._clock = clock or (lambda: datetime.now(UTC))

    # keys

    def _namespace_key(self, namespace: str) -> str:
        return f"{self.prefix}namespaces/{validate_namespace(namespace)}/"

    def _version_key(self, namespace: str, version: int) -> str:
        return f"{self._namespace_key(namespace)}versions/{version:0{_VERSION_DIGITS}d}.json"

    def _revocation_key(self, namespace: str, version: int) -> str:
        return f"{self._namespace_key(namespace)}revocations/{version:0{_VERSION_DIGITS}d}.json"

    def _channel_key(self, namespace: str, channel: str) -> str:
        return f"{self._namespace_key(namespace)}channels/{validate_channel_name(channel)}.json"

    def _now(self) -> datetime:
        return self._clock()

    def _backoff(self, attempt: int) -> None:
        time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311  # jitter, not crypto

    # versions

    def register(
        self,
        namespace: str,
        *,
        git_commit: str,
        git_ref: str,
        packer_run_uuid: str,
        builder_type: str,
        artifacts: Mapping[str, str],
        artifact_sha256: Mapping[str, str] | None = None,
        created_by: str,
        built_for: str = LATEST,
        labels: Mapping[str, str] | None = None,
    ) -> RegistrationResult:
        """Record a Packer run as the next version; the same ``packer_run_uuid`` again returns that one."""
        validate_namespace(namespace)
        validate_channel_name(built_for)
        if not packer_run_uuid:
            raise ValueError("packer_run_uuid must not be empty: it is what makes registration idempotent")
        if not artifacts:
            raise ValueError(f"{namespace}: a version needs at least one artifact")

        version_number = self._reserve_version(namespace, packer_run_uuid)
        existing = self._read_version(namespace, version_number)
        if existing is not None:
            return RegistrationResult(version=self._with_revocation(existing), created=False)

        parent = self._read_channel(namespace, built_for)[0]
        record = ArtifactVersion(
            namespace=namespace,
            version=version_number,
            git_commit=git_commit,
            git_ref=git_ref,
            packer_run_uuid=packer_run_uuid,
            builder_type=builder_type,
            artifacts=dict(artifacts),
            artifact_sha256=dict(artifact_sha256 or {}),
            created_at=self._now(),
            created_by=created_by,
            parent_version=parent.version if parent else None,
            built_for=built_for,
            labels=dict(labels or {}),
        )
        body = record.model_dump_json(exclude={"revocation"}).encode()
        created = self._objects.write(self._version_key(namespace, version_number), body, if_match=None)
        if not created:
            # A concurrent register of the same run completed the reservation first; theirs stands.
            winner = self._read_version(namespace, version_number)
            if winner is None:
                raise ConflictError(f"{namespace} v{version_number} vanished while being registered")
            record = winner
        self._refresh_latest(
            namespace, actor=created_by, reason=f"registered v{version_number} from {git_ref}@{git_commit}"
        )
        return RegistrationResult(version=self._with_revocation(record), created=created)

    def _reserve_version(self, namespace: str, packer_run_uuid: str) -> int:
        key = f"{self._namespace_key(namespace)}index.json"
        for attempt in range(self.max_attempts):
            found = self._objects.read(key)
            index = _NamespaceIndex.model_validate_json(found[0]) if found else _NamespaceIndex()
            if packer_run_uuid in index.runs:
                return index.runs[packer_run_uuid]
            number = index.last_version + 1
            updated = _NamespaceIndex(last_version=number, runs={**index.runs, packer_run_uuid: number})
            if self._objects.write(key, updated.model_dump_json().encode(), if_match=found[1] if found else None):
                return number
            self._backoff(attempt)
        raise ConflictError(
            f"{namespace}: could not reserve a version number after {self.max_attempts} attempts "
            "(too many concurrent registrations); retry"
        )

    def _read_version(self, namespace: str, version: int) -> ArtifactVersion | None:
        found = self._objects.read(self._version_key(namespace, version))
        return _parse(ArtifactVersion, found[0], self.bucket) if found else None

    def _read_revocation(self, namespace: str, version: int) -> Revocation | None:
        found = self._objects.read(self._revocation_key(namespace, version))
        return _parse(Revocation, found[0], self.bucket) if found else None

    def _with_revocation(self, record: ArtifactVersion) -> ArtifactVersion:
        revocation = self._read_revocation(record.namespace, record.version)
        return record.model_copy(update={"revocation": revocation}) if revocation else record

    def get(self, namespace: str, version: int) -> ArtifactVersion:
        """One version with its revocation (if any); :class:`VersionNotFoundError` when absent."""
        record = self._read_version(namespace, version)
        if record is None:
            raise VersionNotFoundError(f"{namespace} has no version {version}")
        return self._with_revocation(record)

    def _version_numbers(self, namespace: str, kind: str = "versions") -> list[int]:
        folder = f"{self._namespace_key(namespace)}{kind}/"
        return sorted(int(key[len(folder) :].removesuffix(".json")) for key in self._objects.list_keys(folder))

    def list_namespaces(self) -> list[str]:
        root = f"{self.prefix}namespaces/"
        return sorted(
            name.removeprefix(root).rstrip("/")
            for org in self._objects.list_folders(root)
            for name in self._objects.list_folders(org)
        )

    def list_versions(self, namespace: str) -> list[ArtifactVersion]:
        """Every version, oldest first, with revocations merged in; empty for an unknown namespace."""
        revoked = set(self._version_numbers(namespace, "revocations"))
        records = []
        for number in self._version_numbers(namespace):
            record = self._read_version(namespace, number)
            if record is None:
                continue
            records.append(self._with_revocation(record) if number in revoked else record)
        return records

    def find_by_artifact_id(self, namespace: str, artifact_id: str) -> ArtifactVersion | None:
        """The newest version that produced ``artifact_id`` (an AMI id, an image path), or None."""
        for record in reversed(self.list_versions(namespace)):
            if artifact_id in record.artifacts.values():
                return record
        return None

    # revocation

    def revoke(
        self,
        namespace: str,
        version: int,
        *,
        revoked_by: str,
        reason: str,
        at: datetime | None = None,
        cascade: bool = False,
    ) -> list[int]:
        """Revoke ``version`` (and with ``cascade`` every descendant by ``parent_version``) from ``at``.

        Returns the versions this call revoked; ones already revoked keep their first revocation and are
        left out. ``latest`` moves back to the newest version not revoked now.
        """
        if not reason.strip():
            raise ValueError("a revocation needs a reason: operators read it when a deploy is refused")
        if at is not None and at.tzinfo is None:
            raise ValueError("revocation time must be timezone-aware (UTC)")
        self.get(namespace, version)
        targets = [version]
        if cascade:
            children: dict[int, list[int]] = {}
            for record in self.list_versions(namespace):
                if record.parent_version is not None:
                    children.setdefault(record.parent_version, []).append(record.version)
            pending = [version]
            while pending:
                for child in children.get(pending.pop(), []):
                    if child not in targets:
                        targets.append(child)
                        pending.append(child)
        revocation = Revocation(revoked_at=at or self._now(), reason=reason, revoked_by=revoked_by)
        body = revocation.model_dump_json().encode()
        revoked = [
            number
            for number in sorted(targets)
            if self._objects.write(self._revocation_key(namespace, number), body, if_match=None)
        ]
        self._refresh_latest(namespace, actor=revoked_by, reason=f"revoked {revoked or targets}: {reason}")
        return revoked

    def resolve_deployable(self, namespace: str, version: int) -> ArtifactVersion:
        """The version if it may be deployed now; :class:`RevokedVersionError` if it is revoked."""
        record = self.get(namespace, version)
        if record.is_revoked(self._now()) and record.revocation is not None:
            revocation = record.revocation
            raise RevokedVersionError(
                f"{namespace} v{version} is revoked since {revocation.revoked_at.isoformat()} "
                f"by {revocation.revoked_by}: {revocation.reason}; refusing to deploy it"
            )
        return record

    def resolve_channel(self, namespace: str, channel: str) -> ArtifactVersion:
        """The deployable version a channel points at; errors as :meth:`resolve_deployable`."""
        pointer = self.get_channel(namespace, channel)
        if pointer is None:
            raise VersionNotFoundError(f"{namespace} has no channel {channel!r} (or it points at nothing)")
        return self.resolve_deployable(namespace, pointer.version)

    # channels

    def _read_channel(self, namespace: str, channel: str) -> tuple[_ChannelDocument | None, str | None]:
        found = self._objects.read(self._channel_key(namespace, channel))
        if found is None:
            return None, None
        return _parse(_ChannelDocument, found[0], self.bucket), found[1]

    def _swap_channel(
        self,
        namespace: str,
        channel: str,
        decide: Callable[[_ChannelDocument | None], ChannelAssignment | None],
    ) -> ChannelAssignment | None:
        """Compare-and-swap loop: ``decide`` sees the current document and returns the move, or None."""
        key = self._channel_key(namespace, channel)
        for attempt in range(self.max_attempts):
            document, etag = self._read_channel(namespace, channel)
            assignment = decide(document)
            if assignment is None:
                return None
            history = [*(document.history if document else []), assignment]
            updated = _ChannelDocument(channel=channel, version=assignment.to_version, history=history)
            if self._objects.write(key, updated.model_dump_json().encode(), if_match=etag):
                return assignment
            self._backoff(attempt)
        raise ConflictError(
            f"{namespace}: channel {channel!r} changed under us {self.max_attempts} times in a row; retry"
        )

    def _newest_deployable(self, namespace: str) -> int | None:
        revoked = set(self._version_numbers(namespace, "revocations"))
        now = self._now()
        for number in reversed(self._version_numbers(namespace)):
            if number not in revoked:
                return number
            revocation = self._read_revocation(namespace, number)
            if revocation is None or revocation.revoked_at > now:
                return number
        return None

    def _refresh_latest(self, namespace: str, *, actor: str, reason: str) -> None:
        def decide(document: _ChannelDocument | None) -> ChannelAssignment | None:
            current = document.version if document else None
            target = self._newest_deployable(namespace)
            if target == current:
                return None
            return ChannelAssignment(
                channel=LATEST,
                from_version=current,
                to_version=target,
                assigned_by=actor,
                assigned_at=self._now(),
                reason=reason,
            )

        self._swap_channel(namespace, LATEST, decide)

    def assign_channel(
        self,
        namespace: str,
        channel: str,
        version: int,
        *,
        assigned_by: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> ChannelAssignment:
        """Point ``channel`` at ``version`` and append the move to its history.

        Raises :class:`RevokedVersionError` for a revoked version, :class:`VersionNotFoundError` for an
        absent one, and :class:`InvalidChannelError` for ``latest`` (the registry moves that one itself).
        """
        validate_channel_name(channel)
        if channel == LATEST:
            raise InvalidChannelError(f"channel {LATEST!r} follows the newest version by itself; pick another")
        record = self.get(namespace, version)
        if record.is_revoked(self._now()) and record.revocation is not None:
            raise RevokedVersionError(
                f"{namespace} v{version} is revoked ({record.revocation.reason}); "
                f"it can't be assigned to channel {channel!r}"
            )

        def decide(document: _ChannelDocument | None) -> ChannelAssignment:
            return ChannelAssignment(
                channel=channel,
                from_version=document.version if document else None,
                to_version=version,
                assigned_by=assigned_by,
                assigned_at=self._now(),
                reason=reason,
                metadata=dict(metadata or {}),
            )

        assignment = self._swap_channel(namespace, channel, decide)
        if assignment is None:  # unreachable: decide always moves; kept for the type checker
            raise ConflictError(f"{namespace}: channel {channel!r} was not assigned")
        return assignment

    def get_channel(self, namespace: str, channel: str) -> ChannelPointer | None:
        """Where the channel points now, or None if it does not exist or points at nothing.

        A revocation scheduled for the future takes effect without any write, so ``latest`` is checked
        here and moved back if the version it points at has become revoked since.
        """
        document, _ = self._read_channel(namespace, channel)
        if document is not None and document.version is not None and channel == LATEST:
            revocation = self._read_revocation(namespace, document.version)
            if revocation is not None and revocation.revoked_at <= self._now():
                self._refresh_latest(
                    namespace,
                    actor=revocation.revoked_by,
                    reason=f"scheduled revocation: {revocation.reason}",
                )
                document, _ = self._read_channel(namespace, channel)
        if document is None or document.version is None:
            return None
        last = document.history[-1]
        return ChannelPointer(
            namespace=namespace,
            channel=channel,
            version=document.version,
            updated_at=last.assigned_at,
            updated_by=last.assigned_by,
        )

    def channel_history(self, namespace: str, channel: str) -> list[ChannelAssignment]:
        """Every move of the channel, oldest first; empty if it never existed."""
        document, _ = self._read_channel(namespace, channel)
        return list(document.history) if document else []

    def list_channels(self, namespace: str) -> list[ChannelPointer]:
        folder = f"{self._namespace_key(namespace)}channels/"
        pointers = []
        for key in self._objects.list_keys(folder):
            pointer = self.get_channel(namespace, key[len(folder) :].removesuffix(".json"))
            if pointer is not None:
                pointers.append(pointer)
        return sorted(pointers, key=lambda pointer: pointer.channel)


def _parse(model: type[RecordT], body: bytes, bucket: str) -> RecordT:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RegistryStorageError(
            f"a registry object in s3://{bucket} is not a valid {model.__name__}: {exc.error_count()} errors"
        ) from exc


__all__ = [
    "LATEST",
    "ArtifactVersion",
    "ChannelAssignment",
    "ChannelPointer",
    "RegistrationResult",
    "Registry",
    "Revocation",
    "validate_channel_name",
    "validate_namespace",
]
