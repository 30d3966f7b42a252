"""One deploy cycle through the deployed flows, against the same Packer + Terraform work done by a shell script.

    .venv/bin/python bench/cycle.py [--rounds 5] [--database-url postgresql+asyncpg://...]
    .venv/bin/python bench/cycle.py --concurrent 10 --workers 2 --postgres

Everything runs here for real: moto (S3, DynamoDB), the Consul and Slack stand-ins, a Prefect server, one
worker (`icd-worker`, warm runs; `--cold` for Prefect's process worker, polling every second), the
deployments and triggers of prefect.yaml. Each round, interleaved:

* **baseline**: a shell script that clones the app, runs `packer build`, then `terraform init`, `plan -out`,
  `show -json` and `apply` on the local stack with the same S3 backend and lock table;
* **ours**: a commit, then `build-artifact` (the registration's event plans the workspace), the
  `deploy-artifact` run that the trigger starts, approved the moment it waits, until it ends `Deployed`.

Ours is measured on the server's own timestamps, from the build run's creation to the deploy run's end,
minus the time the run sat suspended before this script resumed it. Tool time is the sum of the durations
the flows logged for every Packer and Terraform call (`icd/tools/process.py`). Overhead = wall - tool time -
the health check's own wait (the gate's task). Also printed: trigger -> plan waiting in Slack, and the event
-> run -> plan latency of the deployment trigger.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moto.server import ThreadedMotoServer
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.deployments import run_deployment
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from examples.local_env import (
    LocalServices,
    create_postgres_database,
    drop_postgres_database,
    first_run_after,
    free_port,
    git,
    make_app_repo,
    provision,
    read_flow_run,
    run_logs,
    start_prefect_server,
    start_worker,
    stop_instances,
    wait_for_run,
    worker_env,
    write_config,
)
from icd.tools.binaries import packer_binary, terraform_binary, terraform_cli_config
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn

NAMESPACE = "bench/web"
WORKSPACE = "bench"
PROJECT = Path(__file__).resolve().parent.parent
_TOOL_LINE = re.compile(r"tool (\S+) (\S*) exited (-?\d+) in ([\d.]+)s")


@dataclass
class Cycle:
    build_id: Any
    deploy_id: Any
    wall: float
    tool: float
    gate: float
    to_slack: float  # build run created -> "plan waiting" stored by the Slack stand-in
    tool_before_slack: float
    trigger: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def overhead(self) -> float:
        return self.wall - self.tool - self.gate


def _tool_seconds(logs: list[Any], until: float | None = None) -> float:
    total = 0.0
    for log in logs:
        if (match := _TOOL_LINE.search(log.message)) and (until is None or log.timestamp.timestamp() <= until):
            total += float(match.group(4))
    return total


def _task_runs(run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return list(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))))


def _states(run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return list(client.read_flow_run_states(run_id))


def our_cycle(repo: Path, registry: Any, slack: SlackStandIn, round_number: int) -> Cycle:
    app = repo / "src" / "app.py"
    app.write_text(app.read_text() + f"\n# bench round {round_number} {uuid.uuid4().hex}\n")
    git(repo, "commit", "-q", "-am", f"round {round_number}")
    slack_seen = len(slack.messages)
    build = run_deployment("build-artifact/build-artifact", parameters={"namespace": NAMESPACE}, timeout=0)
    started = build.created.timestamp()
    deploy = first_run_after("deploy-artifact", started - 1, interval=0.05)
    paused = wait_for_run(deploy.id, {"PAUSED", "FAILED", "CRASHED", "CANCELLED", "COMPLETED"}, interval=0.05)
    if paused.state.type.value != "PAUSED":
        raise RuntimeError(f"the deploy ended without asking: {paused.state}")
    resumed_at = time.time()
    sha = registry.plan_store().sha256_of(WORKSPACE, str(deploy.id))
    resume_flow_run(
        deploy.id, run_input={"decision": "approve", "approver": "bench", "comment": "", "plan_sha256": sha}
    )
    done = wait_for_run(deploy.id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, interval=0.05)
    if done.state.name != "Deployed":
        raise RuntimeError(f"the deploy ended {done.state.name}: {done.state.message}")
    build_run = read_flow_run(build.id)
    pause_state = next(s for s in _states(deploy.id) if s.type.value == "PAUSED")
    suspended = resumed_at - pause_state.timestamp.timestamp()
    wall = done.end_time.timestamp() - started - suspended
    logs = [*run_logs(build.id), *run_logs(deploy.id)]
    tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(deploy.id) if t.state and t.state.name != "Cached"}
    build_tasks = {t.name.rsplit("-", 1)[0]: t for t in _task_runs(build.id)}
    gate = tasks["health-gate"].total_run_time.total_seconds() if "health-gate" in tasks else 0.0
    waiting = next(m for m in slack.messages[slack_seen:] if "Plan waiting" in m.text)
    slack_at = waiting.received_at
    announce = build_tasks.get("announce-registration")
    plan = tasks.get("plan-deploy")
    trigger = {}
    if announce is not None and announce.end_time and plan is not None and plan.start_time:
        trigger = {
            "event -> deploy run created": deploy.created.timestamp() - announce.end_time.timestamp(),
            "run created -> plan started": plan.start_time.timestamp() - deploy.created.timestamp(),
        }
    phases = {
        "build: queued + process start": build_run.start_time.timestamp() - started,
        "build: flow (incl. packer)": build_run.end_time.timestamp() - build_run.start_time.timestamp(),
        "deploy: queued + process start": paused_start(deploy.id) - deploy.created.timestamp(),
        "deploy: resume -> running again": resumed_run_start(deploy.id, resumed_at) - resumed_at,
    }
    return Cycle(
        build_id=build.id,
        deploy_id=deploy.id,
        wall=wall,
        tool=_tool_seconds(logs),
        gate=gate,
        to_slack=slack_at - started,
        tool_before_slack=_tool_seconds(logs, until=slack_at),
        trigger=trigger,
        phases=phases,
    )


def paused_start(run_id: Any) -> float:
    running = [s for s in _states(run_id) if s.type.value == "RUNNING"]
    return running[0].timestamp.timestamp()


def resumed_run_start(run_id: Any, after: float) -> float:
    running = [s for s in _states(run_id) if s.type.value == "RUNNING" and s.timestamp.timestamp() > after]
    return running[0].timestamp.timestamp()


def load_workspaces(count: int) -> list[str]:
    return [f"{WORKSPACE}-{number}" for number in range(1, count + 1)]


def under_load(repo: Path, registry: Any, deploys: int, workspaces: list[str], database: str) -> None:
    """``deploys`` deploy runs at once, one per workspace (two versions of one workspace at once are one deploy:
    the newest wins), each approved the moment it waits. Per run: overhead = wall - tool time - health gate -
    time suspended."""
    versions = []
    for label in ("load v1",):
        app = repo / "src" / "app.py"
        app.write_text(app.read_text() + f"\n# {label} {uuid.uuid4().hex}\n")
        git(repo, "commit", "-q", "-am", label)
        build = run_deployment(
            "build-artifact/build-artifact", parameters={"namespace": NAMESPACE, "plan": False}, timeout=0
        )
        if wait_for_run(build.id, {"COMPLETED", "FAILED", "CRASHED"}, interval=0.05).state.type.value != "COMPLETED":
            raise RuntimeError("the load test's build failed")
        versions.append(registry.registry().last_version(NAMESPACE))
    started = time.time()
    runs = {}
    for number in range(deploys):
        workspace = workspaces[number % len(workspaces)]
        version = versions[-1]
        run = run_deployment(
            "deploy-artifact/deploy-artifact", parameters={"workspace": workspace, "version": version}, timeout=0
        )
        runs[run.id] = workspace
    resumed: dict[Any, float] = {}
    ended: dict[Any, Any] = {}
    deadline = time.monotonic() + 1800
    while len(ended) < len(runs) and time.monotonic() < deadline:
        for run_id, workspace in runs.items():
            if run_id in ended:
                continue
            run = read_flow_run(run_id)
            kind = run.state.type.value if run.state else ""
            if kind in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                ended[run_id] = run
            elif kind == "PAUSED" and run_id not in resumed:
                sha = registry.plan_store().sha256_of(workspace, str(run_id))
                resumed[run_id] = time.time()
                resume_flow_run(
                    run_id, run_input={"decision": "approve", "approver": "bench", "comment": "", "plan_sha256": sha}
                )
        time.sleep(0.2)
    all_done = time.time() - started
    not_deployed = [run.state.name for run in ended.values() if run.state.name != "Deployed"]
    if len(ended) < len(runs) or not_deployed:
        raise RuntimeError(f"not every deploy ended Deployed: {not_deployed}, {len(runs) - len(ended)} still running")
    overheads = []
    for run_id, run in ended.items():
        pause_state = next(s for s in _states(run_id) if s.type.value == "PAUSED")
        suspended = resumed[run_id] - pause_state.timestamp.timestamp()
        wall = run.end_time.timestamp() - run.created.timestamp() - suspended
        tasks = [t for t in _task_runs(run_id) if t.state and t.state.name != "Cached" and t.total_run_time]
        gate = sum(t.total_run_time.total_seconds() for t in tasks if t.name.startswith("health-gate"))
        overheads.append(wall - _tool_seconds(run_logs(run_id)) - gate)
    print(
        f"\n{deploys} deploys at once over {len(workspaces)} workspaces, server on {database}: all Deployed "
        f"in {all_done:.0f}s"
    )
    print(
        f"orchestration overhead per cycle under load: p50 {statistics.median(overheads):5.1f}s  "
        f"p95 {_p(overheads, 0.95):5.1f}s  max {max(overheads):5.1f}s"
    )


BASELINE = r"""
set -eu
rm -rf "$WORK" && mkdir -p "$WORK"
git clone -q "$REPO" "$WORK/src"
cd "$WORK/src/packer"
"$PACKER" build -machine-readable -only=null.local_image \
  -var namespace="$NAMESPACE" -var version="$VERSION" -var commit="$(git rev-parse HEAD)" \
  -var output_dir="$WORK/images" -var service_name=benchsh . >/dev/null
