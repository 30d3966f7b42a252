"""One watch round over 10,000 checks on 1,000 services: wall, CPU, memory and HTTP requests, vs N+1.

    .venv/bin/python bench/health_scale.py [--services 1000] [--checks-per-service 10] [--repeat 5]

The Consul stand-in runs in its own process, so only the watch's own work is counted here. A "quiet
round" is what ``watch`` does when nothing changed: one ``/v1/health/state/any`` request, parse, evaluate
against the previous state, compare. The baseline is the N+1 pattern consul-alerts-style checkers use:
list the catalog, then ``/v1/health/service/:name`` per service. Also timed: a round in which one check
flips (the meta fetch, deploy-window read and CAS writes of the state for 1,000 instances included).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.health_latency import CountingClient, consul_standin_process
from icd.health.config import WatchConfig
from icd.health.engine import WatchState, evaluate, services_needing_meta
from icd.health.snapshot import parse_service_meta
from icd.health.state import HealthStateStore
from icd.health.watch import fetch_health_state
from icd.health.windows import read_deploy_windows

CONFIG = WatchConfig()


def register(client: CountingClient, services: int, checks: int) -> None:
    for n in range(services):
        definitions = [
            {"CheckID": f"svc-{n:04d}-c{c}", "Name": f"check {c}", "TTL": "3600s", "Status": "passing"}
            for c in range(checks)
        ]
        client.client.agent.service.register(
            f"svc-{n:04d}",
            service_id=f"svc-{n:04d}-1",
            meta={"artifact_version": "v1", "deploy_run_id": "bench"},
            # py-consul sends extra_checks only alongside check.
            check=definitions[0],
            extra_checks=definitions[1:],
        )


def quiet_round(client: CountingClient, state: WatchState) -> Any:
    snapshot = fetch_health_state(client.client, index=0, wait_seconds=0)
    alerts, new_state = evaluate(state, snapshot, datetime.now(UTC), CONFIG, {})
    if alerts or new_state != state:
        raise SystemExit("the quiet round was not quiet")
    return snapshot


def n_plus_one_round(client: CountingClient, state: WatchState) -> Any:
    _, services = client.client.catalog.services()
    meta: dict[str, dict[str, str]] = {}
    for name in services:
        if name == "consul":
            continue
        _, entries = client.client.health.service(name)
        meta.update(parse_service_meta(entries))
    return meta


def measure(label: str, addr: str, body: Callable[[CountingClient], Any], repeat: int) -> dict[str, float]:
    walls: list[float] = []
    cpus: list[float] = []
    requests_per_round = 0
    for _ in range(repeat):
        client = CountingClient(addr)
        gc.collect()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        body(client)
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
        requests_per_round = client.requests
    client = CountingClient(addr)
    gc.collect()
    tracemalloc.start()
    body(client)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = {
        "wall": min(walls),
        "cpu": min(cpus),
        "requests": requests_per_round,
        "peak_mb": peak / 1e6,
    }
    print(
        f"{label:<34} wall={result['wall'] * 1000:8.1f} ms  cpu={result['cpu'] * 1000:8.1f} ms  "
        f"requests={requests_per_round:<5} python-peak={result['peak_mb']:7.1f} MB  (best of {repeat})"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--checks-per-service", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rss_at_start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with consul_standin_process() as addr:
        setup = CountingClient(addr)
        started = time.perf_counter()
        register(setup, args.services, args.checks_per_service)
        snapshot = fetch_health_state(setup.client, index=0, wait_seconds=0)
        checks = len(setup.client.health.state("any")[1])
        print(
            f"Consul stand-in (own process) at {addr}: {args.services} services, "
            f"{len(snapshot.instances)} instances, {checks} check rows (incl. the node's serfHealth) "
            f"(registered in {time.perf_counter() - started:.1f} s)"
        )
        _, state = evaluate(WatchState(), snapshot, datetime.now(UTC), CONFIG, {})

        ours = measure("quiet round (blocking-query watch)", addr, lambda c: quiet_round(c, state), args.repeat)
        naive = measure("N+1 baseline (catalog + per-svc)", addr, lambda c: n_plus_one_round(c, state), 2)

        store = HealthStateStore(setup.client, "bench-scale")
        written = store.save(state, cas=0)
        assert written.written
        setup.client.agent.check.ttl_fail("svc-0000-c0", "bench: failing")

        def transition_round(client: CountingClient) -> None:
            store_for_round = HealthStateStore(client.client, "bench-scale")
            stored = store_for_round.load()
            client.requests = 0  # the load happens once per flow run, not per round
            fresh = fetch_health_state(client.client, index=0, wait_seconds=0)
            now = datetime.now(UTC)
            alerts, new_state = evaluate(stored.state, fresh, now, CONFIG, {})
            windows = read_deploy_windows(client.client)
            for name in services_needing_meta(stored.state, new_state, alerts, windows, now):
                fresh = fresh.with_meta(parse_service_meta(client.client.health.service(name)[1]))
            alerts, new_state = evaluate(stored.state, fresh, now, CONFIG, windows)
            assert len(alerts) == 1, alerts
            first = store_for_round.save(new_state, cas=stored.modify_index, outbox=[], outbox_since=now)
            assert first.written
            assert first.modify_index is not None
            # Put the baseline back so every repetition sees the same single transition.
            restored = store_for_round.save(state, cas=first.modify_index)
            assert restored.written

        measure("round with one transition (+CAS)", addr, transition_round, args.repeat)

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS of this process: {rss_mb:.0f} MB (of which {rss_at_start_mb:.0f} MB before any round: "
        f"Python + prefect, imported by the blocks; growth {rss_mb - rss_at_start_mb:.0f} MB)"
    )
    print(
        f"N+1 / watch ratio: wall x{naive['wall'] / ours['wall']:.1f}  "
        f"cpu x{naive['cpu'] / ours['cpu']:.1f}  requests x{naive['requests'] / ours['requests']:.0f}"
    )
    goals = [
        ("cpu <= 0.5 s", ours["cpu"] <= 0.5),
        ("1 request", ours["requests"] == 1),
        ("<= 150 MB (round's Python peak)", ours["peak_mb"] <= 150),
        ("<= 150 MB (whole-process RSS)", rss_mb <= 150),
    ]
    print("goals: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in goals))


if __name__ == "__main__":
    main()
