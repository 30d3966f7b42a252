"""The project's promises, pushed on as an attacker and a clumsy operator would: what was approved is what
runs, one apply at a time, no secret leaves its block, every failure is told. End to end, on the real loop.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blocks.registry import ArtifactRegistry
from examples.local_env import recorded_task_runs, run_logs
from icd import operations
from icd.config import load_config
from icd.notify.slack import SERVER_ERROR_RETRIES
from tests.helpers import consul_instances, parent_pid, processes, run_artifacts, terraform_applying, told
from tests.plugins.deploy_env import ENDED, DeployEnv, Names
from tests.waiting import wait_until

FIXTURES = Path(__file__).parent / "fixtures"


def _failed_and_told(env: DeployEnv, names: Names, run: Any, error: str, *, lock_store_down: bool = False) -> str:
    done = env.wait_for(run.id, states=ENDED)
    assert done.state is not None
    assert done.state.type.value == "FAILED", done.state
    if not lock_store_down:  # the lock lives beside the state in S3: with S3 down it is checked once S3 is back
        assert env.holder(names.workspace) is None, "the lock is released on the failure path"
    assert consul_instances(env, names.service_name) == [], "nothing was deployed"
    wait_until(lambda: told(env, f"Deploy failed on {names.workspace}: {error}"), timeout=30)
    return done.state.message or ""


# --- 1. integrity: the image and the registry's records -------------------------------------------------------


def test_a_manifest_rewritten_in_s3_then_a_doctored_image_are_each_refused_naming_what_changed(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service()
    env.build(names)
    key = f"{env.registry.prefix}namespaces/{names.namespace}/versions/00000001.json"
    s3 = env.registry.s3_client()
    signed = s3.get_object(Bucket=env.registry.bucket, Key=key)["Body"].read()
    envelope = json.loads(signed)
    envelope["payload"]["artifacts"]["local"] = "/tmp/somewhere-else.tar.gz"  # an attacker's path
    s3.put_object(Bucket=env.registry.bucket, Key=key, Body=json.dumps(envelope).encode())

    message = _failed_and_told(env, names, env.deploy(names.workspace, 1), "RegistryIntegrityError")
    assert key in message

    s3.put_object(Bucket=env.registry.bucket, Key=key, Body=signed)  # the record as signed; now the image
    record = env.registry.registry().get(names.namespace, 1)
    Path(record.artifacts["local"]).write_bytes(b"a doctored image")

    message = _failed_and_told(env, names, env.deploy(names.workspace, 1), "ArtifactIntegrityError")
    assert f"{names.namespace} v1" in message
    assert record.artifact_sha256["local"] in message


def test_an_image_swapped_during_the_approval_wait_is_not_applied(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    record = env.registry.registry().get(names.namespace, version)
    Path(record.artifacts["local"]).write_bytes(b"swapped after the plan was approved")
    env.answer(run.id, env.plan_sha(names.workspace, run.id))
    _failed_and_told(env, names, run, "ArtifactIntegrityError")


# The automatic rollback verifies its image like a forward deploy: tests/test_deploy.py, in the unhealthy deploy's
# test, which has the rollback's v1 at hand.


# --- 6, 8, 10. the registry moving under a waiting plan; storage failing on resume --------------------------


def test_a_channel_moved_during_the_wait_is_not_undone(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    env.repo.commit(
        "hotfix",
        {"src/app.py": env.repo.read("src/app.py") + f"\n# hotfix {names.workspace}\n"},
        branch=f"hotfix-{names.workspace}",
    )
    env.build(names, f"hotfix-{names.workspace}")
    hotfix = env.registry.registry().last_version(names.namespace)
    operations.promote(
        env.registry.registry(),
        env.registry.workspace_queue(),
        load_config(),
        names.namespace,
        hotfix,
        names.workspace,
        by="bob",
        why="hotfix",
    )
    env.answer(run.id, env.plan_sha(names.workspace, run.id))
    done = env.wait_for(run.id, states=ENDED)
    assert done.state is not None
    assert done.state.name == "StalePlan", done.state
    history = env.registry.registry().channel_history(names.namespace, names.workspace)
    assert [move.to_version for move in history] == [hotfix], "the hotfix promoted meanwhile stands"
    assert version != hotfix


def test_a_version_revoked_during_the_wait_is_not_applied_and_the_lock_is_released(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    env.registry.registry().revoke(names.namespace, version, revoked_by="sec", reason="CVE-2026-9")
    env.answer(run.id, env.plan_sha(names.workspace, run.id))
    message = _failed_and_told(env, names, run, "RevokedVersionError")
    assert "CVE-2026-9" in message


def test_storage_down_on_resume_fails_told_and_unlocked(deploy_env: DeployEnv) -> None:
    from examples.local_env import free_port

    env = deploy_env
    names = env.service()
    run, _ = env.deploy_until_paused(names)
    sha = env.plan_sha(names.workspace, run.id)
    healthy = ArtifactRegistry.load("registry")
    broken = ArtifactRegistry.load("registry")
    broken.aws_credentials.aws_client_parameters.endpoint_url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    broken.save("registry", overwrite=True)
    try:
        env.answer(run.id, sha)
        _failed_and_told(env, names, run, "RegistryStorageError", lock_store_down=True)
    finally:
        healthy.save("registry", overwrite=True)
    # S3 holds the lock too, so it could not be released then; its holder's run has ended, so it holds nothing:
    # the next request takes the workspace at once.
    queue = env.registry.workspace_queue()
    held = queue.holder(names.workspace)
    assert held is None or queue.holder_dead(held, datetime.now(UTC)), "a failed run's lock must not stop the next"


# --- 9. Slack never decides an outcome ----------------------------------------------------------------------


def test_a_slack_outage_blocks_neither_the_approval_nor_the_final_state(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    env.build(names)
    # Every try of the "plan waiting" post fails (the notifier retries a 5xx SERVER_ERROR_RETRIES times).
    env.slack.fail_next(SERVER_ERROR_RETRIES + 1, status=503)
    run = env.deploy(names.workspace, 1)
    env.wait_for(run.id, states={"PAUSED"})
    env.slack.fail_next(SERVER_ERROR_RETRIES + 1, status=503)  # and the "deployed" post after the apply too
    done = env.approve(run.id, names.workspace)
    assert done.state is not None
    assert done.state.name == "Deployed", done.state
    # Both messages arrive later, through deliver-notification runs.
    wait_until(lambda: told(env, "Plan waiting for approval", names.workspace), timeout=90)
    wait_until(lambda: told(env, "Deployed", names.workspace), timeout=90)
    assert env.runs_of("deliver-notification"), "redelivery is a visible flow run"


# --- 7. one apply at a time, and a worker that dies mid-apply ----------------------------------------------


def _approved_into_a_slow_apply(env: DeployEnv) -> tuple[Names, Any, list[int]]:
    """A deploy approved and applying a stack whose apply takes a while: its names, run and terraform pids."""
    names = env.service(stack=str(FIXTURES / "terraform" / "slow_deploy"))
    run, _ = env.deploy_until_paused(names)
    env.answer(run.id, env.plan_sha(names.workspace, run.id))
    applying = wait_until(lambda: terraform_applying(env.icd_home, str(run.id)), timeout=120)
    return names, run, applying


def _assert_stopped_crashed_told_and_unlocked(env: DeployEnv, names: Names, run: Any) -> None:
    wait_until(lambda: not terraform_applying(env.icd_home, str(run.id)), timeout=60, message="terraform kept applying")
    crashed = env.wait_for(run.id, states={"CRASHED"}, timeout=300)
    assert crashed.state is not None
    wait_until(lambda: told(env, f"Deploy run crashed on {names.workspace}"), timeout=120)
    assert env.holder(names.workspace) is None


def test_a_worker_killed_mid_apply_leaves_a_crashed_run_no_orphan_and_no_lock(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names, run, [terraform] = _approved_into_a_slow_apply(env)
    supervisor = parent_pid(terraform)  # the flow's process
    os.kill(supervisor, signal.SIGKILL)
    _assert_stopped_crashed_told_and_unlocked(env, names, run)


def test_a_worker_stopped_mid_apply_stops_the_run_which_ends_crashed_and_unlocked(deploy_env: DeployEnv) -> None:
    """A worker stopped by its service manager (SIGTERM to its process group) stops the runs it is running,
    as Prefect's process worker does; deploy-ended then releases the workspace and tells."""
    env = deploy_env
    names, run, _ = _approved_into_a_slow_apply(env)
    env.restart_worker()
    _assert_stopped_crashed_told_and_unlocked(env, names, run)


