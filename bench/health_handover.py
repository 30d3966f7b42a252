"""Check flip -> Slack message through the *deployed* consul-health flow, hand-overs between runs included.

    .venv/bin/python bench/health_handover.py [--transitions 80] [--interval 20] [--window 30] [--max-overtime 600]
                                              [--pool-outage 0]

A Prefect server, a process worker and the deployments of prefect.yaml run here for real; the Consul stand-in
runs in its own process. The consul-health deployment keeps its mechanism (a schedule, runs whose windows
overlap, the CAS-written state) but its interval and window are shortened (every ``--interval`` s, watching
``--window`` s) so that a few minutes see several hand-overs from one run to the next. The deployment is
paused first (``pause_deployment`` deletes the runs already scheduled with the deployed 660 s window, which
would otherwise watch through the whole bench and hide every hand-over), re-parameterised, then resumed.
Damping is off (``recovery_hold_seconds=0``, ``flap_changes=0``): every transition, recoveries included,
has a message to time. ``--max-overtime 0`` turns off the hand-over (a run stops at its window's end whether
or not the next one is watching yet), which is how the flow behaved before. ``--pool-outage N`` makes the
next runs late on purpose, as a busy or restarting worker does: a third of the way in, the work pool is
paused for N seconds (the run that is watching keeps running; no new run starts until the pool is resumed).

TTL checks of 30 services turn critical and back at random moments (0.5-4 s apart); each transition is
timed from just before the Consul call to the moment the Slack stand-in stored *its* message (matched by the
alert's dedup key). Afterwards each transition is placed against the watch spans of the runs (the
``watch-health`` task runs): how many runs were watching when it happened. Goal: p95 <= 1 s, none lost.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import consul
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolUpdate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.schedules import IntervalSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings

from bench.health_latency import consul_standin_process, percentile
from examples.local_env import (
    LocalServices,
    provision,
    start_moto,
    start_prefect_server,
    start_worker,
    worker_env,
    write_config,
)
from standins.slack import ReceivedMessage, SlackStandIn

SERVICES = 30
TOKEN = "xoxb-bench"


@dataclass(frozen=True)
class Transition:
    service: str
    to: str
    started: float  # time.time() just before the Consul call
    latency: float | None  # None: no message within the timeout (lost)


@dataclass(frozen=True)
class Span:
    """When one run's watch-health task ran (end None: still running when the bench ended)."""

    run: str
    start: float
    end: float | None

    def covers(self, moment: float) -> bool:
        return self.start <= moment and (self.end is None or moment <= self.end)


def wait_for_alert(slack: SlackStandIn, first: int, needle: str, timeout: float) -> ReceivedMessage | None:
    """The first message from position ``first`` on whose dedup key contains ``needle``."""
    deadline = time.monotonic() + timeout
    seen = first
    while True:
        messages = slack.messages
        for message in messages[seen:]:
            if message.dedup_key is not None and needle in message.dedup_key:
                return message
        seen = len(messages)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        slack.wait_for_messages(seen + 1, timeout=remaining)


def flip(agent: consul.Consul, slack: SlackStandIn, service: str, to: str, timeout: float) -> Transition:
    first = len(slack.messages)
    previous = "critical" if to == "passing" else "passing"
    needle = f"/{service}-1:{previous}->{to}@"  # the dedup key of this instance's status alert
    started = time.time()
    if to == "critical":
        agent.agent.check.ttl_fail(f"c-{service}", "bench: failing")
    else:
        agent.agent.check.ttl_pass(f"c-{service}", "bench: ok")
    message = wait_for_alert(slack, first, needle, timeout)
    return Transition(service, to, started, None if message is None else message.received_at - started)


