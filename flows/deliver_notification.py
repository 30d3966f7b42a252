"""deliver-notification: one more attempt at a notification Slack could not take earlier.

Scheduled by ``tasks/notify.py`` (never by hand): each run tries once and, on failure, schedules the next
attempt with a longer wait. Waiting runs are Scheduled flow runs on the server, so no worker slot is held
during an outage, and each attempt is visible in the UI with its reason.
"""

from __future__ import annotations

from typing import Any, cast

from prefect import flow, get_run_logger

from blocks.notifier import SlackNotifier
from icd.errors import NotificationError
from icd.notify.message import Notification
from tasks.notify import schedule_redelivery


@flow(name="deliver-notification")
def deliver_notification(notification: dict[str, Any], attempt: int = 1, notifier_block: str = "ops-slack") -> str:
    message = Notification(**notification)
    notifier = cast(SlackNotifier, SlackNotifier.load(notifier_block))
    try:
        receipt = notifier.sender().send(message)
    except NotificationError as exc:
        schedule_redelivery(message, notifier_block=notifier_block, attempt=attempt + 1, reason=str(exc))
        raise
    get_run_logger().info("delivered %r on attempt %d (ts %s)", message.title, attempt, receipt.ts)
    return receipt.ts
