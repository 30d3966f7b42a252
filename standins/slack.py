"""A local stand-in for the Slack Web API and incoming webhooks, for tests and the offline demo.

It speaks just enough of Slack's wire format for ``slack_sdk.WebClient`` to be pointed at it with
``base_url=standin.api_url``: ``auth.test``, ``chat.postMessage`` (a ``thread_ts`` must name a message it
holds in that channel, else ``invalid_thread_ts``) and ``chat.update``, Bearer-token checks,
``channel_not_found``, and injectable rate limiting (HTTP 429 + ``Retry-After``) and 5xx faults, so the
notifier's retry and error paths run against real HTTP. Incoming-webhook posts to ``/webhook/<id>`` are
recorded too.

Run it on its own with ``python -m standins.slack --port 8765``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"
WEBHOOK_PREFIX = "/webhook/"
# Not Slack's: what the stand-in received, for demos and operators (GET; `?` nothing).
RECEIVED_PATH = "/_standin/received"
_FIRST_TS_SECONDS = 1_700_000_000
BOT_USER_ID = "U000STANDIN"


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
    ) -> None:
        self.host = host
        self.token = token
        self.unknown_channels: set[str] = set(unknown_channels)
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
            self._thread = threading.Thread(
                target=self._server.serve_forever, name=f"slack-standin-{self.port}", daemon=True
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
        reads them (``rendered``) and as sent, and incoming-webhook deliveries."""
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
            }

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()
            self._webhooks.clear()
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
}


def _slack_message_json(message: ReceivedMessage) -> dict[str, Any]:
    return {
        "type": "message",
        "subtype": "bot_message",
        "bot_id": "B000STANDIN",
        "user": message.user,
        "text": message.text,
        "blocks": message.blocks,
        "ts": message.ts,
    }


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local Slack Web API stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default="xoxb-test-token", help="the bot token it accepts")
    parser.add_argument("--unknown-channel", action="append", default=[], help="answer channel_not_found")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    standin = SlackStandIn(args.host, args.port, args.token, unknown_channels=args.unknown_channel)
    logger.info("Slack stand-in: api_url=%s webhook_url=%s", standin.api_url, standin.webhook_url())
    try:
        standin.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()


if __name__ == "__main__":
    main()
