"""deliver-notification: one more attempt at a notification the operators' channel (Slack) could not take
earlier.

Scheduled by ``tasks/notify.py`` (never by hand): each run tries once and, on failure, schedules the next
attempt with a longer wait. Waiting runs are Scheduled flow runs on the server, so no worker slot is held
during an outage, and each attempt is visible in the UI with its reason. Only the channel is tried again: the
copies to the blocks icd.toml routes the message to were made (or counted as failed) with the first attempt.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from blocks.notifier import DEFAULT_NOTIFIER_BLOCK, load_notifier
from icd.errors import NotificationError
from icd.notify.message import Notification
from tasks.notify import schedule_redelivery


@flow(name="deliver-notification")
def deliver_notification(
    notification: dict[str, Any], attempt: int = 1, notifier_block: str = DEFAULT_NOTIFIER_BLOCK
) -> str:
    message = Notification.from_dict(notification)
    notifier = load_notifier(notifier_block)
    try:
        receipt = notifier.channel_sender().send(message)
    except NotificationError as exc:
        schedule_redelivery(message, notifier_block=notifier_block, attempt=attempt + 1, reason=str(exc))
        raise
    get_run_logger().info("delivered %r on attempt %d (ts %s)", message.title, attempt, receipt.ts)
    return receipt.ts
