"""The whole loop, for the end-to-end tests: a real Prefect server with a process worker, the deployments and
triggers of ``prefect.yaml`` and the automations of ``automations.yaml`` (``icd-setup``), saved blocks, moto
(S3, DynamoDB), the Consul and Slack stand-ins, the inbound webhook app, a local receiver for the alerts'
notification block, and a git repository holding the example app as a developer would push it.

Each test adds its own namespace and workspaces to the session's ``icd.toml`` (``DeployEnv.service``), so
tests share one environment safely; the worker re-reads the file when it changes.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
)
from prefect.client.schemas.objects import FlowRun, Log
from prefect.deployments import run_deployment
from pydantic import SecretStr

from blocks.registry import ArtifactRegistry
from examples.local_env import (
    LocalServices,
    ManagedProcess,
    PrefectServer,
    api_client,
    git,
    make_app_repo,
    provision,
    run_logs,
    start_inbound,
    start_worker,
    stop_instances,
    worker_env,
    write_config,
)
from icd.deploy.approval import InvalidApproval, give_answer
from icd.deploy.queue import Holder
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn
from tests.plugins.tcp_link import TcpLink
from tests.waiting import wait_until

POOL = "local-pool"
# Every secret of the environment is a canary: unique, so the secret scan (tests/test_trust.py) can search
# everything the loop writes for it.
_CANARY = uuid.uuid4().hex[:10]
SLACK_TOKEN = f"xoxb-canary-slack-{_CANARY}"
WEBHOOK_SECRET = f"canary-webhook-{_CANARY}"
SLACK_SIGNING_SECRET = f"canary-slack-signing-{_CANARY}"
AWS_SECRET = f"canary-aws-secret-{_CANARY}"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


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


class Receiver:
    """A local HTTP endpoint that records what notification blocks post to it."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass(frozen=True)
