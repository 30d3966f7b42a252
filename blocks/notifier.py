"""The Slack notifier block: where operator notifications go.

It holds configuration (a prefect-slack ``SlackCredentials`` block with the bot token as a ``SecretStr``,
the channel, the API URL so a local stand-in can replace slack.com, the Prefect UI's address for links)
and hands out a configured ``slack_sdk.WebClient`` and the sender built on it (``icd/notify/slack.py``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from prefect.blocks.core import Block
from prefect_slack import SlackCredentials  # type: ignore[import-untyped]  # ships no py.typed
from pydantic import Field, PrivateAttr
from slack_sdk import WebClient
from slack_sdk.http_retry import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler, RetryHandler

from icd.notify.slack import SERVER_ERROR_RETRIES, AnyServerErrorRetryHandler, SlackSender

_CONNECTION_RETRIES = 2
_RATE_LIMIT_RETRIES = 3


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

    _client: Any = PrivateAttr(default=None)

    def get_client(self) -> WebClient:
        """A cached ``WebClient`` with slack-sdk's retry handlers for connection errors and 429s, and ours for
        any 5xx (retried with backoff within a few seconds, before the message is handed to redelivery)."""
        if self._client is None:
            retry_handlers: list[RetryHandler] = [
                ConnectionErrorRetryHandler(max_retry_count=_CONNECTION_RETRIES),
                RateLimitErrorRetryHandler(max_retry_count=_RATE_LIMIT_RETRIES),
                AnyServerErrorRetryHandler(max_retry_count=SERVER_ERROR_RETRIES),
            ]
            self._client = WebClient(
                token=self.credentials.token.get_secret_value(),
                base_url=self.api_url,
                # slack-sdk types its timeout as int seconds; round up so a fractional setting never becomes 0.
                timeout=math.ceil(self.timeout_seconds),
                retry_handlers=retry_handlers,
            )
        return self._client  # type: ignore[no-any-return]

    def sender(self) -> SlackSender:
        """Delivers notifications to this block's channel; see ``icd/notify/slack.py``."""
        return SlackSender(self.get_client(), self.channel, api_url=self.api_url, secrets=[self.credentials.token])

    def flow_run_url(self, flow_run_id: object) -> str | None:
        """The Prefect UI page of a flow run, when ``prefect_ui_url`` is configured."""
        if not self.prefect_ui_url:
            return None
        return f"{self.prefect_ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"
