"""One deploy cycle through the deployed flows, against the same Packer + Terraform work done by a shell script,
on both databases a site can run the Prefect server on, side by side.

    .venv/bin/python bench/cycle.py [--rounds 5]                # both: PostgreSQL and the SQLite default
    .venv/bin/python bench/cycle.py --rounds 5 --postgres       # PostgreSQL only (--sqlite: SQLite only)
    .venv/bin/python bench/cycle.py --concurrent 10 --workers 2 --postgres
    .venv/bin/python bench/cycle.py --rounds 5 --baseline HEAD~1   # A/B: each database also on HEAD~1's code
    .venv/bin/python bench/cycle.py --concurrent 10 --workers 2 --postgres --rounds 2 --baseline HEAD~1   # A/B under load

Everything runs here for real: moto (S3, DynamoDB), and per database its own Consul and Slack stand-ins, Prefect
server, worker (`icd-worker`, warm runs; `--cold` for Prefect's process worker, polling every second), the
deployments and triggers of prefect.yaml, in its own bucket. The servers: **PostgreSQL**, a fresh database on the
local server (``ICD_POSTGRES_DSN``, default 127.0.0.1:5432 ``test``, trust auth) made for this run and dropped at
its end; **SQLite**, the embedded default a newcomer gets: ``icd-server start`` (cli/server.py) on a new file
under this run's temp dir. Each round, interleaved:

* **shell**: a shell script that clones the app, runs `packer build`, then `terraform init`, `plan -out`,
  `show -json` and `apply` on the local stack with the same S3 backend and lock table; each tool call is timed
  (``date`` around it) for its tool time. Like ours, each round's apply replaces the instance the round before
  started (one state and one instance directory for all rounds; its create step retires the old instance), so
  both sides' tools do the same work; the last instance is destroyed at the end, untimed;
* **ours**, on PostgreSQL, then on SQLite: a commit, then `build-artifact` (the registration's event plans the
  workspace), the `deploy-artifact` run that the trigger starts, approved the moment it waits, until it ends
  `Deployed`.

Ours is measured on the server's own timestamps, from the build run's creation to the deploy run's end, minus
the time the run sat suspended before this script resumed it. Tool time is the sum of the durations the flows
logged for every Packer and Terraform call (`icd/tools/process.py`), read once the runs' logs have stopped
growing (:func:`settled_logs`; issue 24: read the moment the run ends, the last batch of log lines is missing).
After the last round every cycle's logs are read again and their tool lines must still sum to what was reported
(the cross-check). Overhead = wall - tool time - the health check's own wait (the gate's task).

Also printed, per database: trigger -> the approval notice in Slack (its first post: the notice is rewritten
in place once decided, issue 21), minus the tool time before it; the ratio (wall - suspended) / shell; tool
time by call against the shell's; the cycle cut into consecutive phases (they add up to the wall) with the
tool time and overhead in each; the task runs by time less their tools; the lock steps (claim / checkpoint /
release tasks); the machine's load before and after; and what the server's and worker's logs hold
(``database is locked``, errors).

**CPU seconds per cycle**, beside the shell's (its script and tools, and moto serving them): the Prefect server,
the worker with its fork server, runs and their tools, PostgreSQL, and this script (moto, the stand-ins, its own
reads), read from /proc around each cycle; and what the server spends idle, measured while the shell's round
runs. On two cores CPU is what a cycle waits for, and it moves far less with the machine's mood than wall time
does: a change of a few hundredths of a second shows there and not in the wall. This script reads a cycle's runs
every ``--poll`` seconds (0.25; it was 0.05, about as many requests as the runs themselves made).

**AWS requests per cycle**, beside the shell's, by what they serve (Prefect's result store, the registry, the
workspace queue, the plan store, the deploy records, Terraform's state, its lock table, STS): counted as moto
serves them (:class:`AwsRequests`). A count does not move with the machine's load, and against a real region
each request is a round trip that moto, in this process, answers in a few milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from examples.local_env import (
    LocalServices,
    ManagedProcess,
    PrefectServer,
    api_client,
    create_postgres_database,
    drop_postgres_database,
    first_run_after,
    git,
    make_app_repo,
    postgres_available,
    provision,
    read_flow_run,
    recorded_task_runs,
    run_logs,
    start_moto,
    start_prefect_server,
    start_worker,
    stop_instances,
    wait_for_run,
    worker_env,
    write_config,
)
from icd.deploy.approval import give_answer
from icd.tools.binaries import packer_binary, terraform_binary, terraform_cli_config
from standins.consul import ConsulStandIn
from standins.slack import ReceivedMessage, SlackStandIn

NAMESPACE = "bench/web"
WORKSPACE = "bench"
PROJECT = Path(__file__).resolve().parent.parent
_TOOL_LINE = re.compile(r"tool (\S+) (\S*) exited (-?\d+) in ([\d.]+)s")
# The lock steps of a cycle: the build's claim on its commit, the deploy's on its workspace (issue 24 asks for
# them as fast on SQLite as on PostgreSQL).
LOCK_TASKS = (
    "build: claim-build",
    "build: release-build-claim",
    "deploy: claim-workspace",
    "deploy: checkpoint-workspace",
    "deploy: release-workspace",
)
# Consecutive stretches from the build run's creation to the deploy's end (the suspension left out): they add
# up to the wall time.
PHASES = (
    "build: created -> running",
    "build: running -> registration announced",
    "registration -> deploy run created",
    "deploy: created -> running",
    "deploy: running -> paused (plan, notice)",
    "deploy: resumed -> running again",
    "deploy: running again -> Deployed",
)


@dataclass
class Cycle:
    build_id: Any
    deploy_id: Any
    wall: float
    tool: float  # the tool lines of both runs, read once their logs settled
    gate: float
    to_slack: float  # build run created -> the approval notice first posted to the Slack stand-in
    tool_before_slack: float
    tool_at_end: float = 0.0  # the same tool lines read the moment the deploy ended (what cycle.py used to count)
    tools: dict[str, list[float]] = field(default_factory=dict)  # "terraform plan" -> durations
    trigger: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # PHASES -> seconds
    phase_tool: dict[str, float] = field(default_factory=dict)  # PHASES -> tool seconds logged in it
    tasks: dict[str, float] = field(default_factory=dict)  # "deploy: plan-deploy" -> summed task run seconds
    task_tool: dict[str, float] = field(default_factory=dict)  # the same -> tool seconds logged inside
    cpu: dict[str, float] = field(default_factory=dict)  # where -> CPU seconds during the cycle (cpu_now)
    cpu_window: float = 0.0  # the seconds those were read over (the suspension and the settling included)
    aws: dict[str, int] = field(default_factory=dict)  # AWS_STORES -> requests during the cycle

    @property
    def overhead(self) -> float:
        return self.wall - self.tool - self.gate

    def phase_overhead(self, name: str) -> float:
        gate = self.gate if name == PHASES[-1] else 0.0  # the health gate runs after the apply
        return self.phases[name] - self.phase_tool.get(name, 0.0) - gate


# CPU seconds, by where they were spent: wall time on two cores moves with whatever else the machine does, CPU time
# much less, and on two cores CPU is what the cycle waits for. Read from /proc (Linux).
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command name, CPU seconds of it and of its children it has reaped)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        name, rest = raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()
        # after the name: state ppid ... utime(12th) stime cutime cstime
        stats[int(entry.name)] = (int(rest[1]), name, sum(int(v) for v in rest[11:15]) / _TICK)
    return stats


def tree_cpu(root: int, stats: dict[int, tuple[int, str, float]]) -> float:
    """CPU seconds of ``root`` and every live descendant (ended ones are in their reaper's children's time)."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _, _) in stats.items():
        children[parent].append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][2]
            todo += children.get(pid, [])
    return total


