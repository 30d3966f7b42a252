"""deploy-ended: what a deploy run can't do for itself once it has ended badly.

Triggered (``prefect.yaml``) by a ``deploy-artifact`` run entering ``Failed``, ``Crashed`` or ``Cancelled``
(the state names: a run's own named endings, ``Rejected`` or ``Superseded``, don't trigger it). Whatever the
ending, the workspace is released if the run still held it, and the newest request queued behind it gets its
run (``icd/deploy/queue.py``), so a queue never stalls behind a dead run:

* **An approval that timed out.** A suspended run holds no process, so nothing inside it notices its
  deadline; the server's pause-expiration service fails it ("paused and never resumed") within seconds.
  This flow then gives it its real final state, ``Cancelled`` named ``ApprovalTimedOut``, releases the
  workspace lock and tells operators. Nothing was applied; the stored plan stays in S3 for the record.
* **A crash** (the worker or the flow process died, or the heartbeat automation declared it a zombie).
  Its ``finally`` never ran: the lock is released here and operators are told. Terraform's own state lock
  (DynamoDB) still guards the state, and the tool died with its process (``icd/tools/process.py``).
* **A cancellation** by an operator (the UI's Cancel): a run cancelled while it waited for approval has no
  process to release anything; it is released here, and operators are told (for a rollout cancelled between
  batches, what each slot runs, as after a crash).

A run that failed on a fault ended through ``finish`` and has told operators already; here it only has its
lock checked.

**S3 down.** The lock lives in S3, so a run that ended because S3 failed (or that crashed while it was down)
could not be released then. It is released here as soon as S3 answers again: tried at once, then retried for
about a quarter of an hour (:data:`RELEASE_RETRY_DELAYS`); operators are told first (a crash's notice says the
release is pending). Meanwhile the lock holds nothing (its run has ended: the next request takes the
workspace); only a request queued behind it waits for this release to get its run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled

from blocks.notifier import load_notifier
from blocks.registry import ArtifactRegistry
from icd.config import load_config
from icd.errors import DeployError
from icd.notify.message import Notification, NotificationReceipt, Notifier, Severity
from tasks.context import run_thread_key
from tasks.notify import notify, update_notice
from tasks.queue import release_workspace
from tasks.record import record_deploy
from tasks.rollout import instances_now

TIMED_OUT = "never resumed"
# Waits between tries of a release S3 refused (about 15 minutes in all): short first, S3 is often back soon.
RELEASE_RETRY_DELAYS: list[float] = [5, 10, 20, 30, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60, 60]


@flow(name="deploy-ended")
def deploy_ended(flow_run_id: UUID, notifier_block: str = "ops-slack", registry_block: str = "registry") -> str:
    """Finish what the deploy run ``flow_run_id`` left behind; returns what was done."""
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    state = run.state
    workspace = str(run.parameters.get("workspace", ""))
    registry = cast(ArtifactRegistry, ArtifactRegistry.load(registry_block))
    # Read before the release: a run that asked for approval keeps its notice in the lock while it waits.
    thread = _approval_notice(registry, workspace, str(run.id)) if workspace else None
    released = _release_now(registry, workspace, str(run.id)) if workspace else False
    notifier = load_notifier(notifier_block)
    if state is not None and state.type == StateType.FAILED and TIMED_OUT in (state.message or ""):
        message = "no approval before the deadline; nothing applied"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelled(name="ApprovalTimedOut", message=message), force=True)
        title, text = f"Approval timed out on {workspace}", f"Run {run.name}: {message}."
        severity: Severity = "warning"
        done = "approval timed out"
    elif state is not None and state.type == StateType.CRASHED:
        title = f"Deploy run crashed on {workspace}"
        lock = {True: "was released", False: "was not held", None: _PENDING}[released]
        text = (
            f"Run {run.name} crashed ({state.message or 'no message'}); its workspace lock {lock}. "
            "Terraform's state lock guards the state; check the run's last log lines, then plan again."
        )
        text += _instances_left_sentence(registry, workspace, run.name, "crashed mid-rollout")
        severity, done = "critical", "crash handled"
    elif (
        state is not None
        and state.type == StateType.CANCELLED
        and state.name == "Cancelled"
        # A run that had started (it may have been applying), whether or not it released the workspace itself
        # on its way out; a run cancelled before it ever ran did nothing to tell.
        and (released is not False or run.start_time is not None)
    ):
        title = f"Deploy run cancelled on {workspace}"
        lock = {True: "was released", False: "was already free", None: _PENDING}[released]
        text = (
            f"Run {run.name} was cancelled ({state.message or 'no message'}); nothing more is applied by it, and "
            f"its workspace lock {lock}."
        )
        # A rollout cancelled between (or during) its batches leaves a mix, told as after a crash.
        text += _instances_left_sentence(registry, workspace, run.name, "cancelled mid-rollout")
        severity, done = "warning", "cancellation handled"
    else:
        logger.info("run %s ended %s and has told operators itself; lock released: %s", run.name, state, released)
        return (
            _release_when_back(registry, notifier, workspace, str(run.id), "nothing to do")
            if released is None
            else "nothing to do"
        )
    told = Notification(
        title=title,
        text=f"{text} Push again or re-run to plan afresh.",
        severity=severity,
        fields={"workspace": workspace, "run": run.name},
        link_url=notifier.flow_run_url(run.id),
        link_text="Open the run",
        thread_key=run_thread_key(str(run.id)),
    )
    notify(notifier, told, reply_to=thread)
    if thread is not None:
        # The run's one line in the channel (its approval notice) says how it ended; no button stays.
        ending = replace(told, text=f"{text} Details in the thread.", fields={**told.fields, "ended": done})
        update_notice(notifier, thread, replace(ending, kind="approval"))
    logger.info("run %s: %s; lock released: %s", run.name, done, released)
    if released is None:
        return _release_when_back(registry, notifier, workspace, str(run.id), done)
    return done


def _instances_left_sentence(registry: ArtifactRegistry, workspace: str, run_name: str, outcome: str) -> str:
    """For a workspace that rolls out: the notice's sentence on what its instances run now, also put in its
    deploy record (as ``outcome``), so a rollout that died or was cancelled between batches never leaves an
    unknown mix. "" for other workspaces, or when the state can't be read (the notice says no more than it did)."""
    try:
        settings = load_config().workspaces.get(workspace)
        if settings is None or settings.rollout is None:
            return ""
        mix = instances_now(registry, workspace, settings.namespace)
        if mix is None:
            return ""
        record_deploy(workspace, {"outcome": outcome, "instances": mix, "run": run_name})
    except Exception as exc:  # noqa: BLE001  # an extra for the notice: never in the way of the release or the notice
        get_run_logger().warning("could not read what %s runs after run %s (%s): %s", workspace, run_name, outcome, exc)
        return ""
    return f" The workspace runs {mix}, as its state says: the next plan rolls out from there."


