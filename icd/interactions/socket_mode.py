"""Slack interactions over Socket Mode, for sites Slack cannot reach over HTTP (no public URL).

The process opens a WebSocket to Slack (``apps.connections.open`` with the app-level ``xapp-`` token gives its
URL) and Slack delivers each button click or modal submission on it as an envelope, which must be
acknowledged within 3 s. The same :class:`~icd.interactions.reply.InteractionHandler` as the HTTP route
decides: its ``Reply.body`` goes back in the acknowledgement (a modal's ``response_action`` or nothing), and
``Reply.later`` runs in a worker thread only once the acknowledgement is sent, as the HTTP route runs it
after its 200.

slack_sdk's builtin client (``slack_sdk.socket_mode.builtin``, no extra package) owns the connection: it
pings, reconnects when the connection drops or Slack asks it to (``disconnect``), and asks for a fresh URL
each time. It speaks plain ``ws://`` to any port but 443, which is how tests point it at
``standins/slack_socket.py``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.error import URLError

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.socket_mode.builtin.client import SocketModeClient
from slack_sdk.socket_mode.client import BaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse

from icd.errors import NotificationError, TransientNotificationError
from icd.interactions.reply import InteractionHandler, Reply

_module_logger = logging.getLogger(__name__)
# Enough for a few clicks at once; ``later`` resumes a run or posts one message, it does not build anything.
LATER_WORKERS = 4


class InteractionDispatcher:
    """The Socket Mode request listener: hands ``interactive`` envelopes to the handler, acknowledges every
    envelope at once, and runs each ``Reply.later`` in its own small pool, where an exception is logged and
    the connection lives on."""

    def __init__(self, handler: InteractionHandler, *, logger: logging.Logger, workers: int = LATER_WORKERS) -> None:
        self._handler = handler
        self._logger = logger
        self._later = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="socket-mode-later")

    def __call__(self, client: BaseSocketModeClient, request: SocketModeRequest) -> None:
        if request.type != "interactive":
            # Events API envelopes and slash commands are not ours; acknowledged, else Slack sends them again.
            self._logger.debug("Socket Mode: ignored a %s envelope %s", request.type, request.envelope_id)
            self._acknowledge(client, request.envelope_id, None)
            return
        reply = self._decide(request)
        if not self._acknowledge(client, request.envelope_id, reply.body):
            # Slack told the person the click failed; acting anyway would contradict that. They can click again.
            self._logger.error("Socket Mode: envelope %s was not acknowledged; not acting on it", request.envelope_id)
            return
        if reply.later is not None:
            self._later.submit(self._run_later, reply.later, request.envelope_id)

    def shutdown(self) -> None:
        """Wait for the ``later`` work already started (a run being resumed), then stop the pool."""
        self._later.shutdown(wait=True)

    def _decide(self, request: SocketModeRequest) -> Reply:
        """The handler's reply; an empty one if it broke its promise never to raise (the click is still
        acknowledged, so Slack does not show an error and deliver the same envelope again)."""
        try:
            return self._handler.receive(request.payload)
        except Exception:
            self._logger.exception("Socket Mode: the interaction handler failed on envelope %s", request.envelope_id)
            return Reply()

    def _acknowledge(self, client: BaseSocketModeClient, envelope_id: str, body: dict[str, object] | None) -> bool:
        try:
            client.send_socket_mode_response(SocketModeResponse(envelope_id=envelope_id, payload=body))
        except (SlackClientError, OSError) as exc:
            self._logger.error("Socket Mode: acknowledging envelope %s failed: %s", envelope_id, exc)
            return False
        return True

    def _run_later(self, later: Callable[[], None], envelope_id: str) -> None:
        try:
            later()
        except Exception:
            self._logger.exception("Socket Mode: the work after envelope %s failed", envelope_id)


def run_socket_mode(
    handler: InteractionHandler,
    *,
    app_token: str,
    api_url: str,
    stop: threading.Event | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """Receive interactions over Socket Mode until ``stop`` is set (forever without one).

    ``api_url`` is the Web API base (``https://slack.com/api/``, or a stand-in's). Raises
    :class:`~icd.errors.NotificationError` when Slack refuses the app-level token (``invalid_auth``: a bot
    token given instead, a revoked one, Socket Mode off) and :class:`~icd.errors.TransientNotificationError`
    when the Web API cannot be reached or is failing; neither message carries the token. Once connected, a
    dropped connection is slack_sdk's to restore. Returns after ``stop``, once the ``later`` work started
    has ended.
    """
    log = logger or _module_logger
    client = SocketModeClient(
        app_token=app_token,
        web_client=WebClient(base_url=api_url),
        logger=log,
        auto_reconnect_enabled=True,
    )
    dispatcher = InteractionDispatcher(handler, logger=log)
    client.socket_mode_request_listeners.append(dispatcher)
    try:
        _connect(client, api_url)
        log.info("Socket Mode: receiving Slack interactions (Web API %s)", api_url)
        (stop or threading.Event()).wait()
    finally:
        _close(client)
        dispatcher.shutdown()


def _close(client: SocketModeClient) -> None:
    """``client.close()``, without its waits. It takes the receiving thread's lock, which that thread holds in
    ``recv()`` until a 3 s timeout fixed in slack_sdk: shutting the socket down first ends that ``recv()``. It
    then joins the thread that takes messages off its queue, which waits up to 1 s for the next one: once the
    client is marked closed, an empty item (``None``, which that thread skips) ends its wait."""
    session = client.current_session
    sock = session.sock if session is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    client.closed = True
    client.message_queue.put(None)
    client.close()


def _connect(client: SocketModeClient, api_url: str) -> None:
    """The first connection, with what Slack says about the token as our error; ``SlackApiError``'s text is
    the response (no token), but ours is the one an operator needs."""
    try:
        client.connect()
    except SlackApiError as exc:
        status = exc.response.status_code
        data = exc.response.data
        code = data.get("error", "unknown_error") if isinstance(data, dict) else "unknown_error"
        message = f"Slack refused to open a Socket Mode connection: {code} (HTTP {status}, Web API {api_url})"
        if status == 429 or status >= 500:
            raise TransientNotificationError(message) from exc
        if code in {"invalid_auth", "not_authed", "not_allowed_token_type", "token_revoked"}:
            message += "; the app-level token (xapp-..., with connections:write) is wrong or revoked"
        raise NotificationError(message) from exc
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientNotificationError(f"Slack Web API at {api_url} unreachable for Socket Mode: {reason}") from exc
