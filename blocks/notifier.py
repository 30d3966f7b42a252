"""Where operator notifications go: the notifier (the operators' Slack channel) and the notification blocks
``[notifications]`` of icd.toml routes each kind of message to.

Flows and tasks load a notifier with :func:`load_notifier` and speak to it through the ``Notifier`` protocol
(``icd/notify/message.py``); :class:`SlackNotifier` is the one there is. It holds configuration (a
prefect-slack ``SlackCredentials`` block with the bot token as a ``SecretStr``, the channel, the API URL so a
local stand-in can replace slack.com) and knows the name it was saved under, so a message it could not send
can be redelivered through it. Its sender also copies each message, as plain text, to the notification
blocks routed for its kind (``icd/notify/routes.py``): any Prefect ``NotificationBlock`` (Microsoft Teams,
PagerDuty, a custom webhook), or :class:`AppriseNotification` for any Apprise URL (e-mail over SMTP:
``mailto://``/``mailtos://``).

The Prefect UI's address is a site setting (``[site] prefect_ui_url``, else ``PREFECT_UI_URL``); a Slack
block saved with ``prefect_ui_url`` before it moved keeps working.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit

import prefect.blocks.notifications  # noqa: F401  # registers Prefect's notification block types for loading
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.blocks.notifications import AppriseNotificationBlock
from prefect.settings import get_current_settings
from prefect.types import SecretDict
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect_slack import SlackCredentials  # type: ignore[import-untyped]  # ships no py.typed
from pydantic import Field, PrivateAttr, SecretStr
from slack_sdk import WebClient
from slack_sdk.http_retry import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler, RetryHandler

from icd.config import load_config
from icd.errors import ConfigError, NotificationError
from icd.notify.message import MessageKind, Notifier
from icd.notify.routes import PlainOutlet, RoutedSender
from icd.notify.slack import SERVER_ERROR_RETRIES, AnyServerErrorRetryHandler, SlackSender

_LOG = logging.getLogger(__name__)
DEFAULT_NOTIFIER_BLOCK = "ops-slack"

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
        default=None,
        description="Deprecated: set [site] prefect_ui_url in icd.toml (or PREFECT_UI_URL). Used when neither is.",
    )
    timeout_seconds: float = Field(default=10, gt=0, description="Per-request timeout for Slack calls.")
    buttons: bool = Field(
        default=False,
        description="Messages carry Approve/Reject and alert buttons: the Slack app sends clicks to icd-inbound "
        "(its interactivity URL, or Socket Mode). Off: messages link to the Prefect UI only.",
    )

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

    @property
    def block_name(self) -> str | None:
        """The name this block was saved under and loaded by; None for one built in memory."""
        return self._block_document_name

    def channel_sender(self) -> SlackSender:
        """Delivers notifications to this block's channel only; see ``icd/notify/slack.py``."""
        return SlackSender(
            self.get_client(),
            self.channel,
            api_url=self.api_url,
            secrets=[self.credentials.token],
            buttons=self.buttons,
        )

    def sender(self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None) -> RoutedSender:
        """Delivers to the channel and copies each message to the blocks icd.toml routes its kind to. With
        icd.toml unreadable (a run that ends because of it) the channel alone is told."""
        log = logger or _LOG
        try:
            routes: dict[MessageKind, list[str]] = load_config().notifications.by_kind()
        except ConfigError as exc:
            log.warning("notifications go to Slack only: %s", exc)
            routes = {}
        return RoutedSender(self.channel_sender(), routes, open_outlet, secrets=[self.credentials.token], logger=log)

    @property
    def ui_url(self) -> str | None:
        """The Prefect UI's address: ``[site] prefect_ui_url`` of icd.toml, else ``PREFECT_UI_URL`` when set,
        else this block's own (deprecated) ``prefect_ui_url``."""
        try:
            configured = load_config().site.prefect_ui_url
        except ConfigError:
            configured = None
        settings = get_current_settings()
        # Prefect derives ui_url from the API URL when it is not set; only a setting someone made counts.
        from_prefect = settings.ui_url if "ui_url" in settings.model_fields_set else None
        return configured or from_prefect or self.prefect_ui_url

    def flow_run_url(self, flow_run_id: object) -> str | None:
        """The Prefect UI page of a flow run, when the UI's address is configured."""
        ui_url = self.ui_url
        if not ui_url:
            return None
        return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}"


