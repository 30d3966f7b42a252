"""The team set-up of docs/operations.md, under load: the Prefect server on PostgreSQL, two process workers
on one pool, task results in S3. A deploy suspended on one worker resumes on the other from the results in
S3, and ten deploys at once over ten workspaces all finish with no database lock errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from examples.local_env import ManagedProcess
from tests.plugins.deploy_env import ENDED, DeployEnv
from tests.waiting import wait_until

# What PostgreSQL (or SQLite) says when concurrent writers collide; none may reach the server's log.
_DATABASE_LOCK_ERRORS = re.compile(
    r"deadlock detected|database is locked|could not serialize access|LockNotAvailable|"
    r"could not obtain lock|QueuePool limit",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def two_workers(deploy_env: DeployEnv) -> Iterator[DeployEnv]:
    """The session's worker plus a second one; whichever a test stops is replaced afterwards."""
    extra = deploy_env.add_worker("worker-b")
    yield deploy_env
    if deploy_env.worker.proc.poll() is not None:  # a test stopped the session's worker: keep the live one
        deploy_env.worker = extra
    else:
        extra.stop()


def _submitted(worker: ManagedProcess, run_id: Any) -> int:
    """How often ``worker`` submitted the run (its start, and its resume after approval)."""
    return worker.log_path.read_text(errors="replace").count(f"submitting flow run '{run_id}'")


def _results_bucket(env: DeployEnv) -> list[str]:
    s3 = env.registry.aws_credentials.get_s3_client()
    listing = s3.list_objects_v2(Bucket=f"{env.registry.bucket}-results")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_the_suite_runs_on_postgresql(deploy_env: DeployEnv) -> None:
    assert deploy_env.server.database == "postgresql", (
        "no PostgreSQL answered at ICD_POSTGRES_DSN (default postgresql://postgres@127.0.0.1:5432/test); "
        "the team set-up cannot be tested on SQLite"
    )


def test_a_deploy_suspended_on_one_worker_resumes_on_the_other(two_workers: DeployEnv) -> None:
    env = two_workers
    live = [w for w in env.workers if w.name.startswith("worker") and w.proc.poll() is None]
    assert len(live) == 2, [w.name for w in env.workers]
    names = env.service()
    run, _ = env.deploy_until_paused(names)
    started_on = next(w for w in live if _submitted(w, run.id))
    other = next(w for w in live if w is not started_on)
    started_on.stop()  # the machine that planned is gone while the operator reads the plan

    done = env.approve(run.id, names.workspace)
    assert done.state is not None and done.state.name == "Deployed", done.state
    assert _submitted(other, run.id) >= 1, "the other worker ran the resumed deploy"
    assert _results_bucket(env), "the task results the resumed run reused are in S3"
    if started_on is env.worker:
        env.worker = other
    replacement = env.add_worker("worker-c")
    assert replacement.proc.poll() is None


def test_ten_concurrent_deploys_over_ten_workspaces(two_workers: DeployEnv) -> None:
    """Ten deploys at once on two workers and PostgreSQL. (Two versions of one workspace at once are not two
    deploys any more: the newest wins, tests/test_event_stream.py.)"""
    env = two_workers
    names = env.service()
    workspaces = [names.workspace] + [f"{names.workspace}-{i}" for i in range(1, 10)]
    for workspace in workspaces[1:]:
        env.workspace(workspace, follows=f"{names.namespace}@latest", stack="examples/stacks/local")
    env.build(names)
    v1 = env.registry.registry().last_version(names.namespace)
    server_log_before = env.server.process.log_path.stat().st_size

    runs = {env.deploy(ws, v1).id: ws for ws in workspaces}
    answered: set[tuple[Any, str | None]] = set()

    def all_ended() -> bool:
        ended = 0
        for run_id, workspace in runs.items():
            state = env.read(run_id).state
            if state is None:
                continue
            if state.type.value in ENDED:
                ended += 1
            elif state.type.value == "PAUSED" and (run_id, state.state_details.pause_key) not in answered:
                env.answer(run_id, env.plan_sha(workspace, run_id), approver="team")
                answered.add((run_id, state.state_details.pause_key))
        return ended == len(runs)

    wait_until(all_ended, timeout=900, interval=0.5, message="not every concurrent deploy ended")

    outcomes = {run_id: env.read(run_id).state for run_id in runs}
    not_deployed = {
        f"{runs[run_id]} {run_id}": (state.name, state.message) if state else None
        for run_id, state in outcomes.items()
        if state is None or state.name != "Deployed"
    }
    assert not_deployed == {}
    for workspace in workspaces:
        assert env.holder(workspace) is None, f"{workspace} was left held"
    with env.server.process.log_path.open("rb") as log:
        log.seek(server_log_before)
        errors = [
            line for line in log.read().decode(errors="replace").splitlines() if _DATABASE_LOCK_ERRORS.search(line)
        ]
    assert errors == [], errors
