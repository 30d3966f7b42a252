"""A progressive rollout of 10 instances in batches of 2 (issue 23), against Terraform applying the same 5 steps in
a shell loop.

    .venv/bin/python bench/rollout.py [--rounds 3] [--postgres] [--no-cycle]

The environment is bench/cycle.py's (moto for S3 and DynamoDB, the Consul and Slack stand-ins, a Prefect server,
one warm `icd-worker`, the deployments of prefect.yaml), with two namespaces: ``bench/fleet`` for the workspace
``fleet`` on examples/stacks/local-fleet with ``rollout = {instances = 10, max_parallel = 2,
min_healthy_time_seconds = 0}``, and cycle.py's ``bench/web`` on examples/stacks/local for one single-deploy
cycle per round. Set-up, not measured: v1 goes onto all 10 slots at once (``max_parallel = 10``) on both sides.
Then each round, interleaved, both sides move the fleet to a new version built by `build-artifact` (the same
image on both sides):

* **shell**: `terraform plan -out` + `terraform apply` five times on the same stack and S3 backend on moto (its
  own state key, workspace ``shell``), each step moving 2 more slots (the ``-var instances=...`` JSON of that
  step, as icd/deploy/rollout.py encodes it), each followed by a poll of the Consul stand-in's
  ``/v1/health/service/fleet?passing`` every 0.1 s until the step's 2 new instances are in it (the shell's gate).
  Timed by ``date`` around each command: wall, Terraform time, gate time.
* **ours**: a `deploy-artifact` run for the version, approved the moment it waits, its 5 batches run by
  flows/deploy_artifact.py's ``roll_out``. Wall = the server's end time of the run - the moment this script sent
  the approval. Tool time = the Terraform tool lines (icd/tools/process.py) the run logged after the approval,
  read once the run's logs have stopped growing (issue 24: reading them as the run ends misses the last batch
  of log lines). Gate = the summed durations of the run's ``batch-health-gate`` task runs (as cycle.py counts
  the single deploy's ``health-gate``); the gates' own waited seconds (their log lines) are printed too.
  Overhead = wall - tool - gate; per batch = overhead / 5.
  Also printed: ours' Terraform calls by subcommand and its task time after the approval, by task.
* **one deploy cycle** (cycle.py's ``our_cycle``, its tool time read once the logs settle): the single
  deploy's overhead in the same run, the goal's yardstick. ``--no-cycle`` leaves it out.

Round 0 warms both sides up and is not counted.
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
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cycle
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from examples.local_env import (
    LocalServices,
    create_postgres_database,
    drop_postgres_database,
    git,
    make_app_repo,
    provision,
    recorded_task_runs,
    start_moto,
    start_prefect_server,
    start_worker,
    stop_instances,
    wait_for_run,
    worker_env,
    write_config,
)
from icd.deploy.artifacts import artifact_for
from icd.deploy.rollout import Slot, encode_instances
from icd.tools.binaries import terraform_binary, terraform_cli_config
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn

FLEET_NAMESPACE = "bench/fleet"
FLEET_WORKSPACE = "fleet"
FLEET_SERVICE = "fleet"
FLEET_STACK = "examples/stacks/local-fleet"
INSTANCES = 10
BATCH = 2
STEPS = INSTANCES // BATCH
PROJECT = Path(__file__).resolve().parent.parent
ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
_GATE_LINE = re.compile(r"batch gate: .* healthy after ([\d.]+)s")


@dataclass
class Rollout:
    run_id: Any
    wall: float  # approval sent -> the run's end
    tool: float  # Terraform tool lines after the approval
    tool_calls: int
    gate: float  # the batch-health-gate task runs' durations
    gate_waited: float  # what the gates themselves say they waited
    tasks: dict[str, float] = field(default_factory=dict)  # task name -> summed duration after the approval
    commands: dict[str, list[float]] = field(default_factory=dict)  # terraform subcommand -> call durations

    @property
    def overhead(self) -> float:
        return self.wall - self.tool - self.gate

    @property
    def per_batch(self) -> float:
        return self.overhead / STEPS


@dataclass
class ShellRollout:
    wall: float
    tool: float
    gate: float

    @property
    def per_batch(self) -> float:
        return (self.wall - self.tool - self.gate) / STEPS


# Shared with cycle.py (issue 24: a run's last log lines arrive after it ended).
settled_logs = cycle.settled_logs


def tool_after(logs: list[Any], after: float) -> dict[str, list[float]]:
    """Terraform subcommand -> the durations of its calls logged after ``after``."""
    calls: dict[str, list[float]] = defaultdict(list)
    for log in logs:
        match = cycle._TOOL_LINE.search(log.message)
        if match and log.timestamp.timestamp() >= after and Path(match.group(1)).name.startswith("terraform"):
            calls[match.group(2)].append(float(match.group(4)))
    return dict(calls)


def start(deployment: str, parameters: dict[str, Any]) -> FlowRun:
    """A run of ``deployment``, not waited for (run_deployment is typed for both its sync and async callers)."""
    return cast(FlowRun, run_deployment(deployment, parameters=parameters, timeout=0))


def build(repo: Path, registry: Any, namespace: str, label: str) -> int:
    """A new registered version of ``namespace`` (no deploy triggered: ``plan=False``)."""
    app = repo / "src" / "app.py"
    app.write_text(app.read_text() + f"\n# {label} {uuid.uuid4().hex}\n")
    git(repo, "commit", "-q", "-am", label)
    run = start("build-artifact/build-artifact", {"namespace": namespace, "plan": False})
    ended = wait_for_run(run.id, ENDED, interval=0.1, timeout=300)
    if ended.state is None or ended.state.type.value != "COMPLETED":
        raise RuntimeError(f"the build of {label} ended {ended.state}")
    return int(registry.registry().last_version(namespace))


def our_rollout(registry: Any, version: int, *, batches: int) -> Rollout:
    run = start("deploy-artifact/deploy-artifact", {"workspace": FLEET_WORKSPACE, "version": version})
    paused = wait_for_run(run.id, {"PAUSED", *ENDED}, interval=0.05, timeout=300)
    if paused.state is None or paused.state.type.value != "PAUSED":
        raise RuntimeError(f"the rollout ended without asking: {paused.state}")
    sha = registry.plan_store().sha256_of(FLEET_WORKSPACE, str(run.id))
    resumed_at = time.time()
    cycle.approve(run.id, sha)
    done = wait_for_run(run.id, ENDED, interval=0.05, timeout=900)
    if done.state is None or done.state.name != "Deployed":
        raise RuntimeError(f"the rollout ended {done.state and done.state.name}: {done.state and done.state.message}")
    assert done.end_time is not None
    wall = done.end_time.timestamp() - resumed_at
    logs = settled_logs(run.id, after=resumed_at, min_applies=batches)
    by_command = tool_after(logs, resumed_at)
    tool = sum(sum(durations) for durations in by_command.values())
    calls = sum(len(durations) for durations in by_command.values())
    task_runs = recorded_task_runs(run.id)
    tasks: dict[str, float] = defaultdict(float)
    for task in task_runs:
        if task.start_time is None or task.start_time.timestamp() < resumed_at or task.total_run_time is None:
            continue
        tasks[task.name.rsplit("-", 1)[0]] += task.total_run_time.total_seconds()
    gates = [t for t in task_runs if t.name.startswith("batch-health-gate")]
    if len(gates) != batches:
        raise RuntimeError(f"expected {batches} batch gates, the run has {len(gates)}")
    waited = sum(float(m.group(1)) for log in logs if (m := _GATE_LINE.search(log.message)))
    return Rollout(run.id, wall, tool, calls, tasks.get("batch-health-gate", 0.0), waited, dict(tasks), by_command)


SHELL_ROLLOUT = r"""
set -eu
cd "$STACKDIR"
now() { date +%s.%N; }
for step in $(seq 1 "$STEPS"); do
  eval "instances=\$INSTANCES_$step"
  eval "ids=\$IDS_$step"
  a=$(now)
  "$TERRAFORM" plan -input=false -no-color -out=plan.tfplan -var "instances=$instances" \
    -var artifact_id="$ARTIFACT" -var artifact_version="$LABEL" -var namespace="$NAMESPACE" \
    -var service_name="$SERVICE" -var consul_addr="$CONSUL" -var deploy_run_id=shell -var workspace=shell \
    -var instance_root="$INSTANCE_ROOT" >>"$LOG" 2>&1
  b=$(now)
  "$TERRAFORM" apply -input=false -no-color plan.tfplan >>"$LOG" 2>&1
  c=$(now)
  # The shell's gate: each new instance listed as passing by Consul, polled every 0.1 s, 60 s at most.
  for id in $ids; do
    tries=0
    until curl -sf "$CONSUL/v1/health/service/$SERVICE?passing" | grep -q "\"$id\""; do
      tries=$((tries + 1)); [ "$tries" -lt 600 ] || { echo "gate: $id never passed" >>"$LOG"; exit 1; }
      sleep 0.1
    done
  done
  d=$(now)
  echo "$a $b $c $d" >>"$TIMES"
