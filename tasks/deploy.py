"""The steps of one push-to-deploy run: build, register, plan, apply, promote.

Each is a small Prefect task that takes blocks as parameters. The steps before the approval wait persist
their results under a per-run cache key (``tasks.run_cache``), because a suspended flow re-runs from the top
when it is resumed and must not build, register or plan twice. Retries are decided per step:

* build and plan failures are never retried: a broken template or config fails the same way again;
* registry writes are retried: S3 faults and lost compare-and-swap races are transient;
* plan and apply are retried only when Terraform's state lock is held by someone else.

Terraform runs in a fresh per-run working directory whose state lives in the S3 backend next to the
registry, and the saved plan file is stored in S3 too. So the apply after an approval needs nothing from
the worker that planned: a restarted or different worker re-creates the directory and fetches the plan.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ArtifactRegistry
from tasks import packer
from tasks.errors import (
    ConflictError,
    PackerError,
    PlanIntegrityError,
    RegistryStorageError,
    StalePlanError,
    StateLockedError,
)
from tasks.plan_summary import PlanView, summarize_plan
from tasks.registry import ArtifactVersion
from tasks.retries import retry_on
from tasks.run_cache import run_scoped_cache_key
from tasks.source import SourceCheckout
from tasks.terraform import StateVersion, Terraform
from tasks.toolpaths import PROJECT_ROOT

PLAN_FILENAME = "deploy.tfplan"
BACKEND_OVERRIDE = "icd_backend_override.tf"
_BUILD_TIMEOUT = 3600.0
_TERRAFORM_TIMEOUT = 1800.0


def state_home() -> Path:
    """Where runs keep their scratch directories and local images (ICD_HOME; default ``.state/``)."""
    return Path(os.environ.get("ICD_HOME") or PROJECT_ROOT / ".state").resolve()


# --- build and register -----------------------------------------------------------------------------------


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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def collect_artifacts(build: packer.PackerBuild) -> tuple[str, dict[str, str], dict[str, str]]:
    """Flatten a Packer run into (builder type, platform -> artifact id, platform -> sha256).

    A local image is keyed ``local`` with its absolute path (the manifest's ``custom_data.image_path``) and
    its sha256, so a deploy can prove it runs the bytes that were registered.
    """
    artifacts: dict[str, str] = {}
    digests: dict[str, str] = {}
    builder_types: list[str] = []
    for entry in build.builds:
        builder_types.append(entry.builder_type)
        image_path = entry.custom_data.get("image_path")
        if image_path and entry.builder_type in {"null", "file"}:
            path = Path(image_path)
            if not path.is_file():
                raise PackerError(f"the build reported image {path} but no such file exists")
            artifacts["local"] = str(path)
            digests["local"] = _sha256_file(path)
            continue
        artifacts.update(entry.artifact_ids)
    if not artifacts:
        raise PackerError("the build produced no artifact ids")
    return "+".join(sorted(set(builder_types))), artifacts, digests


# No retries: a failed build fails the same way again, and a retry would only hide it.
@task(name="build-artifact", persist_result=True, cache_key_fn=run_scoped_cache_key)
def build_artifact(
    source: SourceCheckout,
    *,
    namespace: str,
    template_subdir: str,
    only: list[str],
    build_label: str,
    output_dir: str,
    service_name: str,
) -> BuiltArtifact:
    logger = get_run_logger()
    template_dir = source.path / template_subdir
    if not template_dir.is_dir():
        raise PackerError(f"no Packer template directory {template_subdir!r} in {source.repo}@{source.ref}")
    result = packer.build(
        template_dir,
        {
            "namespace": namespace,
            "version": build_label,
            "commit": source.commit,
            "output_dir": output_dir,
            "service_name": service_name,
        },
        only=only or None,
        timeout=_BUILD_TIMEOUT,
        on_progress=logger.info,
    )
    builder_type, artifacts, digests = collect_artifacts(result)
    logger.info("packer run %s built %s", result.packer_run_uuid, artifacts)
    return BuiltArtifact(
        namespace=namespace,
        build_label=build_label,
        commit=source.commit,
        ref=source.ref,
        packer_run_uuid=result.packer_run_uuid,
        builder_type=builder_type,
        artifacts=artifacts,
        artifact_sha256=digests,
    )


@task(
    name="find-existing-build",
    persist_result=True,
    cache_key_fn=run_scoped_cache_key,
    retries=3,
    retry_delay_seconds=[1, 3, 9],
)
def find_existing_build(
    registry: ArtifactRegistry, namespace: str, *, commit: str, service_name: str, platform: str
) -> ArtifactVersion | None:
    """The newest deployable version already built from this commit, so a re-push does not rebuild.

    Immutable artifacts make this safe: the same commit and template give the same image, and reusing it
    is what lets an unchanged push plan "no changes".
    """
    candidates = [
        version
        for version in registry.registry().list_versions(namespace)
        if version.git_commit == commit
        and version.labels.get("service_name", service_name) == service_name
        and platform in version.artifacts
        and not version.is_revoked()
        and all(Path(path).is_file() for key, path in version.artifacts.items() if key == "local")
    ]
    return max(candidates, key=lambda version: version.version, default=None)


@task(
    name="next-build-label",
    persist_result=True,
    cache_key_fn=run_scoped_cache_key,
    retries=3,
    retry_delay_seconds=[1, 3, 9],
)
def next_build_label(registry: ArtifactRegistry, namespace: str) -> str:
    """The version the build will most likely get, baked into the image and its Consul service ID.

    Only a label: the registry assigns the real number atomically at registration. Two builds of one
    namespace racing may share a label; their images still differ (per-run output directories).
    """
    versions = registry.registry().list_versions(namespace)
    return str(max((v.version for v in versions), default=0) + 1)


@task(
    name="register-artifact",
    persist_result=True,
    cache_key_fn=run_scoped_cache_key,
    retries=4,
    retry_delay_seconds=[1, 2, 4, 8],
    retry_condition_fn=retry_on(RegistryStorageError, ConflictError),
)
def register_artifact(
    registry: ArtifactRegistry, built: BuiltArtifact, *, created_by: str, service_name: str
) -> ArtifactVersion:
    result = registry.registry().register(
        built.namespace,
        git_commit=built.commit,
        git_ref=built.ref,
        packer_run_uuid=built.packer_run_uuid,
        builder_type=built.builder_type,
        artifacts=built.artifacts,
        artifact_sha256=built.artifact_sha256,
        created_by=created_by,
        labels={"build_label": built.build_label, "service_name": service_name},
    )
    verb = "registered" if result.created else "already registered as"
    get_run_logger().info("%s %s v%d", verb, built.namespace, result.version.version)
    return result.version


# --- terraform working directory -------------------------------------------------------------------------


def backend_config(registry: ArtifactRegistry, workspace: str) -> dict[str, str]:
    """The S3 backend settings for a workspace's state, next to the registry in the same bucket."""
    creds = registry.aws_credentials
    config = {
        "bucket": registry.bucket,
        "key": f"{registry.prefix}state/{workspace}.tfstate",
        "region": creds.region_name or "us-east-1",
    }
    endpoint = creds.aws_client_parameters.endpoint_url
    if endpoint:
        # A non-AWS endpoint (moto here, MinIO elsewhere): path-style, and no AWS-only checks.
        config |= {
            "endpoint": str(endpoint),
            "force_path_style": "true",
            "skip_credentials_validation": "true",
            "skip_metadata_api_check": "true",
            "skip_region_validation": "true",
        }
    return config


def terraform_env(registry: ArtifactRegistry) -> dict[str, str]:
    """Credentials for the S3 backend, passed by environment so they never appear in argv or logs."""
    creds = registry.aws_credentials
    env: dict[str, str] = {}
    if creds.aws_access_key_id:
        env["AWS_ACCESS_KEY_ID"] = creds.aws_access_key_id
    if creds.aws_secret_access_key:
        env["AWS_SECRET_ACCESS_KEY"] = creds.aws_secret_access_key.get_secret_value()
    if creds.aws_session_token:
        env["AWS_SESSION_TOKEN"] = creds.aws_session_token
    if creds.region_name:
        env["AWS_DEFAULT_REGION"] = creds.region_name
    return env


def prepare_workdir(stack_dir: Path, workdir: Path) -> Path:
    """A clean copy of the stack with an S3 backend block, so the stack itself stays backend-agnostic."""
    if not any(stack_dir.glob("*.tf")):
        raise FileNotFoundError(f"no Terraform configuration in {stack_dir}")
    if workdir.exists():
        shutil.rmtree(workdir)
    shutil.copytree(
        stack_dir,
        workdir,
        ignore=shutil.ignore_patterns(".terraform", "*.tfstate", "*.tfstate.backup", "*.tfplan"),
    )
    (workdir / BACKEND_OVERRIDE).write_text('terraform {\n  backend "s3" {}\n}\n')
    return workdir


def open_terraform(registry: ArtifactRegistry, workspace: str, stack_dir: Path, workdir: Path) -> Terraform:
    logger = get_run_logger()
    terraform = Terraform(
        prepare_workdir(stack_dir, workdir),
        env=terraform_env(registry),
        timeout=_TERRAFORM_TIMEOUT,
        on_line=logger.info,
    )
    terraform.init(backend_config=backend_config(registry, workspace), reconfigure=True)
    return terraform


# --- plan ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedDeploy:
    workspace: str
    plan_id: str
    has_changes: bool
    plan_sha256: str
    state_before: StateVersion | None
    view: PlanView


@task(
    name="plan-deploy",
    persist_result=True,
    cache_key_fn=run_scoped_cache_key,
    retries=3,
    retry_delay_seconds=[5, 15, 30],
    retry_condition_fn=retry_on(StateLockedError),
)
def plan_deploy(
    registry: ArtifactRegistry,
    *,
    workspace: str,
    stack_dir: str,
    version: ArtifactVersion,
    variables: Mapping[str, str],
    plan_id: str,
    channel: str,
    step: str = "deploy",
) -> PlannedDeploy:
    """``init`` + ``plan -out``; the saved plan goes to S3 with its sha256 before anyone is asked to approve."""
    logger = get_run_logger()
    workdir = state_home() / "runs" / plan_id
    terraform = open_terraform(registry, workspace, Path(stack_dir), workdir)
    # Recorded so the apply can prove nothing else wrote the state since this plan was made (Terraform
    # itself does not notice when the plan was made against an empty state).
    state_before = terraform.state_pull()
    result = terraform.plan(variables=dict(variables), out=Path(PLAN_FILENAME))
    plan = terraform.show_plan(result.plan_file)
    reg = registry.registry()
    current = reg.get_channel(version.namespace, channel)
    view = summarize_plan(
        plan,
        namespace=version.namespace,
        to_version=version.version,
        channel=channel,
        channel_version=current.version if current else None,
        find_version=lambda artifact_id: reg.find_by_artifact_id(version.namespace, artifact_id),
    )
    if not result.has_changes or not plan.has_changes:
        logger.info("plan for %s has no changes", workspace)
        return PlannedDeploy(workspace, plan_id, False, plan.sha256, state_before, view)
    stored = registry.plan_store().put(
        workspace,
        plan_id,
        result.plan_file.read_bytes(),
        metadata={"namespace": version.namespace, "version": str(version.version)},
    )
    if stored.sha256 != plan.sha256:
        raise PlanIntegrityError(f"stored plan {stored.key} hashes to {stored.sha256}, expected {plan.sha256}")
    logger.info("plan %s stored as s3://%s/%s", plan.sha256, registry.bucket, stored.key)
    return PlannedDeploy(workspace, plan_id, True, plan.sha256, state_before, view)


# --- apply ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppliedDeploy:
    plan_sha256: str
    outputs: dict[str, Any]
    duration_seconds: float


@dataclass(frozen=True)
class StalePlan:
    """The expected outcome when the state moved after planning: nothing was applied."""

    reason: str


@task(
    name="apply-plan",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[5, 15, 30],
    retry_condition_fn=retry_on(StateLockedError),
)
def apply_plan(
    registry: ArtifactRegistry,
    planned: PlannedDeploy,
    *,
    approved_sha256: str,
    stack_dir: str,
) -> AppliedDeploy | StalePlan:
    """Apply exactly the approved plan: same bytes, same state it was made against, or nothing at all."""
    logger = get_run_logger()
    if approved_sha256 != planned.plan_sha256:
        raise PlanIntegrityError(
            f"approved plan {approved_sha256[:12]} is not the plan of this run ({planned.plan_sha256[:12]})"
        )
    plan_bytes = registry.plan_store().get(planned.workspace, planned.plan_id, expected_sha256=approved_sha256)
    workdir = state_home() / "runs" / f"{planned.plan_id}-apply"
    terraform = open_terraform(registry, planned.workspace, Path(stack_dir), workdir)
    plan_file = terraform.working_dir / PLAN_FILENAME
    plan_file.write_bytes(plan_bytes)
    current = terraform.state_pull()
    if current != planned.state_before:
        return StalePlan(
            f"the state of workspace {planned.workspace!r} moved since planning "
            f"({_describe(planned.state_before)} -> {_describe(current)}); nothing was applied"
        )
    try:
        applied = terraform.apply(plan_file, expected_sha256=approved_sha256)
    except StalePlanError as exc:
        return StalePlan(f"Terraform refused the saved plan as stale: {exc}; nothing was applied")
    outputs = terraform.output()
    logger.info("applied plan %s in %.1fs", approved_sha256[:12], applied.duration_seconds)
    return AppliedDeploy(approved_sha256, outputs, applied.duration_seconds)


def _describe(state: StateVersion | None) -> str:
    return "no state" if state is None else f"serial {state.serial} of lineage {state.lineage[:8]}"


# --- promote --------------------------------------------------------------------------------------------


@task(
    name="promote-channel",
    cache_policy=NO_CACHE,
    retries=4,
    retry_delay_seconds=[1, 2, 4, 8],
    retry_condition_fn=retry_on(RegistryStorageError, ConflictError),
)
def promote_channel(
    registry: ArtifactRegistry,
    *,
    namespace: str,
    channel: str,
    version: int,
    assigned_by: str,
    reason: str,
    metadata: Mapping[str, str],
) -> int | None:
    """Point ``channel`` at ``version``; returns the version it pointed at before."""
    assignment = registry.registry().assign_channel(
        namespace, channel, version, assigned_by=assigned_by, reason=reason, metadata=dict(metadata)
    )
    get_run_logger().info("channel %s of %s: v%s -> v%d", channel, namespace, assignment.from_version, version)
    return assignment.from_version