def cpu_now(server_pid: int, worker_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far: the Prefect server, the workers with their fork servers, runs and the tools the runs
    ran, every PostgreSQL process on the machine (the other sides' idle servers and workers use it too, as would
    anything else on the machine: the SQLite side's figure is that), and this script (moto, the stand-ins, its own
    reads of the API)."""
    stats = _proc_stats()
    mine = os.times()
    return {
        "server": tree_cpu(server_pid, stats),
        "worker, runs, tools": sum(tree_cpu(pid, stats) for pid in worker_pids),
        "postgresql": sum(cpu for _, name, cpu in stats.values() if name == "postgres"),
        "bench (moto, stand-ins, polls)": mine.user + mine.system,
    }


def cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in before}


# AWS requests per cycle, by what they serve. Unlike time, a count does not move with the machine's load, and
# against a real region each one is a round trip of its own (tens of milliseconds) where moto answers in a few.
# The shell's round and each side's cycle run one after another, so a window's count is that cycle's; the one
# thing counted that the cycle did not do is this script's own read of the plan's hash to approve it.
AWS_STORES = (
    "result store (Prefect)",
    "registry",
    "workspace queue",
    "plan store",
    "deploy records",
    "terraform state",
    "terraform state lock",
    "sts",
    "other",
)


def aws_store(environ: Mapping[str, Any]) -> str:
    """What one request to moto served, from its path (the buckets are path-style) or its target."""
    if environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB"):
        return "terraform state lock"  # the only table: Terraform's state lock
    path = str(environ.get("PATH_INFO", "")).strip("/")
    if not path:
        # AssumeRole, for Terraform's scoped credentials (a form POST to the root); anything else there is not
        # a cycle's (a bucket listing, say)
        return "sts" if environ.get("REQUEST_METHOD") == "POST" else "other"
    key = path.partition("/")[2]
    if not key:  # a listing: what it lists is its prefix (Terraform lists its workspaces under env:/)
        key = parse_qs(str(environ.get("QUERY_STRING", ""))).get("prefix", [""])[0]
        if not key or key.startswith("env:"):
            return "terraform state"
    if key.startswith("shell/") or key.startswith("registry/state/"):
        return "terraform state"
    for prefix, store in (
        ("registry/namespaces/", "registry"),
        ("registry/queues/", "workspace queue"),
        ("registry/plans/", "plan store"),
        ("registry/deployments/", "deploy records"),
        ("registry/", "other"),  # a store a cycle does not use (the drift checks' memory, say)
    ):
        if key.startswith(prefix):
            return store
    return "result store (Prefect)"  # task results and run records, at the bucket's root


class AwsRequests:
    """Counts what moto serves, by :func:`aws_store`: a WSGI wrapper on its server (moto's private
    ``_server``: a benchmark may lean on it, nothing else does)."""

    def __init__(self, moto: Any) -> None:
        self._counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        server = moto._server
        app = server.app

        def counting(environ: dict[str, Any], start_response: Any) -> Any:
            with self._lock:
                self._counts[aws_store(environ)] += 1
            return app(environ, start_response)

        server.app = counting

    def now(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @staticmethod
    def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {store: after.get(store, 0) - before.get(store, 0) for store in AWS_STORES}


def _tool_seconds(logs: list[Any], until: float | None = None) -> float:
    total = 0.0
    for log in logs:
        if (match := _TOOL_LINE.search(log.message)) and (until is None or log.timestamp.timestamp() <= until):
            total += float(match.group(4))
    return total


def _tool_calls(logs: list[Any]) -> dict[str, list[float]]:
    """``"terraform plan"`` -> the durations of those calls."""
    calls: dict[str, list[float]] = defaultdict(list)
    for log in logs:
        if match := _TOOL_LINE.search(log.message):
            calls[f"{Path(match.group(1)).name} {match.group(2)}".strip()].append(float(match.group(4)))
    return dict(calls)


def settled_logs(run_id: Any, *, after: float, min_applies: int, quiet: float = 2.5, timeout: float = 60) -> list[Any]:
    """The run's logs once they stop growing: Prefect ships log lines in batches (every 2 s by default), so the
    last batch lands after the run has ended. At least ``min_applies`` `terraform apply` lines after ``after``
    must be there, and then nothing new for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while True:
        logs = run_logs(run_id)
        applies = sum(
            1
            for log in logs
            if log.timestamp.timestamp() >= after and (m := _TOOL_LINE.search(log.message)) and m.group(2) == "apply"
        )
        if len(logs) != seen:
            seen, since = len(logs), time.monotonic()
        elif applies >= min_applies and time.monotonic() - since >= quiet:
            return logs
        if time.monotonic() > deadline:
            raise RuntimeError(f"the run's logs never settled with {min_applies} applies (saw {applies})")
        time.sleep(0.25)


def _states(run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return list(client.read_flow_run_states(run_id))


def plan_notice(slack: SlackStandIn, plan_sha256: str, timeout: float = 30) -> ReceivedMessage:
    """The approval notice of the plan ``plan_sha256``, as the stand-in stored it. Found by the dedup key the
    notice carries in its metadata (``plan-<sha256>``, tasks/approve.py): its text is rewritten in place once
    decided (issue 21), its metadata and ``received_at`` (the first post's time) are kept by ``chat.update``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in slack.messages if m.dedup_key == f"plan-{plan_sha256}" and m.thread_ts is None]
        if found:
            return min(found, key=lambda message: message.received_at)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no approval notice for plan {plan_sha256[:12]} reached the Slack stand-in")
        time.sleep(0.05)


def approve(run_id: Any, plan_sha256: str) -> None:
    """Approve a waiting run the way a script or a chat button does (``give_answer``): the moment it is
    Suspended its form's schema may not be saved yet, and Prefect refuses an answer until it is."""
    refused = give_answer(
        run_id, {"decision": "approve", "approver": "bench", "comment": "", "plan_sha256": plan_sha256}
    )
    if refused is not None:
        raise RuntimeError(f"the approval of run {run_id} was refused: {refused}")


def our_cycle(
    repo: Path,
    registry: Any,
    slack: SlackStandIn,
    round_number: int,
    *,
    poll: float,
    cpu: Callable[[], dict[str, float]],
) -> Cycle:
    cpu_before, cpu_from = cpu(), time.monotonic()
    app = repo / "src" / "app.py"
    app.write_text(app.read_text() + f"\n# bench round {round_number} {uuid.uuid4().hex}\n")
    git(repo, "commit", "-q", "-am", f"round {round_number}")
    # Any: these FlowRun reads are typed for async callers too, and their times as optional.
    build: Any = run_deployment("build-artifact/build-artifact", parameters={"namespace": NAMESPACE}, timeout=0)
    started = build.created.timestamp()
    deploy: Any = first_run_after("deploy-artifact", started - 1, interval=poll)
    paused: Any = wait_for_run(deploy.id, {"PAUSED", "FAILED", "CRASHED", "CANCELLED", "COMPLETED"}, interval=poll)
    if paused.state.type.value != "PAUSED":
        raise RuntimeError(f"the deploy ended without asking: {paused.state}")
    resumed_at = time.time()
    sha = registry.plan_store().sha256_of(WORKSPACE, str(deploy.id))
    approve(deploy.id, sha)
    done: Any = wait_for_run(deploy.id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, interval=poll)
    tool_at_end = _tool_seconds([*run_logs(build.id), *run_logs(deploy.id)])
    if done.state.name != "Deployed":
        raise RuntimeError(f"the deploy ended {done.state.name}: {done.state.message}")
    # The deploy's last log lines arrive after it ended; the build ended long before (the deploy's plan and
    # apply ran since), so one quiet read shows all of its lines.
    deploy_logs = settled_logs(deploy.id, after=0, min_applies=1)
    spent = cpu_spent(cpu_before, cpu())  # the runs have ended: their last lines are in
    window = time.monotonic() - cpu_from
    build_logs = settled_logs(build.id, after=0, min_applies=0, quiet=0.5)
    logs = [*build_logs, *deploy_logs]
    build_run: Any = read_flow_run(build.id)
    states = _states(deploy.id)
    pause_state = next(s for s in states if s.type.value == "PAUSED")
    suspended = resumed_at - pause_state.timestamp.timestamp()
    wall = done.end_time.timestamp() - started - suspended
    deploy_tasks = recorded_task_runs(deploy.id)
    build_tasks = recorded_task_runs(build.id)
    gate = sum(
        t.total_run_time.total_seconds()
        for t in deploy_tasks
        if t.name.startswith("health-gate") and t.state and t.state.name != "Cached"
    )
    slack_at = plan_notice(slack, sha).received_at
    announce = next((t for t in build_tasks if t.name.startswith("announce-registration") and t.end_time), None)
    plan = next((t for t in deploy_tasks if t.name.startswith("plan-deploy") and t.start_time), None)
    announced = announce.end_time.timestamp() if announce is not None else build_run.end_time.timestamp()
    trigger = {"event -> deploy run created": deploy.created.timestamp() - announced}
    if plan is not None:
        trigger["run created -> plan started"] = plan.start_time.timestamp() - deploy.created.timestamp()
    running = [s.timestamp.timestamp() for s in states if s.type.value == "RUNNING"]
    again = min(at for at in running if at > resumed_at)
    bounds = [
        started,
        build_run.start_time.timestamp(),
        announced,
        deploy.created.timestamp(),
        running[0],
        pause_state.timestamp.timestamp(),
        # the suspension: the pause -> the approval sent, left out
        resumed_at,
        again,
        done.end_time.timestamp(),
    ]
    spans = [(bounds[i], bounds[i + 1]) for i in (0, 1, 2, 3, 4)] + [(bounds[6], bounds[7]), (bounds[7], bounds[8])]
    phases = {name: end - begin for name, (begin, end) in zip(PHASES, spans, strict=True)}
    phase_tool = {name: _tool_in(logs, begin, end) for name, (begin, end) in zip(PHASES, spans, strict=True)}
    tasks: dict[str, float] = defaultdict(float)
    task_tool: dict[str, float] = defaultdict(float)
    for flow_name, runs, run_log in (("build", build_tasks, build_logs), ("deploy", deploy_tasks, deploy_logs)):
        for task in runs:
            if task.start_time is None or task.end_time is None:
                continue
            # A step read back from its record after the resume (once_per_run) still costs its round trips.
            read_back = " (read back)" if task.state and task.state.name == "Cached" else ""
            name = f"{flow_name}: {task.name.rsplit('-', 1)[0]}{read_back}"
            tasks[name] += task.end_time.timestamp() - task.start_time.timestamp()
            task_tool[name] += _tool_in(run_log, task.start_time.timestamp(), task.end_time.timestamp())
    return Cycle(
        build_id=build.id,
        deploy_id=deploy.id,
        wall=wall,
        tool=_tool_seconds(logs),
        gate=gate,
        to_slack=slack_at - started,
        tool_before_slack=_tool_seconds(logs, until=slack_at),
        tool_at_end=tool_at_end,
        tools=_tool_calls(logs),
        trigger=trigger,
        phases=phases,
        phase_tool=phase_tool,
        tasks=dict(tasks),
        task_tool=dict(task_tool),
        cpu=spent,
        cpu_window=window,
    )


def _tool_in(logs: list[Any], begin: float, end: float) -> float:
    """Tool seconds of the calls that ended (were logged) within [begin, end)."""
    total = 0.0
    for log in logs:
        if (match := _TOOL_LINE.search(log.message)) and begin <= log.timestamp.timestamp() < end:
            total += float(match.group(4))
    return total


def recheck(cycles: list[Cycle]) -> list[float]:
    """Every cycle's tool lines read again now, minus what was reported for it (0 when the figure held)."""
    return [_tool_seconds([*run_logs(one.build_id), *run_logs(one.deploy_id)]) - one.tool for one in cycles]


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
        build: Any = run_deployment(
            "build-artifact/build-artifact", parameters={"namespace": NAMESPACE, "plan": False}, timeout=0
        )
        built: Any = wait_for_run(build.id, {"COMPLETED", "FAILED", "CRASHED"}, interval=0.05)
        if built.state.type.value != "COMPLETED":
            raise RuntimeError("the load test's build failed")
        versions.append(registry.registry().last_version(NAMESPACE))
    started = time.time()
    runs = {}
    for number in range(deploys):
        workspace = workspaces[number % len(workspaces)]
        version = versions[-1]
        run: Any = run_deployment(
            "deploy-artifact/deploy-artifact", parameters={"workspace": workspace, "version": version}, timeout=0
        )
        runs[run.id] = workspace
    resumed: dict[Any, float] = {}
    ended: dict[Any, Any] = {}
    deadline = time.monotonic() + 1800
    while len(ended) < len(runs) and time.monotonic() < deadline:
        # One read of every run per poll, not one per run: the bench's own polling is load on the server it
        # measures (ten reads every 0.2 s were 50 requests a second).
        waiting = [run_id for run_id in runs if run_id not in ended]
        for run in api_client().read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=waiting))):
            run_id, workspace = run.id, runs[run.id]
            kind = run.state.type.value if run.state else ""
            if kind in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                ended[run_id] = run
            elif kind == "PAUSED" and run_id not in resumed:
                sha = registry.plan_store().sha256_of(workspace, str(run_id))
                resumed[run_id] = time.time()
                approve(run_id, sha)
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
        tasks = [t for t in recorded_task_runs(run_id) if t.state and t.state.name != "Cached" and t.total_run_time]
        gate = sum(t.total_run_time.total_seconds() for t in tasks if t.name.startswith("health-gate"))
        logs = settled_logs(run_id, after=0, min_applies=1, quiet=1.0)
        overheads.append(wall - _tool_seconds(logs) - gate)
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
# Each tool call timed, as ours are: start and end on one line of $WORK/times.
t() { a=$(date +%s.%N); "$@"; echo "$a $(date +%s.%N) $(basename "$1") $2" >>"$WORK/times"; }
rm -rf "$WORK" && mkdir -p "$WORK"
t git clone -q "$REPO" "$WORK/src"
cd "$WORK/src/packer"
t "$PACKER" build -machine-readable -only=null.local_image \
  -var namespace="$NAMESPACE" -var version="$VERSION" -var commit="$(git rev-parse HEAD)" \
  -var output_dir="$WORK/images" -var service_name=benchsh . >/dev/null
