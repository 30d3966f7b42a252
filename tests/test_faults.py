"""Faults the loop must end cleanly, end to end on the real loop: S3 gone while a run waits for approval, and a
worker killed with its run in the middle of an apply, with the shipped settings (``icd.worker_settings``)."""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from botocore.exceptions import ClientError, EndpointConnectionError
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from pydantic import SecretStr

from cli.setup import check_zombie_window
from examples.local_env import api_client, free_port, start_worker, worker_env
from icd.paths import PROJECT_ROOT
from icd.worker_settings import HEARTBEAT_ENV, HEARTBEAT_SECONDS, ZOMBIE_AFTER_SECONDS
from tasks import policies
from tasks.policies import _is_missing, _recorded, once_per_run
from tests.helpers import consul_instances as _services
from tests.helpers import parent_pid as _parent_pid
from tests.helpers import terraform_applying as _terraform_applying
from tests.helpers import told as _told
from tests.plugins.deploy_env import ENDED, POOL, DeployEnv
from tests.waiting import wait_until

import flows.deploy_artifact as deploy_module  # isort: skip

FIXTURES = Path(__file__).parent / "fixtures"
# From the answer to the final state with S3 gone: the worker's pick-up, the record asked for 30 s (plus the
# S3 client's own retries), one release try, the notice (docs/operations.md, "S3 unreachable").
S3_FAULT_ENDS_WITHIN_SECONDS = 180
NOTICED_WITHIN_SECONDS = 90


def _logged(env: DeployEnv, run_id: object, fragment: str) -> list[str]:
    return [log.message for log in env.logs(run_id) if fragment in log.message]


