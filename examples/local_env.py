"""Start the real components of a local push-to-deploy loop: a Prefect server, a process worker, and the
machine-local stand-ins (moto for S3/EC2, the Consul API stand-in, the Slack API stand-in).

The demo and the end-to-end tests both use this, so they exercise the same set-up an operator would.
Every process is started in its own process group and stopped with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]  # ships no type information
import boto3
import httpx
from moto.server import ThreadedMotoServer
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTextSearch,
)
from prefect.client.schemas.objects import FlowRun, Log, TaskRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL
from pydantic import SecretStr

from blocks.registry import ArtifactRegistry
from cli.setup import RESULTS_BLOCK, STATE_LOCK_TABLE, Site, save_blocks, setup
from icd.config import parse_config
from icd.deploy.credentials import state_role_policy
from icd.deploy.workdir import StateBackend
from icd.worker_settings import HEARTBEAT_ENV, HEARTBEAT_SECONDS, LONGEST_STOP_SECONDS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The PostgreSQL these machines run for teams (trust auth); a fresh database is made on it per server.
# moto's one account: the state role trusts it, as a role in AWS trusts the account the workers run in.
MOTO_ACCOUNT_ROOT = "arn:aws:iam::123456789012:root"
POSTGRES_ADMIN_DSN = os.environ.get("ICD_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """moto (S3, EC2, DynamoDB) over real HTTP, in this process, and its endpoint URL; ``.stop()`` it after.

    Its access log (werkzeug's, a line per request: hundreds per deploy cycle) is silenced: it buried the
    figures a benchmark prints, and writing it took CPU from what was being measured."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


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
    # Seconds between SIGTERM and SIGKILL: long enough for the process's own stop sequence.
    stop_grace: float = 10.0

    def stop(self) -> None:
        _stop_group(self.proc, self.stop_grace)

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
    database: str = "sqlite"

    def stop(self) -> None:
        self.process.stop()


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Flow code and blocks are imported by module path from the project.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect_server(
    home: Path,
    *,
    port: int | None = None,
    database_url: str | None = None,
    timeout: float = 180.0,
    write_first: bool = True,
    env: Mapping[str, str] | None = None,
    project: Path | None = None,
) -> PrefectServer:
    """A Prefect server in its own process group, on SQLite under ``home`` unless ``database_url`` is given.

    Started as ``icd-server start`` (``cli/server.py``: on SQLite, a transaction waits for the write lock
    instead of failing with ``database is locked`` under load); ``write_first=False`` starts Prefect's own
    ``prefect server start``, the baseline of ``bench/sqlite_load.py``. ``env`` adds settings; ``project`` runs
    another checkout's ``icd-server`` (a benchmark's baseline)."""
    port = port or free_port()
    server_env = {**prefect_env(home), **(env or {})}
    server_env["PREFECT_SERVER_API_HOST"] = "127.0.0.1"
    server_env["PREFECT_SERVER_API_PORT"] = str(port)
    if database_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    process = spawn(
        "prefect-server",
        [
            sys.executable,
            "-m",
            "cli.server" if write_first else "prefect",
            *([] if write_first else ["server"]),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**server_env, "PYTHONPATH": str(project)} if project else server_env,
        log_dir=home / "logs",
        cwd=project,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    _wait_until_healthy(process, f"{api_url}/health", timeout=timeout, interval=0.5)
    return PrefectServer(
        api_url=api_url,
        ui_url=f"http://127.0.0.1:{port}",
        home=home,
        process=process,
        env=prefect_env(home, api_url),
        database="postgresql" if database_url else "sqlite",
    )


def _wait_until_healthy(process: ManagedProcess, health_url: str, *, timeout: float, interval: float) -> None:
    """Until ``health_url`` answers 200; stops the process and raises if it exits or the time runs out.

    One HTTP client for all the polls: each new one would load the CA bundle (about 25 ms of CPU) at every
    poll, up to ten a second, on the cores the process being waited for needs to start."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline:
            if process.proc.poll() is not None:
                raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(health_url).status_code == 200:
                    return
            time.sleep(interval)
    process.stop()
    raise RuntimeError(f"{process.name} did not answer within {timeout:.0f}s:\n{process.log_tail()}")


def start_worker(
    server: PrefectServer,
    pool: str,
    *,
    env: Mapping[str, str] | None = None,
    limit: int = 4,
    name: str = "worker",
    warm: bool = True,
    cwd: Path | None = None,
) -> ManagedProcess:
    """The project's worker (``icd-worker``, warm flow runs), or with ``warm=False`` Prefect's own process
    worker, which starts a fresh interpreter per run (the benchmarks' baseline). ``cwd``: where it starts
    (default: this project), for a worker of another checkout."""
    worker = [sys.executable, "-m", "cli.worker"] if warm else [sys.executable, "-m", "prefect", "worker", "start"]
    kind = [] if warm else ["--type", "process"]
    process = spawn(
        name,
        [*worker, "--pool", pool, *kind, "--limit", str(limit), "--name", name],
        # Deploys wait on this poll twice (start, and resume after approval): 1 s instead of Prefect's 10 s.
        env={"PREFECT_WORKER_QUERY_SECONDS": "1", **server.env, **(env or {})},
        log_dir=server.home / "logs",
        cwd=cwd,
    )
    # Killed before its own stop sequence ends, a worker would leave a forked run behind, stopped by no one.
    process.stop_grace = LONGEST_STOP_SECONDS + 5.0
    return process


def postgres_available(dsn: str = POSTGRES_ADMIN_DSN) -> bool:
    try:
        asyncio.run(_postgres(dsn, "SELECT 1"))
    except (OSError, asyncpg.PostgresError):
        return False
    return True


def create_postgres_database(prefix: str = "icd", dsn: str = POSTGRES_ADMIN_DSN) -> str:
    """A new, empty database on the team PostgreSQL; returns the URL the Prefect server is given."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    asyncio.run(_postgres(dsn, f'CREATE DATABASE "{name}"'))
    base = dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


def drop_postgres_database(url: str, dsn: str = POSTGRES_ADMIN_DSN) -> None:
    """Drop a database made by ``create_postgres_database`` (its server stopped first)."""
    name = url.rsplit("/", 1)[1]
    asyncio.run(_postgres(dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _postgres(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


# --- the project's own set-up on that server: blocks, pool, deployments, an app repository ------------


_API_CLIENTS: dict[str, SyncPrefectClient] = {}
_API_CLIENTS_LOCK = threading.Lock()


def api_client() -> SyncPrefectClient:
    """This process's client of the Prefect API it is pointed at: opened once, kept open, used directly
    (``api_client().read_flow_run(...)``, never in a ``with`` block, which would close it for every thread).

    Polling loops (tests, benchmarks, the demo) read the API several times a second, and every
    ``get_client()`` builds a new TLS context, parsing the whole CA bundle even for an ``http://`` API:
    about 25 ms of CPU each, which was a seventh of all the CPU an end-to-end test used. Where
    ``prefect_patches/shared_tls.py`` is applied (the test session) that cost is gone; a kept client still saves a
    client and a connection per read."""
    url = str(PREFECT_API_URL.value())
    with _API_CLIENTS_LOCK:
        client = _API_CLIENTS.get(url)
        if client is None:
            client = _API_CLIENTS[url] = get_client(sync_client=True).__enter__()
        return client


def read_flow_run(run_id: Any) -> FlowRun:
    return api_client().read_flow_run(run_id)


def wait_for_run(run_id: Any, states: set[str], *, timeout: float = 300, interval: float = 0.3) -> FlowRun:
    """Poll until the run's state type is one of ``states``; a benchmark passes a short ``interval``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = read_flow_run(run_id)
        if run.state is not None and run.state.type.value in states:
            return run
        time.sleep(interval)
    raise TimeoutError(f"flow run {run_id} did not reach {states} in {timeout:.0f}s")


def first_run_after(deployment: str, after: float, *, timeout: float = 120, interval: float = 0.3) -> FlowRun:
    """The first run of ``deployment`` created after ``after`` (epoch seconds): the one a trigger made."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api_client().read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            flow_run_filter=FlowRunFilter(),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=20,
        )
        fresh = [run for run in runs if run.created is not None and run.created.timestamp() > after]
        if fresh:
            return min(fresh, key=lambda run: run.created.timestamp())  # type: ignore[union-attr]  # filtered above
        time.sleep(interval)
    raise TimeoutError(f"no {deployment} run appeared within {timeout:.0f}s")


_API_PAGE = 200  # the most the Prefect API hands out per read
_FINISHED = "Finished in state "  # the engines' last line for a task run and for a flow run; str(state) follows


def run_logs(run_id: Any, *, text: str | None = None) -> list[Log]:
    """Every log line of a run, oldest first; with ``text``, only those the server's text search matches (a
    case-insensitive substring of the message or the logger's name; a space separates alternatives)."""
    lines = LogFilter(
        flow_run_id=LogFilterFlowRunId(any_=[run_id]), text=LogFilterTextSearch(query=text) if text else None
    )
    found: list[Log] = []
    while True:
        page = api_client().read_logs(log_filter=lines, limit=_API_PAGE, offset=len(found))
        found += page
        if len(page) < _API_PAGE:
            return sorted(found, key=lambda log: log.timestamp)


def recorded_task_runs(run_id: Any, *, timeout: float = 30.0, interval: float = 0.1) -> list[TaskRun]:
    """Every task run of flow run ``run_id``, which has ended, once the server has recorded how each ended.

    The server records task runs from the events a run sends, in batches (icd-server's task-run recorder:
    up to a second late), so a read the moment a run ends can miss its last task runs, or see one Running.
    What the run logged says which to wait for: the engines log "Finished in state ..." for each task run
    as it ends and for the flow last, and a run's log batches arrive in order, each written before the
    server answers. Once the flow's line for the state the run ended in has arrived, so has every task
    run's; each of those is then read until it is recorded in a final state.

    A run whose engine did not log its end (its process killed, say) has no last line: this times out on it
    (``TimeoutError``); read such a run's task runs with ``read_task_runs``.
    """
    deadline = time.monotonic() + timeout
    finished = _task_runs_logged_as_finished(run_id)
    while finished is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run_id} has not ended with its engine's last log line in {timeout:.0f}s")
        time.sleep(interval)
        finished = _task_runs_logged_as_finished(run_id)
    while True:
        found = read_task_runs(run_id)
        if finished <= {run.id for run in found if run.state is not None and run.state.is_final()}:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not record how flow run {run_id}'s task runs ended in {timeout:.0f}s")
        time.sleep(interval)


def read_task_runs(run_id: Any) -> list[TaskRun]:
    """The task runs of flow run ``run_id`` that the server has recorded so far (up to a second behind the run:
    ``recorded_task_runs`` waits for an ended run's)."""
    found = api_client().read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])), limit=_API_PAGE
    )
    if len(found) == _API_PAGE:
        raise RuntimeError(f"flow run {run_id} has {_API_PAGE} task runs or more: read them in pages")
    return found


