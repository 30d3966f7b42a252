"""A local stand-in for the Slack Web API, incoming webhooks and interactivity, for tests and the offline demo.

It speaks just enough of Slack's wire format for ``slack_sdk.WebClient`` to be pointed at it with
``base_url=standin.api_url``: ``auth.test``, ``chat.postMessage`` (a ``thread_ts`` must name a message it
holds in that channel, else ``invalid_thread_ts``), ``chat.update``, ``users.info``,
``usergroups.users.list`` and ``views.open``, Bearer-token checks, ``channel_not_found``, and injectable rate
limiting (HTTP 429 + ``Retry-After``) and 5xx faults, so the notifier's retry and error paths run against real
HTTP. Incoming-webhook posts to ``/webhook/<id>`` are recorded too.

It also plays the person at the keyboard, as Slack does when someone clicks a button or submits a modal:
after ``set_interactivity(request_url, signing_secret)``, ``click()`` and ``submit_view()`` POST a signed
``block_actions`` / ``view_submission`` payload (form-encoded ``payload=<json>``, 3 s timeout) to the app.
Only what is shown can be clicked; each interaction carries a fresh ``trigger_id`` (good for one
``views.open`` within 3 s) and a ``response_url`` (``/actions/<id>``, five uses within 30 minutes) whose
ephemeral, ``replace_original`` and ``delete_original`` answers are applied to what the stand-in holds.
``signed_headers()`` and ``send_signed()`` make replayed, stale or badly signed requests.

Run it on its own with ``python -m standins.slack --port 8765``; with ``--interactivity-url`` (and the
signing secret in ``SLACK_SIGNING_SECRET``), ``POST /_standin/click`` makes it click for a process outside.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

if TYPE_CHECKING:
    from standins.slack_socket import SlackSocketStandIn

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"
WEBHOOK_PREFIX = "/webhook/"
# Not Slack's: what the stand-in received, for demos and operators (GET; `?` nothing).
RECEIVED_PATH = "/_standin/received"
# Not Slack's: a process outside asks the stand-in to click a button (POST JSON {message_ts, action_id, user}).
CLICK_PATH = "/_standin/click"
RESPONSE_URL_PREFIX = "/actions/"
_FIRST_TS_SECONDS = 1_700_000_000
BOT_USER_ID = "U000STANDIN"
TEAM_ID = "T000STANDIN"
TEAM_DOMAIN = "standin"
APP_ID = "A000STANDIN"
BOT_ID = "B000STANDIN"
# The deprecated verification token Slack still puts in every interaction payload (apps check the signature).
VERIFICATION_TOKEN = "standin-verification-token"  # noqa: S105  # a fixed fake value, as the bot token is
# Slack's limits: the app answers an interaction within 3 s; a trigger_id opens one view within 3 s of the
# interaction; a response_url takes five posts within 30 minutes.
INTERACTION_TIMEOUT_SECONDS = 3.0
TRIGGER_LIFETIME_SECONDS = 3.0
RESPONSE_URL_USES = 5
RESPONSE_URL_LIFETIME_SECONDS = 30 * 60


@dataclass(frozen=True)
class ReceivedMessage:
    """A message as the stand-in stored it (after any ``chat.update``)."""

    channel: str
    channel_id: str
    text: str
    blocks: list[dict[str, Any]]
    ts: str
    metadata: dict[str, Any] | None
    payload: dict[str, Any] = field(repr=False)
    received_at: float = field(default=0.0, compare=False)  # time.time() when the stand-in stored it
    user: str = BOT_USER_ID  # who posted it: our bot, unless a test posted as a person (post_as_user)
    edited: bool = False  # changed by chat.update since it was posted

    @property
    def thread_ts(self) -> str | None:
        """The parent message's ts when this is a reply in a thread."""
        parent = self.payload.get("thread_ts")
        return str(parent) if parent else None

    @property
    def thread_key(self) -> str | None:
        """The sender's thread key (what the message is about, e.g. one deploy run), from its metadata."""
        if not self.metadata:
            return None
        key = self.metadata.get("event_payload", {}).get("thread_key")
        return str(key) if key is not None else None

    @property
    def dedup_key(self) -> str | None:
        """The sender's dedup key, if it put one in the message metadata."""
        if not self.metadata:
            return None
        key = self.metadata.get("event_payload", {}).get("dedup_key")
        return str(key) if key is not None else None


@dataclass(frozen=True)
class WebhookDelivery:
    webhook_id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class SlackUser:
    """A person in the stand-in's workspace (``add_user``): who can click, what ``users.info`` tells."""

    id: str
    name: str  # the handle (``jane.doe``); Slack's ``name`` and the payload's ``username``
    display_name: str  # what the person chose to be shown as; "" when not set, as in Slack
    team_id: str = TEAM_ID

    def info_json(self) -> dict[str, Any]:
        """As ``users.info`` answers it (the fields apps read)."""
        return {
            "id": self.id,
            "team_id": self.team_id,
            "name": self.name,
            "real_name": self.name,
            "profile": {"display_name": self.display_name, "real_name": self.name},
        }

    def payload_json(self) -> dict[str, Any]:
        """As an interaction payload names the person who acted."""
        return {"id": self.id, "username": self.name, "name": self.name, "team_id": self.team_id}


@dataclass(frozen=True)
class OpenedView:
    """A modal opened with ``views.open``, for the person whose interaction's trigger opened it."""

    id: str
    user: str
    view: dict[str, Any]  # as Slack answered it (with ``id`` and ``state``); replaced by a ``response_action`` update
    trigger_id: str
    closed: bool = False
    errors: dict[str, str] | None = None  # the last ``response_action: errors`` the app answered a submission with

    @property
    def callback_id(self) -> str:
        return str(self.view.get("callback_id") or "")


@dataclass(frozen=True)
class EphemeralMessage:
    """A message only ``user`` sees: an ephemeral answer posted to an interaction's ``response_url``."""

    interaction_id: str
    user: str
    channel_id: str
    text: str
    blocks: list[dict[str, Any]]


