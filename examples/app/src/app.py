"""The example web service the pipeline deploys: Python 3 stdlib only, so it runs from the unpacked image.

``GET /`` says who it is; ``GET /health`` is what the Consul HTTP check polls. The service reads its
identity from the ``release.json`` baked into the image, so what it reports is what was built.

A file switch makes health fail on purpose: while ``<instance_dir>/unhealthy`` exists, ``/health`` answers
500. Demos and tests use it to turn an instance critical in Consul without killing it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

IMAGE_ROOT = Path(__file__).resolve().parent.parent
UNHEALTHY_SWITCH = "unhealthy"
PORT_FILE = "app.port"


def load_release(path: Path) -> dict[str, Any]:
    try:
        release: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        # Running from the source tree, not from a built image.
        return {"namespace": "unknown", "version": "0.0.0-dev", "commit": "unknown"}
    return release


def make_handler(release: dict[str, Any], instance_dir: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "example-app"

        def do_GET(self) -> None:
            if self.path == "/":
                self._reply(200, {"name": release.get("namespace"), "version": release.get("version")})
            elif self.path == "/health":
                healthy = not (instance_dir / UNHEALTHY_SWITCH).exists()
                self._reply(
                    200 if healthy else 500,
                    {
                        "status": "ok" if healthy else "unhealthy",
                        "version": release.get("version"),
                        "commit": release.get("commit"),
                    },
                )
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=int(os.environ.get("APP_PORT", "8080")))
    parser.add_argument("--bind", default=os.environ.get("APP_BIND", "127.0.0.1"))
    parser.add_argument("--instance-dir", type=Path, default=Path(os.environ.get("APP_INSTANCE_DIR", str(IMAGE_ROOT))))
    parser.add_argument("--release", type=Path, default=IMAGE_ROOT / "release.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    release = load_release(args.release)
    server = ThreadingHTTPServer((args.bind, args.port), make_handler(release, args.instance_dir))
    # Port 0 means "any free port"; the file tells bin/start which one the kernel chose, without a race.
    bound_port = server.server_address[1]
    port_file = args.instance_dir / PORT_FILE
    port_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(f"{bound_port}\n")
    tmp.replace(port_file)
    sys.stderr.write(f"serving {release.get('version')} on {args.bind}:{bound_port}\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
