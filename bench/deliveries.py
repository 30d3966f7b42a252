"""One push delivered many times at once, under distinct delivery ids: how many versions does the commit get?

    .venv/bin/python bench/deliveries.py [--cases 2,10,50] [--postgres]

Everything runs for real: moto (S3), the Consul and Slack stand-ins, a Prefect server, one `icd-worker` at
`--limit 4` (as examples/local_env.py starts it), the deployments and triggers of prefect.yaml, and the
`icd-inbound` app. Each case is a fresh namespace: N copies of one signed push, each with its own
`X-GitHub-Delivery` (two hooks on the repository, a manual redelivery), posted at the same moment from N
threads. Each copy becomes its own `icd.push.received` event and so its own `build-artifact` run.

* **ours**: those runs as they are: each claims the commit's build in the registry before building. Printed:
  versions the commit got (goal: 1), Packer builds, the runs by end state, and the time from the first
  delivery until every run has ended.
* **baseline**: the build as it was before the claim (commit d9c8efe), replayed in this process against
  the same moto: check for an existing build, build, register, with the registry's old registration (a new
  number for every Packer run; `Unguarded` below is that and nothing else). Replayed twice: with the arrival
  times and the Packer time of our runs (each thread checks when its run claimed, "builds" for as long as
  our build took), and with every copy at the same instant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import botocore.config
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
from prefect.settings import PREFECT_API_URL, temporary_settings

from examples.local_env import (
    LocalServices,
    api_client,
    create_postgres_database,
    deliver_webhook,
    drop_postgres_database,
    git,
    github_push,
    make_app_repo,
    provision,
    read_task_runs,
    recorded_task_runs,
    start_inbound,
    start_moto,
    start_prefect_server,
    start_worker,
    worker_env,
    write_config,
)
from icd.registry.registry import Registry
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn

SECRET = "bench-webhook-secret"
SETTLE = 30.0
ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Unguarded(Registry):
    """The registration of commit d9c8efe: every Packer run gets the next number, whatever its commit."""

    def _number_for_commit(self, namespace: str, commit: str, packer_run_uuid: str, *, rebuild_of: int | None) -> int:
        return self._reserve_version(namespace, packer_run_uuid)


@dataclass
class Case:
    copies: int
    resent: int
    runs: int
    versions: list[int]
    packer_builds: int
    states: Counter[str]
    all_ended: float
    arrivals: list[float]  # each run's claim, seconds after the first
    build_seconds: float
    queued: list[float]  # run created -> running (waiting for a worker slot)
    running: list[float]  # running -> ended


def _runs(namespace: str) -> list[Any]:
    runs = api_client().read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["build-artifact"])),
        flow_run_filter=FlowRunFilter(),
        limit=200,
    )
    return [run for run in runs if run.parameters.get("namespace") == namespace]


def _named(tasks: list[Any], name: str) -> list[Any]:
    return [task for task in tasks if task.name.rsplit("-", 1)[0] == name]


def ours(inbound_url: str, repo: Path, registry: Registry, namespace: str, alias: str, copies: int) -> Case:
    commit = git(repo, "rev-parse", "HEAD")
    push = github_push(full_name=alias, clone_url=f"https://github.com/{alias}.git", branch="main", after=commit)
    barrier = threading.Barrier(copies)

    def deliver(_: int) -> list[int]:
        """Its answers: past icd-inbound's --limit-concurrency (32) uvicorn answers 503, and the delivery is
        sent again under the same id, as an operator's redelivery from GitHub's page would."""
        delivery = str(uuid.uuid4())
        barrier.wait()
        answers = [deliver_webhook(f"{inbound_url}/github", SECRET, push, delivery=delivery).status_code]
        while answers[-1] == 503 and len(answers) < 50:
            time.sleep(0.2)
            answers.append(deliver_webhook(f"{inbound_url}/github", SECRET, push, delivery=delivery).status_code)
        return answers

    started = time.time()
    with ThreadPoolExecutor(max_workers=copies) as pool:
        answers = list(pool.map(deliver, range(copies)))
    if [each[-1] for each in answers] != [202] * copies:
        raise RuntimeError(f"the webhook answered {Counter(each[-1] for each in answers)}")
    resent = sum(len(each) - 1 for each in answers)
    # Every delivery should start a run; a run the server failed to create (SQLite's "database is locked"
    # under this load, in the trigger's action) never appears, so stop waiting once all have ended and no new
    # one came for SETTLE seconds, and report the count.
    deadline = time.monotonic() + 900
    seen, last_new = 0, time.monotonic()
    while time.monotonic() < deadline:
        runs = _runs(namespace)
        if len(runs) != seen:
            seen, last_new = len(runs), time.monotonic()
        ended = runs and all(run.state is not None and run.state.type.value in ENDED for run in runs)
        if ended and (len(runs) >= copies or time.monotonic() - last_new > SETTLE):
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"{copies} deliveries: runs not all ended after 900 s")
    # A run its engine ended (Completed, Failed) logged its end: wait for all its task runs. A crashed one did
    # not: what the server recorded is all there is.
    tasks = {
        run.id: recorded_task_runs(run.id)
        if run.state.type.value in {"COMPLETED", "FAILED"}
        else read_task_runs(run.id)
        for run in runs
    }
    claims = sorted(
        t.start_time.timestamp() for ts in tasks.values() for t in _named(ts, "claim-build") if t.start_time
    )
    builds = [t for ts in tasks.values() for t in _named(ts, "build-artifact")]
    return Case(
        copies=copies,
        resent=resent,
        runs=len(runs),
        versions=registry.commit_versions(namespace, commit),
        packer_builds=len(builds),
        states=Counter(f"{run.state.type.value.title()}/{run.state.name}" for run in runs),
        all_ended=max(run.end_time.timestamp() for run in runs) - started,
        arrivals=[at - claims[0] for at in claims],
        build_seconds=max((t.total_run_time.total_seconds() for t in builds), default=0.0),
        queued=sorted(run.start_time.timestamp() - run.created.timestamp() for run in runs),
        running=sorted(run.end_time.timestamp() - run.start_time.timestamp() for run in runs),
    )


def baseline(old: Unguarded, namespace: str, arrivals: list[float], build_seconds: float) -> tuple[int, int]:
    """The old check-then-build-then-register, one thread per run; returns (versions, Packer builds)."""
    commit = f"{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(len(arrivals))
    built: list[str] = []

    def run(index: int) -> None:
        barrier.wait()
        time.sleep(arrivals[index])
        if old.find_build(namespace, commit=commit, service_name="web", platform="local") is not None:
            return
        built.append(str(index))
        time.sleep(build_seconds)  # Packer, as long as our build took
        old.register(
            namespace,
            git_commit=commit,
            git_ref="main",
            packer_run_uuid=str(uuid.uuid4()),
            builder_type="null",
            artifacts={"local": f"/images/{index}.tar.gz"},
            created_by="bench-baseline",
            labels={"service_name": "web"},
        )

    with ThreadPoolExecutor(max_workers=len(arrivals)) as pool:
        list(pool.map(run, range(len(arrivals))))
    return len(old.commit_versions(namespace, commit)), len(built)


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="2,10,50", help="copies of the push per case, comma-separated")
    parser.add_argument(
        "--postgres", action="store_true", help="the server on a fresh database on the local PostgreSQL"
    )
    args = parser.parse_args(argv)
    cases = [int(copies) for copies in args.cases.split(",")]
    home = Path(tempfile.mkdtemp(prefix="icd-bench-deliveries-"))
    moto, endpoint = start_moto()
    consul = ConsulStandIn().start()
    slack = SlackStandIn(token="xoxb-bench").start()
    database_url = create_postgres_database("icd_bench") if args.postgres else None
    server = start_prefect_server(home / "prefect", database_url=database_url)
    processes = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            repo = make_app_repo(home / "repo")
            namespaces = {
                f"bench/web{copies}": {
                    "repository": str(repo),
                    "repository_aliases": [f"acmeinc/web{copies}"],
                    "service_name": "web",
                }
                for copies in cases
            }
            namespaces["bench/warmup"] = {
                "repository": str(repo),
                "repository_aliases": ["acmeinc/warmup"],
                "service_name": "web",
            }
            config = write_config(home / "icd.toml", namespaces=namespaces, workspaces={})
            os.environ["ICD_CONFIG"] = str(config)
            services = LocalServices(
                endpoint, "icd-bench", "bench", "bench", slack.api_url, "xoxb-bench", consul.http_addr
            )
            block = provision(server, services, alerts_url=slack.webhook_url("alerts"), webhook_secret=SECRET)
            client = api_client()
            client.pause_deployment(client.read_deployment_by_name("consul-health/consul-health").id)
            processes.append(start_worker(server, "local-pool", env=worker_env(home / "icd", config)))
            inbound, inbound_url = start_inbound(server, config=config)
            processes.append(inbound)
            registry = block.registry()
            # Its own client: one pooled connection per baseline thread.
            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                config=botocore.config.Config(max_pool_connections=64),
            )
            old = Unguarded(s3, block.bucket, "bench-baseline/", sealer=registry._sealer)
            # Not counted: the worker's first runs also warm its fork server up.
            ours(inbound_url, repo, registry, "bench/warmup", "acmeinc/warmup", 2)
            print(f"server on {server.database}; one icd-worker --limit 4; load average {os.getloadavg()[0]:.1f}")
            print(
                f"\n{'copies':>6}  {'versions':>8}  {'packer':>6}  {'all ended':>9}  runs by end state"
                "                      | baseline (old path): versions / Packer builds"
            )
            for copies in cases:
                case = ours(inbound_url, repo, registry, f"bench/web{copies}", f"acmeinc/web{copies}", copies)
                replayed = baseline(old, f"bench-old/replay{copies}", case.arrivals, case.build_seconds)
                at_once = baseline(old, f"bench-old/once{copies}", [0.0] * copies, case.build_seconds)
                states = ", ".join(f"{count} {name}" for name, count in sorted(case.states.items()))
                print(
                    f"{copies:>6}  {len(case.versions):>8}  {case.packer_builds:>6}  {case.all_ended:>8.1f}s  "
                    f"{states:<45} | same arrivals {replayed[0]:>2} / {replayed[1]:>2};  at once {at_once[0]:>2} / "
                    f"{at_once[1]:>2}",
                    flush=True,
                )
                print(
                    f"{'':>6}  {case.runs} runs for {copies} deliveries ({case.resent} sent again after a 503); claims spread over {case.arrivals[-1]:.1f}s; "
                    f"Packer {case.build_seconds:.1f}s; per run: queued p50 {_p50(case.queued):.1f}s "
                    f"max {case.queued[-1]:.1f}s, running p50 {_p50(case.running):.1f}s max {case.running[-1]:.1f}s; "
                    f"versions of the commit: {case.versions}",
                    flush=True,
                )
    finally:
        for process in processes:
            process.stop()
        server.stop()
        if database_url:
            drop_postgres_database(database_url)
        slack.stop()
        consul.stop()
        moto.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