cp -r "$STACK" "$WORK/stack" && cd "$WORK/stack"
printf 'terraform {\n  backend "s3" {}\n}\n' > backend_override.tf
t "$TERRAFORM" init -input=false -no-color -reconfigure \
  -backend-config=bucket="$BUCKET" -backend-config=key="shell/web.tfstate" -backend-config=region=us-east-1 \
  -backend-config=endpoint="$ENDPOINT" -backend-config=force_path_style=true \
  -backend-config=skip_credentials_validation=true -backend-config=skip_metadata_api_check=true \
  -backend-config=skip_region_validation=true -backend-config=dynamodb_table="$TABLE" \
  -backend-config=dynamodb_endpoint="$ENDPOINT" >/dev/null
t "$TERRAFORM" plan -input=false -no-color -out=plan.tfplan \
  -var artifact_id="$WORK/images/benchsh-$VERSION.tar.gz" -var artifact_version="$VERSION" \
  -var namespace="$NAMESPACE" -var service_name=benchsh -var consul_addr="$CONSUL" \
  -var deploy_run_id=shell -var workspace=shell -var instance_root="$INSTANCES" >/dev/null
t "$TERRAFORM" show -json plan.tfplan >/dev/null
t "$TERRAFORM" apply -input=false -no-color plan.tfplan >/dev/null
date +%s.%N > "$WORK/applied"
"""

# After the last round, in its stack directory: the instance the shell left running stopped and deregistered.
SHELL_TEARDOWN = r"""
set -eu
cd "$WORK/stack"
"$TERRAFORM" destroy -auto-approve -input=false -no-color \
  -var artifact_id=x -var artifact_version="$VERSION" -var namespace="$NAMESPACE" -var service_name=benchsh \
  -var consul_addr="$CONSUL" -var deploy_run_id=shell -var workspace=shell -var instance_root="$INSTANCES" \
  >>"$WORK/log" 2>&1
