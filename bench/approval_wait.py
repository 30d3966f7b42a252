"""What the approval wait costs: ``suspend_flow_run`` (our choice) against ``pause_flow_run``.

    .venv/bin/python bench/approval_wait.py [--rounds 8] [--database-url postgresql+asyncpg://...]

Both probes are deployed flows on a real Prefect server, run by one process worker polling every second
(as in examples/local_env.py), interleaved round by round. Each probe imports what the deploy flow imports
(``flows.deploy_artifact``), waits for a ``PlanApproval`` answer, and logs one line when it has it. Printed:

* **resume -> running**: from the resume call to the run's next RUNNING state (suspend: the worker must
  start a new process; pause: the waiting process notices);
* **resume -> answer in hand**: from the resume call to the probe's log line, the latency an operator feels;
* **held while waiting**: the private memory of the process that a paused run keeps for the whole wait
  (a suspended run keeps none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.flow_runs import pause_flow_run, resume_flow_run, suspend_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

PROJECT = Path(__file__).resolve().parent.parent
POOL = "bench-pool"
ANSWER = {"decision": "approve", "approver": "bench", "comment": "", "plan_sha256": "0" * 64}
MARK = "answer in hand"


def _form() -> Any:
    import flows.deploy_artifact  # noqa: F401  # the deploy flow's imports: a fair cold start
    from icd.deploy.approval import PlanApproval

    return PlanApproval


@flow(name="suspend-probe")
def suspend_probe() -> None:
    answer = suspend_flow_run(wait_for_input=_form(), timeout=600, key="probe")
    get_run_logger().info("%s: %s", MARK, answer.approver)


@flow(name="pause-probe")
def pause_probe() -> None:
    answer = pause_flow_run(wait_for_input=_form(), timeout=600, poll_interval=1, key="probe")
    get_run_logger().info("%s: %s", MARK, answer.approver)


def _mark_time(run_id: Any, timeout: float = 30) -> float:
    """When the probe logged that it had the answer (the log line is stamped where it was written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        found = [log.timestamp.timestamp() for log in logs if MARK in log.message]
        if found:
            return found[0]
        time.sleep(0.1)  # log lines are shipped in batches after the run's state changes
    raise TimeoutError(f"run {run_id} never logged {MARK!r}")


def _running_after(run_id: Any, after: float) -> float:
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(run_id)
    return min(s.timestamp.timestamp() for s in states if s.type.value == "RUNNING" and s.timestamp.timestamp() > after)


def _waiting_rss_mb(run_id: Any) -> float:
    """Memory the run's own process holds while it waits: its private pages (``Private_*`` of
    ``/proc/PID/smaps_rollup``), which is what the wait costs. Found by the pid the worker recorded on the run
    (a forked run's ``/proc/PID/environ`` is its fork server's). A suspended run has no process: 0."""
    from examples.local_env import read_flow_run  # not at the top: the probes' processes import this module

    pid = read_flow_run(run_id).infrastructure_pid
    try:
        rollup = Path(f"/proc/{int(pid or 0)}/smaps_rollup").read_text()
    except (OSError, ValueError):
        return 0.0
    private_kb = sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Private_"))
    return private_kb / 1024


def one_round(deployment: str) -> tuple[float, float, float]:
    from examples.local_env import wait_for_run  # not at the top: the probes' processes import this module

    run = run_deployment(deployment, timeout=0)
    wait_for_run(run.id, {"PAUSED"}, timeout=180, interval=0.02)
    # A real wait lasts minutes: let a suspending process exit and a pausing one settle into its poll loop.
    time.sleep(5)
    rss = _waiting_rss_mb(run.id)
    resumed_at = time.time()
    resume_flow_run(run.id, run_input=ANSWER)
    done = wait_for_run(run.id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=180, interval=0.02)
    if done.state.type.value != "COMPLETED":
        raise RuntimeError(f"{deployment} ended {done.state}")
    return _running_after(run.id, resumed_at) - resumed_at, _mark_time(run.id) - resumed_at, rss


def main(argv: list[str] | None = None) -> int:
    from examples.local_env import start_prefect_server, start_worker

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="icd-bench-wait-"))
    server = start_prefect_server(home / "prefect", database_url=args.database_url)
    worker = None
    try:
        os.environ["PREFECT_API_URL"] = server.api_url
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            with get_client(sync_client=True) as client:
                from prefect.client.schemas.actions import WorkPoolCreate

                client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            for probe in ("suspend_probe", "pause_probe"):
                flow.from_source(source=str(PROJECT), entrypoint=f"bench/approval_wait.py:{probe}").deploy(  # type: ignore[attr-defined]
                    name="probe", work_pool_name=POOL, print_next_steps=False
                )
            worker = start_worker(server, POOL, env={"PYTHONPATH": str(PROJECT)})
            results: dict[str, list[tuple[float, float, float]]] = {"suspend": [], "pause": []}
            for round_number in range(args.rounds + 1):  # round 0 warms up and is not counted
                for name in ("suspend", "pause"):
                    sample = one_round(f"{name}-probe/probe")
                    if round_number:
                        results[name].append(sample)
                print(f"round {round_number}{' (warm-up)' if not round_number else ''} done", flush=True)
            print(f"\nrounds: {args.rounds} per contender, interleaved; worker polls every 1 s")
            for name, samples in results.items():
                running = statistics.median(s[0] for s in samples)
                answered = statistics.median(s[1] for s in samples)
                rss = statistics.median(s[2] for s in samples)
                print(
                    f"{name:8s} resume -> running p50 {running:5.2f}s   resume -> answer in hand p50 {answered:5.2f}s "
                    f"(max {max(s[1] for s in samples):5.2f}s)   held while waiting {rss:6.1f} MB"
                )
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
