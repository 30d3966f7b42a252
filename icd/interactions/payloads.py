"""Slack's interaction payloads, read into what we act on (https://api.slack.com/reference/interaction-payloads).

Only the fields used are read, each checked for its type: a payload missing one is not ours to act on
(:class:`NotOurs`), never a crash. The button's ``value`` is JSON we wrote into the message ourselves; Slack
sends it back as it was, inside a request it signed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ACTION_ID_PREFIX = "icd."  # icd/notify/slack.py names each button icd.<Action.id>
REJECT_CALLBACK = "icd.reject"  # the reject modal's callback_id
REASON_BLOCK = "reason"
REASON_INPUT = "reason-input"


@dataclass(frozen=True)
class Person:
    """Who clicked: their Slack team and user id (what Slack's signature proves) and their handle."""

    team_id: str
    user_id: str
    handle: str


@dataclass(frozen=True)
class ButtonClick:
    person: Person
    action: str  # the Action.id: "approve", "reject", "ack", "silence-1h", ...
    value: Mapping[str, Any]
    response_url: str  # answers the clicker (ephemeral) or changes the message, for 30 minutes
    trigger_id: str  # opens a modal within 3 s of the click
    channel_id: str
    message_ts: str


@dataclass(frozen=True)
class ModalSubmitted:
    person: Person
    callback_id: str
    metadata: Mapping[str, Any]  # what we put in the modal's private_metadata when we opened it
    values: Mapping[str, str]  # input block id -> its value


@dataclass(frozen=True)
class NotOurs:
    """A payload we don't act on (another app's button, a link button, a malformed payload): why, for the log."""

    why: str


def _str(data: Mapping[str, Any], *path: str) -> str:
    value: Any = data
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, str) else ""


def _person(payload: Mapping[str, Any]) -> Person | None:
    user_id = _str(payload, "user", "id")
    team_id = _str(payload, "user", "team_id") or _str(payload, "team", "id")
    if not user_id or not team_id:
        return None
    return Person(team_id, user_id, _str(payload, "user", "username") or _str(payload, "user", "name"))


def read_payload(payload: Mapping[str, Any]) -> ButtonClick | ModalSubmitted | NotOurs:
    """What an interaction asks us to do, or why it asks nothing of us."""
    person = _person(payload)
    if person is None:
        return NotOurs("no user or team in the payload")
    kind = payload.get("type")
    if kind == "block_actions":
        actions = payload.get("actions")
        if not isinstance(actions, list) or not actions or not isinstance(actions[0], Mapping):
            return NotOurs("a block_actions payload without actions")
        action = actions[0]
        action_id = _str(action, "action_id")
        if not action_id.startswith(ACTION_ID_PREFIX):
            return NotOurs(f"action {action_id!r} is not one of ours (a link button, or another app's)")
        try:
            value = json.loads(_str(action, "value") or "null")
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep to decode
            return NotOurs(f"action {action_id!r} carries a value that is not JSON")
        if not isinstance(value, Mapping):
            return NotOurs(f"action {action_id!r} carries no target")
        return ButtonClick(
            person=person,
            action=action_id.removeprefix(ACTION_ID_PREFIX),
            value=value,
            response_url=_str(payload, "response_url"),
            trigger_id=_str(payload, "trigger_id"),
            channel_id=_str(payload, "channel", "id") or _str(payload, "container", "channel_id"),
            message_ts=_str(payload, "container", "message_ts") or _str(payload, "message", "ts"),
        )
    if kind == "view_submission":
        view = payload.get("view")
        if not isinstance(view, Mapping):
            return NotOurs("a view_submission without its view")
        try:
            metadata = json.loads(_str(view, "private_metadata") or "{}")
        except (json.JSONDecodeError, RecursionError):
            return NotOurs("a view whose private_metadata is not JSON")
        values: dict[str, str] = {}
        state = view.get("state")
        blocks = state.get("values") if isinstance(state, Mapping) else None
        for block_id, inputs in blocks.items() if isinstance(blocks, Mapping) else ():
            if isinstance(inputs, Mapping):
                for field in inputs.values():
                    if isinstance(field, Mapping) and isinstance(field.get("value"), str):
                        values[str(block_id)] = field["value"]
        return ModalSubmitted(
            person, _str(view, "callback_id"), metadata if isinstance(metadata, Mapping) else {}, values
        )
    return NotOurs(f"interaction type {kind!r} is not handled")