class AppriseNotification(AppriseNotificationBlock):
    """Sends a notification to any Apprise URL: e-mail (``mailto://`` and ``mailtos://``), Microsoft Teams,
    PagerDuty, ntfy, a JSON webhook... (https://github.com/caronc/apprise/wiki). The URL holds the
    credentials, so it is a secret."""

    _block_type_name: ClassVar[str] = "Apprise Notification"
    _block_type_slug: ClassVar[str] = "apprise-notification"
    _description: ClassVar[str] = "Sends notifications to any Apprise URL, e-mail over SMTP included."

    url: SecretStr = Field(
        default=...,
        title="Apprise URL",
        description="Where to send, as an Apprise URL; e-mail: mailtos://user:password@smtp.example.com?to=ops@example.com",
        examples=["mailtos://icd:app-password@smtp.example.com:587?from=icd@example.com&to=ops@example.com"],
    )

    def _start_apprise_client(self, url: SecretStr) -> None:
        # Prefect's client leaves the body's format unsaid, so Apprise takes it for HTML: an e-mail's text part
        # lost its line breaks and ``***``. Our bodies are plain text; Apprise converts them where HTML is due.
        from apprise import Apprise, AppriseAsset, NotifyFormat  # as Prefect does: apprise loads on first use

        asset = AppriseAsset(app_id="Prefect Notifications", app_desc="icd", body_format=NotifyFormat.TEXT)
        self._apprise_client = Apprise(asset=asset)
        self._apprise_client.add(url.get_secret_value())


class _Outlet:
    """A notification block that raises when it fails (Prefect's blocks only log by default)."""

    def __init__(self, block: NotificationBlock) -> None:
        self.block = block

    def notify(self, body: str, subject: str | None = None) -> None:
        with self.block.raise_on_failure():
            # Prefect's own blocks answer a sync call synchronously (``async_dispatch``); a block whose notify
            # is only async hands back a coroutine, run here.
            sent: object = self.block.notify(body, subject)
            if inspect.iscoroutine(sent):
                run_coro_as_sync(sent)


def _secret_values(block: Block) -> list[str]:
    """Every secret a block holds, and the password inside a secret URL, to keep them out of messages."""
    values: list[str] = []
    for name in type(block).model_fields:
        value = getattr(block, name)
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            values.append(secret)
            try:
                password = urlsplit(secret).password
            except ValueError:
                password = None
            if password:
                values.append(password)
        elif isinstance(value, SecretDict):
            values += [str(item) for item in value.get_secret_value().values()]
    return values


def outlet_of(block: NotificationBlock) -> tuple[PlainOutlet, list[str]]:
    """A notification block as a route's outlet (raising when it fails), and the secrets it holds."""
    return _Outlet(block), _secret_values(block)


def open_outlet(route: str) -> tuple[PlainOutlet, list[str]]:
    """The notification block a route of icd.toml names ("<block type slug>/<block name>"), and its secrets."""
    block = Block.load(route)
    if not isinstance(block, NotificationBlock):
        raise NotificationError(f"block {route} is a {type(block).__name__}, not a notification block")
    return outlet_of(block)


def load_notifier(block_name: str = DEFAULT_NOTIFIER_BLOCK) -> Notifier:
    """The notifier saved as ``block_name`` (a Slack Notifier block)."""
    return cast(SlackNotifier, SlackNotifier.load(block_name))