# --- 2 and the secret scan: no secret leaves its block ---------------------------------------------------------


def test_no_secret_leaves_its_block_in_a_full_cycle(deploy_env: DeployEnv) -> None:
    env = deploy_env
    canaries = env.secrets()
    seen_in_argv: list[str] = []
    stop = threading.Event()

    def sample_argv() -> None:
        while not stop.is_set():
            for process in processes():
                cmdline = process.cmdline.decode(errors="replace")
                seen_in_argv.extend(name for name, value in canaries.items() if value in cmdline)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample_argv, daemon=True)
    sampler.start()
    try:
        names = env.service()
        run, version = env.deploy_until_paused(names)
        assert env.approve(run.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]
    finally:
        stop.set()
        sampler.join(timeout=10)
    assert seen_in_argv == [], "a secret was visible in a process's arguments"

    def leaks(where: str, text: str) -> list[str]:
        return [f"{name} in {where}" for name, value in canaries.items() if value in text]

    found: list[str] = []
    task_runs = recorded_task_runs(run.id)  # first: it waits until the run's last log lines are in, too
    logs = run_logs(run.id)
    found += leaks("the run's logs", "\n".join(log.message for log in logs))
    found += leaks("artifacts", json.dumps([a.data for a in run_artifacts(run.id)], default=str))
    found += leaks("task runs", json.dumps([t.model_dump(mode="json") for t in task_runs], default=str))
    database = env.server.home / "prefect.db"
    if database.exists():
        with sqlite3.connect(database) as db:  # block documents are stored encrypted; nothing else holds secrets
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                if table == "block_document":
                    continue
                rows = db.execute(f'SELECT * FROM "{table}"').fetchall()  # noqa: S608  # table names from sqlite
                found += leaks(f"the Prefect database ({table})", repr(rows))
    found += leaks("notifications", json.dumps(env.slack.received()))
    found += leaks("notification webhooks", json.dumps(env.receiver.posts))
    s3 = env.registry.s3_client()
    for item in s3.list_objects_v2(Bucket=env.registry.bucket).get("Contents", []):
        body = s3.get_object(Bucket=env.registry.bucket, Key=item["Key"])["Body"].read()
        found += leaks(f"s3://{env.registry.bucket}/{item['Key']}", body.decode(errors="replace"))
    for log_file in (env.server.home / "logs").glob("*.log"):
        found += leaks(str(log_file.name), log_file.read_text(errors="replace"))
    instance = next((env.icd_home / "instances" / names.workspace).glob(f"{names.service_name}-*"))
    pid = int((instance / "app.pid").read_text())
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    found += leaks("the deployed instance's environment", environ)
    assert "AWS_" not in environ
    for path in instance.rglob("*"):
        if path.is_file():
            found += leaks(f"the instance's {path.name}", path.read_text(errors="replace"))
    assert found == [], found
    assert version == 1
