"""The warm worker (prefect_patches/warm_worker.py): what it preloads, which events it acts on, how it accounts
for slots, and that a run never executes project code older than what is on disk. Every deploy in the end-to-end tests
runs through it; these are the parts those tests cannot reach on purpose."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import anyio
import prefect.workers.base
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.events import Event
from prefect.exceptions import Pause
from prefect.states import Paused, Pending, Running, Scheduled, Suspended
from prefect.workers.process import ProcessWorker

from examples.local_env import PrefectServer
from icd.paths import PROJECT_ROOT
from icd.worker_settings import LONGEST_STOP_SECONDS
from prefect_patches.warm_worker import WarmProcessWorker, _schedules_a_run, _suspends_a_run, flow_modules
from tests.waiting import wait_until

# --- which modules the fork server preloads ------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefect_yaml", "expected"),
    [
        ("deployments:\n  - entrypoint: flows/a.py:a\n  - entrypoint: flows/b.py:b\n", ["flows.a", "flows.b"]),
        ("deployments:\n  - entrypoint: flows/a.py:a\n  - entrypoint: flows/a.py:other\n", ["flows.a"]),
        ("deployments:\n  - entrypoint: /abs/a.py:a\n  - entrypoint: pkg.module:f\n", []),
        ("deployments:\n  - name: no-entrypoint\n  -\n", []),
        ("deployments: [", []),  # broken YAML: preload nothing, the runs still work cold
        ("", []),
    ],
    ids=["two-flows", "one-module-twice", "absolute-or-not-a-file", "no-entrypoint", "broken-yaml", "empty"],
)
def test_flow_modules_are_the_entrypoints_of_prefect_yaml(
    tmp_path: Path, prefect_yaml: str, expected: list[str]
) -> None:
    (tmp_path / "prefect.yaml").write_text(prefect_yaml)
    assert flow_modules(tmp_path) == expected


def test_flow_modules_without_prefect_yaml_is_empty(tmp_path: Path) -> None:
    assert flow_modules(tmp_path) == []


def test_the_projects_own_flows_are_preloaded() -> None:
    modules = flow_modules(PROJECT_ROOT)
    assert {"flows.build_artifact", "flows.deploy_artifact", "flows.consul_health"} <= set(modules)


# --- which events it acts on ------------------------------------------------------------------------------


def _state_event(run_id: uuid.UUID, state_type: str, name: str) -> Event:
    return Event(
        event=f"prefect.flow-run.{name}",
        resource={"prefect.resource.id": f"prefect.flow-run.{run_id}"},
        payload={"validated_state": {"type": state_type, "name": name}},
    )


@pytest.mark.parametrize(
    ("state_type", "name", "schedules", "suspends"),
    [
        ("SCHEDULED", "Scheduled", True, False),
        ("SCHEDULED", "Resuming", True, False),  # an approval answered
        ("SCHEDULED", "AwaitingRetry", True, False),
        ("PAUSED", "Suspended", False, True),  # its process is ending
        ("PAUSED", "Paused", False, False),  # waits in its process: its slot stays taken
        ("RUNNING", "Running", False, False),
        ("COMPLETED", "Completed", False, False),
    ],
)
def test_events_that_start_a_poll_or_free_a_slot(state_type: str, name: str, schedules: bool, suspends: bool) -> None:
    run_id = uuid.uuid4()
    event = _state_event(run_id, state_type, name)
    assert _schedules_a_run(event) is schedules
    assert _suspends_a_run(event) == (run_id if suspends else None)


def test_an_event_without_a_state_is_neither() -> None:
    event = Event(
        event="prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}"}
    )
    assert not _schedules_a_run(event)
    assert _suspends_a_run(event) is None


# --- slots: a suspended run's slot is given back once, and only while it is suspended -----------------------


class _Runs:
    """The one API call the slot release makes: the run's current state."""

    def __init__(self) -> None:
        self.states: dict[uuid.UUID, Any] = {}

    async def read_flow_run(self, flow_run_id: uuid.UUID) -> FlowRun:
        return FlowRun(id=flow_run_id, flow_id=uuid.uuid4(), state=self.states[flow_run_id])


def _worker(limit: int) -> tuple[WarmProcessWorker, _Runs]:
    worker = WarmProcessWorker(work_pool_name="unit", limit=limit)
    runs = _Runs()
    worker._client = runs  # type: ignore[assignment]
    worker._limiter = anyio.CapacityLimiter(limit)
    return worker, runs


