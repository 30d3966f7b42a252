"""A local stand-in for Slack's side of Socket Mode, for tests and the offline demo.

Slack's side of Socket Mode is two parts: the Web API method ``apps.connections.open`` (an app-level token in,
a one-use WebSocket URL out) and the WebSocket itself, on which Slack first says ``hello``, then sends
envelopes and expects each to be acknowledged with its ``envelope_id`` (and, when the envelope
``accepts_response_payload``, a ``payload`` that stands for the HTTP response body). This module serves
both on loopback, so ``icd.interactions.socket_mode`` runs against real HTTP and a real WebSocket.

It is a module of its own, apart from ``standins/slack.py`` (the Web API for messages), because it serves a
WebSocket; a test that needs both runs both. Envelope shapes follow Slack's and slack_sdk's own mock server
(``tests/slack_sdk/socket_mode/mock_socket_mode_server.py`` in slackapi/python-slack-sdk).

Run it on its own with ``python -m standins.slack_socket --app-token xapp-...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

logger = logging.getLogger(__name__)

OPEN_CONNECTION_PATH = "/api/apps.connections.open"
WEBSOCKET_PATH = "/link/"
STANDIN_APP_ID = "A000STANDIN"
# The interaction types whose HTTP response body Slack reads (a modal's ``response_action``, the options of an
# external select); for these alone a Socket Mode envelope says ``accepts_response_payload: true``.
_TYPES_WITH_RESPONSE_PAYLOAD = frozenset({"view_submission", "block_suggestion"})


class SlackSocketStandIn:
    """``apps.connections.open`` over HTTP plus the Socket Mode WebSocket, both on loopback.

    Use it as a context manager, or call ``start()`` / ``stop()``. Envelopes go to the connection opened
    last (Slack spreads them over an app's connections; a client holds one at a time, two while it swaps).
    All methods are thread-safe.
    """

    def __init__(
        self,
        app_token: str = "xapp-1-A000STANDIN-0-standin",  # noqa: S107  # a fixed fake token is the point
        *,
        host: str = "127.0.0.1",
        app_id: str = STANDIN_APP_ID,
    ) -> None:
        self.host = host
        self.app_token = app_token
        self.app_id = app_id
        self._changed = threading.Condition()
        self._unused_tickets: set[str] = set()
        self._connections: list[ServerConnection] = []
        self._connections_opened = 0
        self._open_calls = 0
        self._refused_open_calls = 0
        self._acknowledgements: list[dict[str, Any]] = []
        self._websocket: Server = serve(
            self._serve_connection,
            host,
            0,
            process_request=self._check_ticket,
            compression=None,  # slack_sdk's builtin client offers no extension
            close_timeout=2,
            logger=logging.getLogger(f"{__name__}.websocket"),
        )
        self._http = ThreadingHTTPServer((host, 0), _make_http_handler(self))
        self._http.daemon_threads = True
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """The ``base_url`` for ``slack_sdk.WebClient`` (ends with a slash: the SDK urljoins)."""
        return f"http://{self.host}:{self._http.server_address[1]}/api/"

    @property
    def websocket_port(self) -> int:
        return int(self._websocket.socket.getsockname()[1])

    def start(self) -> SlackSocketStandIn:
        if not self._threads:
            self._threads = [
                threading.Thread(
                    target=self._http.serve_forever,
                    kwargs={"poll_interval": 0.05},  # as the other stand-ins: its stop waits one interval
                    name="slack-socket-standin-http",
                    daemon=True,
                ),
                threading.Thread(target=self._websocket.serve_forever, name="slack-socket-standin-ws", daemon=True),
            ]
            for thread in self._threads:
                thread.start()
        return self

    def stop(self) -> None:
        """Stop both servers and close every open connection (their threads are not daemons: they must end)."""
        self._websocket.shutdown()
        with self._changed:
            connections = list(self._connections)
        for connection in connections:
            connection.close()
        if self._threads:
            self._http.shutdown()
            for thread in self._threads:
                thread.join(timeout=5)
            self._threads = []
        self._http.server_close()

    def __enter__(self) -> SlackSocketStandIn:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what happened --------------------------------------------------------------------------------

    @property
    def open_calls(self) -> int:
        """``apps.connections.open`` calls answered with a URL."""
        with self._changed:
            return self._open_calls

    @property
    def refused_open_calls(self) -> int:
        """``apps.connections.open`` calls refused (``not_authed`` / ``invalid_auth``)."""
        with self._changed:
            return self._refused_open_calls

    @property
    def connections_opened(self) -> int:
        """WebSocket connections accepted and greeted with ``hello`` since the start."""
        with self._changed:
            return self._connections_opened

    @property
    def acknowledgements(self) -> list[dict[str, Any]]:
        """Every acknowledgement received, in order of arrival."""
        with self._changed:
            return list(self._acknowledgements)

    def wait_for_connection(self, count: int = 1, timeout: float = 10.0) -> None:
        """Until ``count`` connections have been opened in all and one is open; ``TimeoutError`` after that."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: self._connections_opened >= count and bool(self._connections), timeout=timeout
            ):
                raise TimeoutError(
                    f"no Socket Mode connection #{count} within {timeout:.0f}s "
                    f"({self._connections_opened} opened, {len(self._connections)} open)"
                )

    # --- what Slack sends -----------------------------------------------------------------------------

    def send_interactive(self, payload: Mapping[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
        """Deliver one interaction (a ``block_actions`` or ``view_submission`` payload) as Slack does in
        Socket Mode; the client's acknowledgement (``{"envelope_id", "payload"?}``)."""
        accepts_response_payload = payload.get("type") in _TYPES_WITH_RESPONSE_PAYLOAD
        return self.send_envelope("interactive", payload, accepts_response_payload, timeout=timeout)

    def send_envelope(
        self,
        envelope_type: str,
        payload: Mapping[str, Any],
        accepts_response_payload: bool,
        *,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """Deliver one envelope of any type (``events_api``, ``slash_commands``, ``interactive``); the
        acknowledgement. ``TimeoutError`` when none comes within ``timeout`` seconds (Slack waits 3 s, then
        shows the person an error)."""
        envelope_id = str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "payload": dict(payload),
            "type": envelope_type,
            "accepts_response_payload": accepts_response_payload,
        }
        self._send(envelope, timeout=timeout)
        with self._changed:
            acknowledged = self._changed.wait_for(lambda: self._acknowledgement(envelope_id), timeout=timeout)
        if not acknowledged:
            raise TimeoutError(f"{envelope_type} envelope {envelope_id} not acknowledged within {timeout:.0f}s")
        return acknowledged

    def send_disconnect(self, reason: str = "refresh_requested", *, timeout: float = 5.0) -> None:
        """Ask the client to reconnect, as Slack does before it recycles a connection."""
        self._send({"type": "disconnect", "reason": reason, "debug_info": {"host": "standin"}}, timeout=timeout)

    def _send(self, message: Mapping[str, Any], *, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._connections), timeout=timeout):
                raise TimeoutError(f"no Socket Mode connection open within {timeout:.0f}s")
            connection = self._connections[-1]
        connection.send(json.dumps(message))

    def _acknowledgement(self, envelope_id: str) -> dict[str, Any] | None:
        return next((ack for ack in self._acknowledgements if ack.get("envelope_id") == envelope_id), None)

    # --- servers --------------------------------------------------------------------------------------

    def open_connection(self, authorization: str | None) -> dict[str, Any]:
        """``apps.connections.open``: a one-use WebSocket URL for the app-level token, as Slack answers."""
        token = authorization.removeprefix("Bearer ").strip() if authorization else ""
        with self._changed:
            if not token or not secrets.compare_digest(token.encode(), self.app_token.encode()):
                self._refused_open_calls += 1
                return {"ok": False, "error": "invalid_auth" if token else "not_authed"}
            ticket = str(uuid.uuid4())
            self._unused_tickets.add(ticket)
            self._open_calls += 1
        url = f"ws://{self.host}:{self.websocket_port}{WEBSOCKET_PATH}?ticket={ticket}&app_id={self.app_id}"
        return {"ok": True, "url": url}

    def _check_ticket(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse the handshake unless its URL came from ``apps.connections.open`` and was not used yet."""
        url = urlsplit(request.path)
        ticket = parse_qs(url.query).get("ticket", [""])[0]
        with self._changed:
            if url.path == WEBSOCKET_PATH and ticket in self._unused_tickets:
                self._unused_tickets.discard(ticket)
                return None
        return connection.respond(HTTPStatus.UNAUTHORIZED, "unknown or used ticket\n")

    def _serve_connection(self, connection: ServerConnection) -> None:
        with self._changed:
            num_connections = len(self._connections) + 1
        hello = {
            "type": "hello",
            "num_connections": num_connections,
            "debug_info": {"host": "standin", "approximate_connection_time": 18060},
            "connection_info": {"app_id": self.app_id},
        }
        try:
            connection.send(json.dumps(hello))  # before any envelope: it joins the list only once greeted
            with self._changed:
                self._connections.append(connection)
                self._connections_opened += 1
                self._changed.notify_all()
            for message in connection:
                self._receive(message)
        except ConnectionClosed:
            pass  # the client went away (it closes without a closing handshake)
        finally:
            with self._changed:
                if connection in self._connections:
                    self._connections.remove(connection)
                self._changed.notify_all()

    def _receive(self, message: str | bytes) -> None:
        try:
            parsed = json.loads(message)
        except json.JSONDecodeError:
            logger.warning("Socket Mode stand-in: a message that is not JSON: %.200r", message)
            return
        if not isinstance(parsed, dict) or "envelope_id" not in parsed:
            logger.warning("Socket Mode stand-in: a message that acknowledges nothing: %.200r", message)
            return
        with self._changed:
            self._acknowledgements.append(parsed)
            self._changed.notify_all()


def _make_http_handler(standin: SlackSocketStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "SlackSocketStandIn/1.0"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if urlsplit(self.path).path != OPEN_CONNECTION_PATH:
                self._reply(HTTPStatus.NOT_FOUND, {"ok": False, "error": "unknown_method"})
                return
            self._reply(HTTPStatus.OK, standin.open_connection(self.headers.get("Authorization")))

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # the stdlib names it `format`
            logger.debug("slack socket stand-in: " + format, *args)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local stand-in for Slack's Socket Mode.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--app-token", default="xapp-1-A000STANDIN-0-standin", help="the app-level token it accepts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with SlackSocketStandIn(args.app_token, host=args.host) as standin:
        logger.info("Socket Mode stand-in: api_url=%s", standin.api_url)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
