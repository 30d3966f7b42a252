"""The loop under a stream of events: a registration storm, and a channel flapping while operators answer.

    .venv/bin/python bench/storm.py --storm-only [--registrations 200 --seconds 60] [--postgres] [--skip-baseline]
    .venv/bin/python bench/storm.py --flap-only [--flap-rounds 3] [--postgres]

Each experiment gets a fresh environment (a storm's backlog would be in the way of the next one).

Everything runs for real, as in ``bench/cycle.py``: moto, the Consul and Slack stand-ins, a Prefect server, one
``icd-worker --limit 4`` (as ``examples/local_env.py`` starts it), the deployments and triggers of prefect.yaml.
The namespace is followed by two workspaces; v1 is a real Packer build, the storm's versions are registered
copies of its image (one commit each), each announced as build-artifact announces a registration.

**Storm.** ``--registrations`` in ``--seconds``, evenly spaced; halfway through, an unrelated build is
started. Printed: deploy runs by state every few seconds, the worker's memory (PSS of its whole process tree)
and busy slots, then the figures against the goals of issue 19: within 30 s of the last registration each
workspace has exactly one run waiting for approval, for the newest version, and nothing else left running or
queued; the unrelated build starts within 5 s; a rejection is processed within 2 s. The baseline, run in the
same process on fresh workspaces, is the same storm with one deploy run asked for per request, as the event
trigger did before the queue (``--skip-baseline`` leaves it out: it takes minutes to drain).

**Flapping channel.** A workspace follows ``@production``; production moves v1 -> v2 -> v1 -> v2 within a
second, in three answer orders: the first waiting plan approved in the middle of the flap; every plan
approved the moment it waits; only the last one approved. Goal: the workspace always ends on v2, and every
other run ends ``Superseded`` or stale, never ``Deployed``.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
from prefect.deployments import run_deployment
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from examples.local_env import (
    LocalServices,
    ManagedProcess,
    create_postgres_database,
    drop_postgres_database,
    make_app_repo,
    provision,
    start_moto,
    start_prefect_server,
    start_worker,
    stop_instances,
    wait_for_run,
    worker_env,
    write_config,
)
from icd import events, operations
from icd.config import load_config
from icd.deploy.dispatch import dispatch_next, request_from_event, submit
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
NOT_APPLIED = {"Superseded", "StalePlan", "LockLost", "Queued", "AlreadyInProgress", "NothingQueued", "Rejected"}


# --- the environment ------------------------------------------------------------------------------------------


@dataclass
class Env:
    registry: Any
    worker: ManagedProcess
    home: Path
    config: Path
    namespaces: dict[str, Any] = field(default_factory=dict)
    workspaces: dict[str, Any] = field(default_factory=dict)

    def add(self, namespace: str, repo: Path, workspaces: dict[str, str]) -> None:
        self.namespaces[namespace] = {"repository": str(repo), "service_name": namespace.split("/")[1]}
        for name, follows in workspaces.items():
            self.workspaces[name] = {
                "follows": follows,
                "stack": "examples/stacks/local",
                "health_deadline_seconds": 30,
            }
        write_config(self.config, namespaces=self.namespaces, workspaces=self.workspaces)


@contextmanager
def environment(postgres: bool) -> Iterator[tuple[Env, Path]]:
    home = Path(tempfile.mkdtemp(prefix="icd-bench-storm-"))
    moto, moto_url = start_moto()
    consul = ConsulStandIn().start()
    slack = SlackStandIn(token="xoxb-bench").start()
    database_url = create_postgres_database("icd_storm") if postgres else None
    server = start_prefect_server(home / "prefect", database_url=database_url)
    worker = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            repo = make_app_repo(home / "repo")
            config = write_config(home / "icd.toml", namespaces={}, workspaces={})
            os.environ["ICD_CONFIG"] = str(config)
            services = LocalServices(
                moto_url,
                "icd-storm",
                "bench",
                "bench",
                slack.api_url,
                "xoxb-bench",
                consul.http_addr,
            )
            registry = provision(server, services, alerts_url=slack.webhook_url("alerts"))
            with get_client(sync_client=True) as client:
                client.pause_deployment(client.read_deployment_by_name("consul-health/consul-health").id)
            worker = start_worker(server, "local-pool", env=worker_env(home / "icd", config), limit=4)
            yield Env(registry, worker, home, config), repo
    finally:
        if worker is not None:
            worker.stop()
        stop_instances(home / "icd")
        server.stop()
        if database_url:
            drop_postgres_database(database_url)
        slack.stop()
        consul.stop()
        moto.stop()
        shutil.rmtree(home, ignore_errors=True)


def deploy_runs(workspace: str | None = None) -> list[Any]:
    found: list[Any] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["deploy-artifact"])),
                flow_run_filter=FlowRunFilter(),
                limit=200,
                offset=len(found),
            )
            found.extend(page)
            if len(page) < 200:
                break
    return [r for r in found if workspace is None or r.parameters.get("workspace") == workspace]


def state_of(run: Any) -> str:
    return run.state.type.value if run.state else "NONE"


def tree_pss_mib(pid: int) -> float:
    """The proportional memory of a process and all its descendants (shared pages counted once overall)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current and child not in tree]
        tree.update(children)
        frontier.extend(children)
    total_kib = 0
    for member in tree:
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def build_v1(env: Env, namespace: str) -> Any:
    run = run_deployment("build-artifact/build-artifact", parameters={"namespace": namespace, "plan": False}, timeout=0)
    done = wait_for_run(run.id, ENDED, interval=0.2)
    if done.state.type.value != "COMPLETED":
        raise RuntimeError(f"the build of {namespace} ended {done.state}")
    return env.registry.registry().get(namespace, env.registry.registry().last_version(namespace))


