"""Notifications on Slack: Block Kit rendering (slack-sdk's own models) and the one place that posts.

Rendering is pure and tested as tables. Every text is escaped for mrkdwn (``icd/text.py``) and secrets are
redacted before anything leaves the process. :class:`SlackSender` posts through a configured
``slack_sdk.WebClient`` (the ``SlackNotifier`` block hands one out); slack-sdk's own retry handlers absorb
short connection blips and rate limits, :class:`AnyServerErrorRetryHandler` a burst of 5xx answers, and
whatever is left surfaces as our ``NotificationError`` (``TransientNotificationError`` when a later retry
may succeed).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any
from urllib.error import URLError

from pydantic import SecretStr
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry import Jitter, RetryHandler, RetryState
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)
from slack_sdk.web import SlackResponse

from icd.errors import NotificationError, TransientNotificationError
from icd.notify.message import (
    SEVERITY_STYLES,
    Action,
    Notification,
    NotificationReceipt,
    redact_notification,
    redact_text,
)
from icd.text import slack_mrkdwn

# Block Kit limits (https://api.slack.com/reference/block-kit/blocks); Slack rejects longer values outright.
_HEADER_MAX = 150
_SECTION_TEXT_MAX = 3000
_FIELD_TEXT_MAX = 2000
_FIELDS_PER_SECTION = 10
_BUTTON_TEXT_MAX = 75
_FALLBACK_MAX = 3000


# A 5xx from Slack is mostly over within seconds: retried 3 times, after about 0.5, 1 and 2 s (each plus up to
# 0.25 s of jitter), so a burst costs at most about 4.3 s before the message goes to redelivery (30 s later).
SERVER_ERROR_RETRIES = 3
SERVER_ERROR_BACKOFF_FACTOR = 0.5
_SERVER_ERROR_JITTER_SECONDS = 0.25


class _SmallJitter(Jitter):
    """slack-sdk's default jitter adds up to a whole second per retry; a quarter is enough to spread senders."""

    def recalculate(self, duration: float) -> float:
        return duration + random.uniform(0, _SERVER_ERROR_JITTER_SECONDS)  # noqa: S311  # jitter, not a secret