"""


@dataclass
class ShellCycle:
    wall: float  # start -> the apply done
    tools: dict[str, float]  # "terraform plan" -> seconds
    cpu: dict[str, float] = field(default_factory=dict)  # the script with its tools, and this one (moto)
    aws: dict[str, int] = field(default_factory=dict)  # AWS_STORES -> requests during the round

    @property
    def tool(self) -> float:
        return sum(self.tools.values())


def _shell_work(home: Path, round_number: int) -> Path:
    return home / f"shell-{round_number}"


def _shell_env(home: Path, env: dict[str, str], round_number: int) -> dict[str, str]:
    return {
        **env,
        "WORK": str(_shell_work(home, round_number)),
        "VERSION": f"sh{round_number}",
        "INSTANCES": str(home / "shell-instances"),
    }


def shell_cycle(home: Path, repo: Path, env: dict[str, str], round_number: int) -> ShellCycle:
    work = _shell_work(home, round_number)
    times = os.times()
    started = time.time()
    result = subprocess.run(
        ["bash", "-c", BASELINE.replace(">/dev/null", '>>"$WORK/log" 2>&1')],
        env=_shell_env(home, env, round_number),
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the shell baseline failed:\n{(work / 'log').read_text()[-3000:]}")
    tools: dict[str, float] = defaultdict(float)
    for line in (work / "times").read_text().splitlines():
        begin, end, name, command = line.split(maxsplit=3)
        tools[f"{name} {command}"] += float(end) - float(begin)
    spent = os.times()
    cpu = {
        "script and its tools": spent.children_user
        + spent.children_system
        - times.children_user
        - times.children_system,
        "bench (moto, stand-ins, polls)": spent.user + spent.system - times.user - times.system,
    }
    return ShellCycle(wall=float((work / "applied").read_text()) - started, tools=dict(tools), cpu=cpu)


def shell_teardown(home: Path, env: dict[str, str], round_number: int) -> None:
    """Destroy what the shell's last round (``round_number``) left running; a failure is printed, not raised."""
    result = subprocess.run(["bash", "-c", SHELL_TEARDOWN], env=_shell_env(home, env, round_number), check=False)
    if result.returncode != 0:
        print(f"the shell's clean-up failed; see {_shell_work(home, round_number) / 'log'}", flush=True)


