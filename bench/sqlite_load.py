"""The embedded SQLite database under the demo's kind of load: Prefect's defaults against the project's server.

    .venv/bin/python bench/sqlite_load.py [--rounds 2] [--runs 40] [--cycles 3] [--writers 6]

Each round starts two fresh Prefect servers on SQLite, one after the other in alternating order: the
baseline, ``prefect server start`` (how the demo, the tests and the README walkthrough started it before
issue 20), and ours, ``icd-server start`` (``cli/server.py``: every SQLite transaction begins ``IMMEDIATE``).
Both log the errors Prefect answers with a 503 (``PREFECT_API_LOG_RETRYABLE_ERRORS``; off by default, which
hid most of them), and get the same load through the REST API, as workers, flow runs and operators make it:

* **the resume loop**: ``--runs`` flow runs of one deployment, all at once, each ``--cycles`` times:
  Pending -> Running -> suspended for input (``Suspended``, with a run-input schema saved, as
  ``suspend_flow_run(wait_for_input=...)`` does) -> resumed with an answer (``POST /flow_runs/{id}/resume``,
  what the UI's Resume button and ``icd-approve answer`` call) -> at the end Completed;
* **background writes** by ``--writers`` loops until the resume loop ends: batches of log lines, task runs
  with their states, and events (``POST /events``), as running flows send them.

A resume is sent once, as the UI's Resume button does: a failed one (an HTTP error such as the 503 of a
locked database, or an answer other than ACCEPT) is counted, then sent again until it is taken so the loop
goes on. Every other request is retried on a 503 as Prefect's client does, and its 503s are counted.
Printed per side: resumes, failed resumes, 503s of other requests, requests that failed for good,
``database is locked`` in the server's log, and the resume call's p50/p95 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.local_env import PrefectServer, start_prefect_server

ANSWER_SCHEMA = {
    "title": "PlanApproval",
    "type": "object",
    "properties": {"decision": {"type": "string"}, "approver": {"type": "string"}},
    "required": ["decision", "approver"],
}


@dataclass
class Tally:
    resumes: int = 0
    resume_failures: int = 0
    other_failures: int = 0
    other_503s: int = 0
    resume_seconds: list[float] = field(default_factory=list)
    failure_samples: list[str] = field(default_factory=list)

    def failed(self, what: str) -> None:
        """Keep a few examples of each kind of failure (the path or "resume", then the answer)."""
        kind = what.split(":", 1)[0].split("/")[1 if what.startswith("/") else 0]
        if sum(sample.startswith(kind) for sample in self.failure_samples) < 2:
            self.failure_samples.append(f"{kind}: {what[:300]}")


def now_iso(offset: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat()


async def post(http: httpx.AsyncClient, tally: Tally, path: str, body: Any) -> Any:
    """A request other than the resume, retried on a 503 as Prefect's client does (up to 5 times, backing
    off); a failure for good is counted and the caller goes on."""
    for attempt in range(6):
        try:
            response = await http.post(path, json=body)
        except httpx.HTTPError as exc:
            tally.other_failures += 1
            tally.failed(f"{path}: {exc!r}")
            return None
        if response.status_code != 503:
            break
        tally.other_503s += 1
        await asyncio.sleep(min(2**attempt, 10) * (0.5 + random.random()))  # noqa: S311  # jitter, not a secret
    if response.status_code >= 400:
        tally.other_failures += 1
        tally.failed(f"{path}: {response.status_code} {response.text}")
        return None
    return response.json() if response.content else None


async def resume(http: httpx.AsyncClient, tally: Tally, run_id: str) -> bool:
    """Resume as the UI does, once; if it failed, count it and resume again until taken (the operator
    clicks again)."""
    for attempt in range(20):
        started = time.perf_counter()
        try:
            response = await http.post(
                f"/flow_runs/{run_id}/resume", json={"run_input": {"decision": "approve", "approver": "bench"}}
            )
            answer = response.json() if response.status_code < 400 else {"status": response.status_code}
            status = answer.get("status")
            if status != "ACCEPT" and answer.get("details"):
                status = f"{status} {answer['details']}"
        except (httpx.HTTPError, ValueError) as exc:
            status = repr(exc)
        if attempt == 0:
            tally.resumes += 1
            tally.resume_seconds.append(time.perf_counter() - started)
        if status == "ACCEPT":
            return True
        if attempt == 0:
            tally.resume_failures += 1
            tally.failed(f"resume: {status}")
        await asyncio.sleep(1)
    return False


async def set_state(http: httpx.AsyncClient, tally: Tally, run_id: str, state: dict[str, Any]) -> bool:
    answer = await post(http, tally, f"/flow_runs/{run_id}/set_state", {"state": state, "force": False})
    if answer is None:
        return False
    if answer.get("status") != "ACCEPT":
        tally.other_failures += 1
        tally.failed(f"set_state {state['type']}: {answer.get('status')} {answer.get('details')}")
        return False
    return True


async def one_run(http: httpx.AsyncClient, tally: Tally, deployment_id: str, cycles: int) -> None:
    run = await post(http, tally, f"/deployments/{deployment_id}/create_flow_run", {})
    if run is None:
        return
    run_id = run["id"]
    for cycle in range(cycles):
        if not await set_state(http, tally, run_id, {"type": "PENDING", "name": "Pending"}):
            return
        if not await set_state(http, tally, run_id, {"type": "RUNNING", "name": "Running"}):
            return
        key = f"approval-{cycle}"
        suspended = {
            "type": "PAUSED",
            "name": "Suspended",
            "state_details": {
                "pause_timeout": now_iso(3600),
                "pause_reschedule": True,
                "pause_key": key,
                "run_input_keyset": {part: f"{key}-{part}" for part in ("description", "response", "schema")},
            },
        }
        if not await set_state(http, tally, run_id, suspended):
            return
        # Then the form's schema, as suspend_flow_run saves it once the run is paused.
        schema = {"key": f"{key}-schema", "value": json.dumps(ANSWER_SCHEMA)}
        await post(http, tally, f"/flow_runs/{run_id}/input", schema)
        if not await resume(http, tally, run_id):
            return
    if await set_state(http, tally, run_id, {"type": "PENDING", "name": "Pending"}):
        await set_state(http, tally, run_id, {"type": "RUNNING", "name": "Running"})
        await set_state(http, tally, run_id, {"type": "COMPLETED", "name": "Completed"})


async def background_writer(http: httpx.AsyncClient, tally: Tally, flow_run_id: str, stop: asyncio.Event) -> None:
    """Log lines, a task run with its states, and events, in a loop: what a running flow sends."""
    while not stop.is_set():
        logs = [
            {"name": "icd", "level": 20, "message": f"line {i}", "timestamp": now_iso(), "flow_run_id": flow_run_id}
            for i in range(20)
        ]
        await post(http, tally, "/logs/", logs)
        task = await post(
            http,
            tally,
            "/task_runs/",
            {"flow_run_id": flow_run_id, "task_key": "bench", "dynamic_key": uuid.uuid4().hex, "name": "bench"},
        )
        if task is not None:
            for kind in ("RUNNING", "COMPLETED"):
                await post(
                    http,
                    tally,
                    f"/task_runs/{task['id']}/set_state",
                    {"state": {"type": kind, "name": kind.title()}, "force": False},
                )
        events = [
            {
                "id": str(uuid.uuid4()),
                "occurred": now_iso(),
                "event": "icd.bench.write",
                "resource": {"prefect.resource.id": f"icd.bench.{i}"},
                "payload": {"i": i},
            }
            for i in range(10)
        ]
        await post(http, tally, "/events", events)


async def load(api_url: str, runs: int, cycles: int, writers: int) -> Tally:
    tally = Tally()
    # Connections idle for 1 s are closed by us, before uvicorn's 5 s keep-alive can close one under a request.
    limits = httpx.Limits(max_connections=runs + writers + 4, keepalive_expiry=1)
    async with httpx.AsyncClient(base_url=api_url, timeout=120, limits=limits) as http:
        flow = (await http.post("/flows/", json={"name": "sqlite-bench"})).json()
        deployment = (
            await http.post("/deployments/", json={"name": f"bench-{uuid.uuid4().hex[:6]}", "flow_id": flow["id"]})
        ).json()
        writer_run = (await http.post(f"/deployments/{deployment['id']}/create_flow_run", json={})).json()
        stop = asyncio.Event()
        background = [
            asyncio.create_task(background_writer(http, tally, writer_run["id"], stop)) for _ in range(writers)
        ]
        await asyncio.gather(*(one_run(http, tally, deployment["id"], cycles) for _ in range(runs)))
        stop.set()
        await asyncio.gather(*background)
    return tally


def side(name: str, write_first: bool, args: argparse.Namespace) -> tuple[Tally, int, float]:
    home = Path(tempfile.mkdtemp(prefix=f"icd-bench-sqlite-{name}-"))
    server: PrefectServer = start_prefect_server(
        home / "prefect", write_first=write_first, env={"PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}
    )
    started = time.monotonic()
    try:
        tally = asyncio.run(load(server.api_url, args.runs, args.cycles, args.writers))
    finally:
        elapsed = time.monotonic() - started
        server.stop()
    log = server.process.log_path.read_text(errors="replace")
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return tally, log.count("database is locked"), elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--writers", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep each server's home (its log, its database)")
    args = parser.parse_args()
    sides = {"baseline (prefect server start)": False, "ours (icd-server start)": True}
    totals: dict[str, list[tuple[Tally, int, float]]] = {name: [] for name in sides}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for name in order:
            tally, locked, elapsed = side(name.split()[0], sides[name], args)
            totals[name].append((tally, locked, elapsed))
            p50 = statistics.median(tally.resume_seconds) if tally.resume_seconds else 0.0
            print(
                f"round {round_ + 1} {name}: resumes {tally.resumes}, failed {tally.resume_failures}, "
                f"other 503s {tally.other_503s}, failed for good {tally.other_failures}, 'database is locked' {locked}, "
                f"resume p50 {p50:.2f}s, load {elapsed:.0f}s",
                flush=True,
            )
            for sample in tally.failure_samples:
                print(f"    e.g. {sample}", flush=True)
    print()
    print(
        "| side | resumes | failed resumes | 503s of other requests | failed for good | `database is locked` "
        "| resume p50 / p95 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, results in totals.items():
        seconds = sorted(s for tally, _, _ in results for s in tally.resume_seconds)
        p95 = seconds[int(0.95 * (len(seconds) - 1))] if seconds else 0.0
        p50 = statistics.median(seconds) if seconds else 0.0
        print(
            f"| {name} | {sum(t.resumes for t, _, _ in results)} | {sum(t.resume_failures for t, _, _ in results)} "
            f"| {sum(t.other_503s for t, _, _ in results)} | {sum(t.other_failures for t, _, _ in results)} "
            f"| {sum(locked for _, locked, _ in results)} "
            f"| {p50:.2f} s / {p95:.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