class Names:
    namespace: str
    workspace: str
    service_name: str


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
    config_path: Path
    inbound_url: str
    receiver: Receiver
    workers: list[ManagedProcess] = field(default_factory=list)
    # Every process of the loop reaches S3 (moto) through it: a test cuts it to take S3 away (test_faults.py).
    s3_link: TcpLink | None = None
    namespaces: dict[str, dict[str, object]] = field(default_factory=dict)
    workspaces: dict[str, dict[str, object]] = field(default_factory=dict)
    notifications: dict[str, list[str]] = field(default_factory=dict)
    people: dict[str, dict[str, object]] = field(default_factory=dict)

    # --- icd.toml ----------------------------------------------------------------------------------------

    def service(
        self,
        *,
        stack: str = "examples/stacks/local",
        namespace_settings: dict[str, object] | None = None,
        **workspace_settings: object,
    ) -> Names:
        """A fresh namespace (with ``namespace_settings``), service and workspace (following its latest) in the
        session's icd.toml."""
        tag = uuid.uuid4().hex[:6]
        names = Names(f"acmeinc/t{tag}", f"ws{tag}", f"svc{tag}")
        self.namespaces[names.namespace] = {
            "repository": str(self.repo.path),
            "repository_aliases": [f"acmeinc/repo-{tag}"],
            "service_name": names.service_name,
            **(namespace_settings or {}),
        }
        self.workspace(names.workspace, follows=f"{names.namespace}@latest", stack=stack, **workspace_settings)
        return names

    def workspace(self, name: str, **settings: object) -> None:
        self.workspaces[name] = {"health_deadline_seconds": 30, **settings}
        self.write_config()

    def route(self, kind: str, blocks: list[str]) -> None:
        """Send messages of ``kind`` also to these notification blocks ("<type slug>/<name>"); [] stops it."""
        self.notifications[kind] = blocks
        self.write_config()

    def write_config(self) -> None:
        write_config(
            self.config_path,
            namespaces=self.namespaces,
            workspaces=self.workspaces,
            notifications=self.notifications,
            people=self.people,
        )

    # --- runs --------------------------------------------------------------------------------------------

    def read(self, flow_run_id: Any) -> FlowRun:
        return api_client().read_flow_run(flow_run_id)

    def state_message(self, flow_run_id: Any) -> str:
        state = self.read(flow_run_id).state
        return (state.message or "") if state is not None else ""

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

    def runs_of(self, deployment: str, **parameters: object) -> list[FlowRun]:
        """Runs of ``deployment`` whose parameters include ``parameters``, oldest first."""
        runs: list[FlowRun] = []
        while True:  # page by page: the server answers at most 200 runs a call
            page = api_client().read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                flow_run_filter=FlowRunFilter(),
                limit=200,
                offset=len(runs),
            )
            runs += page
            if len(page) < 200:
                break
        matching = [run for run in runs if all(run.parameters.get(k) == v for k, v in parameters.items())]
        return sorted(matching, key=lambda run: run.created or run.expected_start_time)  # type: ignore[arg-type, return-value]

    def build(self, names: Names, ref: str = "main", *, expect: str = "COMPLETED", **parameters: object) -> FlowRun:
        """Run build-artifact for ``names`` without planning anyone (tests plan explicitly)."""
        run = run_deployment(
            "build-artifact/build-artifact",
            parameters={"namespace": names.namespace, "ref": ref, "plan": False, **parameters},
            timeout=0,
        )
        done = self.wait_for(run.id, states=ENDED)
        assert done.state is not None and done.state.type.value == expect, done.state
        return done

    def deploy(self, workspace: str, version: int) -> FlowRun:
        return run_deployment(  # type: ignore[return-value]  # the sync variant
            "deploy-artifact/deploy-artifact", parameters={"workspace": workspace, "version": version}, timeout=0
        )

    def deploy_until_paused(self, names: Names, ref: str = "main") -> tuple[FlowRun, int]:
        """Build ``ref``, start its deploy, and wait for the approval wait; returns the run and the version."""
        self.build(names, ref)
        version = self.registry.registry().last_version(names.namespace)
        run = self.deploy(names.workspace, version)
        paused = self.wait_for(run.id, states={"PAUSED", *ENDED})
        assert paused.state is not None and paused.state.type.value == "PAUSED", paused.state
        self.wait_for_question(run.id)
        return run, version

    def wait_for_question(self, run_id: Any) -> FlowRun:
        """Until the run has asked in full: Prefect writes the Suspended state first, then the form's schema,
        then the flow says what it waits for; an operator answers the question, not the first write."""
        return wait_until(
            lambda: (
                (run := self.read(run_id)).state is not None
                and run.state.type.value == "PAUSED"
                and "Waiting for approval" in (run.state.message or "")
                and run
            ),
            timeout=60,
            message="the run never finished asking",
        )

    def plan_sha(self, workspace: str, run_id: Any) -> str:
        sha = self.registry.plan_store().sha256_of(workspace, str(run_id))
        assert sha, "the saved plan must be in S3 before the run pauses"
        return sha

    def answer(
        self, run_id: Any, plan_sha256: str, approver: str = "alice", decision: str = "approve"
    ) -> InvalidApproval | None:
        """``None`` when the run took the answer; Prefect's reason when the form's schema refused it."""
        return give_answer(
            run_id, {"decision": decision, "approver": approver, "comment": "lgtm", "plan_sha256": plan_sha256}
        )

    def approve(self, run_id: Any, workspace: str, approver: str = "alice") -> FlowRun:
        self.answer(run_id, self.plan_sha(workspace, run_id), approver)
        return self.wait_for(run_id, states=ENDED)

    def holder(self, workspace: str) -> Holder | None:
        """Who holds the workspace now (its queue's lock: ``icd/deploy/queue.py``), or None."""
        return self.registry.workspace_queue().holder(workspace)

    def secrets(self) -> dict[str, str]:
        """Every secret value the loop holds, by where it lives."""
        return {
            "registry AWS secret key": AWS_SECRET,
            "registry signing key": self.registry.signing_key.get_secret_value(),
            "registry provenance key": _secret(self.registry.provenance_key),
            "Slack token": SLACK_TOKEN,
            "webhook secret": WEBHOOK_SECRET,
            "Slack signing secret": SLACK_SIGNING_SECRET,
        }

    def logs(self, flow_run_id: Any) -> list[Log]:
        """Every log line of a run, oldest first."""
        return run_logs(flow_run_id)

    def add_worker(self, name: str) -> ManagedProcess:
        """One more process worker on the pool, as a second machine would run it."""
        worker = start_worker(self.server, POOL, env=self.worker_env, name=name)
        self.workers.append(worker)
        return worker

    def restart_worker(self) -> None:
        self.worker.stop()
        self.worker = start_worker(self.server, POOL, env=self.worker_env, name=f"worker-{uuid.uuid4().hex[:6]}")
        self.workers.append(self.worker)


