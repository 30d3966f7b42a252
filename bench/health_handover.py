"""Check flip -> Slack message through the *deployed* consul-health flow, hand-overs between runs included.

    .venv/bin/python bench/health_handover.py [--flips 40] [--interval 20] [--window 25]

A Prefect server, a process worker and the deployments of prefect.yaml run here for real. The consul-health
deployment's schedule is shortened (every `--interval` s, watching `--window` s) so that a few minutes see
several hand-overs from one run to the next. TTL checks of 30 services are flipped (critical, then back to
passing) at random moments; each flip is timed from just before the Consul call to the moment the Slack
stand-in stored the message. Goal: p95 <= 1 s, with no flip lost in a gap between two runs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import consul
from moto.server import ThreadedMotoServer
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleUpdate, DeploymentUpdate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
from prefect.client.schemas.schedules import IntervalSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings

from examples.local_env import (
    LocalServices,
    free_port,
    provision,
    start_prefect_server,
    start_worker,
    worker_env,
    write_config,
)
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn

SERVICES = 30


def _health_runs() -> list[object]:
    with get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["consul-health"])),
                flow_run_filter=FlowRunFilter(),
                limit=200,
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=40)
    parser.add_argument("--interval", type=int, default=20, help="seconds between scheduled runs")
    parser.add_argument("--window", type=int, default=25, help="seconds each run watches")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="icd-bench-handover-"))
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    standin = ConsulStandIn().start()
    slack = SlackStandIn(token="xoxb-bench").start()
    server = start_prefect_server(home / "prefect")
    processes = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            config = write_config(home / "icd.toml", namespaces={}, workspaces={})
            os.environ["ICD_CONFIG"] = str(config)
            services = LocalServices(
                f"http://127.0.0.1:{moto_port}", "icd-bench", "b", "b", slack.api_url, "xoxb-bench", standin.http_addr
            )
            provision(server, services, alerts_url=slack.webhook_url("alerts"))
            host, port = standin.address.rsplit(":", 1)
            agent = consul.Consul(host=host, port=int(port))
            for n in range(SERVICES):
                agent.agent.service.register(
                    f"svc{n}", service_id=f"svc{n}-1", check={"CheckID": f"c{n}", "TTL": "3600s", "Status": "passing"}
                )
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("consul-health/consul-health")
                client.update_deployment(deployment.id, DeploymentUpdate(parameters={"window_seconds": args.window}))
                [schedule] = client.read_deployment_schedules(deployment.id)
                client.update_deployment_schedule(
                    deployment.id,
                    schedule.id,
                    DeploymentScheduleUpdate(schedule=IntervalSchedule(interval=args.interval)),
                )
            processes.append(start_worker(server, "local-pool", env=worker_env(home / "icd", config)))
            deadline = time.monotonic() + 120
            while not standin_kv(agent) and time.monotonic() < deadline:
                time.sleep(0.2)  # the bench's own pace: the first run persists its baseline
            latencies: list[float] = []
            lost = 0
            for flip in range(args.flips):
                time.sleep(random.uniform(0.5, 4.0))  # noqa: S311  # flips land anywhere, hand-overs included
                check = f"c{random.randrange(SERVICES)}"  # noqa: S311
                seen = len(slack.messages)
                started = time.time()
                agent.agent.check.ttl_fail(check, f"bench flip {flip}")
                messages = slack.wait_for_messages(seen + 1, timeout=30)
                if len(messages) <= seen:
                    lost += 1
                    continue
                latencies.append(messages[seen].received_at - started)
                agent.agent.check.ttl_pass(check)  # back to passing: its own message, not timed
                slack.wait_for_messages(seen + 2, timeout=30)
            runs = _health_runs()
            ordered = sorted(latencies)
            p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
            print(
                f"flips {len(latencies)} timed, {lost} lost; alert latency p50 {statistics.median(latencies) * 1000:.0f} ms "
                f"p95 {p95 * 1000:.0f} ms max {ordered[-1] * 1000:.0f} ms; consul-health runs during the bench: {len(runs)} "
                f"(every {args.interval} s, watching {args.window} s)"
            )
    finally:
        for process in processes:
            process.stop()
        server.stop()
        slack.stop()
        standin.stop()
        moto.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def standin_kv(agent: consul.Consul) -> bool:
    return agent.kv.get("icd/health-watch/default/state")[1] is not None


if __name__ == "__main__":
    raise SystemExit(main())