cp -r "$STACK" "$WORK/stack" && cd "$WORK/stack"
printf 'terraform {\n  backend "s3" {}\n}\n' > backend_override.tf
"$TERRAFORM" init -input=false -no-color -reconfigure \
  -backend-config=bucket="$BUCKET" -backend-config=key="shell/$VERSION.tfstate" -backend-config=region=us-east-1 \
  -backend-config=endpoint="$ENDPOINT" -backend-config=force_path_style=true \
  -backend-config=skip_credentials_validation=true -backend-config=skip_metadata_api_check=true \
  -backend-config=skip_region_validation=true -backend-config=dynamodb_table="$TABLE" \
  -backend-config=dynamodb_endpoint="$ENDPOINT" >/dev/null
"$TERRAFORM" plan -input=false -no-color -out=plan.tfplan \
  -var artifact_id="$WORK/images/benchsh-$VERSION.tar.gz" -var artifact_version="$VERSION" \
  -var namespace="$NAMESPACE" -var service_name=benchsh -var consul_addr="$CONSUL" \
  -var deploy_run_id=shell -var workspace=shell -var instance_root="$WORK/instances" >/dev/null
"$TERRAFORM" show -json plan.tfplan >/dev/null
"$TERRAFORM" apply -input=false -no-color plan.tfplan >/dev/null
"$TERRAFORM" destroy -auto-approve -input=false -no-color \
  -var artifact_id=x -var artifact_version="$VERSION" -var namespace="$NAMESPACE" -var service_name=benchsh \
  -var consul_addr="$CONSUL" -var deploy_run_id=shell -var workspace=shell -var instance_root="$WORK/instances" >/dev/null