def register_copy(env: Env, namespace: str, base: Any) -> int:
    registry = env.registry.registry()
    label = registry.next_build_label(namespace)
    result = registry.register(
        namespace,
        git_commit=uuid.uuid4().hex + uuid.uuid4().hex[:8],
        git_ref="main",
        packer_run_uuid=str(uuid.uuid4()),
        builder_type=base.builder_type,
        artifacts=dict(base.artifacts),
        artifact_sha256=dict(base.artifact_sha256),
        created_by="bench",
        labels={"build_label": label, "service_name": base.labels.get("service_name", "")},
    )
    return int(result.version.version)


def announce(env: Env, namespace: str, version: int, *, coalesce: bool) -> None:
    """build-artifact's announcement; without ``coalesce``, one run per request (the trigger before the queue)."""
    cause = events.artifact_registered(
        namespace=namespace, version=version, commit="0" * 40, ref="main", build_run_id=None
    )
    events.emit(cause)
    queue = env.registry.workspace_queue()
    for spec in events.plan_requests(load_config(), cause):
        if coalesce:
            submit(queue, spec)
        else:
            events.emit(spec)
            queue.request(request_from_event(spec))
            dispatch_next(request_from_event(spec))


# --- the storm ---------------------------------------------------------------------------------------------------


@dataclass
class StormResult:
    label: str
    runs: dict[str, int]
    settled_after: dict[str, float | None]
    unrelated_start: float | None
    rejection: float | None
    peak_pss: float
    base_pss: float
    peak_busy: int
    endings: Counter[str]