def _secret(value: SecretStr | None) -> str:
    assert value is not None, "icd-setup blocks gives the registry block its keys"
    return value.get_secret_value()


@pytest.fixture(scope="session")
def deploy_env(
    prefect_server: PrefectServer, moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeployEnv]:
    icd_home = tmp_path_factory.mktemp("icd-home")
    config_path = tmp_path_factory.mktemp("config") / "icd.toml"
    write_config(config_path, namespaces={}, workspaces={})
    consul = ConsulStandIn().start()
    slack = SlackStandIn(token=SLACK_TOKEN).start()
    receiver = Receiver()
    s3_link = TcpLink(moto_endpoint)
    services = LocalServices(
        s3_endpoint=s3_link.url,
        bucket=f"icd-e2e-{uuid.uuid4().hex[:8]}",
        aws_access_key_id="testing",
        aws_secret_access_key=AWS_SECRET,
        slack_api_url=slack.api_url,
        slack_token=SLACK_TOKEN,
        consul_addr=consul.http_addr,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ICD_CONFIG", str(config_path))
        # Zombie runs: the shipped heartbeat and window (icd.worker_settings, automations.yaml), never a test's own.
        patch.delenv("ICD_ZOMBIE_AFTER_SECONDS", raising=False)
        registry = provision(
            prefect_server,
            services,
            pool=POOL,
            alerts_url=receiver.url,
            webhook_secret=WEBHOOK_SECRET,
            slack_signing_secret=SLACK_SIGNING_SECRET,
        )
        client = api_client()
        # The scheduled watch has its own tests; here it would post Slack messages of its own.
        # pause_deployment also deletes the runs already scheduled (update_deployment(paused=True) does not).
        client.pause_deployment(client.read_deployment_by_name("consul-health/consul-health").id)
        # Likewise the scheduled drift check: tests/test_drift.py runs it by hand, for its own workspaces.
        client.pause_deployment(client.read_deployment_by_name("drift-check/drift-check").id)

        repo = AppRepo(make_app_repo(tmp_path_factory.mktemp("app-repo")))
        env_for_worker = worker_env(
            icd_home,
            config_path,
            {
                # Redelivery of a notification Slack refused: seconds, not minutes, in tests.
                "ICD_REDELIVERY_BACKOFF_SECONDS": "1,2,4",
                # ... and of a GitHub status: long enough to outlast an outage of a whole apply (test_github_status).
                "ICD_STATUS_REDELIVERY_BACKOFF_SECONDS": "2,4,8,16,32",
            },
        )
        worker = start_worker(prefect_server, POOL, env=env_for_worker)
        # Refusals past their allowance are summarised when a window ends: seconds, not a minute, in tests.
        inbound, inbound_url = start_inbound(prefect_server, config=config_path, refusal_window=3)
        # The Slack app's interactivity URL: the stand-in signs each click and posts it there, as Slack does.
        slack.set_interactivity(f"{inbound_url}/slack/interactions", SLACK_SIGNING_SECRET)
        env = DeployEnv(
            prefect_server,
            worker,
            env_for_worker,
            consul,
            slack,
            registry,
            repo,
            icd_home,
            config_path,
            inbound_url,
            receiver,
            [worker, inbound],
            s3_link=s3_link,
        )
        try:
            yield env
        finally:
            for process in env.workers:
                process.stop()
            stop_instances(icd_home)
            s3_link.cut()
            receiver.stop()
            slack.stop()
            consul.stop()
