"""One operator-facing message, whatever carries it: what happened, how bad, the facts, a link."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, get_args

from pydantic import SecretStr

Severity = Literal["info", "success", "warning", "critical"]
# What a message is about, for routing it to more notification blocks than the operators' channel
# (``[notifications]`` in icd.toml, docs/operations.md#where-messages-go). Each is made in one kind of place:
# approval: a plan waits for an answer (tasks/approve.py); refusal: an answer was refused and is asked again;
# deploy: how a deploy run went or ended (finish, deploy-ended, a superseded run, an apply running long);
# build: a build failed; health: the health watch (transitions, blind, sees again); registry: a version revoked
# while a workspace runs it.
MessageKind = Literal["approval", "refusal", "deploy", "build", "health", "registry"]
MESSAGE_KINDS: tuple[MessageKind, ...] = get_args(MessageKind)
REDACTED = "***"


@dataclass(frozen=True)
class SeverityStyle:
    emoji: str
    label: str


SEVERITY_STYLES: Mapping[Severity, SeverityStyle] = MappingProxyType(
    {
        "info": SeverityStyle(":information_source:", "Info"),
        "success": SeverityStyle(":white_check_mark:", "Success"),
        "warning": SeverityStyle(":warning:", "Warning"),
        "critical": SeverityStyle(":rotating_light:", "Critical"),
    }
)


@dataclass(frozen=True)
class Confirm:
    """A dialog that asks "are you sure?" before an action is taken (a tap on a phone is easily made)."""

    title: str
    text: str
    confirm: str
    deny: str = "Cancel"


@dataclass(frozen=True)
class Action:
    """Something an operator can do from the message itself, as data: a channel with buttons (Slack) draws
    it, a plain copy (e-mail) leaves it out, since its link already leads where the same can be done.

    ``id`` says what it does (``approve``, ``reject``, ``ack``, ``silence-1h``...; ``icd/interactions/``
    acts on it), ``value`` what it acts on (a run and its plan hash, an alert), opaque to renderers."""

    id: str
    label: str
    value: str
    style: Literal["primary", "danger"] | None = None
    confirm: Confirm | None = None


@dataclass(frozen=True)
class Notification:
    """One operator-facing message.

    ``text`` may use Slack's ``*bold*``/```code``` formatting; everything is escaped when rendered, so a
    value interpolated into it (an approver's comment) can never ping, mention or disguise a link.
    ``fields`` are short facts shown as a grid. ``kind`` says which notification blocks of icd.toml also
    get it; ``severity`` how bad it is.
    """

    title: str
    text: str
    severity: Severity
    fields: Mapping[str, str] = field(default_factory=dict)
    link_url: str | None = None
    link_text: str | None = None
    # Same key, same message: receivers and re-sends can tell a repeat from a new event.
    dedup_key: str | None = None
    kind: MessageKind = "deploy"
    # Messages with the same key are about one thing (``deploy-run:<run id>``: one deploy run) and are read
    # together: on Slack in one thread, in a plain-text copy a fact a mail client or receiver can group by.
    thread_key: str | None = None
    # What can be done from the message (approve, silence...); empty once there is nothing left to decide.
    actions: tuple[Action, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_STYLES:
            raise ValueError(f"unknown severity {self.severity!r}; expected one of {sorted(SEVERITY_STYLES)}")
        if self.kind not in MESSAGE_KINDS:
            raise ValueError(f"unknown message kind {self.kind!r}; expected one of {sorted(MESSAGE_KINDS)}")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self) | {"fields": dict(self.fields)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Notification:
        """The inverse of :meth:`to_dict` (a stored notification read back)."""
        values = dict(data)
        actions: list[dict[str, Any]] = list(values.pop("actions", None) or ())
        return cls(
            **values,
            actions=tuple(
                Action(**{**a, "confirm": Confirm(**a["confirm"]) if a.get("confirm") else None}) for a in actions
            ),
        )


@dataclass(frozen=True)
class NotificationReceipt:
    """Where the operators' channel put the message, so a later one can go in its thread: on Slack, the
    channel ID and the message timestamp (its ID within the channel)."""

    channel: str
    ts: str


class Sender(Protocol):
    """Anything that delivers a notification now (``reply_to``: in the thread of that earlier message, where
    the channel has threads) or updates one it delivered, or raises ``NotificationError``."""

    def send(
        self, notification: Notification, *, reply_to: NotificationReceipt | None = None
    ) -> NotificationReceipt: ...

    def update(self, receipt: NotificationReceipt, notification: Notification) -> None:
        """Replace the message sent earlier (``receipt``) with ``notification``, in place; raises
        ``NotificationError`` when the channel can't (the message is gone, or not ours)."""
        ...


class Notifier(Protocol):
    """What flows and tasks tell operators through (``blocks/notifier.py`` has the one there is, on Slack)."""

    @property
    def block_name(self) -> str | None:
        """The name it was saved under: a message it could not send is redelivered through it."""
        ...

    @property
    def ui_url(self) -> str | None:
        """The Prefect UI's address, for links; None when not configured."""
        ...

    def sender(self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None) -> Sender:
        """Delivers to the operators' channel, and copies each message to the blocks routed for its kind."""
        ...

    def channel_sender(self) -> Sender:
        """Delivers to the operators' channel only (a redelivery: the copies were made the first time)."""
        ...

    def flow_run_url(self, flow_run_id: object) -> str | None:
        """The UI page of a flow run, when the UI's address is configured."""
        ...


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