"""


def shell_cycle(home: Path, repo: Path, env: dict[str, str], round_number: int) -> float:
    """The baseline's wall time (its clean-up `destroy` excluded)."""
    script = BASELINE.replace('"$TERRAFORM" destroy', 'date +%s.%N > "$WORK/applied"; "$TERRAFORM" destroy')
    work = home / f"shell-{round_number}"
    started = time.time()
    result = subprocess.run(
        ["bash", "-c", script.replace(">/dev/null", '>>"$WORK/log" 2>&1')],
        env={**env, "WORK": str(work), "VERSION": f"sh{round_number}"},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the shell baseline failed:\n{(work / 'log').read_text()[-3000:]}")
    return float((work / "applied").read_text()) - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=None, help="PostgreSQL for the Prefect server (default: SQLite)")
    parser.add_argument("--postgres", action="store_true", help="a fresh database on the local PostgreSQL")
    parser.add_argument("--timeline", action="store_true", help="print the last cycle's task timeline")
    parser.add_argument(
        "--concurrent", type=int, default=0, help="instead: this many deploys at once (the team load test)"
    )
    parser.add_argument("--workers", type=int, default=1, help="process workers on the pool")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="Prefect's own process worker (a fresh interpreter per run) instead of icd-worker: the before",
    )
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="icd-bench-cycle-"))
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    consul = ConsulStandIn().start()
    slack = SlackStandIn(token="xoxb-bench").start()
    database_url = create_postgres_database("icd_bench") if args.postgres else args.database_url
    server = start_prefect_server(home / "prefect", database_url=database_url)
    processes = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            repo = make_app_repo(home / "repo")
            config = write_config(
                home / "icd.toml",
                namespaces={NAMESPACE: {"repository": str(repo), "service_name": "web"}},
                workspaces={
                    name: {"follows": f"{NAMESPACE}@latest", "stack": "examples/stacks/local"}
                    for name in [WORKSPACE, *load_workspaces(args.concurrent)]
                },
            )
            os.environ["ICD_CONFIG"] = str(config)
            services = LocalServices(
                endpoint, "icd-bench", "bench", "bench", slack.api_url, "xoxb-bench", consul.http_addr
            )
            registry = provision(server, services, alerts_url=slack.webhook_url("alerts"))
            with get_client(sync_client=True) as client:
                client.pause_deployment(client.read_deployment_by_name("consul-health/consul-health").id)
            for number in range(args.workers):
                processes.append(
                    start_worker(
                        server,
                        "local-pool",
                        env=worker_env(home / "icd", config),
                        name=f"worker-{number}",
                        warm=not args.cold,
                    )
                )
            if args.concurrent:
                under_load(repo, registry, args.concurrent, load_workspaces(args.concurrent), server.database)
                return 0
            shell_env = {
                "PATH": os.environ["PATH"],
                "HOME": os.environ.get("HOME", "/root"),
                "REPO": str(repo),
                "PACKER": packer_binary(),
                "TERRAFORM": terraform_binary(),
                "TF_CLI_CONFIG_FILE": str(terraform_cli_config()),
                "CHECKPOINT_DISABLE": "1",
                "TF_IN_AUTOMATION": "1",
                "NAMESPACE": NAMESPACE,
                "STACK": str(PROJECT / "examples" / "stacks" / "local"),
                "BUCKET": "icd-bench",
                "TABLE": registry.state_lock_table or "",
                "ENDPOINT": endpoint,
                "CONSUL": consul.http_addr,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            baselines, ours = [], []
            for round_number in range(args.rounds + 1):  # round 0 warms both up and is not counted
                baseline = shell_cycle(home, repo, shell_env, round_number)
                cycle = our_cycle(repo, registry, slack, round_number)
                if round_number:
                    baselines.append(baseline)
                    ours.append(cycle)
                print(
                    f"round {round_number}{' (warm-up)' if not round_number else ''}: shell {baseline:5.1f}s  "
                    f"ours {cycle.wall:5.1f}s (tools {cycle.tool:4.1f}s, gate {cycle.gate:4.1f}s, "
                    f"overhead {cycle.overhead:4.1f}s)",
                    flush=True,
                )
            report(baselines, ours)
            if args.timeline:
                timeline(ours[-1])
    finally:
        for process in processes:
            process.stop()
        stop_instances(home / "icd")
        server.stop()
        if args.postgres and database_url:
            drop_postgres_database(database_url)
        slack.stop()
        consul.stop()
        moto.stop()
        if not args.timeline:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home}")
    return 0


