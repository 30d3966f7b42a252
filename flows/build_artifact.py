"""build-artifact: a pushed commit becomes a registered, immutable artifact, announced to the loop.

    claim the commit's build (a ref alone is resolved first)
    -> (reuse this commit's build | resolve source -> pre-flight check -> Packer build -> register)
    -> icd.artifact.registered, icd.plan.requested for every workspace following latest
    -> release the claim

Started by an ``icd.push.received`` event (the GitHub webhook, see ``cli/inbound.py``), by ``push-to-deploy``,
or by hand. Where the code is and how it is built come from the namespace's entry in ``icd.toml``. A commit
already built is reused, not rebuilt (immutable artifacts make that safe): nothing is checked out, checked
or announced again, and the run ends ``Reused``.

One build per commit at a time, however many deliveries start runs at once: the first run claims the commit
in the registry; a run that finds it claimed by a live run ends ``Duplicate``, naming that run (or
``Reused`` when that run has registered the version already). A commit gets one version; ``rebuild`` makes
another on purpose (as does a build whose versions can't serve this platform), and two rebuilds make one.

A failure (an unreadable ``icd.toml`` too) is told to operators and fails the run; one before registering
gives the claim back at once. A service that breaks the service contract (``docs/service-contract.md``)
fails at the pre-flight check, with every breach in the message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run
from prefect.states import Completed
from pydantic import Field

from blocks.notifier import load_notifier
from blocks.registry import ArtifactRegistry
from icd.config import NamespaceConfig, load_config
from icd.deploy.source import SourceCheckout
from icd.errors import DeployError
from icd.notify.message import Notification
from icd.paths import state_home
from icd.registry.models import ArtifactVersion, BuildClaimed, BuildHeld
from icd.registry.provenance import BuildFacts, template_digest
from icd.rules import GitRef, Namespace
from icd.text import operator_time
from tasks.announce import announce_registration
from tasks.build import build_artifact as bake
from tasks.build import claim_build, find_existing_build, next_build_label, release_build_claim
from tasks.github_status import build_status
from tasks.notify import notify
from tasks.preflight import preflight_check
from tasks.register import register_artifact
from tasks.source import resolve_source

Commit = Annotated[str, Field(pattern=r"^([0-9a-f]{40})?$", description="The pushed commit (default: the ref's tip).")]
DUPLICATE = "Duplicate"
REUSED = "Reused"


@flow(name="build-artifact", log_prints=False)
def build_artifact(
    namespace: Namespace,
    ref: GitRef = "main",
    commit: Commit = "",
    platform: str = "local",
    plan: bool = True,
    rebuild: bool = False,
    registry_block: str = "registry",
    notifier_block: str = "ops-slack",
    pushed_by: Annotated[str, Field(max_length=100, description="Who pushed (the push webhook's pusher).")] = "",
) -> int | State[Any]:
    """Build ``ref`` (at ``commit`` when given) of ``namespace`` and register it; returns the version.

    With ``plan`` (the default) the registration requests a plan of every workspace that follows ``latest``.
    A second run of a commit being built ends ``Duplicate`` (its result names the run building it).
    """
    run_id, run_name = str(flow_run.id), str(flow_run.name)
    reported: tuple[NamespaceConfig, str] | None = None  # the commit whose icd/build status this run reports
    try:
        # A typo in icd.toml (a ConfigError) is a build failure like any other: told, then the run fails.
        config = load_config().namespace(namespace)
        registry = cast(ArtifactRegistry, ArtifactRegistry.load(registry_block))
        build = _Build(registry, config, namespace, ref, platform, plan, rebuild, run_id, pushed_by)
        # A push names its commit: a second run of it, or a commit built already, ends before any checkout.
        # A ref alone is resolved (checked out) first, to know the commit.
        source = None if commit else resolve_source(config.repository, ref, build.workdir)
        sha = commit or cast(SourceCheckout, source).commit
        claimed = claim_build(registry, namespace, commit=sha, run_id=run_id, run_name=run_name)
        if isinstance(claimed, BuildHeld):
            return _second_build(build, sha, claimed)
        # Reported once the build is this run's (a duplicate run must not set a built commit back to pending).
        build_status(config, sha, None, run_id=run_id, notifier_block=notifier_block)
        reported = (config, sha)
        built = _build_under_claim(build, sha, claimed, source)
        build_status(config, sha, built, run_id=run_id, notifier_block=notifier_block)
        return built
    except DeployError as exc:
        if reported is not None:
            build_status(*reported, exc, run_id=run_id, notifier_block=notifier_block)
        notifier = load_notifier(notifier_block)
        notify(
            notifier,
            Notification(
                title=f"Build of {namespace} {ref} failed: {type(exc).__name__}",
                text=str(exc)[:2500],
                severity="critical",
                fields={"namespace": namespace, "ref": ref},
                link_url=notifier.flow_run_url(run_id),
                link_text="Open the build run",
                kind="build",
            ),
        )
        raise


@dataclass(frozen=True)
class _Build:
    """What every step of this run needs."""

    registry: ArtifactRegistry
    config: NamespaceConfig
    namespace: str
    ref: str
    platform: str
    plan: bool
    rebuild: bool
    run_id: str
    pushed_by: str = ""

    @property
    def workdir(self) -> str:
        return str(state_home() / "runs" / self.run_id / "src")

    def find_existing(self, commit: str) -> ArtifactVersion | None:
        return find_existing_build(
            self.registry, self.namespace, commit=commit, service_name=self.config.service_name, platform=self.platform
        )

    def announce(self, version: int, commit: str) -> None:
        announce_registration(
            self.registry,
            self.namespace,
            version,
            commit=commit,
            ref=self.ref,
            build_run_id=self.run_id,
            plan=self.plan,
        )

    def release(self, commit: str, outcome: str) -> None:
        release_build_claim(self.registry, self.namespace, commit=commit, run_id=self.run_id, outcome=outcome)


def _build_under_claim(
    build: _Build, commit: str, claimed: BuildClaimed, source: SourceCheckout | None
) -> int | State[Any]:
    """Reuse or build, register, announce, then give the claim back (this run holds it)."""
    registry, namespace, config = build.registry, build.namespace, build.config
    with _given_back_on_failure(build, commit):
        found = None if build.rebuild else build.find_existing(commit)
    if found is not None:
        # A run that registered this version and ended before announcing it left its claim behind: say it now.
        left = claimed.taken_over
        if left is not None and found.labels.get("build_run_id") == left.holder_run_id:
            build.announce(found.version, commit)
        build.release(commit, f"reused v{found.version}")
        message = (
            f"{namespace}@{commit[:12]} is v{found.version} already, built by {_built_by(found)}; nothing to build"
        )
        get_run_logger().info(message)
        return Completed(name=REUSED, message=message, data=found.version)
    with _given_back_on_failure(build, commit):
        source = source or resolve_source(config.repository, commit, build.workdir)
        # Every breach of the service contract, before anything is built (docs/service-contract.md).
        preflight_check(registry, source, namespace=namespace)
        # For the signed provenance: the template as checked out, before Packer runs in it.
        templates, started = template_digest(source.path / config.template_dir), datetime.now(UTC)
        built = bake(
            source,
            namespace=namespace,
            template_subdir=config.template_dir,
            only=config.packer_only,
            build_label=next_build_label(registry, namespace),
            output_dir=str(state_home() / "images" / namespace.replace("/", "__") / build.run_id),
            service_name=config.service_name,
        )
    # From here on a failure keeps the claim: the run ends, and the next run of the commit takes the claim
    # over and announces what this one registered.
    registered = register_artifact(
        registry,
        built,
        created_by=f"flow-run/{claimed.claim.holder_run_name}",
        service_name=config.service_name,
        build_run_id=build.run_id,
        # The commit's newest version when the claim was taken: the registry makes a new version only if it
        # still is (a first build, an explicit rebuild, or a build whose versions can't serve this platform).
        rebuild_of=claimed.versions[-1] if claimed.versions else None,
        provenance={
            key: value for key, value in (("commit_author", source.author), ("pushed_by", build.pushed_by)) if value
        },
        build_facts=BuildFacts(
            repository=config.repository,
            ref=build.ref,
            commit=commit,
            template_digest=templates,
            packer_only=tuple(config.packer_only),
            build_run_id=build.run_id,
            started_on=started,
            finished_on=datetime.now(UTC),
        ),
    )
    version = registered.version
    if version.packer_run_uuid == built.packer_run_uuid:
        build.announce(version.version, commit)
    build.release(commit, f"registered v{version.version}")
    return version.version


@contextmanager
def _given_back_on_failure(build: _Build, commit: str) -> Iterator[None]:
    """A step before registration: if it fails nothing was registered, so the claim goes back at once and the
    next delivery of the commit builds it. (A crash gives it back when its run is seen ended.)"""
    try:
        yield
    except Exception as exc:
        # return_state: a registry that can't take the release must not hide the failure being reported.
        release_build_claim(
            build.registry,
            build.namespace,
            commit=commit,
            run_id=build.run_id,
            outcome=f"failed: {type(exc).__name__}",
            return_state=True,
        )
        raise


def _second_build(build: _Build, commit: str, held: BuildHeld) -> State[Any]:
    """Another live run is building this commit: reuse what it registered already, or end as its duplicate."""
    holder = held.holder
    building = f"run {holder.holder_run_name} ({holder.holder_run_id})"
    found = None if build.rebuild else build.find_existing(commit)
    if found is not None:
        message = (
            f"{build.namespace}@{commit[:12]} is v{found.version} already, built by {_built_by(found)} "
            f"(the commit's build is held by {building}); nothing to build"
        )
        get_run_logger().info(message)
        return Completed(name=REUSED, message=message, data=found.version)
    message = (
        f"{build.namespace}@{commit[:12]} is being built by {building} since {operator_time(holder.claimed_at)}; "
        "this run built nothing"
    )
    get_run_logger().info(message)
    return Completed(
        name=DUPLICATE,
        message=message,
        data={"version": None, "building_run_id": holder.holder_run_id, "building_run_name": holder.holder_run_name},
    )


def _built_by(version: ArtifactVersion) -> str:
    run_id = version.labels.get("build_run_id")
    return f"{version.created_by} ({run_id})" if run_id else version.created_by
