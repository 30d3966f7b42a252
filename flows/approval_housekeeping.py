"""approval-housekeeping: end push-to-deploy runs whose approval wait timed out.

A suspended run holds no process, so nothing inside it can notice that its approval deadline passed: the
server only refuses a late resume. This scheduled flow is what notices. For each push-to-deploy run still
paused after its deadline it sets the final state ``Cancelled`` named ``ApprovalTimedOut``, releases the
run's workspace lock (its lease would also expire on its own, later), and tells operators. Nothing is
applied; the stored plan stays in S3 for the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled

from blocks.notifier import SlackNotifier
from icd.deploy import lock
from icd.notify.message import Notification
from tasks.notify import notify

DEPLOY_FLOW_NAME = "push-to-deploy"


@dataclass(frozen=True)
class TimedOutRun:
    flow_run_id: str
    flow_run_name: str
    workspace: str
    lock_released: bool


def _expired(run: FlowRun, now: datetime) -> bool:
    """Still paused past its deadline, or already failed by the server for it (not yet handled by us).

    The server itself fails a suspended run whose deadline passed as soon as anything proposes a new state
    for it ("The flow was paused and never resumed."), but it neither releases our lock nor tells anyone.
    """
    if run.state is None:
        return False
    if run.state.type == StateType.FAILED:
        return "never resumed" in (run.state.message or "")
    deadline = run.state.state_details.pause_timeout
    return deadline is not None and deadline < now


def expire_timed_out_approvals(notifier: SlackNotifier | None, *, now: datetime | None = None) -> list[TimedOutRun]:
    logger = get_run_logger()
    now = now or datetime.now(UTC)
    with get_client(sync_client=True) as client:
        candidates = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[DEPLOY_FLOW_NAME])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED, StateType.FAILED]))
            ),
            limit=200,
        )
        ended: list[TimedOutRun] = []
        for run in candidates:
            if not _expired(run, now):
                continue
            workspace = str(run.parameters.get("workspace", "staging"))
            message = "no approval before the deadline; nothing applied"
            client.set_flow_run_state(run.id, Cancelled(name="ApprovalTimedOut", message=message), force=True)
            holder = lock.current_holder(workspace)
            released = holder is not None and holder.holder_flow_run_id == str(run.id)
            if holder is not None and released:
                lock.release(holder)
            logger.info("run %s (%s): approval timed out; lock released: %s", run.name, run.id, released)
            if notifier is not None:
                notify(
                    notifier,
                    Notification(
                        title=f"Approval timed out on {workspace}",
                        text=f"Run {run.name}: {message}. Push again or re-run to plan afresh.",
                        severity="warning",
                        fields={"workspace": workspace, "run": run.name},
                        link_url=notifier.flow_run_url(run.id),
                        link_text="Open the run",
                    ),
                )
            ended.append(TimedOutRun(str(run.id), run.name, workspace, released))
    return ended


@flow(name="approval-housekeeping")
def approval_housekeeping(notifier_block: str = "ops-slack") -> list[TimedOutRun]:
    """Cancel push-to-deploy runs whose approval deadline passed, release their locks, notify."""
    return expire_timed_out_approvals(cast(SlackNotifier, SlackNotifier.load(notifier_block)))