@dataclass
class Side:
    """One database's server, with its own worker, stand-ins, bucket and cycles."""

    label: str  # "PostgreSQL", "SQLite"
    server: PrefectServer
    registry: Any
    slack: SlackStandIn
    consul: ConsulStandIn
    bucket: str
    workers: list[ManagedProcess] = field(default_factory=list)
    cycles: list[Cycle] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)  # server CPU seconds per second while the shell's round ran

    @contextlib.contextmanager
    def api(self) -> Iterator[None]:
        """This side's server as the Prefect client's API."""
        with temporary_settings(updates={PREFECT_API_URL: self.server.api_url}):
            yield

    def cpu(self) -> dict[str, float]:
        return cpu_now(self.server.process.proc.pid, [worker.proc.pid for worker in self.workers])

    def log_findings(self) -> dict[str, dict[str, Any]]:
        """Per process (server, workers): lines saying ``database is locked``, ERROR and WARNING lines, the first
        of each."""
        found: dict[str, dict[str, Any]] = {}
        for process in [self.server.process, *self.workers]:
            try:
                lines = process.log_path.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            errors = [line for line in lines if " ERROR " in line or "| ERROR" in line or line.startswith("ERROR")]
            warnings = [line for line in lines if " WARNING " in line or "| WARNING" in line]
            found[process.name] = {
                "locked": sum("database is locked" in line for line in lines),
                "errors": len(errors),
                "warnings": len(warnings),
                "first errors and warnings": errors[:3] + warnings[:2],
            }
        return found


