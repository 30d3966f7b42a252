"""Operator actions, each announced to the loop: promote a version to a channel, revoke one, tear down a
workspace.

The ``icd-registry`` command and the ``promote`` / ``revoke`` flows (so they can be run from the UI) both
call these, so a channel moved by hand plans its followers exactly as one moved by a deploy does.
"""

from __future__ import annotations

from dataclasses import dataclass

from icd import events
from icd.config import PipelineConfig
from icd.deploy.dispatch import submit
from icd.deploy.queue import WorkspaceQueue
from icd.errors import InvalidInputError
from icd.registry.models import ChannelAssignment, ChannelMoved
from icd.registry.registry import Registry
from icd.text import normalize_identity, version_label


def _identity(by: str) -> str:
    who = normalize_identity(by)
    if who is None:
        raise InvalidInputError("say who you are (--by): the registry records who moved or revoked what")
    return who


@dataclass(frozen=True)
class Promotion:
    assignment: ChannelAssignment
    plans_requested: list[str]


def promote(
    registry: Registry,
    queue: WorkspaceQueue,
    config: PipelineConfig,
    namespace: str,
    version: int,
    channel: str,
    *,
    by: str,
    why: str,
) -> Promotion:
    """Point ``channel`` at ``version``, then emit ``icd.channel.moved`` and queue a plan request per follower
    (latest wins: a promotion made while a follower waits for approval of another version supersedes it)."""
    who = _identity(by)
    if not why.strip():
        raise InvalidInputError("say why (--why): the channel's history keeps it")
    moved = registry.assign_channel(namespace, channel, version, assigned_by=who, reason=why.strip())
    if isinstance(moved, ChannelMoved):  # only a compare-and-swap move can lose; this one has no expectation
        raise InvalidInputError(
            f"channel {channel!r} moved under us to {version_label(moved.actual_version)}; try again"
        )
    cause = events.channel_moved(
        namespace=namespace, channel=channel, from_version=moved.from_version, to_version=version, by=who, reason=why
    )
    events.emit(cause)
    requests = events.plan_requests(config, cause)
    for spec in requests:
        submit(queue, spec)
    return Promotion(moved, [str(spec.payload["workspace"]) for spec in requests])


def revoke(registry: Registry, namespace: str, version: int, *, by: str, why: str, cascade: bool = False) -> list[int]:
    """Revoke ``version`` (and its descendants with ``cascade``) and emit ``icd.version.revoked`` for each,
    which tells operators which workspaces run it (``flows/revocation_notice.py``)."""
    who = _identity(by)
    revoked = registry.revoke(namespace, version, revoked_by=who, reason=why, cascade=cascade)
    for number in revoked:
        events.emit(events.version_revoked(namespace=namespace, version=number, by=who, reason=why))
    return revoked


@dataclass(frozen=True)
class TeardownRequest:
    workspace: str
    namespace: str
    version: int


def request_teardown(
    registry: Registry, queue: WorkspaceQueue, config: PipelineConfig, workspace: str, *, by: str, why: str
) -> TeardownRequest:
    """Ask for ``workspace`` to be destroyed: emit ``icd.teardown.requested`` and queue the teardown, which gets
    a ``deploy-artifact`` run that plans the destroy and waits for approval like any plan (nothing is
    destroyed before that). Like any request, a newer one (a new version) supersedes it while it waits.

    The version only fills the stack's variables (the destroy itself reads what the state holds): the one the
    workspace follows now. Remove the workspace from ``icd.toml`` too, or the next version plans it again.
    """
    who = _identity(by)
    if not why.strip():
        raise InvalidInputError("say why (--why): the deploy record keeps it")
    settings = config.workspace(workspace)
    # The channel's pointer, `latest` included: the registry keeps it off revoked and unfinished versions,
    # which the last version number can be.
    pointer = registry.get_channel(settings.namespace, settings.channel)
    version = pointer.version if pointer else None
    if not version:
        raise InvalidInputError(
            f"{settings.namespace} has no version on {settings.channel!r}: nothing can have been deployed to "
            f"{workspace} from it"
        )
    events.emit(
        events.teardown_requested(
            workspace=workspace, namespace=settings.namespace, version=version, by=who, reason=why.strip()
        )
    )
    submit(
        queue,
        events.plan_requested(
            workspace=workspace,
            namespace=settings.namespace,
            version=version,
            by=who,
            cause=events.TEARDOWN_REQUESTED,
            teardown=True,
            reason=why.strip(),
        ),
    )
    return TeardownRequest(workspace, settings.namespace, version)
