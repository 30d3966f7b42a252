"""Operator notifications: the message model, its Slack rendering, secret redaction and the Prefect task.

Rendering and redaction are pure functions so they can be tested as tables; talking to Slack is the
``SlackNotifier`` block's job (``blocks/notifier.py``), and ``send_notification`` is the task flows call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from pydantic import SecretStr

from tasks.errors import TransientNotificationError
from tasks.retries import retry_on

if TYPE_CHECKING:
    from blocks.notifier import SlackNotifier

Severity = Literal["info", "success", "warning", "critical"]
REDACTED = "***"

# Block Kit limits (https://api.slack.com/reference/block-kit/blocks); Slack rejects longer values outright.
_HEADER_MAX = 150
_SECTION_TEXT_MAX = 3000
_FIELD_TEXT_MAX = 2000
_FIELDS_PER_SECTION = 10
_BUTTON_TEXT_MAX = 75
_FALLBACK_MAX = 3000


@dataclass(frozen=True)
class SeverityStyle:
    emoji: str
    # Block Kit blocks carry no colour; this is for attachment-based receivers and the docs table.
    colour: str
    label: str


SEVERITY_STYLES: Mapping[Severity, SeverityStyle] = MappingProxyType(
    {
        "info": SeverityStyle(":information_source:", "#439FE0", "Info"),
        "success": SeverityStyle(":white_check_mark:", "#2EB67D", "Success"),
        "warning": SeverityStyle(":warning:", "#ECB22E", "Warning"),
        "critical": SeverityStyle(":rotating_light:", "#E01E5A", "Critical"),
    }
)


@dataclass(frozen=True)
class Notification:
    """One operator-facing message. ``text`` is Slack mrkdwn; ``fields`` are short facts shown as a grid."""

    title: str
    text: str
    severity: Severity
    fields: Mapping[str, str] = field(default_factory=dict)
    link_url: str | None = None
    link_text: str | None = None
    # Same key, same channel: the task returns the first receipt instead of posting again (see below).
    dedup_key: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_STYLES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {sorted(SEVERITY_STYLES)}")


@dataclass(frozen=True)
class NotificationReceipt:
    """Where Slack put the message: the channel ID and the message timestamp (its ID within the channel)."""

    channel: str
    ts: str


# --- pure functions -----------------------------------------------------------------------------------


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each non-empty secret with ``***``; longest first so none leaks partly."""
    for secret in sorted({s for s in secrets if s.strip()}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact_notification(notification: Notification, secrets: Iterable[str | SecretStr]) -> Notification:
    """A copy of ``notification`` with every secret value removed from everything a human will see."""
    plain = [s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets]

    def clean(value: str) -> str:
        return redact_text(value, plain)

    return dataclasses.replace(
        notification,
        title=clean(notification.title),
        text=clean(notification.text),
        fields={clean(key): clean(value) for key, value in notification.fields.items()},
        link_url=clean(notification.link_url) if notification.link_url is not None else None,
        link_text=clean(notification.link_text) if notification.link_text is not None else None,
    )


def render_slack_message(notification: Notification) -> tuple[str, list[dict[str, Any]]]:
    """The fallback text (shown in push notifications and screen readers) and the Block Kit blocks."""
    style = SEVERITY_STYLES[notification.severity]
    fallback = _clip(f"{style.emoji} [{style.label}] {notification.title}: {notification.text}", _FALLBACK_MAX)
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": _clip(f"{style.emoji} {notification.title}", _HEADER_MAX),
                "emoji": True,
            },
        },
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(notification.text, _SECTION_TEXT_MAX)}},
    ]
    facts = [
        {"type": "mrkdwn", "text": _clip(f"*{_escape(key)}*\n{_escape(value)}", _FIELD_TEXT_MAX)}
        for key, value in notification.fields.items()
    ]
    for start in range(0, len(facts), _FIELDS_PER_SECTION):
        blocks.append({"type": "section", "fields": facts[start : start + _FIELDS_PER_SECTION]})
    if notification.link_url:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {
                            "type": "plain_text",
                            "text": _clip(notification.link_text or "Open", _BUTTON_TEXT_MAX),
                        },
                        "url": notification.link_url,
                    }
                ],
            }
        )
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": f"severity: *{notification.severity}*"}],
        }
    )
    return fallback, blocks


def _escape(text: str) -> str:
    # Slack mrkdwn treats these three as control characters; facts are plain values, not markup.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the task -----------------------------------------------------------------------------------------


def _dedup_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    notification: Notification = parameters["notification"]
    if notification.dedup_key is None:
        return None
    notifier: SlackNotifier = parameters["notifier"]
    return f"slack-notification/{notifier.channel}/{notification.dedup_key}"


@task(
    name="send-notification",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_on(TransientNotificationError),  # a bad token or channel won't heal
    # A flow re-run after suspend_flow_run re-executes from the top; the dedup key keeps it from re-posting.
    cache_key_fn=_dedup_cache_key,
    cache_expiration=timedelta(days=2),
)
def send_notification(
    notifier: SlackNotifier,
    notification: Notification,
    extra_secrets: Sequence[str | SecretStr] = (),
) -> NotificationReceipt:
    """Post ``notification`` through ``notifier``; raises ``NotificationError`` (transient ones retried)."""
    logger = get_run_logger()
    receipt = notifier.send(notification, extra_secrets=extra_secrets)
    logger.info(
        "Posted %s notification %r to %s (ts %s)",
        notification.severity,
        redact_notification(notification, [notifier.credentials.token, *extra_secrets]).title,
        receipt.channel,
        receipt.ts,
    )
    return receipt
