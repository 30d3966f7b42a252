"""Start the real components of a local push-to-deploy loop: a Prefect server, a process worker, and the
machine-local stand-ins (moto for S3/EC2, the Consul API stand-in, the Slack API stand-in).

The demo and the end-to-end tests both use this, so they exercise the same set-up an operator would.
Every process is started in its own process group and stopped with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
from prefect_aws import AwsCredentials
from prefect_slack import SlackCredentials  # type: ignore[import-untyped]  # ships no type information

from blocks.consul import ConsulConnection
from blocks.notifier import SlackNotifier
from blocks.registry import ArtifactRegistry
from cli.inbound import SECRET_BLOCK
from cli.setup import setup
from icd.config import parse_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_LOCK_TABLE = "icd-terraform-locks"
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
        # Deploys wait on this poll twice (start, and resume after approval): 1 s instead of Prefect's 10 s.
        env={"PREFECT_WORKER_QUERY_SECONDS": "1", **server.env, **(env or {})},
        log_dir=server.home / "logs",
    )


# --- the project's own set-up on that server: blocks, pool, deployments, an app repository ------------


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=dev", "-c", "user.email=dev@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def make_app_repo(dest: Path) -> Path:
    """A git repository holding ``examples/app`` as a developer would push it, with v1 committed on main."""
    shutil.copytree(
        PROJECT_ROOT / "examples" / "app",
        dest,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("output", "packer-manifest.json", "__pycache__"),
    )
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "v1")
    return dest


@dataclass(frozen=True)
class LocalServices:
    """Where the flows' blocks point: S3 (moto), the Slack Web API and the Consul agent."""

    s3_endpoint: str
    bucket: str
    aws_access_key_id: str
    aws_secret_access_key: str
    slack_api_url: str
    slack_token: str
    consul_addr: str


def provision(
    server: PrefectServer,
    services: LocalServices,
    *,
    pool: str = "local-pool",
    alerts_url: str,
    webhook_secret: str = "",
) -> ArtifactRegistry:
    """Create what an operator creates once: the bucket and the state lock table, the blocks the flows load
    by name (with their secrets), then run ``icd-setup``: block types, work pool, the deployments of
    ``prefect.yaml`` with their triggers, and the automations of ``automations.yaml``."""
    credentials = AwsCredentials(
        aws_access_key_id=services.aws_access_key_id,
        aws_secret_access_key=services.aws_secret_access_key,
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": services.s3_endpoint},
    )
    credentials.get_s3_client().create_bucket(Bucket=services.bucket)
    registry = ArtifactRegistry(
        bucket=services.bucket,
        aws_credentials=credentials,
        # The seal of every registry record; generated once here, kept only in the block.
        signing_key=secrets.token_urlsafe(32),
        state_lock_table=STATE_LOCK_TABLE,
    )
    create_lock_table(credentials, STATE_LOCK_TABLE)
    registry.save("registry", overwrite=True)
    SlackNotifier(
        credentials=SlackCredentials(token=services.slack_token),
        channel="#ops",
        api_url=services.slack_api_url,
        prefect_ui_url=server.ui_url,
    ).save("ops-slack", overwrite=True)
    ConsulConnection(address=services.consul_addr, timeout_seconds=10).save("consul", overwrite=True)
    Secret(value=webhook_secret or secrets.token_urlsafe(32)).save(SECRET_BLOCK, overwrite=True)
    # Where critical-health automations send; operators pick PagerDuty, Teams, e-mail... in the UI.
    CustomWebhookNotificationBlock(
        name="ops-alerts",
        url=alerts_url,
        json_data={"text": "{{subject}}", "body": "{{body}}"},
        allow_private_urls=True,
    ).save("ops-alerts", overwrite=True)
    with temporary_env({**server.env, "ICD_PROJECT_DIR": str(PROJECT_ROOT)}):
        setup(pool)
    return registry


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_config(
    path: Path, *, namespaces: Mapping[str, Mapping[str, object]], workspaces: Mapping[str, Mapping[str, object]]
) -> Path:
    """An ``icd.toml`` for a local loop (the demo's, a test's), checked by the same rules as any other."""
    lines: list[str] = []
    for name, settings in namespaces.items():
        lines.append(f'[namespaces."{name}"]')
        lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
        lines.append("")
    for name, settings in workspaces.items():
        lines.append(f"[workspaces.{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
        lines.append("")
    text = "\n".join(lines)
    parse_config(text, where=str(path))  # refuse a bad config before anything runs with it
    path.write_text(text)
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value))


def create_lock_table(credentials: AwsCredentials, table: str) -> None:
    """The DynamoDB table Terraform's S3 backend locks each workspace's state in (hash key ``LockID``)."""
    dynamodb = credentials.get_client("dynamodb")
    with contextlib.suppress(dynamodb.exceptions.ResourceInUseException):  # already there: fine
        dynamodb.create_table(
            TableName=table,
            AttributeDefinitions=[{"AttributeName": "LockID", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "LockID", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )


def worker_env(icd_home: Path, config: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: where runs keep their state, the pipeline config, the venv's tools first."""
    return {
        "ICD_HOME": str(icd_home),
        "ICD_CONFIG": str(config),
        # The library's own log lines (one per tool call, with its duration) go to the run log too.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "icd",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra or {}),
    }


def stop_instances(icd_home: Path) -> None:
    """Deployed app instances are detached processes; stop any still running under ``icd_home``."""
    for stop in sorted((icd_home / "instances").glob("*/*/bin/stop")):
        subprocess.run([str(stop), "--instance-dir", str(stop.parent.parent)], check=False, capture_output=True)


# --- GitHub, as the webhook sender ------------------------------------------------------------------------


def github_push(
    *, full_name: str, clone_url: str, branch: str, after: str, before: str = "0" * 40
) -> dict[str, object]:
    """The parts of GitHub's push payload the webhook reads (the real one has many more)."""
    return {
        "ref": f"refs/heads/{branch}",
        "before": before,
        "after": after,
        "deleted": False,
        "created": before == "0" * 40,
        "repository": {"full_name": full_name, "clone_url": clone_url, "html_url": f"https://github.com/{full_name}"},
        "pusher": {"name": "dev", "email": "dev@example.com"},
        "head_commit": {"id": after, "message": "a change"},
    }


def deliver_webhook(
    url: str,
    secret: str,
    payload: object,
    *,
    delivery: str,
    event: str = "push",
    signature: str | bool | None = None,
) -> httpx.Response:
    """POST ``payload`` as GitHub does: raw JSON body, ``X-Hub-Signature-256`` over it, event and delivery id.

    ``signature``: None signs with ``secret``; a string is sent as is (a forged one); False sends none.
    """
    import hashlib
    import hmac

    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    digest = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "User-Agent": "GitHub-Hookshot/demo",
    }
    if signature is None:
        headers["X-Hub-Signature-256"] = digest
    elif isinstance(signature, str):
        headers["X-Hub-Signature-256"] = signature
    return httpx.post(url, content=body, headers=headers, timeout=30)


def start_inbound(server: PrefectServer, *, config: Path, port: int | None = None) -> tuple[ManagedProcess, str]:
    """``icd-inbound`` in its own process group; returns it and its base URL once it answers."""
    port = port or free_port()
    process = spawn(
        "inbound",
        [sys.executable, "-m", "cli.inbound", "--host", "127.0.0.1", "--port", str(port)],
        env={**server.env, "ICD_CONFIG": str(config)},
        log_dir=server.home / "logs",
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"icd-inbound exited early:\n{process.log_tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.stop()
    raise RuntimeError(f"icd-inbound did not answer within 60s:\n{process.log_tail()}")