def _task_runs_logged_as_finished(run_id: Any) -> set[UUID] | None:
    """The ids of the task runs that flow run ``run_id`` logged as finished, once the run has ended and its
    last line (the flow's own, for the state it ended in) has arrived; None before."""
    run = read_flow_run(run_id)
    if run.state is None or not run.state.is_final():
        return None
    logs = run_logs(run_id, text="Finished")
    last_line = f"{_FINISHED}{run.state.name}("
    if not any(log.task_run_id is None and log.message.startswith(last_line) for log in logs):
        return None
    return {log.task_run_id for log in logs if log.task_run_id is not None and log.message.startswith(_FINISHED)}


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
    slack_signing_secret: str = "",
    project_dir: Path = PROJECT_ROOT,
) -> ArtifactRegistry:
    """Create what an operator creates once (``icd-setup blocks``: the buckets, the state lock table, the
    blocks the flows load by name, with their secrets), then run ``icd-setup``: block types, work pool, the
    deployments of ``prefect.yaml`` with their triggers, and the automations of ``automations.yaml``.
    ``project_dir``: the checkout whose deployments and automations these are, and whose flows the runs load
    (a benchmark's baseline is another checkout)."""
    site = Site(
        bucket=services.bucket,
        aws_access_key_id=services.aws_access_key_id,
        aws_secret_access_key=SecretStr(services.aws_secret_access_key),
        slack_token=SecretStr(services.slack_token),
        slack_channel="#ops",
        prefect_ui_url=server.ui_url,
        consul_addr=services.consul_addr,
        alerts_url=alerts_url,
        webhook_secret=SecretStr(webhook_secret or secrets.token_urlsafe(32)),
        s3_endpoint=services.s3_endpoint,
        slack_api_url=services.slack_api_url,
        allow_private_alerts=True,
        state_role_arn=create_state_role(services),
        # The Slack app's signing secret: icd-inbound serves its buttons' clicks (POST /slack/interactions).
        slack_signing_secret=SecretStr(slack_signing_secret) if slack_signing_secret else None,
    )
    with temporary_env({**server.env, "ICD_PROJECT_DIR": str(project_dir)}):
        registry = save_blocks(site)
        setup(pool, project_dir, automations=project_dir / "automations.yaml")
    return registry