_PENDING = "could not be released yet (S3 unreachable): deploy-ended releases it as soon as S3 answers"


def _approval_notice(registry: ArtifactRegistry, workspace: str, run_id: str) -> NotificationReceipt | None:
    """The run's approval notice, when the lock still names it (the run waited for approval); None when it
    does not, or S3 can't say (then the news goes to the channel as a line of its own)."""
    try:
        holder = registry.workspace_queue().holder(workspace)
    except DeployError as exc:
        get_run_logger().warning("lock of %s unread, so run %s's thread unknown: %s", workspace, run_id, exc)
        return None
    if holder is None or holder.run_id != run_id or holder.notice is None:
        return None
    return NotificationReceipt(channel=holder.notice.channel, ts=holder.notice.ts)


def _release_now(registry: ArtifactRegistry, workspace: str, run_id: str) -> bool | None:
    """Whether the run held the workspace (now released); None when S3 could not be reached."""
    try:
        return release_workspace(registry, workspace, run_id).was_holder
    except DeployError as exc:
        get_run_logger().warning("workspace %s %s (%s)", workspace, _PENDING, exc)
        return None


def _release_when_back(
    registry: ArtifactRegistry,
    notifier: Notifier,
    workspace: str,
    run_id: str,
    done: str,
) -> str:
    """The release, retried until S3 answers (for about 15 minutes; then this run fails, naming S3)."""
    patient = release_workspace.with_options(
        retries=len(RELEASE_RETRY_DELAYS), retry_delay_seconds=RELEASE_RETRY_DELAYS
    )
    try:
        released = patient(registry, workspace, run_id)
    except DeployError as exc:
        text = (
            f"The workspace lock of run {run_id} could not be released for about 15 minutes ({exc}). It holds "
            f"nothing (its run has ended), but a request queued behind it waits: run `icd-lock break {workspace}` "
            "once S3 answers."
        )
        notify(
            notifier,
            Notification(title=f"Workspace {workspace} not released", text=text, severity="critical"),
        )
        raise
    get_run_logger().info(
        "workspace %s released once S3 answered (held by this run: %s)", workspace, released.was_holder
    )
    return f"{done}; released once S3 answered"
