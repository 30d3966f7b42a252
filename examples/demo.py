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
import tempfile
import time
from pathlib import Path

from moto.server import ThreadedMotoServer
from prefect.deployments import run_deployment
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from examples.local_env import (
    LocalServices,
    free_port,
    git,
    make_app_repo,
    provision,
    spawn,
    start_prefect_server,
    start_worker,
    stop_instances,
    worker_env,
)

POOL = "local-pool"
TOKEN = "xoxb-demo-token"


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
    # Prefect reads its environment once, at import: point this process at the server explicitly.
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            services = LocalServices(
                s3_endpoint=endpoint,
                bucket="icd-demo",
                aws_access_key_id="demo",
                aws_secret_access_key="demo",
                slack_api_url=slack.api_url,
                slack_token=TOKEN,
                consul_addr=consul_addr,
            )
            registry = provision(server, services, pool=POOL)
            processes.append(start_worker(server, POOL, env=worker_env(home / "icd")))
            repo = make_app_repo(home / "app-repo")

            for push in (1, 2):
                if push == 2:
                    app = repo / "src" / "app.py"
                    app.write_text(app.read_text() + "\n# v2: a developer's change\n")
                    git(repo, "commit", "-q", "-am", "v2")
                print(f"\n== push {push}: {git(repo, 'rev-parse', '--short', 'HEAD')} -> push-to-deploy")
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
            stop_instances(home / "icd")
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
