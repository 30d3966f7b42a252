"""The Slack notifier block: where operator notifications go, and the one place that talks to Slack.

It holds configuration (a prefect-slack ``SlackCredentials`` block with the bot token as a ``SecretStr``,
the channel, the API URL so a local stand-in can replace slack.com) and hands out a configured
``slack_sdk.WebClient``. ``send`` redacts secrets, renders Block Kit and posts; slack-sdk's own retry
handlers absorb short connection blips, rate limits and 5xx answers, and whatever is left surfaces as our
``NotificationError`` (``TransientNotificationError`` when a later retry may succeed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.error import URLError

from prefect.blocks.core import Block
from prefect_slack import SlackCredentials  # type: ignore[import-untyped]  # ships no py.typed
from pydantic import Field, SecretStr
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    RetryHandler,
)
from slack_sdk.http_retry.builtin_handlers import ServerErrorRetryHandler

from tasks.errors import NotificationError, TransientNotificationError
from tasks.notifications import (
    Notification,
    NotificationReceipt,
    redact_notification,
    redact_text,
    render_slack_message,
)

_CONNECTION_RETRIES = 2
_RATE_LIMIT_RETRIES = 3
_SERVER_ERROR_RETRIES = 1


class SlackNotifier(Block):
    """Posts operator notifications (deploys, approvals, health) to one Slack channel."""

    _block_type_name: ClassVar[str | None] = "Slack Notifier"
    _description: ClassVar[str | None] = "Posts deploy and health notifications to a Slack channel."

    credentials: SlackCredentials = Field(description="prefect-slack credentials holding the bot token.")
    channel: str = Field(description="Channel name (#ops) or ID (C0123...) to post to.")
    api_url: str = Field(
        default="https://slack.com/api/",
        description="Slack Web API base URL; point it at a local stand-in for tests and demos.",
    )
    prefect_ui_url: str | None = Field(
        default=None, description="Prefect UI base URL, used to link notifications to flow runs."
    )
    timeout_seconds: float = Field(default=10, gt=0, description="Per-request timeout for Slack calls.")

    def get_client(self) -> WebClient:
        """A ``WebClient`` with slack-sdk's retry handlers for connection errors, 429s and 500/503."""
        retry_handlers: list[RetryHandler] = [
            ConnectionErrorRetryHandler(max_retry_count=_CONNECTION_RETRIES),
            RateLimitErrorRetryHandler(max_retry_count=_RATE_LIMIT_RETRIES),
            ServerErrorRetryHandler(max_retry_count=_SERVER_ERROR_RETRIES),
        ]
        return WebClient(
            token=self.credentials.token.get_secret_value(),
            base_url=self.api_url,
            # slack-sdk types its timeout as int seconds; round up so a fractional setting never becomes 0.
            timeout=math.ceil(self.timeout_seconds),
            retry_handlers=retry_handlers,
        )

    def flow_run_url(self, flow_run_id: object) -> str | None:
        """The Prefect UI page of a flow run, when ``prefect_ui_url`` is configured."""
        if not self.prefect_ui_url:
            return None
        return f"{self.prefect_ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"

    def send(self, notification: Notification, *, extra_secrets: Sequence[str | SecretStr] = ()) -> NotificationReceipt:
        """Redact, render and post ``notification``; returns where Slack put it.

        Raises ``TransientNotificationError`` when Slack is unreachable, still rate limiting after the
        client's retries, or failing with 5xx; ``NotificationError`` when it refuses (bad token, unknown
        channel, malformed blocks). Neither message ever contains the token.
        """
        secrets = [self.credentials.token, *extra_secrets]
        fallback, blocks = render_slack_message(redact_notification(notification, secrets))
        metadata: dict[str, Any] | None = None
        if notification.dedup_key is not None:
            # Message metadata lets a receiver (or a later reader of the channel) drop exact repeats.
            metadata = {
                "event_type": "icd_notification",
                "event_payload": {"dedup_key": notification.dedup_key, "severity": notification.severity},
            }
        return self._post_message(text=fallback, blocks=blocks, metadata=metadata)

    def send_text(self, text: str, *, extra_secrets: Sequence[str | SecretStr] = ()) -> NotificationReceipt:
        """Post a plain mrkdwn line, redacted like ``send``; for quick operator pings."""
        secrets = [self.credentials.token, *extra_secrets]
        plain = [s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets]
        return self._post_message(text=redact_text(text, plain))

    def _post_message(
        self,
        *,
        text: str,
        blocks: list[dict[str, Any]] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> NotificationReceipt:
        method = "chat.postMessage"
        token = self.credentials.token.get_secret_value()
        try:
            response = self.get_client().chat_postMessage(
                channel=self.channel, text=text, blocks=blocks, metadata=metadata
            )
        except SlackApiError as exc:
            status = exc.response.status_code
            data = exc.response.data
            code = data.get("error", "unknown_error") if isinstance(data, dict) else "unknown_error"
            message = redact_text(f"Slack {method} to {self.channel} failed: {code} (HTTP {status})", [token])
            if status == 429 or status >= 500:
                raise TransientNotificationError(message) from exc
            raise NotificationError(message) from exc
        except (URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            message = redact_text(f"Slack API at {self.api_url} unreachable for {method}: {reason}", [token])
            raise TransientNotificationError(message) from exc
        except SlackClientError as exc:
            message = redact_text(f"Slack {method} to {self.channel} failed: {exc}", [token])
            raise NotificationError(message) from exc
        return NotificationReceipt(channel=str(response["channel"]), ts=str(response["ts"]))
