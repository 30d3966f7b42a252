"""Every operator message, also through the notification blocks the operators route its kind to.

The operators' channel (Slack) is the primary: its receipt threads later messages, and a message it can't
take is redelivered. Each kind of message (``MessageKind``) can also go to any number of Prefect notification
blocks (e-mail, Microsoft Teams, PagerDuty, a webhook), named in ``[notifications]`` of icd.toml. Those get
the message as plain text, a one-line subject and a body, with no Slack markup and every secret redacted.

A copy is best effort: one that fails (its block is missing, the mail server refuses) is logged and
counted, and never stops the primary delivery or the run. Each copy is made once per sender, even when the
primary is asked again to send the same message (the health watch re-sends an outbox Slack did not take);
a later run re-sending an old outbox copies it again, as the primary's own delivery is at least once.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import SecretStr

from icd.notify.message import (
    SEVERITY_STYLES,
    MessageKind,
    Notification,
    NotificationReceipt,
    Sender,
    redact_notification,
    redact_text,
)

SUBJECT_MAX = 200
_LOG = logging.getLogger(__name__)
# Slack's emphasis around a word or phrase: *bold*, _italic_, ~strike~. Backticks stay: in plain text they
# still mark a command to copy.
# A run of markers alone is text (``***``, what a redacted secret became).
_EMPHASIS = re.compile(r"(?<![\w*_~])([*_~])(?=[^\s*_~])(.+?)(?<=[^\s*_~])\1(?![\w*_~])")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_KEEP_IN_BODY = {"\n", "\t"}


class PlainOutlet(Protocol):
    """What takes a plain-text message: Prefect's ``NotificationBlock.notify`` has this shape."""

    def notify(self, body: str, subject: str | None = None) -> None: ...


def plain_text(text: str) -> str:
    """``text`` without Slack's emphasis markers or invisible control characters; line breaks stay."""
    text = _EMPHASIS.sub(r"\2", text)
    return "".join(ch for ch in text if ch in _KEEP_IN_BODY or unicodedata.category(ch) not in {"Cc", "Cf"})


def render_plain(notification: Notification) -> tuple[str, str]:
    """The subject (one line) and body of ``notification`` as plain text: the text, each fact on its line,
    the link written out, the severity and kind."""
    style = SEVERITY_STYLES[notification.severity]
    subject = _LINE_BREAKS.sub(" ", plain_text(f"[{style.label}] {notification.title}")).strip()
    if len(subject) > SUBJECT_MAX:
        subject = subject[: SUBJECT_MAX - 1] + "…"
    lines = [plain_text(notification.text), ""]
    lines += [f"{plain_text(key)}: {plain_text(value)}" for key, value in notification.fields.items()]
    if notification.thread_key:
        lines.append(f"thread: {plain_text(notification.thread_key)}")
    if notification.link_url:
        lines += ["", f"{plain_text(notification.link_text or 'Open')}: {notification.link_url}"]
    lines += ["", f"severity: {notification.severity} · kind: {notification.kind}"]
    return subject, "\n".join(lines).strip() + "\n"


@dataclass
class CopyReport:
    """The copies of one message: the routes that took it and, for each that did not, why."""

    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


OutletOpener = Callable[[str], tuple[PlainOutlet, Sequence[str]]]


class RoutedSender:
    """Sends to the primary channel, then a plain-text copy to each route of the message's kind.

    ``open_outlet(route)`` gives the notification block a route names and the secret values it holds (kept
    out of what is sent, with ``secrets``). ``failed_copies`` counts copies that failed, over this sender's
    life.
    """

    def __init__(
        self,
        primary: Sender,
        routes: Mapping[MessageKind, Sequence[str]],
        open_outlet: OutletOpener,
        *,
        secrets: Iterable[str | SecretStr] = (),
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self.primary = primary
        self.routes = routes
        self.open_outlet = open_outlet
        self.secrets = [s.get_secret_value() if isinstance(s, SecretStr) else s for s in secrets]
        self.logger = logger or _LOG
        self.failed_copies = 0
        self._copied: set[tuple[str, str]] = set()
        self._outlets: dict[str, tuple[PlainOutlet, Sequence[str]]] = {}

    def send(self, notification: Notification, *, reply_to: NotificationReceipt | None = None) -> NotificationReceipt:
        """The primary's receipt, or its ``NotificationError``; the copies are made either way."""
        try:
            return self.primary.send(notification, reply_to=reply_to)
        finally:
            self.copy(notification)

    def update(self, receipt: NotificationReceipt, notification: Notification) -> None:
        """Update the primary's message in place; no copy (a plain-text reader got the details as they came)."""
        self.primary.update(receipt, notification)

    def copy(self, notification: Notification) -> CopyReport:
        """Send ``notification`` to every route of its kind not sent it yet; never raises."""
        report = CopyReport()
        for route in self.routes.get(notification.kind, ()):
            identity = (route, _identity(notification))
            if identity in self._copied:
                continue
            try:
                self._copy_to(route, notification)
            except Exception as exc:  # noqa: BLE001  # a copy is best effort: any failure is logged and counted
                self.failed_copies += 1
                reason = redact_text(f"{type(exc).__name__}: {exc}", self.secrets)
                report.failed[route] = reason
                self.logger.warning("%s notification %r not copied to %s: %s", *_about(notification), route, reason)
                continue
            self._copied.add(identity)
            report.delivered.append(route)
            self.logger.info("%s notification %r copied to %s", *_about(notification), route)
        return report

    def _copy_to(self, route: str, notification: Notification) -> None:
        if route not in self._outlets:
            self._outlets[route] = self.open_outlet(route)
        outlet, outlet_secrets = self._outlets[route]
        secrets = [*self.secrets, *outlet_secrets]
        subject, body = render_plain(redact_notification(notification, secrets))
        outlet.notify(body, subject)


def _identity(notification: Notification) -> str:
    return notification.dedup_key or repr(notification)


def _about(notification: Notification) -> tuple[str, str]:
    return notification.kind, notification.title
