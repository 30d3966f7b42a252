"""deliver-status: one more attempt at a deployment or commit status GitHub could not take earlier.

Scheduled by ``tasks/github_status.py`` (never by hand), as ``deliver-notification`` is for Slack: each run
tries once and, when GitHub still can't take it, schedules the next attempt with a longer wait. Waiting runs
are Scheduled flow runs on the server, so no worker slot is held during an outage. A report that arrives
after a newer status of its deployment is dropped (``icd/github/deployments.py``), so a late one never turns
back what GitHub shows. The run fails when the attempt failed, so each one is visible in the UI.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from blocks.github import GITHUB_BLOCK
from icd.errors import StatusReportError
from icd.github.deployments import StatusReport
from tasks.github_status import deliver


@flow(name="deliver-status")
def deliver_status(report: dict[str, Any], attempt: int = 1, github_block: str = GITHUB_BLOCK) -> bool:
    status = StatusReport.from_dict(report)
    if not deliver(status, github_block=github_block, attempt=attempt):
        raise StatusReportError(f"attempt {attempt} did not deliver the {status.what()} (see the log)")
    get_run_logger().info("delivered the %s on attempt %d", status.what(), attempt)
    return True