def test_a_suspended_runs_slot_is_freed_at_once_and_its_late_release_is_not_counted_twice() -> None:
    async def scenario() -> None:
        worker, runs = _worker(limit=1)
        limiter = worker._limiter
        assert limiter is not None
        run_id = uuid.uuid4()
        limiter.acquire_on_behalf_of_nowait(run_id)  # the first process of the run
        worker._running[run_id] += 1
        runs.states[run_id] = Suspended()

        await worker._release_suspended(run_id)
        assert limiter.borrowed_tokens == 0, "the suspended run kept its slot while its process tore down"

        limiter.acquire_on_behalf_of_nowait(run_id)  # resumed before the first process ended
        worker._running[run_id] += 1
        worker._release_limit_slot(run_id)  # the first process ends: its release was already given
        assert limiter.borrowed_tokens == 1, "the first process's late release freed the resumed run's slot"
        worker._release_limit_slot(run_id)  # the resumed process ends
        assert limiter.borrowed_tokens == 0

    anyio.run(scenario)


@pytest.mark.parametrize(
    "current",
    [Pending(), Running(), Paused(), None],
    ids=["resumed-and-pending", "resumed-and-running", "paused-in-process", "no-state"],
)
def test_a_late_suspended_event_frees_no_slot(current: Any) -> None:
    async def scenario() -> None:
        worker, runs = _worker(limit=1)
        limiter = worker._limiter
        assert limiter is not None
        run_id = uuid.uuid4()
        limiter.acquire_on_behalf_of_nowait(run_id)
        worker._running[run_id] += 1
        runs.states[run_id] = current

        await worker._release_suspended(run_id)
        assert limiter.borrowed_tokens == 1

    anyio.run(scenario)


def test_a_run_this_worker_does_not_run_frees_no_slot() -> None:
    async def scenario() -> None:
        worker, runs = _worker(limit=2)
        limiter = worker._limiter
        assert limiter is not None
        mine, theirs = uuid.uuid4(), uuid.uuid4()
        limiter.acquire_on_behalf_of_nowait(mine)
        runs.states[theirs] = Suspended()
        await worker._release_suspended(theirs)
        assert limiter.borrowed_tokens == 1

    anyio.run(scenario)


