"""The registry's records: what a version, a revocation and a channel move say."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from icd.rules import LATEST


class Record(BaseModel):
    # Unknown fields are ignored so that older readers survive objects written by a newer version.
    model_config = ConfigDict(frozen=True)


class Revocation(Record):
    revoked_at: datetime
    reason: str
    revoked_by: str


class ArtifactVersion(Record):
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

    @property
    def build_label(self) -> str:
        """The version baked into the image and its Consul service ID (see ``Registry.next_build_label``)."""
        return self.labels.get("build_label", str(self.version))


class RegistrationResult(Record):
    """``created``: this call made the version. Otherwise ``version`` is the one that stands: the same
    Packer run registered before, or the commit's version (another build of the commit got there first)."""

    version: ArtifactVersion
    created: bool


class ChannelAssignment(Record):
    channel: str
    from_version: int | None
    to_version: int | None
    assigned_by: str
    assigned_at: datetime
    reason: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)


class ChannelPointer(Record):
    namespace: str
    channel: str
    version: int
    updated_at: datetime
    updated_by: str


class ChannelMoved(Record):
    """The expected outcome of a compare-and-swap move when the channel is no longer where the caller saw
    it (another promotion won); nothing was changed."""

    channel: str
    expected_version: int | None
    actual_version: int | None


class ChannelDocument(Record):
    channel: str
    version: int | None
    history: list[ChannelAssignment]


class NamespaceIndex(Record):
    """One small object per namespace, swapped with compare-and-swap: the last version number, the Packer
    runs registered recently (so a retried registration finds its number) and the revocations (so
    ``latest`` is found without listing versions)."""

    last_version: int = 0
    recent_runs: dict[str, int] = Field(default_factory=dict)
    revocations: dict[int, datetime] = Field(default_factory=dict)


class Pointer(Record):
    """A lookup entry (Packer run, artifact id) that names a version."""

    version: int


class CommitBuilds(Record):
    """The versions built from one commit, oldest first. A number is added here, with compare-and-swap,
    before its version object is written: this entry is what decides that a commit gets one version."""

    versions: list[int] = Field(default_factory=list)


class BuildClaim(Record):
    """Who is building a commit of a namespace: taken before anything is built, released when the build
    ended (registered, reused or failed). An unreleased claim counts until ``expires_at`` or until its run
    has ended, whichever comes first."""

    namespace: str
    commit: str
    holder_run_id: str
    holder_run_name: str
    claimed_at: datetime
    expires_at: datetime
    released_at: datetime | None = None
    outcome: str = ""

    def is_held(self, at: datetime) -> bool:
        """Unreleased and not expired at ``at`` (its run may still have ended: see ``Registry.claim_build``)."""
        return self.released_at is None and at < self.expires_at


class BuildClaimed(Record):
    """The expected outcome of :meth:`Registry.claim_build` when this run may build the commit.

    ``versions`` are the commit's versions when the claim was taken (oldest first); ``taken_over`` is the
    previous holder's claim when it was left unreleased (its run ended or the claim expired), so the new
    holder can finish what that one left (announce a version it registered)."""

    claim: BuildClaim
    versions: list[int] = Field(default_factory=list)
    taken_over: BuildClaim | None = None


class BuildHeld(Record):
    """The expected outcome of :meth:`Registry.claim_build` when another live run is building the commit."""

    holder: BuildClaim
