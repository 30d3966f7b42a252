"""The whole push-to-deploy loop, for the end-to-end tests: a real Prefect server with a process worker,
the deployments from ``prefect.yaml`` (``prefect deploy --all``), saved blocks, moto (S3), the Consul and
Slack stand-ins, and a git repository holding the example app as a developer would push it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from blocks.registry import ArtifactRegistry
from examples.local_env import (
    LocalServices,
    ManagedProcess,
    PrefectServer,
    git,
    make_app_repo,
    provision,
    start_worker,
    stop_instances,
    worker_env,
)
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn
from tests.waiting import wait_until

POOL = "local-pool"
SLACK_TOKEN = "xoxb-e2e-token"


@dataclass
class AppRepo:
    """A git repository with the example app and its Packer template, where tests push commits."""

    path: Path

    def commit(self, message: str, edits: dict[str, str] | None = None, *, branch: str = "main") -> str:
        git(self.path, "checkout", "-q", "-B", branch)
        for relative, content in (edits or {}).items():
            target = self.path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        sha = git(self.path, "rev-parse", "HEAD")
        git(self.path, "checkout", "-q", "main")
        return sha

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text()


@dataclass
class DeployEnv:
    server: PrefectServer
    worker: ManagedProcess
    worker_env: dict[str, str]
    consul: ConsulStandIn
    slack: SlackStandIn
    registry: ArtifactRegistry
    repo: AppRepo
    icd_home: Path
    workers: list[ManagedProcess] = field(default_factory=list)

    def start(self, **parameters: Any) -> FlowRun:
        parameters.setdefault("repo", str(self.repo.path))
        return run_deployment("push-to-deploy/push-to-deploy", parameters=parameters, timeout=0)

    def read(self, flow_run_id: Any) -> FlowRun:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id)

    def wait_for(self, flow_run_id: Any, *, states: set[str], timeout: float = 240) -> FlowRun:
        """Wait until the run's state type is one of ``states`` (PAUSED, COMPLETED, ...)."""
        seen: list[FlowRun] = []

        def reached() -> FlowRun | None:
            run = self.read(flow_run_id)
            seen[:] = [run]
            return run if run.state and run.state.type.value in states else None

        try:
            return wait_until(reached, timeout=timeout, interval=0.2)
        except AssertionError:
            state = seen[0].state if seen else None
            logs = self.worker.log_tail(80)
            raise AssertionError(f"run stuck in {state!r}; wanted {states}\nworker log:\n{logs}") from None

    def wait_for_pause(self, flow_run_id: Any, pause_key: str, timeout: float = 240) -> FlowRun:
        """Wait until the run is suspended under ``pause_key`` (each re-ask uses a new key)."""

        def paused_under_key() -> FlowRun | None:
            run = self.read(flow_run_id)
            state = run.state
            if state is not None and state.type.value == "PAUSED" and state.state_details.pause_key == pause_key:
                return run
            return None

        return wait_until(paused_under_key, timeout=timeout, message=f"run never paused under {pause_key!r}")

    def restart_worker(self) -> None:
        self.worker.stop()
        self.worker = start_worker(self.server, POOL, env=self.worker_env, name=f"worker-{uuid.uuid4().hex[:6]}")
        self.workers.append(self.worker)


@pytest.fixture(scope="session")
def deploy_env(
    prefect_server: PrefectServer, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeployEnv]:
    icd_home = tmp_path_factory.mktemp("icd-home")
    consul = ConsulStandIn().start()
    slack = SlackStandIn(token=SLACK_TOKEN).start()
    services = LocalServices(
        s3_endpoint=moto_endpoint,
        bucket=f"icd-e2e-{uuid.uuid4().hex[:8]}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        slack_api_url=slack.api_url,
        slack_token=SLACK_TOKEN,
        consul_addr=consul.http_addr,
    )
    registry = provision(prefect_server, services, pool=POOL)
    with get_client(sync_client=True) as client:
        # The scheduled flows have their own tests; here they would post Slack messages of their own.
        # pause_deployment also deletes the runs already scheduled (update_deployment(paused=True) does not).
        for name in ("consul-health/consul-health", "approval-housekeeping/approval-housekeeping"):
            client.pause_deployment(client.read_deployment_by_name(name).id)

    repo = AppRepo(make_app_repo(tmp_path_factory.mktemp("app-repo")))
    env_for_worker = worker_env(
        icd_home,
        {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"},
    )
    worker = start_worker(prefect_server, POOL, env=env_for_worker)
    env = DeployEnv(prefect_server, worker, env_for_worker, consul, slack, registry, repo, icd_home, [worker])
    try:
        yield env
    finally:
        for process in env.workers:
            process.stop()
        stop_instances(icd_home)
        slack.stop()
        consul.stop()