done
"""

SHELL_INIT = r"""
set -eu
rm -rf "$STACKDIR" && cp -r "$STACK" "$STACKDIR" && cd "$STACKDIR"
printf 'terraform {\n  backend "s3" {}\n}\n' > backend_override.tf
"$TERRAFORM" init -input=false -no-color -reconfigure \
  -backend-config=bucket="$BUCKET" -backend-config=key="shell/fleet.tfstate" -backend-config=region=us-east-1 \
  -backend-config=endpoint="$ENDPOINT" -backend-config=force_path_style=true \
  -backend-config=skip_credentials_validation=true -backend-config=skip_metadata_api_check=true \
  -backend-config=skip_region_validation=true -backend-config=dynamodb_table="$TABLE" \
  -backend-config=dynamodb_endpoint="$ENDPOINT" >>"$LOG" 2>&1
"""


class Shell:
    """The baseline's fleet: its own copy of the stack, state key and instance directory."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = {**env, "STACKDIR": str(home / "stack"), "INSTANCE_ROOT": str(home / "instances")}
        self.log = home / "log"
        home.mkdir(parents=True, exist_ok=True)
        self._run(SHELL_INIT, {})
        self.slots: list[Slot] = []

    def _run(self, script: str, extra: dict[str, str]) -> None:
        result = subprocess.run(["bash", "-c", script], env={**self.env, "LOG": str(self.log), **extra}, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the shell baseline failed:\n{self.log.read_text()[-3000:]}")

    def roll(self, target: Slot, batch: int) -> ShellRollout:
        """Move every slot to ``target``, ``batch`` slots per plan + apply + gate step."""
        start = self.slots or [target] * INSTANCES  # the first deploy: everything at once (batch = INSTANCES)
        steps: dict[str, str] = {}
        count = 0
        for step, first in enumerate(range(0, INSTANCES, batch), start=1):
            moved = range(first, min(first + batch, INSTANCES))
            slots = [target if index < first + batch else start[index] for index in range(INSTANCES)]
            steps[f"INSTANCES_{step}"] = encode_instances(slots)
            steps[f"IDS_{step}"] = " ".join(f"{FLEET_SERVICE}-shell-{i}-{target.build_label}" for i in moved)
            count = step
        times = self.home / f"times-{uuid.uuid4().hex}"
        extra = {**steps, "STEPS": str(count), "TIMES": str(times), "ARTIFACT": target.artifact_id}
        extra["LABEL"] = target.build_label
        started = time.time()
        self._run(SHELL_ROLLOUT, extra)
        wall = time.time() - started
        rows = [[float(value) for value in line.split()] for line in times.read_text().splitlines()]
        self.slots = [target] * INSTANCES
        return ShellRollout(wall=wall, tool=sum(c - a for a, _, c, _ in rows), gate=sum(d - c for _, _, c, d in rows))


def fleet_workspace(max_parallel: int) -> dict[str, object]:
    return {
        "follows": f"{FLEET_NAMESPACE}@latest",
        "stack": FLEET_STACK,
        "rollout": {"instances": INSTANCES, "max_parallel": max_parallel, "min_healthy_time_seconds": 0},
    }


def one_cycle(repo: Path, registry: Any, slack: SlackStandIn, round_number: int) -> cycle.Cycle:
    """cycle.py's single deploy (its tool time read from settled logs, its notice found by the plan's hash)."""
    return cycle.our_cycle(repo, registry, slack, round_number)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default=None, help="PostgreSQL for the Prefect server (default: SQLite)")
    parser.add_argument("--postgres", action="store_true", help="a fresh database on the local PostgreSQL")
    parser.add_argument("--no-cycle", action="store_true", help="leave out the single-deploy cycle per round")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    home = Path(tempfile.mkdtemp(prefix="icd-bench-rollout-"))
    moto, endpoint = start_moto()
    consul = ConsulStandIn().start()
    slack = SlackStandIn(token="xoxb-bench").start()
    database_url = create_postgres_database("icd_bench") if args.postgres else args.database_url
    server = start_prefect_server(home / "prefect", database_url=database_url)
    processes = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            web_repo = make_app_repo(home / "repo")
            fleet_repo = make_app_repo(home / "fleet-repo")
            namespaces = {
                cycle.NAMESPACE: {"repository": str(web_repo), "service_name": "web"},
                FLEET_NAMESPACE: {"repository": str(fleet_repo), "service_name": FLEET_SERVICE},
            }
            single: dict[str, object] = {"follows": f"{cycle.NAMESPACE}@latest", "stack": "examples/stacks/local"}

            def configure(max_parallel: int) -> Path:
                workspaces: dict[str, Mapping[str, object]] = {
                    cycle.WORKSPACE: single,
                    FLEET_WORKSPACE: fleet_workspace(max_parallel),
                }
                return write_config(home / "icd.toml", namespaces=namespaces, workspaces=workspaces)

            config = configure(INSTANCES)
            os.environ["ICD_CONFIG"] = str(config)
            services = LocalServices(
                endpoint, "icd-bench", "bench", "bench", slack.api_url, "xoxb-bench", consul.http_addr
            )
            registry = provision(server, services, alerts_url=slack.webhook_url("alerts"))
            with get_client(sync_client=True) as client:
                client.pause_deployment(client.read_deployment_by_name("consul-health/consul-health").id)
            processes.append(
                start_worker(server, "local-pool", env=worker_env(home / "icd", config), name="worker-0", warm=True)
            )
            shell = Shell(
                home / "shell",
                {
                    "PATH": os.environ["PATH"],
                    "HOME": os.environ.get("HOME", "/root"),
                    "TERRAFORM": terraform_binary(),
                    "TF_CLI_CONFIG_FILE": str(terraform_cli_config()),
                    "CHECKPOINT_DISABLE": "1",
                    "TF_IN_AUTOMATION": "1",
                    "NAMESPACE": FLEET_NAMESPACE,
                    "SERVICE": FLEET_SERVICE,
                    "STACK": str(PROJECT / FLEET_STACK),
                    "BUCKET": "icd-bench",
                    "TABLE": registry.state_lock_table or "",
                    "ENDPOINT": endpoint,
                    "CONSUL": consul.http_addr,
                    "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_DEFAULT_REGION": "us-east-1",
                },
            )

            def target_of(version: int) -> Slot:
                found = registry.registry().get(FLEET_NAMESPACE, version)
                return Slot(artifact_for(found, "local"), found.build_label, version)

            # Set-up: v1 on all 10 slots at once, on both sides.
            v1 = build(fleet_repo, registry, FLEET_NAMESPACE, "fleet v1")
            first_shell = shell.roll(target_of(v1), INSTANCES)
            first = our_rollout(registry, v1, batches=1)
            print(
                f"set-up, v1 on {INSTANCES} slots at once: shell {first_shell.wall:5.1f}s  ours {first.wall:5.1f}s "
                f"(tools {first.tool:4.1f}s, gate {first.gate:4.1f}s, overhead {first.overhead:4.1f}s)",
                flush=True,
            )
            config = configure(BATCH)
            shells: list[ShellRollout] = []
            ours: list[Rollout] = []
            cycles: list[cycle.Cycle] = []
            for round_number in range(args.rounds + 1):  # round 0 warms both up and is not counted
                version = build(fleet_repo, registry, FLEET_NAMESPACE, f"fleet round {round_number}")
                baseline = shell.roll(target_of(version), BATCH)
                mine = our_rollout(registry, version, batches=STEPS)
                one = None
                if not args.no_cycle:
                    one = one_cycle(web_repo, registry, slack, round_number)
                if round_number:
                    shells.append(baseline)
                    ours.append(mine)
                    if one is not None:
                        cycles.append(one)
                print(
                    f"round {round_number}{' (warm-up)' if not round_number else ''}: "
                    f"shell {baseline.wall:5.1f}s (terraform {baseline.tool:4.1f}s, gate {baseline.gate:4.1f}s)  "
                    f"ours {mine.wall:5.1f}s (terraform {mine.tool:4.1f}s in {mine.tool_calls} calls, "
                    f"gates {mine.gate:4.1f}s [waited {mine.gate_waited:4.1f}s], overhead {mine.overhead:4.1f}s "
                    f"= {mine.per_batch:4.2f}s/batch)"
                    + (f"  cycle overhead {one.overhead:4.1f}s (tools {one.tool:4.1f}s)" if one else ""),
                    flush=True,
                )
            report(shells, ours, cycles)
    finally:
        for process in processes:
            process.stop()
        stop_instances(home / "icd")
        stop_shell_instances(home / "shell" / "instances")
        server.stop()
        if args.postgres and database_url:
            drop_postgres_database(database_url)
        slack.stop()
        consul.stop()
        moto.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def stop_shell_instances(root: Path) -> None:
    for stop in sorted(root.glob("*/bin/stop")):
        subprocess.run([str(stop), "--instance-dir", str(stop.parent.parent)], check=False, capture_output=True)


