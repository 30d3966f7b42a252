"""The artifact registry (versions, lineage, channels, revocation) and the saved-plan store, on S3."""

from icd.registry.models import (
    ArtifactVersion,
    BuildClaim,
    BuildClaimed,
    BuildHeld,
    ChannelAssignment,
    ChannelMoved,
    ChannelPointer,
    RegistrationResult,
    Revocation,
)
from icd.registry.plans import PlanStore, StoredPlan
from icd.registry.registry import Registry
from icd.registry.signing import Sealer

__all__ = [
    "ArtifactVersion",
    "BuildClaim",
    "BuildClaimed",
    "BuildHeld",
    "ChannelAssignment",
    "ChannelMoved",
    "ChannelPointer",
    "PlanStore",
    "RegistrationResult",
    "Registry",
    "Revocation",
    "Sealer",
    "StoredPlan",
]
