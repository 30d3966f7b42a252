"""__SERVICE_NAME__: a tiny HTTP service, Python 3 stdlib only, so it runs from the unpacked image as it is.

``GET /`` says which service and version answer; ``GET /health`` is what the Consul check polls (200 while
the service can serve). Replace the handlers with the service's own; keep the start protocol below, which
``bin/start`` (``instance.py``) relies on:

* it takes ``--port`` (0: any free port), ``--bind`` and ``--instance-dir``;
* it writes the port it bound to ``<instance-dir>/app.port``, so ``bin/start`` knows where to register it;
* it answers ``/health`` once it can serve.

Its identity (namespace, service name, version, commit) comes from the ``release.json`` the build bakes into
the image, so what it reports is what was built.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

IMAGE_ROOT = Path(__file__).resolve().parent.parent
PORT_FILE = "app.port"


def load_release(path: Path) -> dict[str, Any]:
    try:
        release: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        # Run from the source tree, not from a built image.
        return {"service_name": "__SERVICE_NAME__", "version": "dev", "commit": "unknown"}
    return release


def make_handler(release: dict[str, Any]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "__SERVICE_NAME__"

        def do_GET(self) -> None:
            if self.path == "/":
                self._reply(200, {"service": release.get("service_name"), "version": release.get("version")})
            elif self.path == "/health":
                self._reply(200, {"status": "ok", "version": release.get("version")})
            else:
                self._reply(404, {"error": "not found"})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="__SERVICE_NAME__")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--instance-dir", type=Path, default=IMAGE_ROOT)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    release = load_release(IMAGE_ROOT / "release.json")
    server = ThreadingHTTPServer((args.bind, args.port), make_handler(release))
    # Written under a temporary name and renamed: bin/start never reads half a port number.
    port_file = args.instance_dir / PORT_FILE
    port_file.parent.mkdir(parents=True, exist_ok=True)
    partial = port_file.with_suffix(".tmp")
    partial.write_text(f"{server.server_address[1]}\n")
    partial.replace(port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