@dataclass(frozen=True)
class InteractionResult:
    """What the app answered an interaction the stand-in sent, as Slack saw it.

    ``status`` is ``None`` when no answer came: ``error`` then says what Slack would show the person
    (``operation_timeout`` after 3 s, ``dispatch_failed`` when the URL did not connect). ``request`` is what was
    sent (headers, raw body), for ``send_signed`` to replay.
    """

    status: int | None
    body_text: str
    elapsed_seconds: float
    request: tuple[dict[str, str], bytes]
    timed_out: bool = False
    error: str | None = None
    interaction_id: str | None = None
    trigger_id: str | None = None

    def body_json(self) -> Any:
        """The answer's body as JSON; ``None`` when it is empty or not JSON (Slack ignores it then)."""
        try:
            return json.loads(self.body_text) if self.body_text.strip() else None
        except json.JSONDecodeError:
            return None

    def as_json(self) -> dict[str, Any]:
        headers, body = self.request
        return {
            "status": self.status,
            "body_text": self.body_text,
            "elapsed_seconds": self.elapsed_seconds,
            "timed_out": self.timed_out,
            "error": self.error,
            "interaction_id": self.interaction_id,
            "trigger_id": self.trigger_id,
            "request": {"headers": headers, "body": body.decode("utf-8", "replace")},
        }


@dataclass
class _Interaction:
    """One click or submission: whom it was from and where, and its ``response_url``'s uses."""

    id: str
    user: str
    channel_id: str | None
    message_ts: str | None
    issued_at: float
    response_url_uses: int = 0


@dataclass
class _Trigger:
    user: str
    issued_at: float
    used: bool = False


@dataclass
class _Faults:
    rate_limited_calls: int = 0
    retry_after_seconds: int = 1
    server_error_calls: int = 0
    server_error_status: int = 500
    server_error_when: str | None = None  # only requests whose text holds this fail (None: every request)


@dataclass(frozen=True)
class FaultedCall:
    """A Web API request the stand-in answered with an injected fault, and when (``time.time()``)."""

    method: str
    status: int
    text: str
    at: float