def test_s3_unreachable_at_resume_fails_the_run_naming_it_tells_and_releases_once_s3_is_back(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    link = env.s3_link
    assert link is not None
    names = env.service()
    run, _ = env.deploy_until_paused(names)
    sha = env.plan_sha(names.workspace, run.id)
    holder = env.holder(names.workspace)
    assert holder is not None
    assert holder.run_id == str(run.id)
    link.cut()  # every process of the loop loses S3: the run's results, the queue, the registry, the state
    try:
        answered = time.monotonic()
        env.answer(run.id, sha)
        done = env.wait_for(run.id, states=ENDED, timeout=S3_FAULT_ENDS_WITHIN_SECONDS + 60)
        took = time.monotonic() - answered
        assert done.state is not None
        assert done.state.type.value == "FAILED", done.state
        assert took <= S3_FAULT_ENDS_WITHIN_SECONDS, f"the run took {took:.0f} s to end on S3's fault"
        message = done.state.message or ""
        assert "the run's result store failed: the record of step 'claim' could not be read" in message, message
        assert "EndpointConnectionError" in message, message
        assert "deploy-ended releases it once S3 answers" in message, message
        told = wait_until(lambda: _told(env, f"Deploy failed on {names.workspace}: RunRecordStoreError"), timeout=60)
        assert "could not be read" in told[0]
        # deploy-ended could not release it either while S3 was gone
        ended = wait_until(lambda: env.runs_of("deploy-ended", flow_run_id=str(run.id)), timeout=60)
        wait_until(
            lambda: _logged(env, ended[0].id, "could not be released yet"),
            timeout=180,
            message="deploy-ended never tried the release while S3 was gone",
        )
        assert link.is_cut
    finally:
        link.restore()
    wait_until(lambda: env.holder(names.workspace) is None, timeout=180, message="not released once S3 was back")
    # Nothing was claimed, planned, asked or applied again: the resumed run only read, and failed to.
    assert not (env.icd_home / "runs" / f"{run.id}-apply").exists(), "an apply was started"
    assert _services(env, names.service_name) == []
    assert len(_logged(env, run.id, f"holding workspace {names.workspace}")) == 1
    assert len(_told(env, "Plan waiting for approval", names.workspace)) == 1
    finished = env.wait_for(ended[0].id, states=ENDED, timeout=60)
    assert finished.state is not None
    assert finished.state.type.value == "COMPLETED", finished.state


def test_a_worker_killed_with_its_run_mid_apply_is_noticed_within_90_s_released_and_told(
    deploy_env: DeployEnv,
) -> None:
    """The shipped settings (a heartbeat every 30 s from icd-worker, icd-zombie-runs after 70 s), not a test's.
    A run that ended under a name of its own before the kill is left alone meanwhile."""
    env = deploy_env
    assert "ICD_ZOMBIE_AFTER_SECONDS" not in os.environ
    names = env.service(stack=str(FIXTURES / "terraform" / "slow_deploy"))
    run, version = env.deploy_until_paused(names)
    sha = env.plan_sha(names.workspace, run.id)
    # The same version asked for again while it awaits approval: that run ends at once, under a name of ours.
    again = env.deploy(names.workspace, version)
    ended_again = env.wait_for(again.id, states=ENDED, timeout=120)
    assert ended_again.state is not None
    assert ended_again.state.name not in {"Completed", "Cancelled", "Failed"}, ended_again.state
    # The run resumes on a worker of its own, killed with it; another one then runs deploy-ended.
    env.worker.stop()
    doomed = start_worker(env.server, POOL, env=env.worker_env, name=f"doomed-{uuid.uuid4().hex[:6]}")
    env.workers.append(doomed)
    try:
        env.answer(run.id, sha)
        [terraform] = wait_until(lambda: _terraform_applying(env.icd_home, str(run.id)), timeout=180)
        flow_process = _parent_pid(terraform)
        killed_at = datetime.now(UTC)
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(flow_process, signal.SIGKILL)
    finally:
        env.worker = start_worker(env.server, POOL, env=env.worker_env, name=f"worker-{uuid.uuid4().hex[:6]}")
        env.workers.append(env.worker)
    wait_until(
        lambda: not _terraform_applying(env.icd_home, str(run.id)), timeout=60, message="terraform kept applying"
    )
    crashed = env.wait_for(run.id, states={"CRASHED", *ENDED}, timeout=NOTICED_WITHIN_SECONDS + 60)
    assert crashed.state is not None
    assert crashed.state.type.value == "CRASHED", crashed.state
    noticed = (crashed.state.timestamp - killed_at).total_seconds()
    assert noticed <= NOTICED_WITHIN_SECONDS, f"the dead run was noticed after {noticed:.0f} s"
    assert "No heartbeat for 70 s" in (crashed.state.message or "")
    wait_until(lambda: _told(env, f"Deploy run crashed on {names.workspace}"), timeout=120)
    wait_until(lambda: env.holder(names.workspace) is None, timeout=60, message="the workspace stayed held")
    # The automation acted on the dead run; the other run's window (it began earlier: that run ended before the
    # answer) had closed by then, and its ending closed it: nothing was tried on it (it used to be, and fail).
    wait_until(
        lambda: "prefect.automation.action.executed" in _zombie_actions(run.id),
        timeout=60,
        message="the automation's action on the dead run was never recorded",
    )
    assert _zombie_actions(again.id) == [], f"icd-zombie-runs acted on run {again.name}, which had ended"


def test_a_bug_in_a_deploy_is_told_releases_the_workspace_and_still_fails_the_run(
    deploy_env: DeployEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception the code does not expect (here: the deploy step raising KeyError) is not a fault it knows,
    but operators hear of it as of one, and the workspace is free for the next request. The notice names the
    error's type only; the run still ends Failed with the error itself, for its traceback."""
    env = deploy_env
    names = env.service()
    env.build(names)
    version = env.registry.registry().last_version(names.namespace)

    def bug(ctx: object, mine: object) -> NoReturn:
        raise KeyError("text a notice must not carry")

    monkeypatch.setattr(deploy_module, "deploy", bug)
    with pytest.raises(KeyError, match="text a notice must not carry"):
        deploy_module.deploy_artifact(workspace=names.workspace, version=version)  # this process runs it
    [notice] = wait_until(lambda: _told(env, f"Deploy failed on {names.workspace}: UnexpectedError"), timeout=30)
    assert "KeyError raised by deploy-artifact" in notice
    assert "text a notice must not carry" not in notice
    assert env.holder(names.workspace) is None, "the workspace is free for the next request"


def _zombie_actions(run_id: object) -> list[str]:
    """The automation actions the server recorded on run ``run_id`` as their target, by event name."""
    page = api_client().read_events(
        filter=EventFilter(
            event=EventNameFilter(prefix=["prefect.automation.action."]),
            related=EventRelatedFilter(resources_in_roles=[(f"prefect.flow-run.{run_id}", "target")]),
        ),
        limit=50,
    )
    return [event.event for event in page.events]


# --- fast: the parts, each against the real thing ---------------------------------------------------------


def _results_bucket(endpoint: str, bucket: str) -> S3Bucket:
    parameters = AwsClientParameters(endpoint_url=endpoint, config={"retries": {"max_attempts": 1}})
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key=SecretStr("testing"),
        region_name="us-east-1",
        aws_client_parameters=parameters,
    )
    return S3Bucket(bucket_name=bucket, credentials=credentials)


def test_a_missing_record_is_absent_and_an_unreachable_store_is_a_fault(
    moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """Prefect's exists() says False for both; the deploy's read tells them apart (tasks/policies.py)."""
    s3 = ResultStore(result_storage=_results_bucket(moto_endpoint, s3_bucket))
    assert _recorded(s3, "icd-run-claim") is None
    s3.write({"claimed": True}, key="icd-run-claim")
    record = _recorded(s3, "icd-run-claim")
    assert record is not None
    assert record.result == {"claimed": True}
    unreachable = ResultStore(result_storage=_results_bucket(f"http://127.0.0.1:{free_port()}", s3_bucket))
    assert unreachable.exists("icd-run-claim") is False, "Prefect's own answer, which the deploy must not trust"
    with pytest.raises(EndpointConnectionError):
        _recorded(unreachable, "icd-run-claim")
    local = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    assert _recorded(local, "never-written") is None
    assert not _is_missing(ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"))
    assert not _is_missing(ValueError("Path /x is not a file."))


def test_a_stretch_asks_the_store_once_and_a_rerun_reads_its_record_once(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect's transaction alone asks ``exists`` (the whole object) and then reads it again on a re-run,
    and asks ``exists`` before a first write: 4 and 3 S3 requests through prefect-aws, where 2 and 2 do."""
    bucket = _results_bucket(moto_endpoint, s3_bucket)
    # A store of its own each time, as the re-run's new process has (a store keeps what it wrote in memory).
    monkeypatch.setattr(policies, "get_result_store", lambda: ResultStore(result_storage=bucket))
    sent: list[str] = []

    def count(request: Any, **_: Any) -> None:
        sent.append(request.method)

    client = bucket.credentials.get_client("s3")  # the client prefect-aws caches, and the store's reads use
    client.meta.events.register("before-send.s3", count)
    computed: list[str] = []

    def plan() -> dict[str, str]:
        computed.append("planned")
        return {"plan": "sha"}

    try:
        assert once_per_run("plan-and-ask", plan) == {"plan": "sha"}
        first, sent[:] = list(sent), []
        assert once_per_run("plan-and-ask", plan) == {"plan": "sha"}, "the re-run takes the record"
        rerun = list(sent)
    finally:
        client.meta.events.unregister("before-send.s3", count)
    assert computed == ["planned"]
    assert first == ["HEAD", "PUT"], "one miss, then the write"
    assert rerun == ["HEAD", "GET"], "one read (prefect-aws downloads with a HEAD and a GET)"


# The state constructors a run ends through under a name of its own (``finish`` builds them from an Outcome).
_ENDING_CALLS = {"Completed", "Cancelled", "Failed", "Crashed", "end_waiting_run"}


def _state_names_runs_end_with() -> set[str]:
    """Every state name our code gives a run's last state: the Outcomes' names (``Outcome(kind, name, ...)``)
    and the ``name=`` of the state constructors, as written in flows/, tasks/ and icd/ (a literal, or a
    module constant); a name passed through from a caller is counted where the caller writes it."""
    names: set[str] = set()
    sources = [*(PROJECT_ROOT / "flows").glob("*.py"), *(PROJECT_ROOT / "tasks").glob("*.py")]
    for path in [*sources, *(PROJECT_ROOT / "icd").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            func = call.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            given: list[ast.expr] = []
            if called == "Outcome" and len(call.args) >= 2:
                given.append(call.args[1])
            if called in _ENDING_CALLS:
                given += [keyword.value for keyword in call.keywords if keyword.arg == "name"]
            for value in given:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    names.add(value.value)
                elif isinstance(value, ast.Name) and value.id in constants:
                    names.add(constants[value.id])
    return names


def test_a_run_that_ends_under_a_name_of_its_own_is_not_taken_for_a_dead_one() -> None:
    """Prefect names a state's event after the state's *name* (``prefect.flow-run.Deployed``), so icd-zombie-runs
    must expect each name a run of ours can end with: a run that ended ``Deployed`` is otherwise still awaited,
    and 70 s after its last heartbeat the automation tries to crash it (Prefect refuses: a failed action and a
    WARNING each time). Listed by name, never ``prefect.flow-run.*``: that would also take a pull step's event
    for a sign of life, and a run that died just after it would never be crashed."""
    automations = yaml.safe_load((PROJECT_ROOT / "automations.yaml").read_text(encoding="utf-8"))
    [zombies] = [automation for automation in automations["automations"] if automation["name"] == "icd-zombie-runs"]
    expected = set(zombies["trigger"]["expect"])
    ours = _state_names_runs_end_with()
    # The collector itself: it must find the names we know of, or the check below proves nothing.
    assert {"Deployed", "Rejected", "Superseded", "Queued", "Reused", "Duplicate", "ApprovalTimedOut"} <= ours
    stock = {"Completed", "Failed", "Cancelled", "Crashed", "TimedOut", "Suspended", "Paused"}
    missing = sorted(f"prefect.flow-run.{name}" for name in ours | stock if f"prefect.flow-run.{name}" not in expected)
    assert not missing, f"icd-zombie-runs (automations.yaml) does not expect: {', '.join(missing)}"
    assert not [name for name in expected if "*" in name], "a wildcard would take any event for a heartbeat"


def test_the_shipped_settings_notice_a_dead_run_within_90_s(monkeypatch: pytest.MonkeyPatch) -> None:
    automations = (PROJECT_ROOT / "automations.yaml").read_text()
    assert f"${{ICD_ZOMBIE_AFTER_SECONDS:-{ZOMBIE_AFTER_SECONDS}}}" in automations
    assert automations.count("ICD_ZOMBIE_AFTER_SECONDS:-") == 2, "the window and its message"
    proactive_granularity = 5  # Prefect evaluates proactive automations every 5 s
    assert 2 * HEARTBEAT_SECONDS <= ZOMBIE_AFTER_SECONDS <= NOTICED_WITHIN_SECONDS - proactive_granularity - 10
    monkeypatch.delenv("ICD_ZOMBIE_AFTER_SECONDS", raising=False)
    assert worker_env(Path("/h"), Path("/c"))[HEARTBEAT_ENV] == str(HEARTBEAT_SECONDS)
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert f"{HEARTBEAT_ENV}={HEARTBEAT_SECONDS} icd-worker" in readme
    check_zombie_window()
    monkeypatch.setenv("ICD_ZOMBIE_AFTER_SECONDS", "45")
    with pytest.raises(SystemExit, match="at least 60"):
        check_zombie_window()
