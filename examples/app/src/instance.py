"""Start and stop one instance of the app from its unpacked image, and keep Consul in step with it.

``bin/start`` and ``bin/stop`` in the image call this module; it is Python 3 stdlib only because it runs
with the machine's ``python3``, outside any virtualenv.

start: launch the app detached (its own session, output to ``app.log``, ``app.pid``), wait until
``/health`` answers, then register the service definition baked into the image with the local Consul agent
(``PUT /v1/agent/service/register``), filling in the address, the port and the deploy run id. If the
registration fails the app is stopped again, so a failed start leaves nothing running.

stop: deregister the service (``PUT /v1/agent/service/deregister/:id``), then terminate the app's process
group. Stopping an instance that is already stopped, or never started, succeeds.

The Consul ACL token, when needed, comes from ``CONSUL_HTTP_TOKEN`` and is sent as ``X-Consul-Token``; it
is never written to the instance directory or the log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

IMAGE_ROOT = Path(__file__).resolve().parent.parent
PID_FILE = "app.pid"
PORT_FILE = "app.port"
LOG_FILE = "app.log"
STATE_FILE = "instance.json"
HEALTH_WAIT_SECONDS = 20.0
STOP_GRACE_SECONDS = 5.0
HTTP_TIMEOUT_SECONDS = 5.0


class InstanceError(Exception):
    """Start or stop could not do its job; the message says why, for the Terraform log."""


def consul_request(consul_addr: str, method: str, path: str, body: dict[str, Any] | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    # The address comes from Terraform or the operator, never from a request: any scheme they chose is theirs.
    request = urllib.request.Request(f"{consul_addr.rstrip('/')}{path}", data=data, method=method)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    if token := os.environ.get("CONSUL_HTTP_TOKEN"):
        request.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        raise InstanceError(f"Consul agent at {consul_addr} is unreachable: {exc}") from exc


def service_registration(
    definition: dict[str, Any],
    *,
    service_id: str,
    address: str,
    port: int,
    deploy_run_id: str,
    extra_meta: dict[str, str] | None = None,
    initial_status: str | None = None,
) -> dict[str, Any]:
    """The baked definition plus what is only known at start: where it listens and which run deployed it."""
    registration = dict(definition)
    registration["ID"] = service_id
    registration["Address"] = address
    registration["Port"] = port
    registration["Meta"] = {**definition.get("Meta", {}), **(extra_meta or {}), "deploy_run_id": deploy_run_id}
    check = dict(definition.get("Check", {}))
    if "HTTP" in check:
        check["HTTP"] = check["HTTP"].format(address=address, port=port)
    if initial_status is not None:
        check["Status"] = initial_status
    registration["Check"] = check
    return registration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it has exited for every purpose here.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _owned_pid(instance_dir: Path) -> int | None:
    """The app's pid if it is still running and is really ours (pids are reused)."""
    try:
        pid = int((instance_dir / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return pid
    return pid if str(instance_dir) in cmdline else None


def _terminate(pid: int) -> None:
    # start_new_session made the app a group leader: signal the group so nothing it forked survives.
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _wait_until_answering(instance_dir: Path, pid: int, bind: str) -> tuple[int, bool]:
    """Wait for the app to write its port and answer /health (any HTTP status counts as answering); returns
    the port and whether /health said 2xx."""
    deadline = time.monotonic() + HEALTH_WAIT_SECONDS
    port: int | None = None
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise InstanceError(f"the app exited during start; see {instance_dir / LOG_FILE}")
        if port is None:
            try:
                port = int((instance_dir / PORT_FILE).read_text().strip())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
                continue
        host = "127.0.0.1" if bind in ("0.0.0.0", "") else bind  # comparing, not binding
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1.0):
                return port, True
        except urllib.error.HTTPError:
            return port, False
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise InstanceError(f"the app did not answer /health within {HEALTH_WAIT_SECONDS:.0f}s")


def start(args: argparse.Namespace) -> None:
    instance_dir: Path = args.instance_dir.resolve()
    if (running := _owned_pid(instance_dir)) is not None:
        raise InstanceError(f"an instance is already running in {instance_dir} (pid {running})")
    definition: dict[str, Any] = json.loads((IMAGE_ROOT / "consul" / "service.json").read_text())
    release: dict[str, Any] = json.loads((IMAGE_ROOT / "release.json").read_text())
    service_id = args.service_id or f"{definition['Name']}-{release['version']}"

    (instance_dir / PORT_FILE).unlink(missing_ok=True)
    with (instance_dir / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(IMAGE_ROOT / "app" / "app.py"),
                "--port",
                str(args.port),
                "--bind",
                args.bind,
                "--instance-dir",
                str(instance_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # detached: it outlives this script and Terraform
            close_fds=True,
            # The app gets only what it needs; no token or credential of whoever started it.
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        )
    (instance_dir / PID_FILE).write_text(f"{proc.pid}\n")
    try:
        port, healthy = _wait_until_answering(instance_dir, proc.pid, args.bind)
        registration = service_registration(
            definition,
            service_id=service_id,
            address=args.advertise_address,
            port=port,
            deploy_run_id=args.deploy_run_id,
            extra_meta=dict(item.split("=", 1) for item in args.meta),
            # Start already knows how /health answered: register the check in that state (Consul's
            # `Status`) instead of critical-until-the-first-interval, so a healthy instance is seen at once.
            initial_status="passing" if healthy else "critical",
        )
        status = consul_request(args.consul_addr, "PUT", "/v1/agent/service/register", registration)
        if status != 200:
            raise InstanceError(f"Consul refused to register {service_id}: HTTP {status}")
    except BaseException:
        _terminate(proc.pid)
        raise
    state = {"service_id": service_id, "consul_addr": args.consul_addr, "pid": proc.pid, "port": port}
    (instance_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    print(json.dumps(state))


def stop(args: argparse.Namespace) -> None:
    instance_dir: Path = args.instance_dir.resolve()
    try:
        state: dict[str, Any] = json.loads((instance_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        state = {}
    consul_addr = args.consul_addr or state.get("consul_addr")
    service_id = state.get("service_id")
    deregister_error: InstanceError | None = None
    if service_id and consul_addr:
        # Deregister first, so Consul stops routing to the instance before it goes away.
        try:
            status = consul_request(consul_addr, "PUT", f"/v1/agent/service/deregister/{service_id}")
        except InstanceError as exc:
            deregister_error = exc
        else:
            # 404: already deregistered (by an earlier stop, or the agent restarted). That is the goal.
            if status not in (200, 404):
                deregister_error = InstanceError(f"Consul refused to deregister {service_id}: HTTP {status}")
    # Stop the process even when Consul failed: a retry of stop deregisters, and nothing keeps running.
    if (pid := _owned_pid(instance_dir)) is not None:
        _terminate(pid)
    (instance_dir / PID_FILE).unlink(missing_ok=True)
    if deregister_error is not None:
        raise deregister_error
    print(json.dumps({"stopped": service_id, "instance_dir": str(instance_dir)}))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="instance")
    commands = parser.add_subparsers(dest="command", required=True)
    start_cmd = commands.add_parser("start", help="start the app and register it with Consul")
    start_cmd.add_argument("--instance-dir", type=Path, default=IMAGE_ROOT)
    start_cmd.add_argument("--consul-addr", default=os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"))
    start_cmd.add_argument("--deploy-run-id", required=True)
    start_cmd.add_argument("--service-id", default=None, help="default: <service name>-<version>")
    start_cmd.add_argument("--meta", action="append", default=[], help="extra Service Meta, KEY=VALUE")
    start_cmd.add_argument("--port", type=int, default=0, help="0 picks a free port")
    start_cmd.add_argument("--bind", default="127.0.0.1")
    start_cmd.add_argument("--advertise-address", default="127.0.0.1", help="the Address Consul hands out")
    start_cmd.set_defaults(handler=start)
    stop_cmd = commands.add_parser("stop", help="deregister from Consul and stop the app")
    stop_cmd.add_argument("--instance-dir", type=Path, default=IMAGE_ROOT)
    stop_cmd.add_argument("--consul-addr", default=None, help="default: the address start registered with")
    stop_cmd.set_defaults(handler=stop)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.handler(args)
    except InstanceError as exc:
        print(f"{args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
