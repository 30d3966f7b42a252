"""Apply exactly the approved plan: the same bytes, against the same state, channel and image, or nothing.

Checked right before Terraform starts, in this order:

1. the approved hash is this run's plan (both full hashes and where they differ otherwise);
2. the version was not revoked, it is still where the workspace's followed channel points (for ``latest``:
   the newest deployable version), and no channel the plan read moved since planning (a hotfix promoted
   during the approval wait must not be undone by an older approval, whatever order answers arrive in);
3. the image still hashes to the registered digest, and (but for a teardown) the version's signed provenance
   still names it;
4. the plan fetched from S3 hashes to the approved hash;
5. the Terraform state's serial and lineage are the ones the plan was made against (read from the backend;
   Terraform checks them again under its state lock and refuses a stale plan, except one made against no
   state, which only this check catches).

A stale plan is an expected outcome (:class:`StalePlan`): nothing is applied and the operator plans again.
Tampering is a fault: :class:`PlanIntegrityError` / :class:`ArtifactIntegrityError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from icd.deploy.artifacts import verify_image
from icd.deploy.plan import PlannedDeploy, not_current, seen
from icd.deploy.workdir import PLAN_FILENAME, STATE_LOCK_TIMEOUT
from icd.errors import ArtifactIntegrityError, PlanIntegrityError, StalePlanError
from icd.registry.plans import PlanStore
from icd.registry.registry import Registry
from icd.text import hash_difference, version_label
from icd.tools.terraform import ApplyWatch, StateVersion, Terraform, parse_state_outputs, parse_state_version


@dataclass(frozen=True)
class AppliedDeploy:
    plan_sha256: str
    outputs: dict[str, Any]
    duration_seconds: float


@dataclass(frozen=True)
class StalePlan:
    """The expected outcome when something moved after planning: nothing was applied."""

    reason: str


def _describe(state: StateVersion | None) -> str:
    return "no state" if state is None else f"serial {state.serial} of lineage {state.lineage[:8]}"


def apply_approved(
    *,
    registry: Registry,
    plans: PlanStore,
    open_workdir: Callable[[str], Terraform],
    read_state: Callable[[], bytes | None],
    planned: PlannedDeploy,
    approved_sha256: str,
    platform: str,
    watch: ApplyWatch | None = None,
) -> AppliedDeploy | StalePlan:
    """Apply the approved plan after every check above; ``watch`` stops an apply that is stuck
    (``icd/deploy/stuck.py``).

    ``open_workdir(name)`` returns an initialised working directory (``icd.deploy.workdir.open_terraform``:
    where the plan ran, from its kept ``init``);
    ``read_state()`` returns the workspace's state document as the backend stores it (None: no state), read
    directly (``icd.deploy.workdir.fetch_state``) for check 5 and for the outputs, so neither costs a
    Terraform call."""
    if approved_sha256 != planned.plan_sha256:
        raise PlanIntegrityError(f"the approved plan {hash_difference(approved_sha256, planned.plan_sha256)}")
    # The registry's checks read one view of it: each object once (a channel and the index, not twice each).
    with registry.one_view():
        version = registry.resolve_deployable(planned.namespace, planned.version)
        for before in (planned.followed, planned.promoted):
            if before is None:
                continue
            now = seen(registry, planned.namespace, before.channel)
            if now.version != before.version:
                return StalePlan(
                    f"channel {before.channel!r} of {planned.namespace} moved from {version_label(before.version)} "
                    f"to {version_label(now.version)} "
                    "since this plan was made; nothing was applied"
                )
        if planned.must_be_current and (
            reason := not_current(registry, planned.namespace, planned.version, planned.followed.channel)
        ):
            return StalePlan(f"{reason}: this is not the version to run; nothing was applied")
        if verify_image(version, platform) != planned.artifact_id:
            raise ArtifactIntegrityError(
                f"{planned.namespace} v{planned.version}'s {platform} artifact is no longer the one planned "
                f"({planned.artifact_id}); nothing was applied"
            )
        if not planned.view.teardown:
            registry.verify_provenance(version, platform)  # ProvenanceError: nothing is applied
    plan_bytes = plans.get(planned.workspace, planned.plan_id, expected_sha256=approved_sha256)
    stored = read_state()
    state_now = None if stored is None else parse_state_version(stored.decode("utf-8", errors="replace"))
    if state_now != planned.state_before:
        return StalePlan(
            f"the state of workspace {planned.workspace!r} moved since planning "
            f"({_describe(planned.state_before)} -> {_describe(state_now)}); nothing was applied"
        )
    terraform = open_workdir(f"{planned.plan_id}-apply")
    plan_file = terraform.working_dir / PLAN_FILENAME
    plan_file.write_bytes(plan_bytes)
    try:
        applied = terraform.apply(
            plan_file, expected_sha256=approved_sha256, lock_timeout=STATE_LOCK_TIMEOUT, watch=watch
        )
    except StalePlanError as exc:
        return StalePlan(f"Terraform refused the saved plan as stale: {exc}; nothing was applied")
    # The outputs from the state the apply just wrote, as `terraform output` would read them from it.
    after = read_state()
    outputs = {} if after is None else parse_state_outputs(after)
    return AppliedDeploy(approved_sha256, outputs, applied.duration_seconds)