def storm(
    env: Env, repo: Path, *, tag: str, registrations: int, seconds: float, coalesce: bool, settle_limit: float
) -> StormResult:
    namespace, bystander = f"storm/{tag}", f"other/{tag}"
    workspaces = [f"{tag}-a", f"{tag}-b"]
    env.add(namespace, repo, {ws: f"{namespace}@latest" for ws in workspaces})
    env.add(bystander, repo, {})
    base = build_v1(env, namespace)
    label = "ours (latest wins)" if coalesce else "baseline (a run per request)"
    print(f"\n== storm: {label}: {registrations} registrations in {seconds:.0f} s, 2 workspaces ==", flush=True)
    stop = threading.Event()
    samples: list[tuple[float, Counter[str], float, int]] = []
    started = time.monotonic()
    base_pss = tree_pss_mib(env.worker.proc.pid)

    def sample() -> None:
        while not stop.is_set():
            runs = [r for r in deploy_runs() if r.parameters.get("workspace") in workspaces]  # one read: light
            states = Counter(state_of(r) for r in runs)
            busy = states["RUNNING"] + states["PENDING"]
            samples.append((time.monotonic() - started, states, tree_pss_mib(env.worker.proc.pid), busy))
            stop.wait(2.0)

    # Threads don't inherit the context that points Prefect's client at the server: give them this one.
    sampler = threading.Thread(target=contextvars.copy_context().run, args=(sample,), daemon=True)
    sampler.start()
    unrelated: Any = None
    newest = 0
    for n in range(registrations):
        due = started + n * seconds / registrations
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        newest = register_copy(env, namespace, base)
        announce(env, namespace, newest, coalesce=coalesce)
        if n == registrations // 2:
            unrelated = run_deployment(
                "build-artifact/build-artifact", parameters={"namespace": bystander, "plan": False}, timeout=0
            )
    last_at = time.monotonic()
    settled: dict[str, float | None] = {}
    for ws in workspaces:
        settled[ws] = None
        while time.monotonic() - last_at < settle_limit:
            runs = deploy_runs(ws)
            waiting = [r for r in runs if state_of(r) == "PAUSED"]
            busy = [r for r in runs if state_of(r) not in {"PAUSED", *ENDED}]
            holder = env.registry.workspace_queue().holder(ws)
            if (
                len(waiting) == 1
                and not busy
                and holder is not None
                and holder.request.version == newest
                and holder.phase == "awaiting"
            ):
                settled[ws] = time.monotonic() - last_at
                break
            time.sleep(0.5)
    stop.set()
    sampler.join()
    unrelated_start = None
    if unrelated is not None:
        ran = wait_for_run(unrelated.id, ENDED, timeout=600, interval=0.5)
        if ran.start_time is not None and ran.created is not None:
            unrelated_start = ran.start_time.timestamp() - ran.created.timestamp()
    rejection = None
    paused = [r for r in deploy_runs(workspaces[0]) if state_of(r) == "PAUSED"]
    if paused:
        asked = time.time()
        # No plan hash: the form's own is the default (a wrong one, even "", is refused: the form fixes it).
        resume_flow_run(paused[0].id, run_input={"decision": "reject", "approver": "bench", "comment": ""})
        try:
            rejected = wait_for_run(paused[0].id, ENDED, timeout=120, interval=0.05)
            rejection = rejected.end_time.timestamp() - asked if rejected.end_time else None
        except TimeoutError:
            rejection = None  # behind the backlog: reported as not within the limit
    counts = {ws: len(deploy_runs(ws)) for ws in workspaces}
    with get_client(sync_client=True) as client:  # leave nothing queued for the next experiment
        for run in deploy_runs():
            if state_of(run) in {"SCHEDULED", "PENDING"} and run.parameters.get("workspace") in workspaces:
                client.delete_flow_run(run.id)
    for run in deploy_runs():
        if state_of(run) == "PAUSED":
            resume_flow_run(run.id, run_input={"decision": "reject", "approver": "bench", "comment": ""})
    print(
        "  t(s)  "
        + "  ".join(
            f"{s:>9}" for s in ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "COMPLETED", "CANCELLED", "FAILED")
        )
        + "   PSS MiB  busy"
    )
    for at, states, pss, busy in samples[:: max(1, len(samples) // 30)]:
        row = "  ".join(
            f"{states[s]:>9}" for s in ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "COMPLETED", "CANCELLED", "FAILED")
        )
        print(f"  {at:5.0f}  {row}   {pss:7.0f}  {busy:4d}")
    endings = Counter(r.state.name for ws in workspaces for r in deploy_runs(ws) if r.state and state_of(r) in ENDED)
    return StormResult(
        label,
        counts,
        settled,
        unrelated_start,
        rejection,
        max((s[2] for s in samples), default=0.0),
        base_pss,
        max((s[3] for s in samples), default=0),
        endings,
    )


def report_storm(results: list[StormResult], registrations: int) -> None:
    print(f"\nstorm of {registrations} registrations, 2 workspaces ({2 * registrations} requests):")
    print(f"  {'':34}" + "".join(f"{r.label:>32}" for r in results) + "   goal")

    def row(name: str, values: list[str], goal: str) -> None:
        print(f"  {name:34}" + "".join(f"{v:>32}" for v in values) + f"   {goal}")

    def secs(value: float | None) -> str:
        return "not within the limit" if value is None else f"{value:.1f} s"

    row("deploy runs created", [str(sum(r.runs.values())) for r in results], "few")
    row(
        "settled: one plan of the newest",
        [" / ".join(secs(v) for v in r.settled_after.values()) for r in results],
        "<= 30 s",
    )
    row("unrelated build: created -> running", [secs(r.unrelated_start) for r in results], "<= 5 s")
    row("rejection: answer -> ended", [secs(r.rejection) for r in results], "<= 2 s")
    row("worker slots busy, peak", [str(r.peak_busy) for r in results], "flat")
    row("worker tree PSS: before -> peak", [f"{r.base_pss:.0f} -> {r.peak_pss:.0f} MiB" for r in results], "flat")
    for r in results:
        print(f"  endings, {r.label}: {dict(r.endings.most_common())}")


# --- the flapping channel ---------------------------------------------------------------------------------------


def flap(env: Env, repo: Path, *, tag: str, order: str) -> tuple[int, int, Counter[str], float]:
    """v1 -> v2 -> v1 -> v2 on production within a second; returns (the version running, the channel's last,
    the endings of the other runs, seconds until the workspace settled)."""
    namespace, workspace = f"flap/{tag}", f"{tag}-prod"
    env.add(namespace, repo, {workspace: f"{namespace}@production"})
    base = build_v1(env, namespace)
    v2 = register_copy(env, namespace, base)
    registry, queue, config = env.registry.registry(), env.registry.workspace_queue(), load_config()

    def promote(version: int) -> None:
        operations.promote(registry, queue, config, namespace, version, "production", by="bench", why="flap")

    def answer(run: Any) -> None:
        sha = env.registry.plan_store().sha256_of(workspace, str(run.id))
        resume_flow_run(
            run.id, run_input={"decision": "approve", "approver": "bench", "comment": "", "plan_sha256": sha}
        )

    answered: set[Any] = set()

    def approve_waiting() -> None:
        for run in deploy_runs(workspace):
            if state_of(run) == "PAUSED" and run.id not in answered:
                answered.add(run.id)
                try:
                    answer(run)
                except Exception as exc:  # noqa: BLE001  # superseded between the read and the answer: as an operator sees it
                    print(f"    answer refused: {exc}")

    promote(1)
    first = wait_for(lambda: [r for r in deploy_runs(workspace) if state_of(r) == "PAUSED"], 180)[0]
    started = time.monotonic()
    promote(v2)
    if order == "approve-first-mid-flap":
        answered.add(first.id)
        threading.Thread(target=contextvars.copy_context().run, args=(answer, first)).start()
    promote(1)
    promote(v2)

    def settled() -> bool:
        if order == "approve-every-plan-at-once":
            approve_waiting()
        runs = deploy_runs(workspace)
        if any(state_of(r) not in {"PAUSED", *ENDED} for r in runs):
            return False
        waiting = [r for r in runs if state_of(r) == "PAUSED"]
        deployed = [r for r in runs if r.state and r.state.name == "Deployed"]
        return bool(waiting) if order != "approve-every-plan-at-once" else bool(deployed) and not waiting

    wait_for(settled, 240)
    took = time.monotonic() - started
    if order != "approve-every-plan-at-once":
        [last] = [r for r in deploy_runs(workspace) if state_of(r) == "PAUSED"]
        answer(last)
        wait_for_run(last.id, ENDED, timeout=240, interval=0.2)
    wait_for(lambda: all(state_of(r) in ENDED for r in deploy_runs(workspace)), 240)
    runs = sorted(deploy_runs(workspace), key=lambda r: r.created)
    deployed = [r for r in runs if r.state and r.state.name == "Deployed"]
    endings = Counter(r.state.name for r in runs if r.state and r.id != (deployed[-1].id if deployed else None))
    channel = registry.get_channel(namespace, "production")
    return _version_in_state(env, workspace) or 0, channel.version if channel else 0, endings, took


def _version_in_state(env: Env, workspace: str) -> int | None:
    """The artifact version the workspace's Terraform state says it runs (its output)."""
    import json

    state, _ = env.registry.workspace_state(workspace)
    if not state:
        return None
    outputs = json.loads(state).get("outputs", {})
    value = outputs.get("artifact_version", {}).get("value")
    return int(value) if value else None


def wait_for(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.25)
    raise RuntimeError(f"not within {timeout:.0f} s")


def flapping(env: Env, repo: Path, rounds: int) -> None:
    print(
        "\nflapping channel: production v1 -> v2 -> v1 -> v2 within a second; goal: ends on v2, nothing else Deployed"
    )
    print(f"  {'answer order':30} {'runs':>4} {'ends on':>8} {'channel':>8} {'settled':>8}   other runs")
    wrong = 0
    for round_number in range(rounds):
        for order in ("approve-first-mid-flap", "approve-every-plan-at-once", "approve-only-the-last"):
            tag = f"f{round_number}{order[8:11]}"
            running, channel, endings, took = flap(env, repo, tag=tag, order=order)
            ok = running == channel and set(endings) <= NOT_APPLIED
            wrong += not ok
            print(
                f"  {order:30} {sum(endings.values()) + 1:>4} {'v' + str(running):>8} {'v' + str(channel):>8} {took:7.1f}s   {dict(endings)}{'' if ok else '   WRONG'}"
            )
    print(f"  wrong endings: {wrong} (goal 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registrations", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle-limit", type=float, default=120.0, help="how long to wait for a storm to settle")
    parser.add_argument("--postgres", action="store_true", help="the Prefect server on the local PostgreSQL")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--flap-only", action="store_true")
    parser.add_argument("--storm-only", action="store_true")
    parser.add_argument("--flap-rounds", type=int, default=1, help="repetitions of each answer order")
    args = parser.parse_args(argv)
    if not args.flap_only:
        with environment(args.postgres) as (env, repo):
            results = []
            for tag, coalesce in (("ours", True), ("base", False))[: 1 if args.skip_baseline else 2]:
                result = storm(
                    env,
                    repo,
                    tag=tag,
                    registrations=args.registrations,
                    seconds=args.seconds,
                    coalesce=coalesce,
                    settle_limit=args.settle_limit,
                )
                report_storm([result], args.registrations)  # as soon as it is known
                results.append(result)
            if len(results) > 1:
                report_storm(results, args.registrations)
    if args.flap_rounds and not args.storm_only:
        with environment(args.postgres) as (env, repo):  # a fresh one: no storm backlog in the way
            flapping(env, repo, args.flap_rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
