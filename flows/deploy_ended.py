"""deploy-ended: what a deploy run can't do for itself once it has ended badly.

Triggered (``prefect.yaml``) by a ``deploy-artifact`` run entering ``Failed`` or ``Crashed``:

* **An approval that timed out.** A suspended run holds no process, so nothing inside it notices its
  deadline; the server's pause-expiration service fails it ("paused and never resumed") within seconds.
  This flow then gives it its real final state, ``Cancelled`` named ``ApprovalTimedOut``, releases the
  workspace lock and tells operators. Nothing was applied; the stored plan stays in S3 for the record.
* **A crash** (the worker or the flow process died, or the heartbeat automation declared it a zombie).
  Its ``finally`` never ran: the lock is released here and operators are told. Terraform's own state lock
  (DynamoDB) still guards the state, and the tool died with its process (``icd/tools/process.py``).

A run that failed on a fault ended through ``finish`` and has told operators already; here it only has its
lock checked.
"""

from __future__ import annotations

from typing import cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled

from blocks.notifier import SlackNotifier
from icd.deploy import lock
from icd.notify.message import Notification, Severity
from tasks.notify import notify

TIMED_OUT = "never resumed"


@flow(name="deploy-ended")
def deploy_ended(flow_run_id: UUID, notifier_block: str = "ops-slack") -> str:
    """Finish what the deploy run ``flow_run_id`` left behind; returns what was done."""
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    state = run.state
    workspace = str(run.parameters.get("workspace", ""))
    released = _release_if_held(workspace, str(run.id)) if workspace else False
    notifier = cast(SlackNotifier, SlackNotifier.load(notifier_block))
    if state is not None and state.type == StateType.FAILED and TIMED_OUT in (state.message or ""):
        message = "no approval before the deadline; nothing applied"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelled(name="ApprovalTimedOut", message=message), force=True)
        title, text = f"Approval timed out on {workspace}", f"Run {run.name}: {message}."
        severity: Severity = "warning"
        done = "approval timed out"
    elif state is not None and state.type == StateType.CRASHED:
        title = f"Deploy run crashed on {workspace}"
        text = (
            f"Run {run.name} crashed ({state.message or 'no message'}); its workspace lock "
            f"{'was released' if released else 'was not held'}. Terraform's state lock guards the state; "
            "check the run's last log lines, then plan again."
        )
        severity, done = "critical", "crash handled"
    else:
        logger.info("run %s ended %s and has told operators itself; lock released: %s", run.name, state, released)
        return "nothing to do"
    notify(
        notifier,
        Notification(
            title=title,
            text=f"{text} Push again or re-run to plan afresh.",
            severity=severity,
            fields={"workspace": workspace, "run": run.name},
            link_url=notifier.flow_run_url(run.id),
            link_text="Open the run",
        ),
        notifier_block=notifier_block,
    )
    logger.info("run %s: %s; lock released: %s", run.name, done, released)
    return done


def _release_if_held(workspace: str, flow_run_id: str) -> bool:
    holder = lock.current_holder(workspace)
    if holder is None or holder.holder_flow_run_id != flow_run_id:
        return False
    lock.release(holder)
    return True
