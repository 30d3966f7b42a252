"""The HTTP transport: a threaded HTTP/1.1 server on loopback, ACL tokens, and Consul's response headers.

Requests are parsed into a ``Request`` and answered by ``Api.answer``; errors become plain-text answers.
A client that goes away before its answer is written (a watcher giving up on a blocking query) is normal
and passes silently.
"""

from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from standins.consul.parsing import ApiError
from standins.consul.routes import Api, Reply, Request


class HttpFront:
    """Serves ``api`` over HTTP on a background thread; ``acl_token``, when set, is required by every request."""

    def __init__(self, api: Api, acl_token: str | None) -> None:
        self.api = api
        self.acl_token = acl_token
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        front = self

        class Handler(_Handler):
            served = front

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="consul-standin-http",
            daemon=True,
        )
        self._thread.start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._thread = None


class _Handler(BaseHTTPRequestHandler):
    served: ClassVar[HttpFront]
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and the client's
    # delayed ACK add ~40 ms to every answer.
    disable_nagle_algorithm = True
    server_version = "ConsulStandIn"

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib names it `format`
        return

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            # The client closed its connection, typically while a blocking query waited: no one to answer.
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            self._authorize(path, query)
            reply = self.served.api.answer(Request(method, path, query, body))
        except ApiError as error:
            reply = Reply(error.status, error.message.encode(), content_type="text/plain; charset=utf-8")
        self._send(reply)

    def _authorize(self, path: str, query: dict[str, list[str]]) -> None:
        expected = self.served.acl_token
        if expected is None or path.startswith("/v1/status/"):
            return
        bearer = self.headers.get("Authorization", "")
        token = (
            self.headers.get("X-Consul-Token")
            or (bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else "")
            or (query.get("token") or [""])[-1]
        )
        if not token:
            raise ApiError(403, "Permission denied: anonymous token lacks permission")
        if token != expected:
            raise ApiError(403, "ACL not found")

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Vary", "Accept-Encoding")
        if reply.index is not None:
            self.send_header("X-Consul-Index", str(max(reply.index, 1)))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
            self.send_header("X-Consul-Effective-Consistency", "leader")
        self.end_headers()
        self.wfile.write(reply.body)
