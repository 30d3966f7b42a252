"""Start the real components of a local push-to-deploy loop: a Prefect server, a process worker, and the
machine-local stand-ins (moto for S3/EC2, the Consul API stand-in, the Slack API stand-in).

The demo and the end-to-end tests both use this, so they exercise the same set-up an operator would.
Every process is started in its own process group and stopped with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class ManagedProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        _stop_group(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(
    name: str, argv: list[str], *, env: Mapping[str, str], log_dir: Path, cwd: Path | None = None
) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        cwd=cwd or PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return ManagedProcess(name=name, proc=proc, log_path=log_path)


@dataclass
class PrefectServer:
    api_url: str
    ui_url: str
    home: Path
    process: ManagedProcess
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        self.process.stop()


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        # Flow code and blocks are imported by module path from the project.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect_server(
    home: Path, *, port: int | None = None, database_url: str | None = None, timeout: float = 180.0
) -> PrefectServer:
    port = port or free_port()
    env = prefect_env(home)
    env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    env["PREFECT_SERVER_API_PORT"] = str(port)
    # Repossess expired workspace-lock leases promptly rather than on the default cadence.
    env["PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS"] = "5"
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    process = spawn(
        "prefect-server",
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        log_dir=home / "logs",
    )
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early:\n{process.log_tail()}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return PrefectServer(
                    api_url=api_url,
                    ui_url=f"http://127.0.0.1:{port}",
                    home=home,
                    process=process,
                    env=prefect_env(home, api_url),
                )
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.stop()
    raise RuntimeError(f"prefect server did not answer within {timeout:.0f}s:\n{process.log_tail()}")


def start_worker(
    server: PrefectServer,
    pool: str,
    *,
    env: Mapping[str, str] | None = None,
    limit: int = 4,
    name: str = "worker",
) -> ManagedProcess:
    return spawn(
        name,
        [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "process",
            "--limit",
            str(limit),
            "--name",
            name,
        ],
        env={**server.env, **(env or {})},
        log_dir=server.home / "logs",
    )