def start_side(
    stack: contextlib.ExitStack,
    home: Path,
    label: str,
    database_url: str | None,
    *,
    endpoint: str,
    config: Path,
    workers: int,
    cold: bool,
    project: Path | None = None,
) -> Side:
    key = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]  # its bucket's, folders' and workers' name
    consul = ConsulStandIn().start()
    stack.callback(consul.stop)
    slack = SlackStandIn(token="xoxb-bench").start()
    stack.callback(slack.stop)
    # Another checkout's server is its own icd-server (cli/server.py is code under test too).
    server = start_prefect_server(home / f"prefect-{key}", database_url=database_url, project=project)
    stack.callback(server.stop)
    bucket = f"icd-bench-{key}"
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        services = LocalServices(endpoint, bucket, "bench", "bench", slack.api_url, "xoxb-bench", consul.http_addr)
        # Another checkout's deployments are its own: prefect.yaml's pull step and entrypoints name where its runs
        # load their flows from (provisioned from this tree, a baseline's runs loaded this tree's flow files, with
        # the baseline's tasks and library).
        registry = provision(server, services, alerts_url=slack.webhook_url("alerts"), project_dir=project or PROJECT)
        with get_client(sync_client=True) as client:
            # Scheduled runs of their own would land in whichever cycle's window is open.
            client.pause_deployment(client.read_deployment_by_name("consul-health/consul-health").id)
            client.pause_deployment(client.read_deployment_by_name("drift-check/drift-check").id)
    side = Side(label, server, registry, slack, consul, bucket)
    icd_home = home / f"icd-{key}"
    stack.callback(stop_instances, icd_home)
    # Another checkout's worker imports that checkout first: its flows, tasks, library and patches.
    checkout = {"ICD_PROJECT_DIR": str(project), "PYTHONPATH": str(project)} if project else None
    for number in range(workers):
        process = start_worker(
            server,
            "local-pool",
            env=worker_env(icd_home, config, checkout),
            name=f"worker-{key}-{number}",
            warm=not cold,
            cwd=project,
        )
        stack.callback(process.stop)
        side.workers.append(process)
    return side


def baseline_checkout(stack: contextlib.ExitStack, home: Path, revision: str) -> Path:
    """``revision`` checked out beside this tree (a detached git worktree, removed at the end), sharing this
    tree's venv and tools (same dependencies): the code under test is all that differs."""
    checkout = home / "baseline"
    subprocess.run(["git", "-C", str(PROJECT), "worktree", "prune"], check=True)  # an earlier run killed outright
    subprocess.run(
        ["git", "-C", str(PROJECT), "worktree", "add", "--detach", "--quiet", str(checkout), revision], check=True
    )
    stack.callback(
        subprocess.run, ["git", "-C", str(PROJECT), "worktree", "remove", "--force", str(checkout)], check=False
    )
    for shared in (".venv", ".tools"):
        (checkout / shared).symlink_to(PROJECT / shared)
    commit = subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], check=True, capture_output=True, text=True
    )
    print(f"baseline: {revision} = {commit.stdout.strip()[:100]}", flush=True)
    return checkout


def _swap_pairs(sides: list[Side]) -> list[Side]:
    """[a, a@REV, b, b@REV] -> [a@REV, a, b@REV, b]."""
    return [side for pair in zip(sides[1::2], sides[0::2], strict=True) for side in pair]