def create_state_role(services: LocalServices, region: str = "us-east-1") -> str:
    """The IAM role Terraform's steps assume (docs/operations.md#terraforms-credentials), made in moto as an
    operator makes it in AWS: the bucket's workspace states and the lock table, nothing else. Returns its ARN."""
    backend = StateBackend(
        bucket=services.bucket,
        key_prefix=str(ArtifactRegistry.model_fields["prefix"].default),
        region=region,
        lock_table=STATE_LOCK_TABLE,
    )
    iam = boto3.client(
        "iam",
        endpoint_url=services.s3_endpoint,
        region_name=region,
        aws_access_key_id=services.aws_access_key_id,
        aws_secret_access_key=services.aws_secret_access_key,
    )
    name = f"icd-state-{services.bucket}"[:64]
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": MOTO_ACCOUNT_ROOT}, "Action": "sts:AssumeRole"}],
    }
    try:
        arn = str(iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"])
    except iam.exceptions.EntityAlreadyExistsException:
        arn = str(iam.get_role(RoleName=name)["Role"]["Arn"])
    iam.put_role_policy(
        RoleName=name, PolicyName="workspace-states", PolicyDocument=json.dumps(state_role_policy(backend))
    )
    return arn


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
    path: Path,
    *,
    namespaces: Mapping[str, Mapping[str, object]],
    workspaces: Mapping[str, Mapping[str, object]],
    notifications: Mapping[str, Sequence[str]] | None = None,
    people: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """An ``icd.toml`` for a local loop (the demo's, a test's), checked by the same rules as any other;
    ``notifications``: the notification blocks each kind of message also goes to; ``people``: who is who
    on GitHub, in commits and on Slack."""
    lines: list[str] = []
    for name, person in (people or {}).items():
        lines.append(f"[people.{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in person.items()]
        lines.append("")
    if notifications:
        lines.append("[notifications]")
        lines += [f"{kind} = {_toml(list(routes))}" for kind, routes in notifications.items()]
        lines.append("")
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
    if isinstance(value, Mapping):  # an inline table: approval = {required = 2, ...}
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    return json.dumps(str(value))


def worker_env(icd_home: Path, config: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker's environment: where runs keep their state, the pipeline config, the venv's tools first."""
    return {
        "ICD_HOME": str(icd_home),
        "ICD_CONFIG": str(config),
        # The library's own log lines (one per tool call, with its duration) go to the run log too.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "icd",
        # Results in S3 (provision() makes the block): a run suspended on one worker resumes on any other.
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"s3-bucket/{RESULTS_BLOCK}",
        # A dead run is noticed within 90 s (icd.worker_settings); icd-worker sets it too, Prefect's own worker
        # does not.
        HEARTBEAT_ENV: str(HEARTBEAT_SECONDS),
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


def start_inbound(
    server: PrefectServer,
    *,
    config: Path,
    port: int | None = None,
    refusal_window: float | None = None,
    extra_args: Sequence[str] = (),
    name: str = "inbound",
) -> tuple[ManagedProcess, str]:
    """``icd-inbound`` in its own process group; returns it and its base URL once it answers."""
    port = port or free_port()
    window = ["--refusal-window", str(refusal_window)] if refusal_window is not None else []
    process = spawn(
        name,
        [sys.executable, "-m", "cli.inbound", "--host", "127.0.0.1", "--port", str(port), *window, *extra_args],
        env={**server.env, "ICD_CONFIG": str(config)},
        log_dir=server.home / "logs",
    )
    url = f"http://127.0.0.1:{port}"
    _wait_until_healthy(process, f"{url}/health", timeout=60, interval=0.1)
    return process, url