def test_a_run_that_asks_anew_before_it_is_submitted_is_left_waiting_and_the_worker_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A poll saw the run Scheduled (resumed by a refused answer); by the time the worker proposes Pending the
    run has suspended again, and the server answers with a Pause (CI: the whole worker ended on it)."""

    async def refused(*args: object, **kwargs: object) -> None:
        raise Pause(
            "This run cannot transition to the StateType.PENDING state from the StateType.PAUSED state.",
            state=Paused(),
        )

    monkeypatch.setattr(prefect.workers.base, "propose_state", refused)

    async def scenario() -> None:
        worker, _ = _worker(limit=1)
        run = FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), state=Scheduled())
        with pytest.raises(Pause):  # Prefect's own worker lets it out of its task group
            await ProcessWorker._propose_pending_state(worker, run)
        assert await worker._propose_pending_state(run) is False  # not submitted now; Prefect frees its slot

    anyio.run(scenario)


# --- the fork server: in its own interpreter, as the worker starts it ------------------------------------


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_a_module_that_fails_to_preload_is_reported_and_a_run_forked_as_the_worker_forks_it_starts_warm(
    tmp_path: Path,
) -> None:
    (tmp_path / "brokenflows").mkdir()
    (tmp_path / "brokenflows" / "__init__.py").write_text("")
    (tmp_path / "brokenflows" / "bad.py").write_text("raise ValueError('boom at import')\n")
    (tmp_path / "prefect.yaml").write_text("deployments:\n  - entrypoint: brokenflows/bad.py:f\n")
    run_dir = tmp_path / "run"  # a deployment without a working directory runs in a new temporary one
    run_dir.mkdir()
    # What icd-worker does before its fork server (the runs' heartbeat), and the environment it gives a run.
    result = _python(
        f"""
        import uuid
        from pathlib import Path
        from cli.worker import heartbeat_for_runs, leave_version_check_to_the_worker
        from prefect_patches.warm_worker import _FORKS, run_environment, start_fork_server
        from tests.forked_probe import report_run_start
        heartbeat_for_runs()
        leave_version_check_to_the_worker()
        print(start_fork_server(Path({str(tmp_path)!r})))
        receiver, sender = _FORKS.Pipe(duplex=False)
        environment = run_environment({{"ICD_WORKSPACE": "staging"}}, uuid.uuid4(), {{}})
        child = _FORKS.Process(target=report_run_start, args=(environment, {str(run_dir)!r}, sender))
        child.start()
        sender.close()
        print(receiver.recv())
        child.join()
        print("exit", child.exitcode)
        """,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "{'brokenflows.bad': 'ValueError: boom at import'}" in result.stdout
    assert "exit 0" in result.stdout
    # Its start takes the fork server's settings (prefect_patches/settings_reuse.py) and sends the pull step's
    # event through its events worker (prefect_patches/pull_step_events.py); its end will not wait for its
    # heartbeat thread (heartbeat_stop.py); what the fork server loaded is frozen (fork_server_preload.py).
    assert "'settings': \"the fork server's\"" in result.stdout
    assert "'pull-step event': \"through the run's events worker\"" in result.stdout
    assert "'heartbeat thread': 'not waited for'" in result.stdout
    assert "'inherited heap': 'frozen'" in result.stdout
    assert "'server version check': 'left to the worker'" in result.stdout


@pytest.mark.parametrize(("operator_set", "run_env"), [(None, "False"), (True, None), (False, None)])
def test_runs_leave_the_version_check_to_the_worker_unless_the_operator_set_it(
    monkeypatch: pytest.MonkeyPatch, operator_set: bool | None, run_env: str | None
) -> None:
    from prefect.settings import PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED, temporary_settings

    from cli.worker import VERSION_CHECK_ENV, leave_version_check_to_the_worker

    monkeypatch.setenv(VERSION_CHECK_ENV, "recorded")  # so that the end of the test puts the environment back
    monkeypatch.delenv(VERSION_CHECK_ENV)
    updates = {PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED: operator_set} if operator_set is not None else {}
    with temporary_settings(updates=updates):  # as if set in a profile: only the settings say so
        leave_version_check_to_the_worker()
    assert os.environ.get(VERSION_CHECK_ENV) == run_env


def test_a_run_imports_project_code_changed_since_the_fork_server_loaded_it(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text("")
    (tmp_path / "service" / "steps.py").write_text("VERSION = 1\n")
    (tmp_path / "service" / "other.py").write_text("OTHER = 1\n")
    result = _python(
        f"""
        import os, sys, time
        os.environ["ICD_WORKER_PROJECT_DIR"] = {str(tmp_path)!r}
        os.environ["ICD_WORKER_PRELOAD"] = "service.steps,service.other"
        import prefect_patches.fork_server_preload  # what the fork server does
        from prefect_patches.warm_worker import _forget_changed_project_modules
        import service.steps
        assert service.steps.VERSION == 1

        _forget_changed_project_modules({str(tmp_path)!r})  # nothing changed: stays loaded
        print("unchanged kept:", "service.steps" in sys.modules)

        path = {str(tmp_path / "service" / "steps.py")!r}
        with open(path, "w") as source:
            source.write("VERSION = 2\\n")
        later = time.time() + 5
        os.utime(path, (later, later))
        _forget_changed_project_modules({str(tmp_path)!r})
        print("changed dropped:", "service.steps" not in sys.modules, "service.other" not in sys.modules)
        import service.steps
        print("version now:", service.steps.VERSION)
        print("prefect kept:", "prefect" in sys.modules)
        """,
        cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "unchanged kept: True" in result.stdout
    assert "changed dropped: True True" in result.stdout  # the whole project: modules import each other
    assert "version now: 2" in result.stdout
    assert "prefect kept: True" in result.stdout
    assert "project code changed since the worker started (service.steps)" in result.stderr


# --- its stop -----------------------------------------------------------------------------------------------


def test_a_worker_started_in_the_background_of_a_script_stops_on_sigterm(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """`icd-worker &` in a script inherits SIGINT ignored (a shell does that to asynchronous commands), and
    Prefect's stop is a SIGINT the worker sends itself on SIGTERM: the worker must still stop."""
    log = tmp_path / "worker.log"
    ignoring_sigint_then_the_worker = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, '-m', 'cli.worker', *sys.argv[1:]])"
    )
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-c", ignoring_sigint_then_the_worker, "--pool", f"stop-{uuid.uuid4().hex[:6]}"],
            cwd=PROJECT_ROOT,
            env={**os.environ, **prefect_server.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: "started!" in log.read_text(), timeout=120, message="the worker never started")
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=LONGEST_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the worker:\n{log.read_text()[-2000:]}")
        assert "stopped" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