def machine_load() -> str:
    """``uptime``'s load averages (1, 5, 15 min) and the number of cores."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="counted cycles per side, after a warm-up round (default 5); with --concurrent, load rounds per side "
        "(default 1, or 5 with --baseline)",
    )
    parser.add_argument(
        "--both", action="store_true", help="PostgreSQL and the SQLite default side by side (the default)"
    )
    parser.add_argument("--postgres", action="store_true", help="only a fresh database on the local PostgreSQL")
    parser.add_argument("--sqlite", action="store_true", help="only the SQLite default (icd-server)")
    parser.add_argument("--database-url", default=None, help="only a server on this database")
    parser.add_argument("--timeline", action="store_true", help="print each side's last cycle's task timeline")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (servers' and workers' logs)")
    parser.add_argument(
        "--concurrent", type=int, default=0, help="instead: this many deploys at once (the team load test)"
    )
    parser.add_argument("--workers", type=int, default=1, help="process workers on each side's pool")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.25,
        help="seconds between this script's reads of a cycle's runs while it runs (0.05 until 2026-12-06). Each read "
        "is load on the server being measured; the figures come from the server's timestamps and the time a run "
        "sat suspended is left out, so the interval does not bias them",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="Prefect's own process worker (a fresh interpreter per run) instead of icd-worker: the before",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="each database twice, interleaved round by round (which goes first alternates; with --concurrent, "
        "--rounds load rounds each): this tree, and a "
        "worker running REV's flows, tasks, library and patches (a git worktree); the server's deployments, "
        "automations and blocks are this tree's. An A/B of a code change on one machine at one time",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.concurrent and not args.baseline else 5
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    only = [flag for flag in ("postgres", "sqlite", "database_url") if getattr(args, flag)]
    if len(only) > 1 or (only and args.both):
        parser.error("--both, --postgres, --sqlite and --database-url exclude each other")
    if args.baseline and args.database_url:
        parser.error("--baseline makes two servers per database: not with --database-url")
    if args.concurrent and not only:
        parser.error("--concurrent runs on one database: add --postgres (the team set-up), --sqlite or --database-url")
    wanted: list[tuple[str, str | None]] = []  # (label, database URL or None for a fresh one)
    if args.database_url:
        wanted = [("PostgreSQL" if args.database_url.startswith("postgresql") else "given", args.database_url)]
    if args.postgres or not only:
        if not postgres_available():
            parser.error("no PostgreSQL at ICD_POSTGRES_DSN (default postgresql://postgres@127.0.0.1:5432/test)")
        wanted.append(("PostgreSQL", None))
    if args.sqlite or not only:
        wanted.append(("SQLite", None))
    home = Path(tempfile.mkdtemp(prefix="icd-bench-cycle-"))
    load_before = machine_load()
    print(f"before: {load_before}", flush=True)
    with contextlib.ExitStack() as stack:
        if not (args.keep or args.timeline):
            stack.callback(shutil.rmtree, home, ignore_errors=True)
        else:
            stack.callback(print, f"kept {home}")
        moto, endpoint = start_moto()
        stack.callback(moto.stop)
        aws = AwsRequests(moto)
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
        variants: list[tuple[str, Path | None]] = [("", None)]  # (label suffix, the checkout its worker runs)
        if args.baseline:
            variants.append((f" @{args.baseline}", baseline_checkout(stack, home, args.baseline)))
        sides = []
        for label, given_url in wanted:
            for suffix, project in variants:
                url = given_url
                if label == "PostgreSQL" and given_url is None:
                    url = create_postgres_database("icd_bench")  # fresh: no earlier run's rows
                    stack.callback(drop_postgres_database, url)
                side = start_side(
                    stack,
                    home,
                    label + suffix,
                    url,
                    endpoint=endpoint,
                    config=config,
                    workers=args.workers,
                    cold=args.cold,
                    project=project,
                )
                sides.append(side)
        if args.concurrent:
            # With --baseline, each side takes its turn at every round, which goes first alternating; one round
            # at a time on the machine, so that a side's runs never compete with the other's.
            for round_number in range(args.rounds):
                for side in sides if round_number % 2 == 0 else sides[::-1]:
                    with side.api():
                        under_load(repo, side.registry, args.concurrent, load_workspaces(args.concurrent), side.label)
            return 0
        first = sides[0]
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
            "BUCKET": first.bucket,
            "TABLE": first.registry.state_lock_table or "",
            "ENDPOINT": endpoint,
            "CONSUL": first.consul.http_addr,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        shells: list[ShellCycle] = []
        shell_rounds: list[int] = []
        for round_number in range(args.rounds + 1):  # round 0 warms every side up and is not counted
            idle_from, idle_cpu = time.monotonic(), [side.cpu()["server"] for side in sides]
            aws_from = aws.now()
            baseline = shell_cycle(home, repo, shell_env, round_number)
            baseline.aws = AwsRequests.spent(aws_from, aws.now())
            if round_number:  # counted rounds only, as the cycles are
                for side, before in zip(sides, idle_cpu, strict=True):  # what each server spends doing nothing
                    side.idle.append((side.cpu()["server"] - before) / (time.monotonic() - idle_from))
            if not shell_rounds:  # once there is an instance; each round replaces it, the last one is destroyed
                stack.callback(lambda: shell_teardown(home, shell_env, shell_rounds[-1]))
            shell_rounds.append(round_number)
            line = f"round {round_number}{' (warm-up)' if not round_number else ''}: shell {baseline.wall:5.1f}s"
            # With --baseline, each pair of sides takes turns at going first.
            turns = sides if not args.baseline or round_number % 2 == 0 else _swap_pairs(sides)
            for side in turns:
                aws_from = aws.now()
                with side.api():
                    one = our_cycle(repo, side.registry, side.slack, round_number, poll=args.poll, cpu=side.cpu)
                one.aws = AwsRequests.spent(aws_from, aws.now())
                if round_number:
                    side.cycles.append(one)
                line += (
                    f" | {side.label} {one.wall:5.1f}s (tools {one.tool:4.1f}s [at the end {one.tool_at_end:4.1f}s],"
                    f" gate {one.gate:3.1f}s, overhead {one.overhead:4.1f}s)"
                )
            if round_number:
                shells.append(baseline)
            print(line, flush=True)
        differences = {}
        for side in sides:
            with side.api():
                differences[side.label] = recheck(side.cycles)
        load_after = machine_load()
        report(shells, sides, differences, load_before, load_after)
        if args.timeline:
            for side in sides:
                with side.api():
                    timeline(side.label, side.cycles[-1])
    return 0


def timeline(label: str, cycle: Cycle) -> None:
    """Every task run and flow state of one cycle, in seconds from the build run's creation."""
    first: Any = read_flow_run(cycle.build_id)
    start = first.created.timestamp()
    rows = []
    for run_id, flow_name in ((cycle.build_id, "build"), (cycle.deploy_id, "deploy")):
        for state in _states(run_id):
            rows.append((state.timestamp.timestamp() - start, f"{flow_name} flow -> {state.name}", None))
        for task in recorded_task_runs(run_id):
            if task.start_time is not None:
                took = (task.end_time or task.start_time).timestamp() - task.start_time.timestamp()
                rows.append(
                    (task.start_time.timestamp() - start, f"{flow_name}: {task.name} ({task.state.name})", took)
                )
        for log in run_logs(run_id):
            if _TOOL_LINE.search(log.message):
                rows.append((log.timestamp.timestamp() - start, f"{flow_name}:   {log.message}", None))
    print(f"\ntimeline of the last cycle on {label} (s from the build run's creation):")
    for at, what, took in sorted(rows, key=lambda row: row[0]):
        print(f"  {at:6.2f}  {what}" + (f"  [{took:.2f}s]" if took is not None else ""))


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(
    shells: list[ShellCycle],
    sides: list[Side],
    differences: dict[str, list[float]],
    load_before: str,
    load_after: str,
) -> None:
    med = statistics.median

    def row(name: str, shell: str, values: list[str]) -> None:
        print(f"{name:44s} {shell:>16s}" + "".join(f" {value:>22s}" for value in values))

    def p50_p95(values: list[float], unit: str = "s") -> str:
        return f"{med(values):.2f}{unit} / {_p(values, 0.95):.2f}{unit}"

    print()
    print(
        f"cycles: {len(shells)} per column, interleaved (shell, then {', '.join(s.label for s in sides)}, each round)"
    )
    row("", "shell", [side.label for side in sides])
    row(
        "wall (- suspended)      p50 / p95",
        p50_p95([s.wall for s in shells]),
        [p50_p95([c.wall for c in side.cycles]) for side in sides],
    )
    row(
        "tool time               p50 / p95",
        p50_p95([s.tool for s in shells]),
        [p50_p95([c.tool for c in side.cycles]) for side in sides],
    )
    row(
        "  tool ours / shell (per round) p50",
        "",
        [f"x{med(c.tool / s.tool for c, s in zip(side.cycles, shells, strict=True)):.2f}" for side in sides],
    )
    row("health gate             p50", "", [f"{med(c.gate for c in side.cycles):.2f}s" for side in sides])
    row(
        "OVERHEAD (wall - tool - gate) p50 / p95",
        "",
        [p50_p95([c.overhead for c in side.cycles]) for side in sides],
    )
    row(
        "ratio (wall - suspended)/shell p50",
        "",
        [f"x{med(c.wall / s.wall for c, s in zip(side.cycles, shells, strict=True)):.2f}" for side in sides],
    )
    row(
        "trigger -> notice in Slack - tool, p50/p95",
        "",
        [p50_p95([c.to_slack - c.tool_before_slack for c in side.cycles]) for side in sides],
    )
    for name in sides[0].cycles[0].trigger:
        row(
            f"  {name}  p50",
            "",
            [f"{med(c.trigger[name] for c in side.cycles if name in c.trigger):.2f}s" for side in sides],
        )
    row(
        "CPU seconds per cycle, p50: all",
        f"{med(sum(s.cpu.values()) for s in shells):.2f}s",
        [f"{med(sum(c.cpu.values()) for c in side.cycles):.2f}s" for side in sides],
    )
    for key in ("script and its tools", *sides[0].cycles[0].cpu):
        row(
            f"  {key}",
            f"{med(s.cpu[key] for s in shells):.2f}s" if key in shells[0].cpu else "",
            [f"{med(c.cpu[key] for c in side.cycles):.2f}s" if key in side.cycles[0].cpu else "" for side in sides],
        )
    row(
        "  server, idle: CPU-s/s (x the cycle's window)",
        "",
        [
            f"{med(side.idle):.3f} (x{med(c.cpu_window for c in side.cycles):.1f}s = "
            f"{med(side.idle) * med(c.cpu_window for c in side.cycles):.2f}s)"
            for side in sides
        ],
    )
    row(
        "AWS requests per cycle, p50: all",
        f"{med(sum(s.aws.values()) for s in shells):.0f}",
        [f"{med(sum(c.aws.values()) for c in side.cycles):.0f}" for side in sides],
    )
    for store in AWS_STORES:
        row(
            f"  {store}",
            f"{med(s.aws[store] for s in shells):.0f}",
            [f"{med(c.aws[store] for c in side.cycles):.0f}" for side in sides],
        )
    row(
        "tool time read as the run ends: missed p50/max",
        "",
        [
            f"{med(c.tool - c.tool_at_end for c in side.cycles):.2f}s / "
            f"{max(c.tool - c.tool_at_end for c in side.cycles):.2f}s"
            for side in sides
        ],
    )
    row(
        "cross-check: tool lines re-read = reported",
        "",
        [
            f"{sum(abs(d) < 0.0005 for d in differences[side.label])} of {len(differences[side.label])}"
            + (f" (max {max(abs(d) for d in differences[side.label]):.3f}s)" if differences[side.label] else "")
            for side in sides
        ],
    )

    print("\ntool calls per cycle: count, seconds (p50)")
    commands = sorted(
        {name for side in sides for c in side.cycles for name in c.tools} | {n for s in shells for n in s.tools}
    )
    for name in commands:
        row(
            f"  {name}",
            f"{med(s.tools.get(name, 0.0) for s in shells):.2f}s" if any(name in s.tools for s in shells) else "-",
            [
                f"{med(len(c.tools.get(name, [])) for c in side.cycles):.0f} x, "
                f"{med(sum(c.tools.get(name, [])) for c in side.cycles):.2f}s"
                for side in sides
            ],
        )

    print("\nphases (consecutive, they add up to the wall): p50 duration / tool in it / overhead in it")
    for name in PHASES:
        row(
            f"  {name}",
            "",
            [
                f"{med(c.phases[name] for c in side.cycles):.2f} /{med(c.phase_tool[name] for c in side.cycles):5.2f} /"
                f"{med(c.phase_overhead(name) for c in side.cycles):5.2f}"
                for side in sides
            ],
        )
    for side in sides:
        ranked = sorted(PHASES, key=lambda name: -med(c.phase_overhead(name) for c in side.cycles))
        print(
            f"  {side.label}: overhead by phase, largest first: "
            + "; ".join(f"{name} {med(c.phase_overhead(name) for c in side.cycles):.2f}s" for name in ranked)
        )

    print("\ntask runs, p50 seconds less the tool time inside them (the largest 12 per database)")
    for side in sides:
        names = {name for c in side.cycles for name in c.tasks}

        def own(name: str, side: Side = side) -> float:
            return med(c.tasks.get(name, 0.0) - c.task_tool.get(name, 0.0) for c in side.cycles)

        print(f"  {side.label}:")
        for name in sorted(names, key=lambda n: -own(n))[:12]:
            print(f"    {name:46s} {own(name):5.2f}s  (task {med(c.tasks.get(name, 0.0) for c in side.cycles):5.2f}s)")

    print("\nlock steps (task run start -> end): p50 / max")
    for name in LOCK_TASKS:
        row(
            f"  {name}",
            "",
            [
                f"{med(c.tasks.get(name, 0.0) for c in side.cycles):.2f}s / {max(c.tasks.get(name, 0.0) for c in side.cycles):.2f}s"
                for side in sides
            ],
        )

    print(f"\nmachine before: {load_before}")
    print(f"machine after:  {load_after}")
    for side in sides:
        for process, found in side.log_findings().items():
            print(
                f"{side.label} {process} log: {found['locked']} 'database is locked', {found['errors']} ERROR, "
                f"{found['warnings']} WARNING lines"
            )
            for line in found["first errors and warnings"]:
                print(f"    {line[:200]}")


if __name__ == "__main__":
    raise SystemExit(main())
