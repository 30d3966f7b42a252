"""Plan one version into one workspace: the saved plan in S3, and everything the apply will re-check.

A plan records what it was made against, so the apply can refuse anything that moved since: the Terraform
state (serial and lineage; Terraform 1.0.3 does not notice a plan made against an empty state), the
channels (another promotion during the approval wait) and the version itself (revoked meanwhile). A
forward deploy plans only the version its followed channel points at now (:func:`not_current`), and the
apply asks again: a superseded version is never applied. The image is verified against its registered
digest, and the version against its signed provenance (``icd/registry/provenance.py``), before Terraform ever
sees it; a teardown deploys no image, so it needs no provenance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from icd.deploy.artifacts import verify_image
from icd.deploy.plan_view import PlanView, summarize_plan
from icd.deploy.rollout import ResourceDelta, resource_deltas
from icd.deploy.workdir import PLAN_FILENAME, STATE_LOCK_TIMEOUT
from icd.errors import ArtifactIntegrityError, PlanIntegrityError
from icd.registry.models import ArtifactVersion
from icd.registry.plans import PlanStore
from icd.registry.registry import Registry
from icd.rules import LATEST
from icd.tools.terraform import StateVersion, Terraform, plan_state_version


@dataclass(frozen=True)
class ChannelSeen:
    """Where a channel pointed when the plan was made; the apply refuses if it moved since."""

    channel: str
    version: int | None


@dataclass(frozen=True)
class PlanRequest:
    """Everything one plan needs: what to deploy where, with which variables, checked against what."""

    workspace: str
    stack_dir: str
    version: ArtifactVersion
    platform: str
    follows: str  # the channel the workspace follows (latest or a channel)
    promotes: str | None  # the channel a healthy deploy moves, if any
    variables: Mapping[str, str]
    plan_id: str
    destroy: bool = False
    # A forward deploy applies only the version its channel points at; a rollback to the last good version
    # (the deployment's own policy) and a teardown don't follow the channel.
    must_be_current: bool = True
    # What the workspace runs now, from its state (``icd/deploy/running.py``): the plan's "from" when its own
    # changes name no earlier artifact. None: nothing registered runs there.
    running_version: int | None = None


@dataclass(frozen=True)
class PlannedDeploy:
    workspace: str
    plan_id: str
    namespace: str
    version: int
    followed: ChannelSeen  # what the workspace follows (latest or a channel)
    promoted: ChannelSeen | None  # what a healthy deploy moves (None: it moves nothing)
    artifact_id: str
    has_changes: bool
    plan_sha256: str
    state_before: StateVersion | None
    view: PlanView
    must_be_current: bool = True
    stack_dir: str = ""  # where the stack is, for the apply's fresh working directory
    platform: str = "local"  # which of the version's artifacts the stack deploys
    # What the plan changes, resource by resource: a rollout checks each later batch against the first's.
    deltas: tuple[ResourceDelta, ...] = ()


def seen(registry: Registry, namespace: str, channel: str) -> ChannelSeen:
    pointer = registry.get_channel(namespace, channel)
    return ChannelSeen(channel, pointer.version if pointer else None)


def not_current(registry: Registry, namespace: str, version: int, follows: str) -> str | None:
    """Why ``version`` is not what a workspace following ``follows`` should run now, or None when it is.

    ``latest`` is the newest version that is not revoked (the registry keeps its pointer there); any other
    channel is wherever it was last moved.
    """
    now = seen(registry, namespace, follows).version
    if now == version:
        return None
    where = f"v{now}" if now is not None else "no version"
    newest = " (the newest deployable version)" if follows == LATEST and now is not None else ""
    return f"{namespace}@{follows} points at {where}{newest}, not v{version}"


def make_plan(
    request: PlanRequest, *, registry: Registry, plans: PlanStore, open_workdir: Callable[[str], Terraform]
) -> PlannedDeploy:
    """``init`` + ``plan -out`` + ``show -json``; a plan with changes goes to S3 with its sha256 before anyone
    approves it.

    ``open_workdir(name)`` returns an initialised Terraform working directory named ``name``.
    """
    version, workspace, variables = request.version, request.workspace, request.variables
    artifact_id = verify_image(version, request.platform)
    if not request.destroy:
        registry.verify_provenance(version, request.platform)  # ProvenanceError: not built here, or altered
    if variables.get("artifact_id") != artifact_id:
        raise ArtifactIntegrityError(
            f"the stack variables deploy {variables.get('artifact_id')!r}, not {version.namespace} "
            f"v{version.version}'s {request.platform} artifact {artifact_id!r}"
        )
    followed = seen(registry, version.namespace, request.follows)
    promoted = seen(registry, version.namespace, request.promotes) if request.promotes else None
    terraform = open_workdir(request.plan_id)
    result = terraform.plan(
        variables=dict(variables), out=Path(PLAN_FILENAME), destroy=request.destroy, lock_timeout=STATE_LOCK_TIMEOUT
    )
    # Recorded so the apply can prove nothing else wrote the state since this plan was made: the state the
    # plan itself was made against, from the plan file (no `state pull`, and no window between the two).
    state_before = plan_state_version(result.plan_file)
    plan = terraform.show_plan(result.plan_file)
    view = summarize_plan(
        plan,
        namespace=version.namespace,
        to_version=version.version,
        channel=(promoted or followed).channel,
        # What this workspace runs now: the plan's own "before" artifacts, else what its state says it runs.
        channel_version=request.running_version,
        find_version=lambda found: registry.find_by_artifact_id(version.namespace, found),
    )
    if request.destroy:
        view = replace(view, teardown=True)
    has_changes = result.has_changes and plan.has_changes
    if has_changes:
        stored = plans.put(
            workspace,
            request.plan_id,
            result.plan_file.read_bytes(),
            metadata={"namespace": version.namespace, "version": str(version.version)},
        )
        if stored.sha256 != plan.sha256:
            raise PlanIntegrityError(f"stored plan {stored.key} hashes to {stored.sha256}, expected {plan.sha256}")
    return PlannedDeploy(
        workspace=workspace,
        plan_id=request.plan_id,
        namespace=version.namespace,
        version=version.version,
        followed=followed,
        promoted=promoted,
        artifact_id=artifact_id,
        has_changes=has_changes,
        plan_sha256=plan.sha256,
        state_before=state_before,
        view=view,
        must_be_current=request.must_be_current and not request.destroy,
        stack_dir=request.stack_dir,
        platform=request.platform,
        deltas=resource_deltas(plan),
    )
