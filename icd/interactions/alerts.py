"""Acknowledge and Silence, clicked on a health alert in Slack: what ``icd-silence ack`` and ``add`` do.

A click is answered at once (Slack gives an app 3 s) and acted on after, through the very functions
``icd-silence`` uses, on the same book in Consul KV, so the health watch honours it on its next round:

    Acknowledge        -> the clicker takes the instance's incident (no more reminders, their name on its
                          alerts), if it is still failing and nobody took it
    Silence 1 h / 4 h  -> a silence of the alert's service on its node, from now for that long
    Silence until it   -> the same, until every instance it matches passes again (only while one fails)
    recovers

Who acts is the clicker's proven Slack identity, ``slack:<team>/<user>`` plus their display name (as an
approval records it). The channel is told what changed with the same messages ``icd-silence`` sends; the
clicker alone (ephemerally) is told the outcome, or why nothing changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import consul
from slack_sdk import WebClient

from icd.deploy.approvers import slack_identity
from icd.errors import DeployError, NotificationError
from icd.health.render import ACK_ACTION, ALERT_ACTIONS, SILENCE_ACTIONS
from icd.health.silence_store import SilenceStore
from icd.health.silences import (
    AckOutcome,
    Silence,
    SilenceBook,
    acknowledge,
    acknowledged_notification,
    added_notification,
    in_incident,
    new_silence,
)
from icd.health.state import HealthStateStore
from icd.interactions.approvals import display_name, tell_clicker
from icd.interactions.payloads import ButtonClick, Person
from icd.interactions.reply import Reply
from icd.notify.message import Notification, Sender
from icd.text import one_line, operator_time

__all__ = ["ALERT_ACTIONS", "AlertButtons", "AlertTarget"]

log = logging.getLogger("icd.interactions")
SILENCE_REASON = "silenced from Slack"
DEFAULT_WATCH = "default"  # the watch an alert belongs to when its button does not say (icd-silence's default)
# A second Silence click soon after the first (two people, one alert) adds nothing when a silence of the
# instance already lasts this close to as long: the channel is not told twice.
_SAME_END_SLACK = timedelta(minutes=5)
_NAME_MAX = 200


@dataclass(frozen=True)
class AlertTarget:
    """The instance a button names, as the health watch ``watch`` keys it (``node/service_id``)."""

    instance: str
    service: str
    node: str
    watch: str = DEFAULT_WATCH

    @classmethod
    def of(cls, value: Mapping[str, Any]) -> AlertTarget | None:
        fields = {key: value.get(key) for key in ("instance", "service", "node")}
        watch = value.get("watch", DEFAULT_WATCH)
        if not all(isinstance(v, str) and v for v in (*fields.values(), watch)):
            return None
        target = cls(watch=watch, **fields)  # type: ignore[arg-type]  # each checked to be a str just above
        return target if target.instance.startswith(f"{target.node}/") else None

    @property
    def shown(self) -> str:
        return f"{self.service} on {self.node}"


class AlertButtons:
    """Acts on a health alert's buttons. ``consul_client`` makes the client for the silence book and the watch's
    state, ``sender`` tells the channel, ``slack`` reads the clicker's display name (None: their id alone),
    ``respond`` tells the clicker alone, ``published`` shows a changed book in the UI."""

    def __init__(
        self,
        *,
        consul_client: Callable[[], consul.Consul],
        sender: Sender,
        slack: WebClient | None = None,
        respond: Callable[[str, str], None] = tell_clicker,
        published: Callable[[SilenceBook], None] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.consul_client = consul_client
        self.sender = sender
        self.slack = slack
        self.respond = respond
        self.published = published
        self.now = now

    def click(self, click: ButtonClick) -> Reply:
        if click.action == ACK_ACTION:
            return Reply(later=lambda: self.acknowledge(click))
        if click.action in SILENCE_ACTIONS:
            return Reply(later=lambda: self.silence(click))
        return Reply()

    # --- what is done after answering --------------------------------------------------------------------

    def acknowledge(self, click: ButtonClick) -> None:
        target = AlertTarget.of(click.value)
        if target is None:
            self.respond(click.response_url, "Nothing taken: the button names no instance.")
            return
        by = self._label(click.person)
        now = self.now()
        try:
            client = self.consul_client()
            records = HealthStateStore(client, target.watch).load().state.instances
            book, taken = SilenceStore(client).change(
                lambda current: acknowledge(
                    current, records, target.instance, by=by, why="", now=now, watch=target.watch
                )
            )
        except DeployError as exc:
            self.respond(click.response_url, f"Nothing taken: {one_line(str(exc), 300)}.")
            return
        mine = slack_identity(click.person.team_id, click.person.user_id)
        self.respond(click.response_url, _ack_answer(taken, target, book.acknowledged_by(target.instance), mine))
        if taken == "taken":
            log.info("%s took %s", by, target.instance)
            self._tell_channel(click, acknowledged_notification(book.acknowledgements[target.instance]))

    def silence(self, click: ButtonClick) -> None:
        target = AlertTarget.of(click.value)
        if target is None:
            self.respond(click.response_url, "Nothing silenced: the button names no instance.")
            return
        span = SILENCE_ACTIONS[click.action]
        now = self.now()
        try:
            made = new_silence(
                service=target.service,
                node=target.node,
                starts_at=now,
                ends_at=None if span is None else now + span,
                by=self._label(click.person),
                why=SILENCE_REASON,
                now=now,
                watch=target.watch,
            )
            client = self.consul_client()
            if made.until_recovered and not self._failing(client, made, target.watch):
                self.respond(
                    click.response_url,
                    f"Nothing silenced: {target.shown} is passing now, so a silence until it recovers would end "
                    "at once; use Silence 1 h or 4 h.",
                )
                return
            book, kept = SilenceStore(client).change(lambda current: _add_unless_covered(current, made, now))
        except DeployError as exc:
            self.respond(click.response_url, f"Nothing silenced: {one_line(str(exc), 300)}.")
            return
        until = "it recovers" if kept.ends_at is None else operator_time(kept.ends_at)
        if kept is not made:
            self.respond(
                click.response_url,
                f"Already silenced until {until} by {kept.created_by} (silence {kept.id}); nothing added.",
            )
            return
        log.info("%s silenced %s: %s %s", made.created_by, target.instance, made.id, made.span())
        self.respond(
            click.response_url, f"Silenced until {until}: alerts of {target.shown} page no one (silence {made.id})."
        )
        self._tell_channel(click, added_notification(made, now))
        if self.published is not None:
            try:
                self.published(book)
            except Exception as exc:  # noqa: BLE001  # the UI's table is a view; the book in Consul is the record
                log.warning("silence %s added, but the UI's table was not updated: %s", made.id, exc)

    # --- helpers -------------------------------------------------------------------------------------------

    def _failing(self, client: consul.Consul, silence: Silence, watch: str) -> bool:
        """Whether an instance the silence matches is in an incident now, as the watch ``watch`` sees it."""
        records = HealthStateStore(client, watch).load().state.instances.values()
        return any(silence.covers_instance(r.service_name, r.node) and in_incident(r) for r in records)

    def _label(self, person: Person) -> str:
        """How the record names the clicker: the proven identity, then the display name (``Vote.label``)."""
        identity = slack_identity(person.team_id, person.user_id)
        name = self._name(person.user_id)
        return f"{identity} ({name})" if name else identity

    def _name(self, user_id: str) -> str:
        if self.slack is None:
            return ""
        return one_line(display_name(self.slack, user_id), _NAME_MAX)

    def _tell_channel(self, click: ButtonClick, notification: Notification) -> None:
        """The channel hears of the change as when ``icd-silence`` makes it; a lost message does not undo it."""
        try:
            self.sender.send(notification)
        except NotificationError as exc:
            log.warning("%s, but the channel was not told: %s", notification.title, exc)
            self.respond(click.response_url, "Done, but the channel could not be told; say so there yourself.")


def _add_unless_covered(book: SilenceBook, silence: Silence, now: datetime) -> tuple[SilenceBook, Silence]:
    """The book with ``silence``, unless an active silence of exactly that instance already lasts about as long
    (a second click): then the book as it is, and that silence."""
    for held in book.current(now):
        if held.state(now) != "active" or (held.service, held.node, held.check) != (silence.service, silence.node, "*"):
            continue
        if held.ends_at is None and silence.ends_at is None:
            return book, held
        if (
            held.ends_at is not None
            and silence.ends_at is not None
            and held.ends_at >= silence.ends_at - _SAME_END_SLACK
        ):
            return book, held
    return book.with_silence(silence, now), silence


def _ack_answer(taken: AckOutcome, target: AlertTarget, holder: str | None, mine: str) -> str:
    """What the clicker is told about their Acknowledge."""
    if taken == "taken":
        return f"Taken: {target.shown} is yours; no more reminders until it recovers."
    if taken == "already yours" or (holder is not None and (holder == mine or holder.startswith(f"{mine} ("))):
        return f"You took {target.shown} already."
    if taken == "taken by another":
        return f"Already taken by {holder}."
    if taken == "not in an incident":
        return f"Nothing taken: {target.shown} is not in an incident (it is passing again)."
    return (
        f"Nothing taken: the health watch {target.watch!r} knows no instance {target.instance} now "
        "(it left, or the watch was reset)."
    )
