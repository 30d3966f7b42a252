"""A full push-to-deploy cycle on this machine, offline: `make demo`.

Starts moto (S3), the Consul and Slack API stand-ins (or a real `consul agent -dev` when `consul` is on
PATH), a Prefect server and a process worker; creates the blocks and the deployments from prefect.yaml;
pushes v1 of the example app to a local git repository and deploys it; then pushes v2 and deploys that.
Each run pauses for approval. By default the demo approves after showing the plan; with `--interactive`
it waits for you to approve in the Prefect UI (the link is printed).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from examples.local_env import PROJECT_ROOT, free_port, spawn, start_prefect_server, start_worker

POOL = "local-pool"
TOKEN = "xoxb-demo-token"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=dev", "-c", "user.email=dev@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _prefect(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactive", action="store_true", help="wait for approval in the Prefect UI")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = parser.parse_args(argv)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    home = Path(tempfile.mkdtemp(prefix="icd-demo-"))
    print(f"demo state in {home}")
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    os.environ.update(AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="icd-demo")

    processes = []
    if shutil.which("consul"):
        consul_port = free_port()
        processes.append(
            spawn(
                "consul",
                ["consul", "agent", "-dev", "-http-port", str(consul_port)],
                env={},
                log_dir=home / "logs",
            )
        )
        consul_addr = f"http://127.0.0.1:{consul_port}"
        consul_standin = None
        time.sleep(3)
    else:
        from standins.consul import ConsulStandIn

        consul_standin = ConsulStandIn().start()
        consul_addr = consul_standin.http_addr
    from standins.slack import SlackStandIn

    slack = SlackStandIn(token=TOKEN).start()
    print("starting the Prefect server (about 30 s on a fresh database) ...")
    server = start_prefect_server(home / "prefect")
    os.environ.update(server.env)
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import DeploymentUpdate
        from prefect.deployments import run_deployment
        from prefect.flow_runs import resume_flow_run
        from prefect_aws import AwsCredentials
        from prefect_slack import SlackCredentials

        from blocks.consul import ConsulConnection
        from blocks.notifier import SlackNotifier
        from blocks.registry import ArtifactRegistry

        registry = ArtifactRegistry(
            bucket="icd-demo",
            aws_credentials=AwsCredentials(
                aws_access_key_id="demo",
                aws_secret_access_key="demo",
                region_name="us-east-1",
                aws_client_parameters={"endpoint_url": endpoint},
            ),
        )
        registry.save("registry", overwrite=True)
        SlackNotifier(
            credentials=SlackCredentials(token=TOKEN),
            channel="#ops",
            api_url=slack.api_url,
            prefect_ui_url=server.ui_url,
        ).save("ops-slack", overwrite=True)
        ConsulConnection(address=consul_addr).save("consul", overwrite=True)
        _prefect(server.env, "work-pool", "create", POOL, "--type", "process")
        _prefect({**server.env, "ICD_PROJECT_DIR": str(PROJECT_ROOT)}, "deploy", "--all")
        with get_client(sync_client=True) as client:
            for name in ("approval-housekeeping/approval-housekeeping",):
                client.update_deployment(client.read_deployment_by_name(name).id, DeploymentUpdate(paused=False))
        worker_env = {
            "ICD_HOME": str(home / "icd"),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        processes.append(start_worker(server, POOL, env=worker_env))

        repo = home / "app-repo"
        shutil.copytree(
            PROJECT_ROOT / "examples" / "app",
            repo,
            ignore=shutil.ignore_patterns("output", "packer-manifest.json", "__pycache__"),
        )
        _git(repo, "init", "-q", "-b", "main")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "v1")

        for push in (1, 2):
            if push == 2:
                app = repo / "src" / "app.py"
                app.write_text(app.read_text() + "\n# v2: a developer's change\n")
                _git(repo, "commit", "-q", "-am", "v2")
            print(f"\n== push {push}: {_git(repo, 'rev-parse', '--short', 'HEAD')} -> push-to-deploy")
            run = run_deployment(
                "push-to-deploy/push-to-deploy",
                parameters={"repo": str(repo), "ref": "main", "workspace": "staging"},
                timeout=0,
            )
            state = _wait(run.id, {"PAUSED", "COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
            if state.type.value != "PAUSED":
                print(f"run ended without asking: {state.name}: {state.message}")
                return 1
            sha = registry.plan_store().sha256_of("staging", str(run.id))
            print(f"plan {sha} is waiting: {server.ui_url}/runs/flow-run/{run.id}")
            print(f"slack got: {slack.messages[-1].text if slack.messages else '(nothing)'}")
            if args.interactive:
                print("approve it in the UI (type your name; the plan hash is pre-filled) ...")
            else:
                resume_flow_run(
                    run.id,
                    run_input={
                        "decision": "approve",
                        "approver": "demo",
                        "comment": "demo",
                        "plan_sha256": sha,
                    },
                )
            state = _wait(run.id, {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}, timeout=7200)
            print(f"run {run.name}: {state.name}: {state.message}")
            if state.name != "Deployed":
                return 1
        channel = registry.registry().get_channel("acmeinc/web", "staging")
        print(
            f"\nchannel staging -> v{channel.version if channel else '?'}; "
            f"Slack received {len(slack.messages)} messages"
        )
        if args.keep:
            print(f"Prefect UI: {server.ui_url}  (Ctrl-C to stop)")
            while True:
                time.sleep(3600)
        return 0
    finally:
        for process in processes:
            process.stop()
        for stop in (home / "icd" / "instances").glob("*/*/bin/stop"):
            subprocess.run([str(stop), "--instance-dir", str(stop.parent.parent)], check=False, capture_output=True)
        server.stop()
        slack.stop()
        if consul_standin is not None:
            consul_standin.stop()
        moto.stop()


def _wait(run_id: object, states: set[str], timeout: float = 600):  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state  # type: ignore[arg-type]
        if state is not None and state.type.value in states:
            return state
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not reach {states} in {timeout:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