def timeline(cycle: Cycle) -> None:
    """Every task run and flow state of one cycle, in seconds from the build run's creation."""
    start = read_flow_run(cycle.build_id).created.timestamp()
    rows = []
    for run_id, flow_name in ((cycle.build_id, "build"), (cycle.deploy_id, "deploy")):
        for state in _states(run_id):
            rows.append((state.timestamp.timestamp() - start, f"{flow_name} flow -> {state.name}", None))
        for task in _task_runs(run_id):
            if task.start_time is not None:
                took = (task.end_time or task.start_time).timestamp() - task.start_time.timestamp()
                rows.append(
                    (task.start_time.timestamp() - start, f"{flow_name}: {task.name} ({task.state.name})", took)
                )
        for log in run_logs(run_id):
            if _TOOL_LINE.search(log.message):
                rows.append((log.timestamp.timestamp() - start, f"{flow_name}:   {log.message}", None))
    print("\ntimeline of the last cycle (s from the build run's creation):")
    for at, what, took in sorted(rows, key=lambda row: row[0]):
        print(f"  {at:6.2f}  {what}" + (f"  [{took:.2f}s]" if took is not None else ""))


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(baselines: list[float], ours: list[Cycle]) -> None:
    med = statistics.median
    print()
    print(f"cycles: {len(ours)} of each, interleaved")
    print(f"shell baseline     wall p50 {med(baselines):5.1f}s")
    print(
        f"deployed flows     wall p50 {med(c.wall for c in ours):5.1f}s  p95 {_p([c.wall for c in ours], 0.95):5.1f}s"
    )
    print(f"  tool time             p50 {med(c.tool for c in ours):5.1f}s")
    print(f"  health gate wait      p50 {med(c.gate for c in ours):5.1f}s")
    print(
        f"  orchestration overhead p50 {med(c.overhead for c in ours):5.1f}s  p95 {_p([c.overhead for c in ours], 0.95):5.1f}s  (goal <= 5 s)"
    )
    print(f"ratio ours/shell        p50 x{med(c.wall for c in ours) / med(baselines):.1f}")
    beyond = [c.to_slack - c.tool_before_slack for c in ours]
    print(
        f"trigger -> 'plan waiting' in Slack, minus tool time: p50 {med(beyond):4.1f}s  p95 {_p(beyond, 0.95):4.1f}s  (goal <= 3 s)"
    )
    print("per phase (p50):")
    for name in ours[0].phases:
        print(f"  {name:36s} {med(c.phases[name] for c in ours):5.2f}s")
    for name in ours[0].trigger:
        print(f"  trigger: {name:27s} {med(c.trigger[name] for c in ours if name in c.trigger):5.2f}s")


if __name__ == "__main__":
    raise SystemExit(main())
