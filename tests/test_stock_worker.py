"""The fallback stays true: a whole cycle (build, plan, approval wait, resume, apply, ``Deployed``) on Prefect's
stock process worker (``prefect worker start --type process``), with none of prefect_patches/ in its process
or its runs. This is what an operator runs when a Prefect upgrade breaks a private seam
(``tests/test_prefect_seams.py``); every other end-to-end test runs on ``icd-worker``."""

from __future__ import annotations

import uuid

from examples.local_env import ManagedProcess, start_worker
from tests.plugins.deploy_env import POOL, DeployEnv
from tests.waiting import wait_until


def _argv(process: ManagedProcess) -> list[str]:
    args = process.proc.args
    return [str(part) for part in args] if isinstance(args, list | tuple) else [str(args)]


def _is_a_worker(process: ManagedProcess) -> bool:
    """``icd-worker`` (``-m cli.worker``) or Prefect's (``-m prefect worker start``); not the inbound app."""
    argv = _argv(process)
    return "cli.worker" in argv or argv[1:4] == ["-m", "prefect", "worker"]


def _submitted(worker: ManagedProcess, run_id: object) -> int:
    """How often ``worker`` submitted the run (Prefect's worker logs each submission)."""
    return worker.log_path.read_text(errors="replace").count(f"submitting flow run '{run_id}'")


def test_a_full_cycle_on_prefects_stock_process_worker(deploy_env: DeployEnv) -> None:
    env = deploy_env
    # Only the stock worker may take the runs: every live worker of the session leaves the pool first.
    for process in env.workers:
        if _is_a_worker(process) and process.proc.poll() is None:
            process.stop()
    stock = start_worker(env.server, POOL, env=env.worker_env, name=f"stock-{uuid.uuid4().hex[:6]}", warm=False)
    env.workers.append(stock)
    try:
        assert _argv(stock)[1:6] == ["-m", "prefect", "worker", "start", "--pool"], _argv(stock)
        assert "cli.worker" not in _argv(stock)
        names = env.service()
        run, version = env.deploy_until_paused(names)
        done = env.approve(run.id, names.workspace)
        assert done.state is not None
        assert done.state.name == "Deployed", (done.state, stock.log_tail())
        channel = env.registry.registry().get_channel(names.namespace, names.workspace)
        assert channel is not None
        assert channel.version == version
        [build] = env.runs_of("build-artifact", namespace=names.namespace)
        assert _submitted(stock, build.id) == 1, "the stock worker ran the build"
        # Its start, then its resume after the approval: both on the stock worker.
        wait_until(lambda: _submitted(stock, run.id) >= 2, timeout=30, message="the deploy ran elsewhere")
        wait_until(lambda: env.holder(names.workspace) is None, timeout=60, message="the workspace stayed held")
    finally:
        stock.stop()
        env.worker = start_worker(env.server, POOL, env=env.worker_env, name=f"worker-{uuid.uuid4().hex[:6]}")
        env.workers.append(env.worker)