class SlackStandIn:
    """A threaded HTTP server that answers like Slack and records what it was sent.

    Use it as a context manager, or call ``start()`` / ``stop()``. All accessors are thread-safe.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "xoxb-test-token",  # noqa: S107  # a fixed fake token is the point of a stand-in
        *,
        unknown_channels: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` is the stand-in's now for Slack's expiries (a trigger's 3 s, a response_url's 30 minutes):
        tests pass one they move forward instead of waiting. Signatures always carry the wall-clock time."""
        self.host = host
        self.token = token
        self.unknown_channels: set[str] = set(unknown_channels)
        self._clock = clock
        self._users: dict[str, SlackUser] = {}
        self._usergroups: dict[str, list[str]] = {}
        self._interactivity_url: str | None = None
        self._socket_mode: SlackSocketStandIn | None = None
        self._signing_secret: str | None = None
        self._views: list[OpenedView] = []
        self._responses: list[tuple[str, dict[str, Any]]] = []
        self._ephemeral: list[EphemeralMessage] = []
        self._interactions: dict[str, _Interaction] = {}
        self._triggers: dict[str, _Trigger] = {}
        self._serial = 0
        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._webhooks: list[WebhookDelivery] = []
        self._calls: list[str] = []
        self._faulted: list[FaultedCall] = []
        self._channel_ids: dict[str, str] = {}
        self._next_ts_micros = 100
        self._faults = _Faults()
        self._server = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The ``base_url`` for ``slack_sdk.WebClient``; it must end with a slash (the SDK urljoins)."""
        return f"{self.base_url}{API_PREFIX}"

    def webhook_url(self, webhook_id: str = "T000/B000/standin") -> str:
        return f"{self.base_url}{WEBHOOK_PREFIX}{webhook_id}"

    def start(self) -> SlackStandIn:
        if self._thread is None:
            # stop() waits for the serving loop to look up: every 50 ms, not the stdlib's 500 (test teardown).
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"slack-standin-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on the calling thread until interrupted (the CLI's mode)."""
        self._server.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> SlackStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what was received ----------------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def webhook_deliveries(self) -> list[WebhookDelivery]:
        with self._lock:
            return list(self._webhooks)

    def call_count(self, method: str) -> int:
        """How many requests for a Web API method arrived, including rejected and faulted ones."""
        with self._lock:
            return self._calls.count(method)

    def faulted_calls(self) -> list[FaultedCall]:
        """The requests answered with an injected 429 or 5xx, oldest first."""
        with self._lock:
            return list(self._faulted)

    def top_level(self) -> list[ReceivedMessage]:
        """The messages the channel shows (not replies in a thread), oldest first, as updated."""
        return [m for m in self.messages if m.thread_ts is None]

    def thread(self, ts: str) -> list[ReceivedMessage]:
        """The replies in the thread of the message ``ts``, oldest first."""
        return [m for m in self.messages if m.thread_ts == ts]

    def post_as_user(self, channel: str, text: str, user: str = "U000PERSON") -> ReceivedMessage:
        """A message a person posted in ``channel`` (not through the API): the bot may not update it."""
        with self._lock:
            message = ReceivedMessage(
                channel=channel,
                channel_id=self._channel_id(channel),
                text=text,
                blocks=[],
                ts=self._next_ts(),
                metadata=None,
                payload={"channel": channel, "text": text},
                received_at=time.time(),
                user=user,
            )
            self._messages.append(message)
            self._lock.notify_all()
        return message

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until at least ``count`` messages arrived; returns what is there when it gives up."""
        with self._lock:
            self._lock.wait_for(lambda: len(self._messages) >= count, timeout=timeout)
            return list(self._messages)

    def received(self) -> dict[str, Any]:
        """Everything received so far, as ``GET /_standin/received`` answers it: messages as an operator
        reads them (``rendered``) and as sent, incoming-webhook deliveries, opened views, response_url posts
        and the ephemeral messages they made."""
        with self._lock:
            return {
                "messages": [
                    {
                        "channel": m.channel,
                        "ts": m.ts,
                        "text": m.text,
                        "rendered": render_for_reading(m),
                        "blocks": m.blocks,
                        "dedup_key": m.dedup_key,
                    }
                    for m in self._messages
                ],
                "webhooks": [{"webhook_id": d.webhook_id, "payload": d.payload} for d in self._webhooks],
                "views": [
                    {
                        "id": v.id,
                        "user": v.user,
                        "callback_id": v.callback_id,
                        "closed": v.closed,
                        "errors": v.errors,
                        "view": v.view,
                    }
                    for v in self._views
                ],
                "responses": [{"interaction_id": i, "body": body} for i, body in self._responses],
                "ephemeral": [
                    {"user": e.user, "channel": e.channel_id, "text": e.text, "interaction_id": e.interaction_id}
                    for e in self._ephemeral
                ],
            }

    def clear(self) -> None:
        """Forget what was received (messages, deliveries, views, response_url posts, interactions) and the
        injected faults; the workspace (users, user groups) and the interactivity settings stay."""
        with self._lock:
            self._messages.clear()
            self._webhooks.clear()
            self._views.clear()
            self._responses.clear()
            self._ephemeral.clear()
            self._interactions.clear()
            self._triggers.clear()
            self._calls.clear()
            self._faulted.clear()
            self._faults = _Faults()

    # --- fault injection ------------------------------------------------------------------------------

    def rate_limit_next(self, calls: int, retry_after_seconds: int = 1) -> None:
        """Answer the next ``calls`` Web API requests with HTTP 429 ``ratelimited``."""
        with self._lock:
            self._faults.rate_limited_calls = calls
            self._faults.retry_after_seconds = retry_after_seconds

    def fail_next(self, calls: int, status: int = 500, *, text_containing: str | None = None) -> None:
        """Answer the next ``calls`` Web API requests with a 5xx and a non-Slack body; with
        ``text_containing``, only requests whose ``text`` holds it (others pass and don't count)."""
        with self._lock:
            self._faults.server_error_calls = calls
            self._faults.server_error_status = status
            self._faults.server_error_when = text_containing

    # --- the workspace: people and user groups ----------------------------------------------------------

    def add_user(self, user_id: str, name: str, display_name: str | None = None, team_id: str = TEAM_ID) -> SlackUser:
        """A person who can click and submit, and whom ``users.info`` knows. ``name`` is the handle (also
        the real name the stand-in reports); ``display_name`` ``None`` is Slack's unset one, ``""``."""
        user = SlackUser(id=user_id, name=name, display_name=display_name or "", team_id=team_id)
        with self._lock:
            self._users[user_id] = user
        return user

    def set_usergroup(self, usergroup_id: str, user_ids: Iterable[str]) -> None:
        """The members ``usergroups.users.list`` answers for ``usergroup_id`` (an ``S…`` ID)."""
        with self._lock:
            self._usergroups[usergroup_id] = list(user_ids)

    # --- interactivity: what the app got and answered -----------------------------------------------------

    @property
    def views(self) -> list[OpenedView]:
        """The modals opened with ``views.open``, oldest first, as they are now (open or closed)."""
        with self._lock:
            return list(self._views)

    def view(self, view_id: str) -> OpenedView:
        with self._lock:
            return self._find_view(view_id)

    @property
    def responses(self) -> list[tuple[str, dict[str, Any]]]:
        """The accepted posts to ``response_url``s: (the interaction's id, the body), oldest first."""
        with self._lock:
            return list(self._responses)

    @property
    def ephemeral_messages(self) -> list[EphemeralMessage]:
        """The ephemeral answers posted to ``response_url``s, each shown only to the person who acted."""
        with self._lock:
            return list(self._ephemeral)

    def response_url(self, interaction_id: str) -> str:
        return f"{self.base_url}{RESPONSE_URL_PREFIX}{interaction_id}"

    # --- interactivity: acting as the person at the keyboard --------------------------------------------

    def set_interactivity(self, request_url: str, signing_secret: str) -> None:
        """Where clicks and submissions go (the app's Request URL) and the secret they are signed with."""
        with self._lock:
            self._interactivity_url = request_url
            self._signing_secret = signing_secret

    def signed_headers(self, body: bytes, timestamp: int | None = None, secret: str | None = None) -> dict[str, str]:
        """The headers Slack sends with ``body``: v0 signature over ``v0:{timestamp}:{body}``. ``timestamp``
        defaults to now and ``secret`` to the interactivity one; tests pass others for stale or forged
        requests."""
        with self._lock:
            key = secret if secret is not None else self._signing_secret
        if key is None:
            raise AssertionError("the stand-in has no signing secret: call set_interactivity() first")
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        digest = hmac.new(key.encode("utf-8"), b"v0:" + stamp.encode("ascii") + b":" + body, hashlib.sha256)
        return {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
            "X-Slack-Request-Timestamp": stamp,
            "X-Slack-Signature": "v0=" + digest.hexdigest(),
        }

    def send_signed(self, raw_body: bytes, headers: Mapping[str, str]) -> InteractionResult:
        """POST ``raw_body`` with ``headers`` as they are to the Request URL (a replay, or a request made
        with ``signed_headers``), with Slack's 3 s timeout."""
        return self._deliver(raw_body, dict(headers))

    def click(self, message_ts: str, action_id: str, user_id: str, *, channel: str | None = None) -> InteractionResult:
        """``user_id`` clicks the button ``action_id`` on the message ``message_ts`` (in ``channel``, a name or
        ID, when given): the app gets a signed ``block_actions`` payload. A person can only click what is
        shown: an unknown user, message or button is an ``AssertionError``."""
        with self._lock:
            user = self._known_user(user_id)
            message = self._shown_message(message_ts, channel)
            block_id, button = _find_button(message, action_id)
            interaction = self._new_interaction(user.id, message.channel_id, message.ts)
            trigger_id = self._new_trigger(user.id)
            container: dict[str, Any] = {
                "type": "message",
                "message_ts": message.ts,
                "channel_id": message.channel_id,
                "is_ephemeral": False,
            }
            if message.thread_ts:
                container["thread_ts"] = message.thread_ts
            action: dict[str, Any] = {
                "action_id": action_id,
                "block_id": block_id,
                "text": button.get("text", {}),
                "type": "button",
                "action_ts": f"{time.time():.6f}",
            }
            action.update({key: button[key] for key in ("value", "style", "url") if key in button})
            payload: dict[str, Any] = {
                "type": "block_actions",
                "team": {"id": user.team_id, "domain": TEAM_DOMAIN},
                "user": user.payload_json(),
                "api_app_id": APP_ID,
                "token": VERIFICATION_TOKEN,
                "container": container,
                "trigger_id": trigger_id,
                "channel": {"id": message.channel_id, "name": message.channel.lstrip("#")},
                "message": _slack_message_json(message),
                "state": {"values": {}},
                "response_url": self.response_url(interaction.id),
                "actions": [action],
                "enterprise": None,
                "is_enterprise_install": False,
            }
        return self._send_payload(payload, interaction.id, trigger_id)

    def submit_view(
        self, view_id: str, user_id: str, values: Mapping[str, Mapping[str, Any]] | None = None
    ) -> InteractionResult:
        """``user_id`` fills the open modal ``view_id`` with ``values`` ({block_id: {action_id: value}}) and
        presses its submit button: the app gets a signed ``view_submission``. Its answer decides the view's
        fate as in Slack: ``response_action`` ``errors`` keeps it open with the errors shown, ``update``
        replaces it, anything else closes it; no answer in time keeps it open. Only the person it was opened
        for can submit it, only while open, only inputs it shows, and not with a required one empty."""
        with self._lock:
            user = self._known_user(user_id)
            opened = self._find_view(view_id)
            if opened.closed:
                raise AssertionError(f"view {view_id} is closed: nobody can submit it")
            if opened.user != user.id:
                raise AssertionError(f"view {view_id} was opened for {opened.user}, not {user.id}")
            state_values = _filled_state(opened.view, values or {})
            interaction = self._new_interaction(user.id, None, None)
            trigger_id = self._new_trigger(user.id)
            view = {**opened.view, "state": {"values": state_values}}
            payload: dict[str, Any] = {
                "type": "view_submission",
                "team": {"id": user.team_id, "domain": TEAM_DOMAIN},
                "user": user.payload_json(),
                "api_app_id": APP_ID,
                "token": VERIFICATION_TOKEN,
                "trigger_id": trigger_id,
                "view": view,
                "response_urls": [],
                "enterprise": None,
                "is_enterprise_install": False,
            }
        result = self._send_payload(payload, interaction.id, trigger_id)
        self._apply_submission_answer(view_id, result)
        return result

    def _apply_submission_answer(self, view_id: str, result: InteractionResult) -> None:
        if result.status != HTTPStatus.OK:
            return  # Slack shows the person an error and leaves the modal open
        answer = result.body_json()
        action = answer.get("response_action") if isinstance(answer, dict) else None
        with self._lock:
            index = next(i for i, v in enumerate(self._views) if v.id == view_id)
            opened = self._views[index]
            if action == "errors":
                errors = answer.get("errors") if isinstance(answer, dict) else None
                opened = dataclasses.replace(opened, errors=dict(errors or {}))
            elif action == "update" and isinstance(answer.get("view"), dict):
                opened = dataclasses.replace(opened, view=_view_json(answer["view"], view_id), errors=None)
            else:
                opened = dataclasses.replace(opened, closed=True)
            self._views[index] = opened
            self._lock.notify_all()

    def attach_socket_mode(self, socket_mode: SlackSocketStandIn | None) -> None:
        """Deliver interactions over Socket Mode through ``socket_mode`` instead of the Request URL (None: back
        to the URL), and answer ``apps.connections.open`` with its WebSocket URL, as Slack does for an app with
        Socket Mode on."""
        with self._lock:
            self._socket_mode = socket_mode

    def _send_payload(self, payload: dict[str, Any], interaction_id: str, trigger_id: str) -> InteractionResult:
        body = urlencode({"payload": json.dumps(payload)}).encode("utf-8")
        with self._lock:
            socket_mode = self._socket_mode
        if socket_mode is not None:
            return self._deliver_over_socket(socket_mode, payload, body, interaction_id, trigger_id)
        result = self._deliver(body, self.signed_headers(body))
        return dataclasses.replace(result, interaction_id=interaction_id, trigger_id=trigger_id)

    def _deliver_over_socket(
        self,
        socket_mode: SlackSocketStandIn,
        payload: dict[str, Any],
        body: bytes,
        interaction_id: str,
        trigger_id: str,
    ) -> InteractionResult:
        """As Slack in Socket Mode: the payload in an envelope on the app's WebSocket (no signature: only the
        app's token opens it), acknowledged within 3 s; the acknowledgement's payload is the answer."""
        started = time.monotonic()
        try:
            ack = socket_mode.send_interactive(payload, timeout=INTERACTION_TIMEOUT_SECONDS)
        except TimeoutError:
            elapsed = time.monotonic() - started
            return InteractionResult(
                None, "", elapsed, ({}, body), timed_out=True, error="operation_timeout", interaction_id=interaction_id
            )
        answer = json.dumps(ack["payload"]) if ack.get("payload") else ""
        return InteractionResult(
            200, answer, time.monotonic() - started, ({}, body), interaction_id=interaction_id, trigger_id=trigger_id
        )

    def _deliver(self, body: bytes, headers: dict[str, str]) -> InteractionResult:
        with self._lock:
            url = self._interactivity_url
        if url is None:
            raise AssertionError("the stand-in has no Request URL: call set_interactivity() first")
        # The Request URL is the app's, given by the test or the operator: http(s) only by how it is used.
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
        started = time.monotonic()
        status: int | None
        try:
            with urllib.request.urlopen(request, timeout=INTERACTION_TIMEOUT_SECONDS) as response:  # noqa: S310
                status, text = response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as answer:
            status, text = answer.code, answer.read().decode("utf-8", "replace")
        except TimeoutError:
            status, text = None, ""
        except urllib.error.URLError as failure:
            elapsed = time.monotonic() - started
            timed_out = isinstance(failure.reason, TimeoutError)
            error = "operation_timeout" if timed_out else "dispatch_failed"
            return InteractionResult(None, "", elapsed, (headers, body), timed_out=timed_out, error=error)
        elapsed = time.monotonic() - started
        if status is None or elapsed > INTERACTION_TIMEOUT_SECONDS:
            # Slack gives up after 3 s whatever comes later: the person sees "operation_timeout".
            return InteractionResult(None, "", elapsed, (headers, body), timed_out=True, error="operation_timeout")
        return InteractionResult(status, text, elapsed, (headers, body))

    def _known_user(self, user_id: str) -> SlackUser:
        user = self._users.get(user_id)
        if user is None:
            raise AssertionError(f"no user {user_id} in the stand-in's workspace: add_user() first")
        return user

    def _shown_message(self, message_ts: str, channel: str | None) -> ReceivedMessage:
        for message in self._messages:
            if message.ts == message_ts and (channel is None or channel in (message.channel, message.channel_id)):
                return message
        where = f" in {channel}" if channel else ""
        raise AssertionError(f"no message {message_ts}{where}: nobody can click on it")

    def _find_view(self, view_id: str) -> OpenedView:
        for opened in self._views:
            if opened.id == view_id:
                return opened
        raise AssertionError(f"no view {view_id} was opened")

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _new_interaction(self, user_id: str, channel_id: str | None, message_ts: str | None) -> _Interaction:
        interaction = _Interaction(
            id=f"I{self._next_serial():010d}",
            user=user_id,
            channel_id=channel_id,
            message_ts=message_ts,
            issued_at=self._clock(),
        )
        self._interactions[interaction.id] = interaction
        return interaction

    def _new_trigger(self, user_id: str) -> str:
        trigger_id = f"{_FIRST_TS_SECONDS + self._next_serial()}.{uuid.uuid4().int % 10**10}.{uuid.uuid4().hex}"
        self._triggers[trigger_id] = _Trigger(user=user_id, issued_at=self._clock())
        return trigger_id

    # --- request handling (called from server threads) ------------------------------------------------

    def _take_fault(
        self, method: str, params: Mapping[str, Any]
    ) -> tuple[int, dict[str, str], dict[str, Any] | str] | None:
        text = str(params.get("text") or "")
        with self._lock:
            faults = self._faults
            if faults.rate_limited_calls > 0:
                faults.rate_limited_calls -= 1
                self._faulted.append(FaultedCall(method, HTTPStatus.TOO_MANY_REQUESTS, text, time.time()))
                headers = {"Retry-After": str(faults.retry_after_seconds)}
                return HTTPStatus.TOO_MANY_REQUESTS, headers, {"ok": False, "error": "ratelimited"}
            wanted = faults.server_error_when is None or faults.server_error_when in text
            if faults.server_error_calls > 0 and wanted:
                faults.server_error_calls -= 1
                self._faulted.append(FaultedCall(method, faults.server_error_status, text, time.time()))
                return faults.server_error_status, {}, "stand-in injected server error"
        return None

    def _channel_id(self, channel: str) -> str:
        if channel not in self._channel_ids:
            self._channel_ids[channel] = f"C{len(self._channel_ids) + 1:010d}"
        return self._channel_ids[channel]

    def _next_ts(self) -> str:
        micros = self._next_ts_micros
        self._next_ts_micros += 100
        return f"{_FIRST_TS_SECONDS + micros // 1_000_000}.{micros % 1_000_000:06d}"

    def handle_api(
        self, method: str, authorization: str | None, params: dict[str, Any]
    ) -> tuple[int, dict[str, str], dict[str, Any] | str]:
        with self._lock:
            self._calls.append(method)
        fault = self._take_fault(method, params)
        if fault is not None:
            return fault
        with self._lock:
            socket_mode = self._socket_mode
        if method == "apps.connections.open" and socket_mode is not None:
            # Authenticated with the app-level token (xapp-), not the bot token.
            return HTTPStatus.OK, {}, socket_mode.open_connection(authorization)
        handler = _API_METHODS.get(method)
        if handler is None:
            return HTTPStatus.NOT_FOUND, {}, {"ok": False, "error": "unknown_method"}
        token = _bearer_token(authorization) or params.get("token")
        if not token:
            return HTTPStatus.OK, {}, {"ok": False, "error": "not_authed"}
        if token != self.token:
            return HTTPStatus.OK, {}, {"ok": False, "error": "invalid_auth"}
        return HTTPStatus.OK, {}, handler(self, params)

    def _auth_test(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://standin.slack.com/",
            "team": "Stand-in",
            "user": "icd-bot",
            "team_id": "T000STANDIN",
            "user_id": BOT_USER_ID,
            "bot_id": "B000STANDIN",
        }

    def _post_message(self, params: Mapping[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not channel or channel in self.unknown_channels:
            return {"ok": False, "error": "channel_not_found"}
        text = str(params.get("text") or "")
        blocks = _json_field(params.get("blocks")) or []
        if not text and not blocks:
            return {"ok": False, "error": "no_text"}
        thread_ts = str(params.get("thread_ts") or "")
        with self._lock:
            if thread_ts and not any(
                m.ts == thread_ts and channel in (m.channel, m.channel_id) for m in self._messages
            ):
                return {"ok": False, "error": "invalid_thread_ts"}
            message = ReceivedMessage(
                channel=channel,
                channel_id=self._channel_id(channel),
                text=text,
                blocks=blocks,
                ts=self._next_ts(),
                metadata=_json_field(params.get("metadata")),
                payload=dict(params),
                received_at=time.time(),
            )
            self._messages.append(message)
            self._lock.notify_all()
        return {
            "ok": True,
            "channel": message.channel_id,
            "ts": message.ts,
            "message": _slack_message_json(message),
        }

    def _update(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """As Slack's ``chat.update``: the message ``ts`` in ``channel`` (its name or ID) gets the new text and
        blocks and stays where it is (a reply stays in its thread); only the bot's own messages can change
        (``cant_update_message``), an unknown one is ``message_not_found``."""
        channel = str(params.get("channel") or "")
        ts = str(params.get("ts") or "")
        if not channel or channel in self.unknown_channels:
            return {"ok": False, "error": "channel_not_found"}
        with self._lock:
            for index, message in enumerate(self._messages):
                if ts != message.ts or channel not in (message.channel, message.channel_id):
                    continue
                if message.user != BOT_USER_ID:
                    return {"ok": False, "error": "cant_update_message"}
                kept = {"thread_ts": message.thread_ts} if message.thread_ts else {}
                # As Slack: a field left out keeps what the message had; blocks=[] removes them.
                blocks = _json_field(params["blocks"]) if "blocks" in params else message.blocks
                updated = dataclasses.replace(
                    message,
                    text=str(params["text"]) if "text" in params else message.text,
                    blocks=blocks or [],
                    payload={**dict(params), **kept},
                    edited=True,
                )
                self._messages[index] = updated
                self._lock.notify_all()
                return {
                    "ok": True,
                    "channel": updated.channel_id,
                    "ts": updated.ts,
                    "text": updated.text,
                    "message": _slack_message_json(updated),
                }
        return {"ok": False, "error": "message_not_found"}

    def _users_info(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            user = self._users.get(str(params.get("user") or ""))
        if user is None:
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": user.info_json()}

    def _usergroups_users_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            members = self._usergroups.get(str(params.get("usergroup") or ""))
        if members is None:
            return {"ok": False, "error": "no_such_subteam"}
        return {"ok": True, "users": list(members)}

    def _views_open(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """As Slack's ``views.open``: the trigger must be one the stand-in issued (``invalid_trigger_id``), not
        used before (``exchanged_trigger_id``) and at most 3 s old (``expired_trigger_id``); the view must be a
        modal with a title and blocks (``invalid_arguments``). It opens for the person who acted."""
        trigger_id = str(params.get("trigger_id") or "")
        view = _json_field(params.get("view"))
        with self._lock:
            trigger = self._triggers.get(trigger_id)
            if trigger is None:
                return {"ok": False, "error": "invalid_trigger_id"}
            if trigger.used:
                return {"ok": False, "error": "exchanged_trigger_id"}
            if self._clock() - trigger.issued_at > TRIGGER_LIFETIME_SECONDS:
                return {"ok": False, "error": "expired_trigger_id"}
            problems = _view_problems(view)
            if problems:
                return {"ok": False, "error": "invalid_arguments", "response_metadata": {"messages": problems}}
            trigger.used = True
            view_id = f"V{self._next_serial():010d}"
            stored = _view_json(view, view_id)
            self._views.append(OpenedView(id=view_id, user=trigger.user, view=stored, trigger_id=trigger_id))
            self._lock.notify_all()
        return {"ok": True, "view": stored}

    def handle_response_url(
        self, interaction_id: str, params: Mapping[str, Any]
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """A post to a click's ``response_url``, as Slack takes it: at most five within 30 minutes (then 404
        ``used_url`` / ``expired_url``). ``delete_original`` deletes the clicked message, ``replace_original``
        replaces its text and blocks (a field left out is gone, as in Slack), ``response_type: in_channel``
        posts a new message, anything else is an ephemeral message to the person who clicked."""
        with self._lock:
            interaction = self._interactions.get(interaction_id)
            if interaction is None or interaction.channel_id is None:
                return HTTPStatus.NOT_FOUND, {}, {"ok": False, "error": "no_service"}
            if self._clock() - interaction.issued_at > RESPONSE_URL_LIFETIME_SECONDS:
                return HTTPStatus.NOT_FOUND, {}, {"ok": False, "error": "expired_url"}
            if interaction.response_url_uses >= RESPONSE_URL_USES:
                return HTTPStatus.NOT_FOUND, {}, {"ok": False, "error": "used_url"}
            text = str(params.get("text") or "")
            blocks = _json_field(params.get("blocks")) or []
            if _truthy(params.get("delete_original")):
                if not self._drop_message(interaction):
                    return HTTPStatus.NOT_FOUND, {}, {"ok": False, "error": "message_not_found"}
            elif not text and not blocks:
                return HTTPStatus.BAD_REQUEST, {}, {"ok": False, "error": "no_text"}
            elif _truthy(params.get("replace_original")):
                if not self._replace_message(interaction, text, blocks):
                    return HTTPStatus.NOT_FOUND, {}, {"ok": False, "error": "message_not_found"}
            elif params.get("response_type") == "in_channel":
                self._post_in_channel(interaction.channel_id, text, blocks, params.get("thread_ts"))
            else:
                ephemeral = EphemeralMessage(interaction.id, interaction.user, interaction.channel_id, text, blocks)
                self._ephemeral.append(ephemeral)
            interaction.response_url_uses += 1
            self._responses.append((interaction.id, dict(params)))
            self._lock.notify_all()
        return HTTPStatus.OK, {}, {"ok": True}

    def _clicked_message_index(self, interaction: _Interaction) -> int | None:
        for index, message in enumerate(self._messages):
            if message.ts == interaction.message_ts and message.channel_id == interaction.channel_id:
                return index
        return None

    def _drop_message(self, interaction: _Interaction) -> bool:
        index = self._clicked_message_index(interaction)
        if index is None:
            return False
        del self._messages[index]
        return True

    def _replace_message(self, interaction: _Interaction, text: str, blocks: list[dict[str, Any]]) -> bool:
        index = self._clicked_message_index(interaction)
        if index is None:
            return False
        message = self._messages[index]
        kept = {"thread_ts": message.thread_ts} if message.thread_ts else {}
        payload = {"channel": message.channel, "text": text, "blocks": blocks, **kept}
        self._messages[index] = dataclasses.replace(message, text=text, blocks=blocks, payload=payload, edited=True)
        return True

    def _post_in_channel(self, channel_id: str, text: str, blocks: list[dict[str, Any]], thread_ts: Any) -> None:
        channel = next((name for name, cid in self._channel_ids.items() if cid == channel_id), channel_id)
        payload: dict[str, Any] = {"channel": channel, "text": text, "blocks": blocks}
        if thread_ts:
            payload["thread_ts"] = str(thread_ts)
        self._messages.append(
            ReceivedMessage(
                channel=channel,
                channel_id=channel_id,
                text=text,
                blocks=blocks,
                ts=self._next_ts(),
                metadata=None,
                payload=payload,
                received_at=time.time(),
            )
        )

    def handle_click_request(self, params: Mapping[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        """``POST /_standin/click``: a process outside makes the stand-in click; a click no person could make
        (unknown user, message or button) is a 400 that says why."""
        try:
            result = self.click(
                str(params.get("message_ts") or ""),
                str(params.get("action_id") or ""),
                str(params.get("user") or ""),
                channel=str(params["channel"]) if params.get("channel") else None,
            )
        except AssertionError as refusal:
            return HTTPStatus.BAD_REQUEST, {}, {"ok": False, "error": str(refusal)}
        return HTTPStatus.OK, {}, {"ok": True, **result.as_json()}

    def handle_webhook(self, webhook_id: str, params: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        if not params.get("text") and not params.get("blocks"):
            return HTTPStatus.BAD_REQUEST, {}, "no_text"
        with self._lock:
            self._webhooks.append(WebhookDelivery(webhook_id=webhook_id, payload=params))
            self._lock.notify_all()
        return HTTPStatus.OK, {}, "ok"


_API_METHODS = {
    "auth.test": SlackStandIn._auth_test,
    "chat.postMessage": SlackStandIn._post_message,
    "chat.update": SlackStandIn._update,
    "users.info": SlackStandIn._users_info,
    "usergroups.users.list": SlackStandIn._usergroups_users_list,
    "views.open": SlackStandIn._views_open,
}


def _slack_message_json(message: ReceivedMessage) -> dict[str, Any]:
    shown = {
        "type": "message",
        "subtype": "bot_message",
        "bot_id": BOT_ID,
        "user": message.user,
        "text": message.text,
        "blocks": message.blocks,
        "ts": message.ts,
    }
    if message.thread_ts:
        shown["thread_ts"] = message.thread_ts
    return shown


def _generated_block_id(block: Mapping[str, Any]) -> str:
    """The ``block_id`` Slack makes up for a block sent without one: short, and stable for the same block."""
    return hashlib.sha256(json.dumps(block, sort_keys=True).encode("utf-8")).hexdigest()[:5]


def _find_button(message: ReceivedMessage, action_id: str) -> tuple[str, dict[str, Any]]:
    """The block ID and the button ``action_id`` in the message's actions blocks; ``AssertionError`` if the
    message shows no such button."""
    shown: list[str] = []
    for block in message.blocks or ():
        if block.get("type") != "actions":
            continue
        for element in block.get("elements", []):
            if element.get("type") != "button":
                continue
            shown.append(str(element.get("action_id")))
            if element.get("action_id") == action_id:
                return str(block.get("block_id") or _generated_block_id(block)), element
    raise AssertionError(f"message {message.ts} shows no button {action_id!r} (its buttons: {shown})")


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def _view_problems(view: Any) -> list[str]:
    """What Slack's ``views.open`` says is wrong with ``view`` (``invalid_arguments`` messages); [] if nothing."""
    if not isinstance(view, dict):
        return ["[ERROR] failed to match all allowed schemas [json-pointer:/view]"]
    problems = []
    if view.get("type") != "modal":
        problems.append("[ERROR] must be 'modal' [json-pointer:/view/type]")
    title = view.get("title")
    if not isinstance(title, dict) or not title.get("text"):
        problems.append("[ERROR] missing required field: title [json-pointer:/view/title]")
    elif len(str(title["text"])) > 24:
        problems.append("[ERROR] must be less than 25 characters [json-pointer:/view/title/text]")
    blocks = view.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        problems.append("[ERROR] missing required field: blocks [json-pointer:/view/blocks]")
    elif any(b.get("type") == "input" for b in blocks) and not view.get("submit"):
        problems.append("[ERROR] must provide a submit property when using input blocks [json-pointer:/view]")
    return problems


def _view_json(view: Mapping[str, Any], view_id: str) -> dict[str, Any]:
    """A view as Slack holds and answers it: its fields, an ID, an empty state, and block and action IDs made
    up where the app left them out (the state is keyed by them)."""
    blocks = json.loads(json.dumps(view.get("blocks") or []))
    for block in blocks:
        block.setdefault("block_id", _generated_block_id(block))
        element = block.get("element")
        if block.get("type") == "input" and isinstance(element, dict):
            element.setdefault("action_id", _generated_block_id(element))
    return {
        "id": view_id,
        "team_id": TEAM_ID,
        "type": "modal",
        "title": view.get("title"),
        "blocks": blocks,
        "close": view.get("close"),
        "submit": view.get("submit"),
        "private_metadata": str(view.get("private_metadata") or ""),
        "callback_id": str(view.get("callback_id") or ""),
        "external_id": str(view.get("external_id") or ""),
        "state": {"values": {}},
        "hash": hashlib.sha256(json.dumps(blocks, sort_keys=True).encode("utf-8")).hexdigest()[:20],
        "clear_on_close": bool(view.get("clear_on_close", False)),
        "notify_on_close": bool(view.get("notify_on_close", False)),
        "previous_view_id": None,
        "root_view_id": view_id,
        "app_id": APP_ID,
        "app_installed_team_id": TEAM_ID,
        "bot_id": BOT_ID,
    }


def _filled_state(view: Mapping[str, Any], values: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``view_submission``'s ``state.values``: every input block of the view, with what the person typed or
    chose. ``AssertionError`` for an input the view does not show or a required one left empty."""
    state: dict[str, Any] = {}
    for block in view.get("blocks") or ():
        if block.get("type") != "input":
            continue
        block_id, element = str(block["block_id"]), block.get("element") or {}
        action_id = str(element.get("action_id"))
        given = dict(values.get(block_id, {}))
        value = given.pop(action_id, None)
        if given:
            raise AssertionError(f"input block {block_id!r} has no element {sorted(given)} (it has {action_id!r})")
        if value in (None, "") and not block.get("optional"):
            raise AssertionError(f"input {block_id!r} is required: Slack does not submit the view without it")
        state[block_id] = {action_id: _element_state(element, value)}
    unknown = sorted(set(values) - set(state))
    if unknown:
        raise AssertionError(f"the view shows no input blocks {unknown} (it has {sorted(state)})")
    return state


def _element_state(element: Mapping[str, Any], value: Any) -> dict[str, Any]:
    kind = element.get("type")
    if kind == "plain_text_input":
        return {"type": kind, "value": None if value in (None, "") else str(value)}
    if kind in ("static_select", "radio_buttons"):
        options = element.get("options") or []
        chosen = next((o for o in options if o.get("value") == value), None)
        if value is not None and chosen is None:
            raise AssertionError(f"{element.get('action_id')!r} offers no option {value!r}")
        return {"type": kind, "selected_option": chosen}
    raise AssertionError(f"the stand-in cannot fill a {kind!r} element")


# What Slack draws for the emoji codes our messages use.
_EMOJI = {
    ":information_source:": "\u2139\ufe0f",
    ":white_check_mark:": "✅",
    ":warning:": "⚠️",
    ":rotating_light:": "🚨",
}
_BOLD = re.compile(r"\*([^*\n]+)\*")


def _plain(text: str) -> str:
    """Text as Slack draws it: entities decoded, ``*bold*`` without its asterisks, emoji codes as emoji."""
    for code, emoji in _EMOJI.items():
        text = text.replace(code, emoji)
    text = _BOLD.sub(r"\1", text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def render_for_reading(message: ReceivedMessage) -> str:
    """A message roughly as Slack shows it: header, text, the fact grid, the buttons' labels and links."""
    lines: list[str] = []
    for block in message.blocks or ():
        kind = block.get("type")
        if kind in ("header", "section") and isinstance(block.get("text"), dict):
            lines.append(_plain(str(block["text"].get("text", ""))))
        if kind == "section" and block.get("fields"):
            lines.append("  ".join(_plain(str(f.get("text", ""))).replace("\n", ": ") for f in block["fields"]))
        if kind == "actions":
            lines += [f"[{e['text']['text']}] {e.get('url', '')}" for e in block.get("elements", []) if "text" in e]
        if kind == "context":
            lines += [_plain(str(e.get("text", ""))) for e in block.get("elements", [])]
    return "\n".join(line for line in lines if line) or _plain(message.text)


def _bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization.startswith("Bearer "):
        return authorization.removeprefix("Bearer ").strip()
    return None


def _json_field(value: Any) -> Any:
    """Form-encoded requests carry ``blocks``/``metadata`` as JSON strings; JSON requests as objects."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def _parse_body(content_type: str, body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    if content_type.startswith("application/json"):
        parsed = json.loads(body)
        return parsed if isinstance(parsed, dict) else {}
    return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))


def _make_handler(standin: SlackStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "SlackStandIn/1.0"

        def do_POST(self) -> None:
            self._dispatch()

        def do_GET(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                params: dict[str, Any] = dict(parse_qsl(url.query))
                params.update(_parse_body(self.headers.get("Content-Type") or "", body))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self._reply(HTTPStatus.OK, {}, {"ok": False, "error": "invalid_json"})
                return
            if url.path.startswith(API_PREFIX):
                method = url.path.removeprefix(API_PREFIX)
                self._reply(*standin.handle_api(method, self.headers.get("Authorization"), params))
            elif url.path.startswith(WEBHOOK_PREFIX) and self.command == "POST":
                self._reply(*standin.handle_webhook(url.path.removeprefix(WEBHOOK_PREFIX), params))
            elif url.path == RECEIVED_PATH and self.command == "GET":
                self._reply(HTTPStatus.OK, {}, standin.received())
            elif url.path.startswith(RESPONSE_URL_PREFIX) and self.command == "POST":
                self._reply(*standin.handle_response_url(url.path.removeprefix(RESPONSE_URL_PREFIX), params))
            elif url.path == CLICK_PATH and self.command == "POST":
                self._reply(*standin.handle_click_request(params))
            else:
                self._reply(HTTPStatus.NOT_FOUND, {}, "not found")

        def _reply(self, status: int, headers: Mapping[str, str], body: dict[str, Any] | str) -> None:
            if isinstance(body, dict):
                data = json.dumps(body).encode("utf-8")
                content_type = "application/json; charset=utf-8"
            else:
                data = body.encode("utf-8")
                content_type = "text/plain; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # the stdlib names it `format`
            logger.debug("slack stand-in: " + format, *args)

    return Handler


def _user_option(text: str) -> tuple[str, str, str | None]:
    """``--user U123:jane.doe[:Jane]``: ID, handle and, optionally, display name."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError("expected ID:handle[:display name]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _usergroup_option(text: str) -> tuple[str, list[str]]:
    """``--usergroup S0123:U1,U2``: a user group's ID and members."""
    group, _, members = text.partition(":")
    if not group:
        raise argparse.ArgumentTypeError("expected ID:member,member")
    return group, [m for m in members.split(",") if m]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local Slack Web API stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default="xoxb-test-token", help="the bot token it accepts")
    parser.add_argument("--unknown-channel", action="append", default=[], help="answer channel_not_found")
    parser.add_argument("--interactivity-url", help="the app's Request URL: where clicks and submissions go")
    parser.add_argument(
        "--signing-secret",
        default=os.environ.get("SLACK_SIGNING_SECRET"),
        help="signs interactions (default: $SLACK_SIGNING_SECRET; prefer it, argv is visible to every user)",
    )
    parser.add_argument("--user", action="append", type=_user_option, default=[], help="ID:handle[:display name]")
    parser.add_argument("--usergroup", action="append", type=_usergroup_option, default=[], help="S…:U1,U2")
    args = parser.parse_args(argv)
    if args.interactivity_url and not args.signing_secret:
        parser.error("--interactivity-url needs a signing secret (--signing-secret or $SLACK_SIGNING_SECRET)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    standin = SlackStandIn(args.host, args.port, args.token, unknown_channels=args.unknown_channel)
    for user_id, name, display_name in args.user:
        standin.add_user(user_id, name, display_name)
    for group, members in args.usergroup:
        standin.set_usergroup(group, members)
    if args.interactivity_url:
        standin.set_interactivity(args.interactivity_url, args.signing_secret)
    logger.info(
        "Slack stand-in: api_url=%s webhook_url=%s interactivity_url=%s",
        standin.api_url,
        standin.webhook_url(),
        args.interactivity_url or "-",
    )
    try:
        standin.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()


if __name__ == "__main__":
    main()