class AnyServerErrorRetryHandler(RetryHandler):
    """Retries any 5xx with exponential backoff. slack-sdk's ``ServerErrorRetryHandler`` takes only 500 and
    503, but a 502 or 504 from Slack's edge is as passing."""

    def __init__(self, max_retry_count: int = SERVER_ERROR_RETRIES) -> None:
        super().__init__(
            max_retry_count,
            BackoffRetryIntervalCalculator(backoff_factor=SERVER_ERROR_BACKOFF_FACTOR, jitter=_SmallJitter()),
        )

    def _can_retry(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        return response is not None and 500 <= response.status_code < 600


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# What Slack sends back when a button is clicked: ``icd.<Action.id>`` (icd/interactions/ acts on it). A link
# button sends a click too (Slack acknowledges it like any other); the endpoint ignores it.
ACTION_ID_PREFIX = "icd."
LINK_ACTION_ID = "icd-link"
ACTIONS_BLOCK_ID = "icd-actions"
_CONFIRM_TEXT_MAX = 300
_CONFIRM_TITLE_MAX = 100
_CONFIRM_BUTTON_MAX = 30
_VALUE_MAX = 2000


def _action_button(action: Action) -> ButtonElement:
    """A button for ``action``, with its "are you sure?" dialog when it has one."""
    if len(action.value) > _VALUE_MAX:
        raise ValueError(f"the value of action {action.id!r} is longer than Slack's {_VALUE_MAX} characters")
    confirm = None
    if action.confirm is not None:
        confirm = ConfirmObject(
            title=PlainTextObject(text=_clip(action.confirm.title, _CONFIRM_TITLE_MAX)),
            text=MarkdownTextObject(text=_clip(slack_mrkdwn(action.confirm.text), _CONFIRM_TEXT_MAX)),
            confirm=PlainTextObject(text=_clip(action.confirm.confirm, _CONFIRM_BUTTON_MAX)),
            deny=PlainTextObject(text=_clip(action.confirm.deny, _CONFIRM_BUTTON_MAX)),
            style=action.style if action.style == "danger" else None,
        )
    return ButtonElement(
        text=PlainTextObject(text=_clip(action.label, _BUTTON_TEXT_MAX)),
        action_id=f"{ACTION_ID_PREFIX}{action.id}",
        value=action.value,
        style=action.style,
        confirm=confirm,
    )


def render_blocks(notification: Notification) -> list[Block]:
    """The Block Kit blocks of one notification: header, text, fact grid, link button, severity."""
    style = SEVERITY_STYLES[notification.severity]
    blocks: list[Block] = [
        HeaderBlock(text=PlainTextObject(text=_clip(f"{style.emoji} {notification.title}", _HEADER_MAX), emoji=True)),
        SectionBlock(text=MarkdownTextObject(text=_clip(slack_mrkdwn(notification.text), _SECTION_TEXT_MAX))),
    ]
    facts = [
        MarkdownTextObject(text=_clip(f"*{slack_mrkdwn(key)}*\n{slack_mrkdwn(value)}", _FIELD_TEXT_MAX))
        for key, value in notification.fields.items()
    ]
    for start in range(0, len(facts), _FIELDS_PER_SECTION):
        blocks.append(SectionBlock(fields=facts[start : start + _FIELDS_PER_SECTION]))
    buttons = [_action_button(action) for action in notification.actions]
    if notification.link_url:
        buttons.append(
            ButtonElement(
                text=PlainTextObject(text=_clip(notification.link_text or "Open", _BUTTON_TEXT_MAX)),
                url=notification.link_url,
                action_id=LINK_ACTION_ID,
            )
        )
    if buttons:
        blocks.append(ActionsBlock(block_id=ACTIONS_BLOCK_ID, elements=buttons))
    blocks.append(ContextBlock(elements=[MarkdownTextObject(text=f"severity: *{notification.severity}*")]))
    return blocks


def render_slack_message(notification: Notification) -> tuple[str, list[dict[str, Any]]]:
    """The fallback text (push notifications, screen readers) and the blocks as Slack's JSON."""
    style = SEVERITY_STYLES[notification.severity]
    fallback = slack_mrkdwn(f"{style.emoji} [{style.label}] {notification.title}: {notification.text}")
    return _clip(fallback, _FALLBACK_MAX), [block.to_dict() for block in render_blocks(notification)]


def metadata_of(notification: Notification) -> dict[str, Any] | None:
    """Message metadata that lets a receiver (or a later reader of the channel) drop exact repeats and group
    the messages of one thing (a deploy run's ``thread_key``)."""
    if notification.dedup_key is None and notification.thread_key is None:
        return None
    payload: dict[str, Any] = {"severity": notification.severity}
    if notification.dedup_key is not None:
        payload["dedup_key"] = notification.dedup_key
    if notification.thread_key is not None:
        payload["thread_key"] = notification.thread_key
    return {"event_type": "icd_notification", "event_payload": payload}


class SlackSender:
    """Posts notifications to one channel through a configured client; the token never leaves it."""

    def __init__(
        self,
        client: WebClient,
        channel: str,
        *,
        api_url: str,
        secrets: Sequence[str | SecretStr] = (),
        buttons: bool = True,
    ) -> None:
        self.client = client
        # Without a Slack app to receive clicks, a button would only show the clicker an error: left out.
        self.buttons = buttons
        self.channel = channel
        self.api_url = api_url
        self._secrets = [s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets]
        if client.token:
            self._secrets.append(client.token)

    def send(
        self,
        notification: Notification,
        *,
        extra_secrets: Sequence[str | SecretStr] = (),
        reply_to: NotificationReceipt | None = None,
    ) -> NotificationReceipt:
        """Redact, render and post (``reply_to``: in the thread of that earlier message); raises
        ``TransientNotificationError`` when Slack is unreachable, still rate limiting after the client's
        retries, or failing with 5xx; ``NotificationError`` when it refuses (bad token, unknown channel,
        malformed blocks). Neither message ever contains the token."""
        secrets = [*self._secrets, *(s.get_secret_value() if isinstance(s, SecretStr) else s for s in extra_secrets)]
        fallback, blocks = render_slack_message(redact_notification(self._drawable(notification), secrets))
        response = self._call(
            "chat.postMessage",
            secrets,
            lambda: self.client.chat_postMessage(
                channel=reply_to.channel if reply_to else self.channel,
                text=fallback,
                blocks=blocks,
                metadata=metadata_of(notification),
                thread_ts=reply_to.ts if reply_to else None,
            ),
        )
        return NotificationReceipt(channel=str(response["channel"]), ts=str(response["ts"]))

    def update(self, receipt: NotificationReceipt, notification: Notification) -> None:
        """Replace the message ``receipt`` names with ``notification``, in place (``chat.update``): its text
        and blocks, so a button that no longer applies goes. Raises as :meth:`send` does; Slack refuses with
        ``message_not_found`` (deleted) or ``cant_update_message`` (not posted by this bot)."""
        fallback, blocks = render_slack_message(redact_notification(self._drawable(notification), self._secrets))
        self._call(
            "chat.update",
            self._secrets,
            lambda: self.client.chat_update(channel=receipt.channel, ts=receipt.ts, text=fallback, blocks=blocks),
        )

    def _drawable(self, notification: Notification) -> Notification:
        return notification if self.buttons else dataclasses.replace(notification, actions=())

    def _call(self, method: str, secrets: Sequence[str], call: Callable[[], SlackResponse]) -> SlackResponse:
        """``call()``, its failures as our errors (see :meth:`send`); no message ever contains the token."""
        try:
            return call()
        except SlackApiError as exc:
            status = exc.response.status_code
            data = exc.response.data
            code = data.get("error", "unknown_error") if isinstance(data, dict) else "unknown_error"
            message = redact_text(f"Slack {method} to {self.channel} failed: {code} (HTTP {status})", secrets)
            if status == 429 or status >= 500:
                raise TransientNotificationError(message) from exc
            raise NotificationError(message) from exc
        except (URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            message = redact_text(f"Slack API at {self.api_url} unreachable for {method}: {reason}", secrets)
            raise TransientNotificationError(message) from exc
        except SlackClientError as exc:
            message = redact_text(f"Slack {method} to {self.channel} failed: {exc}", secrets)
            raise NotificationError(message) from exc
