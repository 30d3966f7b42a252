"""Tell operators: the one way a flow sends a notification. Best effort: it never decides an outcome.

Cached per run and per notification, so a flow re-run after a suspension does not post the same message
again. The notifier posts to the operators' channel and copies the message to the notification blocks
icd.toml routes its kind to (``icd/notify/routes.py``); a copy that fails is logged and counted, nothing
more. If the channel (Slack) can't take the message (an outage, a refusal), the run goes on as if it had: the
message is handed to the ``deliver-notification`` deployment as a flow run scheduled a little later, which
retries with backoff, so a Slack outage delays messages but blocks neither an approval nor a run's final
state. Only when Prefect itself can't take it either is the message lost, and then it is in the run's log.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import get_run_logger, task
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from icd.errors import NotificationError
from icd.notify.message import Notification, NotificationReceipt, Notifier
from tasks.policies import ONCE_PER_RUN

DELIVERY_DEPLOYMENT = "deliver-notification/deliver-notification"
# Waits between delivery attempts; after the last one the message is given up, loudly. A worker's
# ICD_REDELIVERY_BACKOFF_SECONDS ("30,60,120") overrides them.
REDELIVERY_BACKOFF_SECONDS = (30, 60, 120, 300, 600, 900, 1800)


def redelivery_backoff() -> tuple[int, ...]:
    configured = os.environ.get("ICD_REDELIVERY_BACKOFF_SECONDS", "")
    waits = tuple(int(part) for part in configured.split(",") if part.strip().isdigit())
    return waits or REDELIVERY_BACKOFF_SECONDS


def schedule_redelivery(notification: Notification, *, notifier_block: str | None, attempt: int, reason: str) -> bool:
    """Schedule delivery attempt ``attempt`` (1-based) through the notifier saved as ``notifier_block``; False
    when there is none left, the notifier was never saved (nothing could load it again) or Prefect refused."""
    logger = get_run_logger()
    if notifier_block is None:
        logger.error("notification %r is lost (%s): its notifier is not a saved block", notification.title, reason)
        return False
    backoff = redelivery_backoff()
    if attempt > len(backoff):
        logger.error("giving up on notification %r after %d attempts: %s", notification.title, attempt - 1, reason)
        return False
    delay = backoff[attempt - 1]
    parameters: dict[str, Any] = {
        "notification": notification.to_dict(),
        "attempt": attempt,
        "notifier_block": notifier_block,
    }
    try:
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # the sync variant, in a sync task
            DELIVERY_DEPLOYMENT,
            parameters=parameters,
            scheduled_time=datetime.now(UTC) + timedelta(seconds=delay),
            timeout=0,
            as_subflow=False,
            tags=["housekeeping"],
        )
    except Exception as exc:  # noqa: BLE001  # best effort: whatever Prefect says, the deploy goes on
        logger.error(
            "notification %r is lost (%s), and redelivery could not be scheduled: %s", notification.title, reason, exc
        )
        return False
    logger.warning(
        "notification %r not delivered (%s); retrying in %ds as run %s", notification.title, reason, delay, run.name
    )
    return True


@task(name="notify", persist_result=True, cache_policy=ONCE_PER_RUN)
def notify(
    notifier: Notifier, notification: Notification, *, reply_to: NotificationReceipt | None = None
) -> NotificationReceipt | None:
    """Post ``notification`` (``reply_to``: in the thread of that earlier message) and copy it to its kind's
    routes; when the channel can't take it, schedule its redelivery (outside the thread) and return None."""
    return notify_now(notifier, notification, reply_to=reply_to)


def notify_now(
    notifier: Notifier, notification: Notification, *, reply_to: NotificationReceipt | None = None
) -> NotificationReceipt | None:
    """:func:`notify` without its task, for the one place no task may run: a flow run that is already
    suspended (the server refuses to start a task of a paused run) and has to say how it ended."""
    try:
        receipt = notifier.sender(get_run_logger()).send(notification, reply_to=reply_to)
    except NotificationError as exc:
        schedule_redelivery(notification, notifier_block=notifier.block_name, attempt=1, reason=str(exc))
        return None
    get_run_logger().info("posted %s notification %r (ts %s)", notification.severity, notification.title, receipt.ts)
    return receipt


@task(name="update-notice", persist_result=True, cache_policy=ONCE_PER_RUN)
def update_notice(notifier: Notifier, receipt: NotificationReceipt, notification: Notification) -> bool:
    """Rewrite the message ``receipt`` names as ``notification``, in place (a deploy run's approval notice,
    once it has ended). Best effort: False, and a log line, when the channel can't (the message was deleted,
    Slack is down); the thread below it still tells everything."""
    return update_notice_now(notifier, receipt, notification)


def update_notice_now(notifier: Notifier, receipt: NotificationReceipt, notification: Notification) -> bool:
    """:func:`update_notice` without its task, for a flow run that is already suspended."""
    try:
        notifier.channel_sender().update(receipt, notification)
    except NotificationError as exc:
        get_run_logger().warning("message %s not updated to %r: %s", receipt.ts, notification.title, exc)
        return False
    get_run_logger().info("updated message %s: %r", receipt.ts, notification.title)
    return True
