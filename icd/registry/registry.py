"""An HCP Packer-like artifact registry kept in one S3 bucket, safe for concurrent writers.

Every namespace (``org/name``) has numbered, immutable versions (the build facts of one Packer run) and
named channels pointing at them. ``latest`` follows the newest non-revoked version on its own; other
channels (``production``, ...) move only through :meth:`Registry.assign_channel` and keep their history.

Key layout, all under ``prefix`` (which should end in ``/`` when not empty); every object is sealed
(``icd/registry/signing.py``)::

    namespaces/<org>/<name>/index.json                  last version, recent Packer runs, revocations
    namespaces/<org>/<name>/versions/00000001.json      the build facts of v1; written once, never rewritten
    namespaces/<org>/<name>/revocations/00000001.json   revocation of v1; written once, never rewritten
    namespaces/<org>/<name>/channels/<channel>.json     current pointer plus the channel's full history
    namespaces/<org>/<name>/runs/<packer_run_uuid>.json      -> version (registration is idempotent)
    namespaces/<org>/<name>/commits/<git_commit>.json        -> versions built from that commit
    namespaces/<org>/<name>/artifacts/<sha256(id)[:32]>.json -> newest version with that artifact id
    namespaces/<org>/<name>/claims/<git_commit>.json         who is building that commit (BuildClaim)
    namespaces/<org>/<name>/versions/00000001.provenance.dsse.json  v1's signed SLSA provenance; written once
    deployments/<workspace>/<apply run id>.dsse.json               the signed record of one apply; written once

The two ``.dsse.json`` kinds are not sealed but signed (Ed25519 DSSE envelopes, ``icd/registry/provenance.py``),
so anyone holding the public key can check them.

Runs, commits and artifacts are lookup entries, so every look-up a deploy makes (the next build label, a commit
already built, the version of an artifact id in a plan, ``latest``) costs a fixed number of requests
whatever the number of versions; only listing everything (the CLI) reads every version.

Concurrency rests on S3 conditional writes only (no lock service):

* ``index.json`` is updated with compare-and-swap (``IfMatch=<etag>``, or ``IfNoneMatch="*"`` when it does
  not exist yet). One swap both reserves the next version number and records the Packer run, so two
  writers never get the same number and the same run never gets two numbers.
* Version, revocation and run objects are created with ``IfNoneMatch="*"``: a second writer gets a 412 and
  reads what the first wrote. Revocation is a separate object, so the build facts stay byte-for-byte
  immutable; reads merge the two.
* A channel object is replaced with compare-and-swap; the pointer and its history change in the same write.
* One version per commit: the commit's entry gets the new number, with compare-and-swap, *before* the
  version object is written, and only if the commit has no version yet (or, for a rebuild, if its newest is
  still the one being rebuilt). A second build of the commit gets the commit's number instead, and its
  version object write (``IfNoneMatch``) loses to the first, or completes one whose writer died.
* A build claim is created with ``IfNoneMatch`` (or swapped over a released, expired or dead one) before
  anything is built, so however many runs start a build of one commit at once, one builds.

**One view per decision.** Inside :meth:`Registry.one_view` the look-ups read each object at most once: the
checks of one plan or one apply read ``index.json`` (which says what is revoked) once, not once per look-up
(14 reads of it a deploy cycle made 14 round trips to S3). A write through the registry ends the view's memory,
and whatever decides a write reads afresh: the object a swap replaces, and the index that says where
``latest`` moves.

Each swap retries a bounded number of times with jittered backoff and then raises :class:`ConflictError`.
A failure between reserving a number and writing its version object leaves a reservation that the next
``register`` of the same Packer run (or of the same commit) completes; other writers are never blocked by
it. Registrations of one commit that race past the build claim leave the losers' reserved numbers unused
(a gap in the numbering, never a second version).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from icd.errors import (
    ConflictError,
    InvalidChannelError,
    ProvenanceError,
    RegistryIntegrityError,
    RevokedVersionError,
    VersionNotFoundError,
)
from icd.registry import provenance as prov
from icd.registry.models import (
    ArtifactVersion,
    BuildClaim,
    BuildClaimed,
    BuildHeld,
    ChannelAssignment,
    ChannelDocument,
    ChannelMoved,
    ChannelPointer,
    CommitBuilds,
    NamespaceIndex,
    Pointer,
    RegistrationResult,
    Revocation,
)
from icd.registry.s3 import S3Objects, StoredObject
from icd.registry.signing import Sealer
from icd.rules import LATEST, check_channel, check_namespace, check_run_id, check_workspace

RecordT = TypeVar("RecordT", bound=BaseModel)

# What the look-ups inside Registry.one_view read ("bucket/key" -> the object, None when absent); None outside
# one. A context variable: another thread sees none of it, unless it runs in a copy of this context.
_VIEW: ContextVar[dict[str, StoredObject | None] | None] = ContextVar("icd_registry_view", default=None)

DEFAULT_MAX_ATTEMPTS = 40
# How many recent Packer runs index.json remembers; older ones are found through runs/<uuid>.json.
RECENT_RUNS = 200
_VERSION_DIGITS = 8


class Unset:
    """Marks "no expectation" for a compare-and-swap move (``None`` means "expected to be empty")."""


UNSET = Unset()


class Registry:
    """Artifact versions and channels for many namespaces in one S3 bucket. Thread-safe."""

    def __init__(
        self,
        s3_client: object,
        bucket: str,
        prefix: str = "",
        *,
        sealer: Sealer,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Callable[[], datetime] | None = None,
        provenance_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.max_attempts = max_attempts
        self._objects = S3Objects(s3_client, bucket)  # type: ignore[arg-type]  # any boto3 S3 client
        self._sealer = sealer
        self._clock = clock or (lambda: datetime.now(UTC))
        self._provenance_key = provenance_key

    # --- keys and sealed objects ----------------------------------------------------------------------

    def _namespace_key(self, namespace: str) -> str:
        return f"{self.prefix}namespaces/{check_namespace(namespace)}/"

    def _version_key(self, namespace: str, version: int) -> str:
        return f"{self._namespace_key(namespace)}versions/{version:0{_VERSION_DIGITS}d}.json"

    def _revocation_key(self, namespace: str, version: int) -> str:
        return f"{self._namespace_key(namespace)}revocations/{version:0{_VERSION_DIGITS}d}.json"

    def _channel_key(self, namespace: str, channel: str) -> str:
        return f"{self._namespace_key(namespace)}channels/{check_channel(channel)}.json"

    def _index_key(self, namespace: str) -> str:
        return f"{self._namespace_key(namespace)}index.json"

    def _run_key(self, namespace: str, packer_run_uuid: str) -> str:
        return f"{self._namespace_key(namespace)}runs/{_digest(packer_run_uuid)}.json"

    def _commit_key(self, namespace: str, commit: str) -> str:
        return f"{self._namespace_key(namespace)}commits/{_digest(commit)}.json"

    def _artifact_key(self, namespace: str, artifact_id: str) -> str:
        return f"{self._namespace_key(namespace)}artifacts/{_digest(artifact_id)}.json"

    def _claim_key(self, namespace: str, commit: str) -> str:
        return f"{self._namespace_key(namespace)}claims/{_digest(commit)}.json"

    @contextmanager
    def one_view(self) -> Iterator[None]:
        """Look-ups inside read each object at most once (module docstring, "One view per decision"). Keep it to
        one decision: a change another process makes meanwhile is seen by the next view, not by this one. A write
        in this thread (through any registry) ends what the view remembers."""
        if _VIEW.get() is not None:  # inside one already: it is the same decision's
            yield
            return
        token = _VIEW.set({})
        try:
            yield
        finally:
            _VIEW.reset(token)

    def _forget_view(self) -> None:
        view = _VIEW.get()
        if view:
            view.clear()

    def _read(self, key: str, model: type[RecordT], *, viewed: bool = False) -> tuple[RecordT, str] | None:
        """The sealed record at ``key`` and its etag. ``viewed``: a look-up's read, served from the open view
        (:meth:`one_view`) when it read ``key`` already; never for what a write is about to swap."""
        view = _VIEW.get() if viewed else None
        view_key = f"{self.bucket}/{key}"
        if view is not None and view_key in view:
            found = view[view_key]
        else:
            found = self._objects.read(key)
            if view is not None:
                view[view_key] = found
        if found is None:
            return None
        where = f"s3://{self.bucket}/{key}"
        payload = self._sealer.open(key, found.body, where=where)
        try:
            return model.model_validate(payload), found.etag
        except ValidationError as exc:
            raise RegistryIntegrityError(
                f"{where} is sealed but is not a valid {model.__name__}: {exc.error_count()} errors"
            ) from exc

    def _write(self, key: str, record: BaseModel, *, if_match: str | None) -> bool:
        payload = record.model_dump(
            mode="json", exclude={"revocation"} if isinstance(record, ArtifactVersion) else None
        )
        self._forget_view()
        return self._objects.write(key, self._sealer.seal(key, payload), if_match=if_match)

    def _swap(
        self, key: str, model: type[RecordT], change: Callable[[RecordT | None], RecordT | None]
    ) -> RecordT | None:
        """Compare-and-swap loop: ``change`` sees the current record and returns the new one, or None."""
        for attempt in range(self.max_attempts):
            found = self._read(key, model)
            updated = change(found[0] if found else None)
            if updated is None:
                return None
            if self._write(key, updated, if_match=found[1] if found else None):
                return updated
            self._backoff(attempt)
        raise ConflictError(f"s3://{self.bucket}/{key} changed under us {self.max_attempts} times in a row; retry")

    def _now(self) -> datetime:
        return self._clock()

    def _backoff(self, attempt: int) -> None:
        time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311  # jitter, not crypto

    # --- versions ---------------------------------------------------------------------------------------

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
        rebuild_of: int | None = None,
    ) -> RegistrationResult:
        """Record a Packer run as a version of its commit; the same ``packer_run_uuid`` again returns that one.

        One version per commit: when the commit has one, this build is not registered and that version is
        returned (``created=False``), unless ``rebuild_of`` names the commit's newest version, which makes
        this build the commit's next version. Two rebuilds of the same version make one: the second gets
        the first's. Expected outcomes, so nothing raises for them; the caller compares
        ``result.version.packer_run_uuid`` with its own to tell whose build stands.
        """
        check_namespace(namespace)
        check_channel(built_for)
        if not packer_run_uuid:
            raise ValueError("packer_run_uuid must not be empty: it is what makes registration idempotent")
        if not artifacts:
            raise ValueError(f"{namespace}: a version needs at least one artifact")

        known = self._read(self._run_key(namespace, packer_run_uuid), Pointer)
        if known is not None:
            number = known[0].version
        else:
            number = self._number_for_commit(namespace, git_commit, packer_run_uuid, rebuild_of=rebuild_of)
        record = self._read_version(namespace, number)
        created = False
        if record is None:
            parent = self._read(self._channel_key(namespace, built_for), ChannelDocument)
            candidate = ArtifactVersion(
                namespace=namespace,
                version=number,
                git_commit=git_commit,
                git_ref=git_ref,
                packer_run_uuid=packer_run_uuid,
                builder_type=builder_type,
                artifacts=dict(artifacts),
                artifact_sha256=dict(artifact_sha256 or {}),
                created_at=self._now(),
                created_by=created_by,
                parent_version=parent[0].version if parent else None,
                built_for=built_for,
                labels=dict(labels or {}),
            )
            created = self._write(self._version_key(namespace, number), candidate, if_match=None)
            # A concurrent register of the same run or commit may have completed the number first; theirs stands.
            record = candidate if created else self._read_version(namespace, number)
            if record is None:
                raise ConflictError(f"{namespace} v{number} vanished while being registered")
        if known is None and record.git_commit != git_commit:
            raise RegistryIntegrityError(
                f"{namespace} v{number} is listed for commit {git_commit} but holds the build of {record.git_commit}"
            )
        self._index_lookups(record)
        self._refresh_latest(namespace, actor=created_by, reason=f"registered v{number} from {git_ref}@{git_commit}")
        return RegistrationResult(version=self._with_revocation(record), created=created)

    def _number_for_commit(self, namespace: str, commit: str, packer_run_uuid: str, *, rebuild_of: int | None) -> int:
        """The version number this registration writes: the commit's own when it has one (unless this is
        the rebuild of its newest), else a new number, added to the commit's entry with compare-and-swap
        so that of two builds of one commit racing here, one number wins."""
        key = self._commit_key(namespace, commit)
        for attempt in range(self.max_attempts):
            found = self._read(key, CommitBuilds)
            versions = found[0].versions if found else []
            newest = versions[-1] if versions else None
            # A listed number without its version object is a registration that died (or is finishing right
            # now): this one completes it rather than adding another, even for a rebuild.
            if newest is not None and (
                rebuild_of != newest or self._objects.head(self._version_key(namespace, newest)) is None
            ):
                return newest
            number = self._reserve_version(namespace, packer_run_uuid)
            if number in versions:
                return number
            if self._write(key, CommitBuilds(versions=[*versions, number]), if_match=found[1] if found else None):
                return number
            self._backoff(attempt)
        raise ConflictError(f"{namespace} commit {commit} changed under us {self.max_attempts} times in a row; retry")

    def _reserve_version(self, namespace: str, packer_run_uuid: str) -> int:
        def change(index: NamespaceIndex | None) -> NamespaceIndex | None:
            current = index or NamespaceIndex()
            if packer_run_uuid in current.recent_runs:
                return None
            number = current.last_version + 1
            runs = {**current.recent_runs, packer_run_uuid: number}
            if len(runs) > RECENT_RUNS:
                runs = dict(sorted(runs.items(), key=lambda item: item[1])[-RECENT_RUNS:])
            return current.model_copy(update={"last_version": number, "recent_runs": runs})

        updated = self._swap(self._index_key(namespace), NamespaceIndex, change)
        if updated is not None:
            return updated.recent_runs[packer_run_uuid]
        return self._index(namespace, fresh=True).recent_runs[packer_run_uuid]

    def _index_lookups(self, record: ArtifactVersion) -> None:
        """Write the lookup entries of a version; idempotent, so a retried registration completes them."""
        namespace, number = record.namespace, record.version
        self._write(self._run_key(namespace, record.packer_run_uuid), Pointer(version=number), if_match=None)

        def add_build(builds: CommitBuilds | None) -> CommitBuilds | None:
            versions = builds.versions if builds else []
            return None if number in versions else CommitBuilds(versions=sorted({*versions, number}))

        self._swap(self._commit_key(namespace, record.git_commit), CommitBuilds, add_build)
        for artifact_id in sorted(set(record.artifacts.values())):

            def newest(pointer: Pointer | None) -> Pointer | None:
                return None if pointer is not None and pointer.version >= number else Pointer(version=number)

            self._swap(self._artifact_key(namespace, artifact_id), Pointer, newest)

    def _index(self, namespace: str, *, fresh: bool = False) -> NamespaceIndex:
        """The namespace's index; ``fresh`` for what decides a write (never from an open view)."""
        found = self._read(self._index_key(namespace), NamespaceIndex, viewed=not fresh)
        return found[0] if found else NamespaceIndex()

    def _read_version(self, namespace: str, version: int) -> ArtifactVersion | None:
        found = self._read(self._version_key(namespace, version), ArtifactVersion, viewed=True)
        if found is None:
            return None
        record = found[0]
        if record.namespace != namespace or record.version != version:
            raise RegistryIntegrityError(
                f"{namespace} v{version} holds the record of {record.namespace} v{record.version}"
            )
        return record

    def _read_revocation(self, namespace: str, version: int) -> Revocation | None:
        found = self._read(self._revocation_key(namespace, version), Revocation, viewed=True)
        return found[0] if found else None

    def _with_revocation(self, record: ArtifactVersion, index: NamespaceIndex | None = None) -> ArtifactVersion:
        if index is not None and record.version not in index.revocations:
            return record
        revocation = self._read_revocation(record.namespace, record.version)
        if revocation is None and index is not None:
            # The signed index says it is revoked but its revocation object is gone: fail closed.
            revocation = Revocation(
                revoked_at=index.revocations[record.version],
                reason="revocation record missing from the registry; treated as revoked",
                revoked_by="registry",
            )
        return record.model_copy(update={"revocation": revocation}) if revocation else record

    def get(self, namespace: str, version: int) -> ArtifactVersion:
        """One version with its revocation (if any); :class:`VersionNotFoundError` when absent."""
        record = self._read_version(namespace, version)
        if record is None:
            raise VersionNotFoundError(f"{namespace} has no version {version}")
        return self._with_revocation(record, self._index(namespace))

    def last_version(self, namespace: str) -> int:
        """The highest version number handed out so far (0 for a new namespace); one request."""
        return self._index(namespace).last_version

    def next_build_label(self, namespace: str) -> str:
        """The version the next build will most likely get, baked into the image and its Consul service ID.

        Only a label: the registry assigns the real number atomically at registration. Two builds of one
        namespace racing may share a label; their images still differ (per-run output directories).
        """
        return str(self.last_version(namespace) + 1)

    def list_namespaces(self) -> list[str]:
        root = f"{self.prefix}namespaces/"
        return sorted(
            name.removeprefix(root).rstrip("/")
            for org in self._objects.list_folders(root)
            for name in self._objects.list_folders(org)
        )

    def list_versions(self, namespace: str) -> list[ArtifactVersion]:
        """Every version, oldest first, with revocations merged in; empty for an unknown namespace.

        Reads every version: for operators' listings, never on a deploy's path.
        """
        index = self._index(namespace)
        records = []
        for number in range(1, index.last_version + 1):
            record = self._read_version(namespace, number)
            if record is not None:
                records.append(self._with_revocation(record, index))
        return records

    def find_build(self, namespace: str, *, commit: str, service_name: str, platform: str) -> ArtifactVersion | None:
        """The newest deployable version built from ``commit`` for ``service_name`` with a ``platform``
        artifact, or None; a few requests whatever the number of versions."""
        found = self._read(self._commit_key(namespace, commit), CommitBuilds)
        if found is None:
            return None
        index = self._index(namespace)
        for number in reversed(found[0].versions):
            record = self._read_version(namespace, number)
            if record is None or record.git_commit != commit:
                continue
            record = self._with_revocation(record, index)
            if (
                record.labels.get("service_name", service_name) == service_name
                and platform in record.artifacts
                and not record.is_revoked(self._now())
            ):
                return record
        return None

    def commit_versions(self, namespace: str, commit: str) -> list[int]:
        """The version numbers given to ``commit``, oldest first (a number whose registration died has no
        version object yet: the next registration of the commit completes it); one request."""
        found = self._read(self._commit_key(namespace, commit), CommitBuilds)
        return list(found[0].versions) if found else []

    def find_by_artifact_id(self, namespace: str, artifact_id: str) -> ArtifactVersion | None:
        """The newest version that produced ``artifact_id`` (an AMI id, an image path), or None."""
        found = self._read(self._artifact_key(namespace, artifact_id), Pointer, viewed=True)
        if found is None:
            return None
        record = self._read_version(namespace, found[0].version)
        if record is None or artifact_id not in record.artifacts.values():
            return None
        return self._with_revocation(record, self._index(namespace))

    # --- build claims -----------------------------------------------------------------------------------

    def claim_build(
        self,
        namespace: str,
        commit: str,
        *,
        run_id: str,
        run_name: str,
        lease: timedelta,
        run_alive: Callable[[str], bool] = lambda _run_id: True,
    ) -> BuildClaimed | BuildHeld:
        """Take the build of ``commit`` for the run ``run_id``, before anything is built.

        :class:`BuildClaimed` when this run may build: nobody held the claim, it was released, it expired
        (``lease`` after it was taken), or ``run_alive`` says its run has ended. :class:`BuildHeld`, naming
        the holder, when another run holds it. The claim is created with ``IfNoneMatch`` or swapped with
        ``IfMatch``, so of any number of runs claiming at once, one gets it. The same run claiming again (a
        retried step) gets its own claim back. ``run_alive`` is asked only about an unexpired holder; it
        should answer True when it can't tell.
        """
        check_namespace(namespace)
        if lease <= timedelta(0):
            raise ValueError("a build claim needs a positive lease: it is what frees the claim of a run that died")
        key = self._claim_key(namespace, commit)
        for attempt in range(self.max_attempts):
            found = self._read(key, BuildClaim)
            current = found[0] if found else None
            now = self._now()
            if current is not None and current.released_at is None:
                if current.holder_run_id == run_id:
                    return BuildClaimed(claim=current, versions=self.commit_versions(namespace, commit))
                if current.is_held(now) and run_alive(current.holder_run_id):
                    return BuildHeld(holder=current)
            claim = BuildClaim(
                namespace=namespace,
                commit=commit,
                holder_run_id=run_id,
                holder_run_name=run_name,
                claimed_at=now,
                expires_at=now + lease,
            )
            if self._write(key, claim, if_match=found[1] if found else None):
                left = current if current is not None and current.released_at is None else None
                return BuildClaimed(claim=claim, versions=self.commit_versions(namespace, commit), taken_over=left)
            self._backoff(attempt)
        raise ConflictError(f"build claim of {namespace} {commit} changed {self.max_attempts} times in a row; retry")

    def release_build(self, namespace: str, commit: str, *, run_id: str, outcome: str) -> bool:
        """Release the claim if ``run_id`` still holds it, recording ``outcome``; False when it does not
        (another run took it over after its lease, or it was released already)."""
        released: list[bool] = []

        def change(current: BuildClaim | None) -> BuildClaim | None:
            released.clear()
            if current is None or current.holder_run_id != run_id or current.released_at is not None:
                return None
            released.append(True)
            return current.model_copy(update={"released_at": self._now(), "outcome": outcome})

        self._swap(self._claim_key(namespace, commit), BuildClaim, change)
        return bool(released)

    def build_claim(self, namespace: str, commit: str) -> BuildClaim | None:
        """The commit's build claim as stored (held or released), or None if it was never built here."""
        found = self._read(self._claim_key(namespace, commit), BuildClaim)
        return found[0] if found else None

    # --- revocation -------------------------------------------------------------------------------------

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
        revoked = [
            number
            for number in sorted(targets)
            if self._write(self._revocation_key(namespace, number), revocation, if_match=None)
        ]
        effective = {
            number: (self._read_revocation(namespace, number) or revocation).revoked_at for number in sorted(targets)
        }

        def record_revocations(index: NamespaceIndex | None) -> NamespaceIndex | None:
            current = index or NamespaceIndex()
            missing = {n: when for n, when in effective.items() if n not in current.revocations}
            return current.model_copy(update={"revocations": {**current.revocations, **missing}}) if missing else None

        self._swap(self._index_key(namespace), NamespaceIndex, record_revocations)
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

    # --- provenance and deployment records (signed, icd/registry/provenance.py) ---------------------------

    @property
    def builder_id(self) -> str:
        """The builder id every provenance of this registry names (its build-artifact deployment)."""
        return prov.builder_id(self.bucket, self.prefix)

    def provenance_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """keyid -> public key of what this registry trusts; :class:`ProvenanceError` when it holds no key."""
        return {prov.key_id(key): key for key in [self._signing_key().public_key()]}

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._provenance_key is None:
            raise ProvenanceError(
                "the registry block has no provenance_key, so no provenance can be signed or checked; "
                "run `icd-setup blocks` to add one"
            )
        return self._provenance_key

    def _provenance_key_name(self, namespace: str, version: int) -> str:
        return f"{self._namespace_key(namespace)}versions/{version:0{_VERSION_DIGITS}d}.provenance.dsse.json"

    def _deployment_folder(self, workspace: str) -> str:
        return f"{self.prefix}deployments/{check_workspace(workspace)}/"

    def _read_envelope(self, key: str) -> Any | None:
        """The stored JSON of an envelope as is (None: absent); checking it is the caller's."""
        found = self._objects.read(key)
        if found is None:
            return None
        try:
            return json.loads(found.body)
        except ValueError as exc:
            raise ProvenanceError(f"s3://{self.bucket}/{key} is not JSON, so not an envelope") from exc

    def _write_envelope(self, key: str, envelope: Mapping[str, Any]) -> Any:
        """Write once; a second writer (a retried task) gets the first one's envelope back."""
        body = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
        self._forget_view()
        if self._objects.write(key, body, if_match=None):
            return dict(envelope)
        return self._read_envelope(key)

    def write_provenance(self, version: ArtifactVersion, facts: prov.BuildFacts) -> Any:
        """Sign and store the SLSA provenance of ``version`` beside its record, once; returns the stored
        envelope (the first one written, when this is a retry)."""
        statement = prov.build_statement(version, facts, builder=self.builder_id)
        envelope = prov.sign_envelope(statement, self._signing_key())
        return self._write_envelope(self._provenance_key_name(version.namespace, version.version), envelope)

    def provenance(self, namespace: str, version: int) -> Any | None:
        """The provenance envelope of ``namespace`` v``version`` as stored (unchecked), or None."""
        return self._read_envelope(self._provenance_key_name(namespace, version))

    def verify_provenance(self, version: ArtifactVersion, platform: str) -> prov.VerifiedStatement:
        """The proven provenance of ``version``'s ``platform`` artifact, signed by this registry's key and naming
        the image's digest; :class:`ProvenanceError` with the reason otherwise (none stored included)."""
        return prov.verify_provenance(
            self.provenance(version.namespace, version.version),
            version,
            platform,
            self.provenance_public_keys(),
            builder=self.builder_id,
        )

    def record_deployment(self, facts: prov.DeploymentFacts) -> Any:
        """Sign and store the record of one apply under its workspace, once per apply run; the stored envelope."""
        key = f"{self._deployment_folder(facts.workspace)}{check_run_id(facts.apply_run_id)}.dsse.json"
        envelope = prov.sign_envelope(
            prov.deployment_statement(facts), self._signing_key(), payload_type=prov.DEPLOYMENT_PAYLOAD_TYPE
        )
        return self._write_envelope(key, envelope)

    def deployment_records(self, workspace: str) -> list[prov.CheckedEnvelope]:
        """Every deployment record of ``workspace``, each checked against this registry's key (a broken one is
        listed with its problem, never dropped), oldest first. Reads every record: for audits, not deploys."""
        keys = self.provenance_public_keys()
        checked = []
        for key in self._objects.list_keys(self._deployment_folder(workspace)):
            where = f"s3://{self.bucket}/{key}"
            envelope = None
            try:
                envelope = self._read_envelope(key)
                verified = prov.verify_envelope(
                    envelope, keys, payload_type=prov.DEPLOYMENT_PAYLOAD_TYPE, where=f"deployment record {where}"
                )
            except ProvenanceError as exc:
                checked.append(prov.CheckedEnvelope(where, envelope, None, str(exc)))
                continue
            checked.append(prov.CheckedEnvelope(where, envelope, verified))
        return sorted(
            checked,
            key=lambda item: (str(item.verified.statement.get("recordedAt", "")) if item.verified else "", item.where),
        )

    # --- channels ---------------------------------------------------------------------------------------

    def _newest_deployable(self, namespace: str) -> int | None:
        # Decides where latest moves: from the index as it is now, whatever a view read before.
        index = self._index(namespace, fresh=True)
        now = self._now()
        for number in range(index.last_version, 0, -1):
            revoked_at = index.revocations.get(number)
            if revoked_at is not None and revoked_at <= now:
                continue
            # A reservation whose registration never completed has no version object: skip it.
            if self._objects.head(self._version_key(namespace, number)) is not None:
                return number
        return None

    def _move(
        self,
        namespace: str,
        channel: str,
        target: Callable[[ChannelDocument | None], int | Unset | None],
        **details: object,
    ) -> ChannelAssignment | None:
        """Append a move to ``target(document)`` to the channel's history (``UNSET``: no move)."""
        moved: list[ChannelAssignment] = []

        def change(document: ChannelDocument | None) -> ChannelDocument | None:
            to_version = target(document)
            if isinstance(to_version, Unset):
                return None
            assignment = ChannelAssignment(
                channel=channel,
                from_version=document.version if document else None,
                to_version=to_version,
                assigned_at=self._now(),
                **details,  # type: ignore[arg-type]  # assigned_by, reason, metadata
            )
            moved[:] = [assignment]
            history = [*(document.history if document else []), assignment]
            return ChannelDocument(channel=channel, version=to_version, history=history)

        return moved[0] if self._swap(self._channel_key(namespace, channel), ChannelDocument, change) else None

    def _refresh_latest(self, namespace: str, *, actor: str, reason: str) -> None:
        def target(document: ChannelDocument | None) -> int | Unset | None:
            newest = self._newest_deployable(namespace)
            return UNSET if newest == (document.version if document else None) else newest

        self._move(namespace, LATEST, target, assigned_by=actor, reason=reason)

    def assign_channel(
        self,
        namespace: str,
        channel: str,
        version: int,
        *,
        assigned_by: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        expected_version: int | Unset | None = UNSET,
    ) -> ChannelAssignment | ChannelMoved:
        """Point ``channel`` at ``version`` and append the move to its history.

        With ``expected_version`` the move happens only if the channel still points there (``None``: still
        empty); otherwise nothing changes and :class:`ChannelMoved` says where it points now. Raises
        :class:`RevokedVersionError` for a revoked version, :class:`VersionNotFoundError` for an absent
        one, and :class:`InvalidChannelError` for ``latest`` (the registry moves that one itself).
        """
        check_channel(channel)
        if channel == LATEST:
            raise InvalidChannelError(f"channel {LATEST!r} follows the newest version by itself; pick another")
        record = self.get(namespace, version)
        if record.is_revoked(self._now()) and record.revocation is not None:
            raise RevokedVersionError(
                f"{namespace} v{version} is revoked ({record.revocation.reason}); "
                f"it can't be assigned to channel {channel!r}"
            )
        seen: list[int | None] = []

        def target(document: ChannelDocument | None) -> int | Unset | None:
            current = document.version if document else None
            seen[:] = [current]
            if not isinstance(expected_version, Unset) and current != expected_version:
                return UNSET
            return version

        assignment = self._move(
            namespace, channel, target, assigned_by=assigned_by, reason=reason, metadata=dict(metadata or {})
        )
        if assignment is None:
            expected = None if isinstance(expected_version, Unset) else expected_version
            return ChannelMoved(channel=channel, expected_version=expected, actual_version=seen[0] if seen else None)
        return assignment

    def empty_channel(
        self, namespace: str, channel: str, *, assigned_by: str, reason: str, metadata: Mapping[str, str] | None = None
    ) -> ChannelAssignment | None:
        """Point ``channel`` at nothing (what a torn-down workspace's own channel does) and append the move,
        with who and why, to its history; it then leaves the channel listing. None when it points at nothing
        already. ``latest`` is refused: the registry moves that one itself."""
        check_channel(channel)
        if channel == LATEST:
            raise InvalidChannelError(f"channel {LATEST!r} follows the newest version by itself; it can't be emptied")

        def target(document: ChannelDocument | None) -> int | Unset | None:
            return UNSET if document is None or document.version is None else None

        return self._move(
            namespace, channel, target, assigned_by=assigned_by, reason=reason, metadata=dict(metadata or {})
        )

    def get_channel(self, namespace: str, channel: str) -> ChannelPointer | None:
        """Where the channel points now, or None if it does not exist or points at nothing.

        A revocation scheduled for the future takes effect without any write, so ``latest`` is checked
        here and moved back if the version it points at has become revoked since.
        """
        found = self._read(self._channel_key(namespace, channel), ChannelDocument, viewed=True)
        document = found[0] if found else None
        if document is not None and document.version is not None and channel == LATEST:
            revoked_at = self._index(namespace).revocations.get(document.version)
            if revoked_at is not None and revoked_at <= self._now():
                revocation = self._read_revocation(namespace, document.version)
                self._refresh_latest(
                    namespace,
                    actor=revocation.revoked_by if revocation else "registry",
                    reason=f"scheduled revocation: {revocation.reason if revocation else 'revoked'}",
                )
                refreshed = self._read(self._channel_key(namespace, channel), ChannelDocument)
                document = refreshed[0] if refreshed else None
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
        found = self._read(self._channel_key(namespace, channel), ChannelDocument)
        return list(found[0].history) if found else []

    def list_channels(self, namespace: str) -> list[ChannelPointer]:
        folder = f"{self._namespace_key(namespace)}channels/"
        pointers = []
        for key in self._objects.list_keys(folder):
            pointer = self.get_channel(namespace, key[len(folder) :].removesuffix(".json"))
            if pointer is not None:
                pointers.append(pointer)
        return sorted(pointers, key=lambda pointer: pointer.channel)


def _digest(value: str) -> str:
    """A fixed-length, key-safe name for a lookup entry (commits, artifact ids, run uuids)."""
    return hashlib.sha256(value.encode()).hexdigest()[:32]
