"""build-artifact: a pushed commit becomes a registered, immutable artifact, announced to the loop.

    resolve source -> pre-flight check -> (reuse this commit's build | Packer build -> register)
    -> icd.artifact.registered
    -> icd.plan.requested for every workspace following latest

Started by an ``icd.push.received`` event (the GitHub webhook, see ``cli/inbound.py``), by ``push-to-deploy``,
or by hand. Where the code is and how it is built come from the namespace's entry in ``icd.toml``. A commit
already built is reused, not rebuilt (immutable artifacts make that safe) and nothing is announced again.
A failure is told to operators and fails the run; nothing is registered. A service that breaks the service
contract (``docs/service-contract.md``) fails at the pre-flight check, with every breach in the message.
"""

from __future__ import annotations

from typing import Annotated, cast

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from blocks.notifier import SlackNotifier
from blocks.registry import ArtifactRegistry
from icd.config import load_config
from icd.errors import DeployError
from icd.notify.message import Notification
from icd.paths import state_home
from icd.rules import GitRef, Namespace
from tasks.announce import announce_registration
from tasks.build import build_artifact as bake
from tasks.build import find_existing_build, next_build_label
from tasks.notify import notify
from tasks.preflight import preflight_check
from tasks.register import register_artifact
from tasks.source import resolve_source

Commit = Annotated[str, Field(pattern=r"^([0-9a-f]{40})?$", description="The pushed commit (default: the ref's tip).")]


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
) -> int:
    """Build ``ref`` (at ``commit`` when given) of ``namespace`` and register it; returns the version.

    With ``plan`` (the default) the registration requests a plan of every workspace that follows ``latest``.
    """
    config = load_config().namespace(namespace)
    registry = cast(ArtifactRegistry, ArtifactRegistry.load(registry_block))
    run_id, run_name = str(flow_run.id), str(flow_run.name)
    try:
        source = resolve_source(config.repository, commit or ref, str(state_home() / "runs" / run_id / "src"))
        # Every breach of the service contract, before anything is built (docs/service-contract.md).
        preflight_check(registry, source, namespace=namespace)
        if not rebuild:
            found = find_existing_build(
                registry, namespace, commit=source.commit, service_name=config.service_name, platform=platform
            )
            if found is not None:
                get_run_logger().info("%s@%s is already v%d; nothing to build", ref, source.commit[:12], found.version)
                return found.version
        built = bake(
            source,
            namespace=namespace,
            template_subdir=config.template_dir,
            only=config.packer_only,
            build_label=next_build_label(registry, namespace),
            output_dir=str(state_home() / "images" / namespace.replace("/", "__") / run_id),
            service_name=config.service_name,
        )
        version = register_artifact(
            registry, built, created_by=f"flow-run/{run_name}", service_name=config.service_name
        )
    except DeployError as exc:
        notifier = cast(SlackNotifier, SlackNotifier.load(notifier_block))
        notify(
            notifier,
            Notification(
                title=f"Build of {namespace} {ref} failed: {type(exc).__name__}",
                text=str(exc)[:2500],
                severity="critical",
                fields={"namespace": namespace, "ref": ref},
                link_url=notifier.flow_run_url(run_id),
                link_text="Open the build run",
            ),
            notifier_block=notifier_block,
        )
        raise
    announce_registration(
        namespace, version.version, commit=version.git_commit, ref=ref, build_run_id=run_id, plan=plan
    )
    return version.version