def prepare_deployment(interval: int, parameters: dict[str, Any]) -> Any:
    """Pause (deleting the runs scheduled with the deployed parameters), shorten, resume; the deployment."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("consul-health/consul-health")
        client.pause_deployment(deployment.id)
        client.update_deployment(deployment.id, DeploymentUpdate(parameters=parameters))
        [schedule] = client.read_deployment_schedules(deployment.id)
        client.update_deployment_schedule(deployment.id, schedule.id, schedule=IntervalSchedule(interval=interval))
        for run in client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])), limit=200
        ):
            if run.state is not None and run.state.type == StateType.SCHEDULED:
                client.delete_flow_run(run.id)
        client.resume_deployment(deployment.id)
        return deployment


def watch_spans(deployment_id: Any) -> tuple[list[Span], list[Any]]:
    """The watch-health task runs of the deployment (start/end), and its flow runs."""
    with get_client(sync_client=True) as client:
        by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        runs = client.read_flow_runs(deployment_filter=by_deployment, limit=200)
        names = {run.id: run.name for run in runs}
        spans = [
            Span(
                names.get(task_run.flow_run_id, "?"),
                task_run.start_time.timestamp(),
                task_run.end_time.timestamp() if task_run.end_time is not None else None,
            )
            for task_run in client.read_task_runs(deployment_filter=by_deployment, limit=200)
            if task_run.name.startswith("watch-health") and task_run.start_time is not None
        ]
    return sorted(spans, key=lambda span: span.start), runs


def line(label: str, values: Sequence[float]) -> str:
    if not values:
        return f"{label:<34} n=0"
    ms = [v * 1000 for v in values]
    return (
        f"{label:<34} n={len(ms):<4} p50={percentile(ms, 50):7.0f} ms  p95={percentile(ms, 95):7.0f} ms  "
        f"max={max(ms):7.0f} ms  mean={statistics.fmean(ms):7.0f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transitions", type=int, default=80, help="timed transitions (critical, then back)")
    parser.add_argument("--interval", type=int, default=20, help="seconds between scheduled runs")
    parser.add_argument("--window", type=int, default=30, help="seconds each run watches")
    parser.add_argument(
        "--max-overtime", type=int, default=600, help="seconds a run may watch past its window (0: no hand-over)"
    )
    parser.add_argument(
        "--pool-outage", type=float, default=0, help="pause the work pool this long, a third of the way in"
    )
    parser.add_argument("--timeout", type=float, default=90, help="a transition with no message by then is lost")
    args = parser.parse_args(argv)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    home = Path(tempfile.mkdtemp(prefix="icd-bench-handover-"))
    moto, moto_url = start_moto()
    slack = SlackStandIn(token=TOKEN).start()
    server = start_prefect_server(home / "prefect")
    processes = []
    try:
        with consul_standin_process() as consul_addr, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            config = write_config(home / "icd.toml", namespaces={}, workspaces={})
            os.environ["ICD_CONFIG"] = str(config)
            services = LocalServices(moto_url, "icd-bench", "b", "b", slack.api_url, TOKEN, consul_addr)
            provision(server, services, alerts_url=slack.webhook_url("alerts"))
            host, port = consul_addr.removeprefix("http://").rsplit(":", 1)
            agent = consul.Consul(host=host, port=int(port))
            for n in range(SERVICES):
                agent.agent.service.register(
                    f"svc{n}",
                    service_id=f"svc{n}-1",
                    check={"CheckID": f"c-svc{n}", "TTL": "3600s", "Status": "passing"},
                )
            parameters = {
                "window_seconds": args.window,
                "max_overtime_seconds": args.max_overtime,
                # Damping off: each transition, recoveries included, has a message to time (flap.py measures it).
                "recovery_hold_seconds": 0,
                "flap_changes": 0,
            }
            deployment = prepare_deployment(args.interval, parameters)
            processes.append(start_worker(server, "local-pool", env=worker_env(home / "icd", config)))
            deadline = time.monotonic() + 180
            while agent.kv.get("icd/health-watch/default/state")[1] is None:  # the first run's baseline
                if time.monotonic() > deadline:
                    raise SystemExit("no consul-health run persisted a baseline within 180 s")
                time.sleep(0.2)
            print(f"first run watching; {args.transitions} transitions follow", flush=True)
            bench_started = time.time()
            transitions: list[Transition] = []
            outage: list[float] = []
            while len(transitions) < args.transitions:
                if args.pool_outage and not outage and len(transitions) >= args.transitions // 3:
                    pool_outage(server.api_url, args.pool_outage, outage)
                service = f"svc{random.randrange(SERVICES)}"  # noqa: S311
                for to in ("critical", "passing"):
                    time.sleep(random.uniform(0.5, 4.0))  # noqa: S311  # transitions land anywhere, hand-overs too
                    transitions.append(flip(agent, slack, service, to, args.timeout))
            bench_ended = time.time()
            spans, runs = watch_spans(deployment.id)
            print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
            report(args, transitions, spans, runs, bench_started, bench_ended, outage)
    finally:
        for process in processes:
            process.stop()
        server.stop()
        slack.stop()
        moto.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def report(
    args: argparse.Namespace,
    transitions: Sequence[Transition],
    spans: Sequence[Span],
    runs: Sequence[Any],
    bench_started: float,
    bench_ended: float,
    outage: Sequence[float],
) -> None:
    started = [run for run in runs if run.start_time is not None]
    windows = sorted({float(run.parameters.get("window_seconds", -1)) for run in started})
    overtime = sorted({float(run.parameters.get("max_overtime_seconds", -1)) for run in started})
    during = [s for s in spans if s.start <= bench_ended and (s.end is None or s.end >= bench_started)]
    handovers = [(a, b) for a, b in itertools.pairwise(during) if a.end is not None]
    overlaps = [a.end - b.start for a, b in handovers if a.end is not None]
    print(
        f"consul-health runs that watched during the bench: {len(during)} (every {args.interval} s, watching "
        f"{args.window} s, overtime up to {args.max_overtime} s; parameters of every run started: window_seconds "
        f"{windows}, max_overtime_seconds {overtime}); hand-overs: {len(handovers)}"
    )
    if overlaps:
        print(
            f"overlap at each hand-over (old run's end - new run's start): min {min(overlaps):.1f} s, "
            f"median {statistics.median(overlaps):.1f} s, max {max(overlaps):.1f} s; "
            f"gaps (no run watching): {sum(1 for o in overlaps if o < 0)}"
        )
    timed = [t for t in transitions if t.latency is not None]
    lost = [t for t in transitions if t.latency is None]
    latencies = [t.latency for t in timed if t.latency is not None]
    print(line(f"all transitions ({len(lost)} lost)", latencies))
    for watching, label in (
        (2, "while 2 runs watched (hand-over)"),
        (1, "while 1 run watched"),
        (0, "while none watched (gap)"),
    ):
        subset = [t.latency for t in timed if t.latency is not None and _watching(spans, t.started, watching)]
        print(line(label, subset))
    near = [t.latency for t in timed if t.latency is not None and _near_handover(handovers, t.started, 5.0)]
    print(line("within 5 s of a hand-over", near))
    if len(outage) == 2:
        during_outage = [t.latency for t in timed if t.latency is not None and outage[0] <= t.started <= outage[1]]
        print(line(f"during the {outage[1] - outage[0]:.0f} s pool outage", during_outage))
    for t in lost:
        print(f"  lost: {t.service} -> {t.to} at +{t.started - bench_started:.1f} s")
    p95 = percentile(latencies, 95) if latencies else float("inf")
    verdict = "met" if p95 <= 1.0 and not lost else "MISSED"
    print(
        f"goal p95 <= 1 s through the deployed flow, none lost: {verdict} (p95 {p95 * 1000:.0f} ms, {len(lost)} lost)"
    )


def pool_outage(api_url: str, seconds: float, outage: list[float]) -> None:
    """Pause the work pool now (the next runs are late: no worker takes them) and resume it ``seconds`` later,
    in the background; ``outage`` gets both moments."""

    def set_paused(paused: bool) -> None:
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            client.update_work_pool("local-pool", WorkPoolUpdate(is_paused=paused))
        outage.append(time.time())

    set_paused(True)
    threading.Timer(seconds, set_paused, args=(False,)).start()


def _watching(spans: Sequence[Span], moment: float, count: int) -> bool:
    active = sum(1 for span in spans if span.covers(moment))
    return active == count if count < 2 else active >= count


def _near_handover(handovers: Sequence[tuple[Span, Span]], moment: float, seconds: float) -> bool:
    return any(
        abs(moment - new.start) <= seconds or (old.end is not None and abs(moment - old.end) <= seconds)
        for old, new in handovers
    )


if __name__ == "__main__":
    raise SystemExit(main())
