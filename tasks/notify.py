"""Tell operators: the one way a flow sends a notification.

Cached per run and per notification, so a flow re-run after a suspension does not post the same message
again; retried only when Slack's failure is transient.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.notifier import SlackNotifier
from icd.errors import TransientNotificationError
from icd.notify.message import Notification, NotificationReceipt
from tasks.policies import ONCE_PER_RUN, retry_on


@task(
    name="notify",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    retries=3,
    retry_delay_seconds=[2, 5, 10],
    retry_condition_fn=retry_on(TransientNotificationError),  # a bad token or channel won't heal
)
def notify(notifier: SlackNotifier, notification: Notification) -> NotificationReceipt:
    receipt = notifier.sender().send(notification)
    get_run_logger().info("posted %s notification %r (ts %s)", notification.severity, notification.title, receipt.ts)
    return receipt