def report(shells: list[ShellRollout], ours: list[Rollout], cycles: list[cycle.Cycle]) -> None:
    med = statistics.median
    print()
    print(f"rollouts of {INSTANCES} instances in {STEPS} batches of {BATCH}: {len(ours)} of each, interleaved")
    print(
        "| round | shell wall | shell terraform | shell gate | ours wall | ours terraform | ours gates | ours overhead | per batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for number, (sh, us) in enumerate(zip(shells, ours, strict=True), start=1):
        print(
            f"| {number} | {sh.wall:.1f} s | {sh.tool:.1f} s | {sh.gate:.1f} s | {us.wall:.1f} s | {us.tool:.1f} s | "
            f"{us.gate:.1f} s | {us.overhead:.1f} s | {us.per_batch:.2f} s |"
        )
    print(
        f"p50: shell wall {med(s.wall for s in shells):.1f}s (terraform {med(s.tool for s in shells):.1f}s, "
        f"gate {med(s.gate for s in shells):.1f}s, rest {med(s.per_batch for s in shells):.2f}s/batch); "
        f"ours wall {med(u.wall for u in ours):.1f}s (terraform {med(u.tool for u in ours):.1f}s, "
        f"gates {med(u.gate for u in ours):.1f}s)"
    )
    per_batch = med(u.per_batch for u in ours)
    strict = med((u.wall - u.tool - u.gate_waited) / STEPS for u in ours)
    print(
        f"ours: overhead per batch p50 {per_batch:.2f}s (counting the gate tasks' own time as overhead: {strict:.2f}s)"
    )
    print(f"ratio ours/shell wall p50 x{med(u.wall for u in ours) / med(s.wall for s in shells):.2f}")
    if cycles:
        single = med(c.overhead for c in cycles)
        verdict = "met" if per_batch <= single else "NOT met"
        print(
            f"one deploy cycle, same run: overhead p50 {single:.2f}s (tools {med(c.tool for c in cycles):.1f}s) -> "
            f"goal (overhead per batch <= one cycle's) {verdict}"
        )
    print("ours, Terraform calls after the approval (p50 per rollout; the shell makes 5 plan + 5 apply):")
    for name in sorted({n for u in ours for n in u.commands}):
        count = med(len(u.commands.get(name, [])) for u in ours)
        print(f"  {name:28s} {count:4.0f} calls {med(sum(u.commands.get(name, [])) for u in ours):6.2f}s")
    print("ours, task time after the approval (p50 per rollout, summed over its batches):")
    for name in sorted({n for u in ours for n in u.tasks}, key=lambda n: -med(u.tasks.get(n, 0.0) for u in ours)):
        print(f"  {name:28s} {med(u.tasks.get(name, 0.0) for u in ours):6.2f}s")


if __name__ == "__main__":
    raise SystemExit(main())
