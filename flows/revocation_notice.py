"""revocation-notice: when a version is revoked, tell operators which workspaces still run it.

Triggered by ``icd.version.revoked``. For each workspace of ``icd.toml`` whose Terraform state says it runs the
revoked version (``icd/deploy/running.py``: what was applied, not where a channel points, which moves before
anything is applied), operators get the command that plans that workspace back to what its followed channel
points at now. Nothing is planned by itself: rolling a workspace back is an operator's decision.
"""

from __future__ import annotations

from typing import cast

from prefect import flow

from blocks.notifier import load_notifier
from blocks.registry import ArtifactRegistry
from icd.config import load_config
from icd.notify.message import Notification
from tasks.notify import notify


@flow(name="revocation-notice")
def revocation_notice(
    namespace: str, version: int, registry_block: str = "registry", notifier_block: str = "ops-slack"
) -> list[str]:
    """Notify about every workspace that runs ``namespace`` ``version``; returns their names."""
    config = load_config()
    block = cast(ArtifactRegistry, ArtifactRegistry.load(registry_block))
    registry = block.registry()
    notifier = load_notifier(notifier_block)
    record = registry.get(namespace, version)
    reason = record.revocation.reason if record.revocation else "revoked"
    affected: list[str] = []
    for workspace in sorted(config.workspaces):
        settings = config.workspaces[workspace]
        if settings.namespace != namespace:
            continue
        running = block.running(workspace, namespace)
        if running is None or running.version is None or running.version.version != version:
            continue
        affected.append(workspace)
        now = registry.get_channel(namespace, settings.channel)
        text = f"{workspace} still runs v{version} ({reason})."
        if now is not None and now.version != version:
            command = f"prefect deployment run 'deploy-artifact/deploy-artifact' -p workspace={workspace}"
            text += f" Plan it back to {settings.follows} (v{now.version}):\n`{command} -p version={now.version}`"
        else:
            text += f" {settings.follows} has no other version to go back to."
        notify(
            notifier,
            Notification(
                title=f"{namespace} v{version} was revoked; {workspace} runs it",
                text=text,
                severity="critical",
                fields={"workspace": workspace, "namespace": namespace, "revoked": f"v{version}"},
                kind="registry",
            ),
        )
    return affected
