"""The warm process worker: Prefect's process worker, but each flow run's process is forked from a server
that has already imported Prefect, boto3 and the project's flows, instead of starting a fresh interpreter.

A cold start costs 4-6 s on two cores (Prefect's workspace supervisor imports Prefect, then execs
``python -m prefect.engine``, which imports Prefect and the flow module again); a fork costs tens of
milliseconds. Everything else is the process worker's: the pool, its job template, polling, the
executor that tracks the process, proposes ``Crashed`` when it dies, and delivers cancellation over
Prefect's control channel. Only the step that starts the process differs, through the runner's own
``ProcessStarter`` seam (``prefect/runner/AGENTS.md``: "To add a new execution mode, implement the
ProcessStarter protocol and inject it into FlowRunExecutor"). Why, and what it costs: docs/decisions.md.

The fork server is ``multiprocessing``'s ``forkserver``: a single-threaded process started by the worker,
which imports ``prefect_patches.fork_server_preload`` (and through it the flows) once, and forks a child per
request. The child is a separate process, as a cold start is: a run that crashes takes nothing else down, and a run
survives its worker as before. What the child runs is Prefect's own engine entry point
(``prefect.engine`` as ``__main__``) with the run's environment, so a flow run behaves as it would cold.

The private Prefect and interpreter names it relies on are listed, with fingerprints, in ``seams.py``
(``tests/test_prefect_seams.py`` fails when one changes); ``prefect worker start --type process`` on the same
pool is the fallback (``tests/test_stock_worker.py`` runs a whole cycle on it).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import sys
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
import yaml
from prefect.client.orchestration import PrefectClient, get_client
from prefect.events import Event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.exceptions import Pause
from prefect.flows import load_flow_from_flow_run
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._process_manager import ProcessHandle
from prefect.settings import Settings, get_current_settings
from prefect.utilities.processutils import sanitize_subprocess_env
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from icd.worker_settings import KILL_GRACE_SECONDS, SUSPENDED_TEARDOWN_SECONDS, TERM_GRACE_SECONDS
from prefect_patches import PRELOAD_ENV, PROJECT_ENV
from prefect_patches.settings_reuse import settings_for_run

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from prefect.client.schemas.objects import FlowRun
    from prefect.runner._control_channel import ControlChannel

_FORKS = multiprocessing.get_context("forkserver")

# The (type, name) of a suspended run's state: its process is ending (``Paused`` waits in its process).
_SUSPENDED = ("PAUSED", "Suspended")


def _run_states_in(pool_id: UUID) -> EventFilter:
    return EventFilter(
        event=EventNameFilter(prefix=["prefect.flow-run."]),
        related=EventRelatedFilter(resources_in_roles=[(f"prefect.work-pool.{pool_id}", "work-pool")]),
    )


def _new_state(event: Event) -> tuple[str, str]:
    """The (type, name) of the state a flow-run state event reports, or empty strings."""
    validated = event.payload.get("validated_state")
    if not isinstance(validated, dict):
        return "", ""
    return str(validated.get("type") or ""), str(validated.get("name") or "")


def _schedules_a_run(event: Event) -> bool:
    """A flow-run state event whose new state is Scheduled (Scheduled, Resuming, AwaitingRetry, Late...)."""
    return _new_state(event)[0] == "SCHEDULED"


def _suspends_a_run(event: Event) -> UUID | None:
    """The run a ``Suspended`` state event is about."""
    if _new_state(event) != _SUSPENDED:
        return None
    try:
        return UUID(event.resource.id.removeprefix("prefect.flow-run."))
    except ValueError:
        return None


def flow_modules(project_dir: Path) -> list[str]:
    """The modules of every deployment's entrypoint in ``prefect.yaml`` (``flows/x.py:f`` -> ``flows.x``)."""
    try:
        document = yaml.safe_load((project_dir / "prefect.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    modules: list[str] = []
    for deployment in document.get("deployments") or []:
        path = str((deployment or {}).get("entrypoint", "")).partition(":")[0]
        if path.endswith(".py") and not Path(path).is_absolute():
            name = path.removesuffix(".py").replace("/", ".")
            if name not in modules:
                modules.append(name)
    return modules


# --- in the fork server's child: one flow run ----------------------------------------------------------


def run_engine(environment: dict[str, str], cwd: str) -> None:
    """One flow run's process, forked from the fork server: what ``python -m prefect.engine`` does."""
    # Like the cold path's own session: a signal to the worker's process group (Ctrl-C in its terminal)
    # does not reach the run before the worker has told it why.
    os.setsid()
    from prefect.context import SettingsContext, get_settings_context

    try:
        settings = enter_run(environment, cwd)
        with SettingsContext(profile=get_settings_context().profile, settings=settings), warnings.catch_warnings():
            # runpy warns that prefect.engine is already imported: it is, on purpose (that is the warm part).
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
    finally:
        _exit_like_the_interpreter()


def enter_run(environment: dict[str, str], cwd: str) -> Settings:
    """The forked process becomes the run's: its environment, directory and arguments, project code changed
    since the fork server imported it, and its Prefect settings. Settings were read when the fork server
    imported Prefect; the run's environment may differ (job variables). Prefect's run_flow_in_subprocess
    reads them again once it has set the environment; this takes the fork server's when they would be read
    from the same inputs (prefect_patches/settings_reuse.py)."""
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    sys.argv = [sys.argv[0]]  # the engine takes a run id from argv before the environment; not the worker's
    _forget_changed_project_modules(environment.get(PROJECT_ENV))
    return settings_for_run()


def _exit_like_the_interpreter() -> None:
    """A forkserver child ends in ``os._exit``, which skips what a normal interpreter exit runs: the
    threading exit hooks that drain Prefect's log and event queues, then ``atexit``. Run both, or the
    run's last log lines and events are lost."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own exit step; no public name
    atexit._run_exitfuncs()


def _forget_changed_project_modules(project: str | None) -> None:
    """Project code edited since the fork server imported it is imported again by this run (and by every
    run after it, until the worker restarts): a run never executes code older than what is on disk."""
    from prefect_patches.fork_server_preload import IMPORTED_AT  # the fork server's; this runs in its child

    if not project:
        return
    root = Path(project)
    # Only the project's own top-level packages and modules: asking every loaded module for its file would
    # also load the lazily imported ones.
    own = {entry.name for entry in root.iterdir() if (entry / "__init__.py").is_file()}
    own |= {entry.stem for entry in root.glob("*.py")}
    loaded = {
        name: file
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] in own and isinstance(file := getattr(module, "__file__", None), str)
    }
    changed = [name for name, file in loaded.items() if _modified_since(file, IMPORTED_AT)]
    if not changed:
        return
    logging.getLogger(__name__).warning(
        "project code changed since the worker started (%s%s); this run imports it again. Restart the worker "
        "to start warm again.",
        ", ".join(sorted(changed)[:5]),
        ", ..." if len(changed) > 5 else "",
    )
    for name in loaded:
        del sys.modules[name]


def _modified_since(file: str, moment: float) -> bool:
    try:
        return os.stat(file).st_mtime > moment
    except OSError:
        return True


# --- in the worker ------------------------------------------------------------------------------------


# Modules Prefect and boto3 import only when a run first calls a task or reads a result (py-spy over a bench
# cycle, 2026-12-05: about 40 ms of each run's start, 0.36 s over three cycles' nine processes).
_IMPORTED_AT_FIRST_USE = (
    "prefect.task_engine",
    "prefect.utilities.visualization",
    "boto3.s3.inject",
    "encodings.cp437",
)


def start_fork_server(project_dir: Path | None) -> dict[str, str]:
    """Start the fork server now and wait until it has imported everything, so the first run is warm too.

    Returns what it could not preload (module -> error): runs that need those import them themselves.
    """
    flows = flow_modules(project_dir) if project_dir else []
    modules = ["prefect.engine", "prefect.flow_engine", *_IMPORTED_AT_FIRST_USE, *flows, "prefect_patches.warm_worker"]
    os.environ[PRELOAD_ENV] = ",".join(modules)
    if project_dir:
        os.environ[PROJECT_ENV] = str(project_dir)
    _FORKS.set_forkserver_preload(["prefect_patches.fork_server_preload"])
    receiver, sender = _FORKS.Pipe(duplex=False)
    probe = _FORKS.Process(target=_report_preload_failures, args=(sender,), name="icd-worker-warm-up")
    probe.start()
    sender.close()
    failures: dict[str, str] = receiver.recv() if receiver.poll(timeout=300) else {}
    probe.join()
    if probe.exitcode != 0:
        raise RuntimeError(f"the warm worker's fork server could not start a process (exit code {probe.exitcode})")
    return failures


def _report_preload_failures(sender: Connection) -> None:
    from prefect_patches.fork_server_preload import FAILED  # the fork server's; this runs in its child

    sender.send(dict(FAILED))
    sender.close()


def run_environment(
    job_env: Mapping[str, str | None], flow_run_id: UUID, control_env: Mapping[str, str]
) -> dict[str, str]:
    """A run's environment, as Prefect's ``EngineCommandStarter`` builds it for ``python -m prefect.engine``: the
    worker's, the job's, the worker's settings written out, then the run's own keys."""
    environment: dict[str, str | None] = {
        **os.environ,
        **job_env,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT__FLOW_RUN_ID": str(flow_run_id),
        "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
        **control_env,
    }
    return sanitize_subprocess_env(environment)


class ForkedEngineStarter:
    """A ``ProcessStarter`` for Prefect's flow-run executor: the run's process is a fork of the fork server.

    The environment is built as Prefect's ``EngineCommandStarter`` builds it for ``python -m
    prefect.engine``: the job's environment, the worker's settings, then the run's own keys.
    """

    def __init__(
        self,
        *,
        cwd: Path,
        env: Mapping[str, str | None],
        control_channel: ControlChannel | None = None,
    ) -> None:
        self._cwd = cwd
        self._env = dict(env)
        self._control_channel = control_channel

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        control_env: dict[str, str] = {}
        control_registered = False
        if self._control_channel is not None:
            try:
                port, token = self._control_channel.register(flow_run.id)
            except RuntimeError:
                pass  # no loopback listener: Prefect falls back to kill-only cancellation, as cold
            else:
                control_env = {"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token}
                control_registered = True
        environment = run_environment(self._env, flow_run.id, control_env)
        handed_off = False
        try:
            process = _FORKS.Process(
                target=run_engine,
                args=(environment, str(self._cwd)),
                name=f"flow-run-{flow_run.id}",
            )
            await anyio.to_thread.run_sync(process.start)
            # multiprocessing joins its children when the worker exits; a flow run must outlive its worker,
            # as a cold start does, so the worker does not count it as one of its own.
            multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
            # ProcessHandle reads pid, exitcode and is_alive: any multiprocessing process has them.
            task_status.started(ProcessHandle(process))  # type: ignore[arg-type]
            handed_off = True
            # One thread joins (a forkserver child's exit status can be read once); waiting on it can be
            # abandoned, so a stopping worker gets to decide what happens to the run.
            exited = threading.Event()
            threading.Thread(target=_join_then_set, args=(process, exited), daemon=True).start()
            try:
                await anyio.to_thread.run_sync(exited.wait, abandon_on_cancel=True)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await _stop_with_the_worker(flow_run.id, process, exited)
                raise
        except BaseException:
            if control_registered and not handed_off and self._control_channel is not None:
                self._control_channel.unregister(flow_run.id)
            raise


def _join_then_set(process: multiprocessing.process.BaseProcess, exited: threading.Event) -> None:
    process.join()
    exited.set()


async def _stop_with_the_worker(
    flow_run_id: UUID, process: multiprocessing.process.BaseProcess, exited: threading.Event
) -> None:
    """The worker is stopping while this run's process is alive.

    A run that has suspended is only tearing down (Prefect joins its heartbeat thread): its wait is saved
    and survives the worker, so it is left to end by itself; a signal now would turn the wait into a crash.
    Any other run is stopped as Prefect's process worker stops it (SIGTERM; the engine reports ``Crashed``
    and deploy-ended releases and tells).
    """
    if exited.is_set() or process.pid is None:
        return
    async with get_client() as client:
        suspended = await _is_suspended(client, flow_run_id)
    if suspended and await anyio.to_thread.run_sync(exited.wait, SUSPENDED_TEARDOWN_SECONDS):
        return
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_SECONDS), (signal.SIGKILL, KILL_GRACE_SECONDS)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        if await anyio.to_thread.run_sync(exited.wait, grace):
            return


async def _is_suspended(client: PrefectClient, flow_run_id: UUID) -> bool:
    """Whether the run is Suspended now; no answer counts as no (then nothing is left to end by itself,
    and a dead server could not record a crash either)."""
    try:
        state = (await client.read_flow_run(flow_run_id)).state
    except Exception:  # noqa: BLE001 - see above: any failure to read is "not known to be suspended"
        return False
    return state is not None and (state.type.value, state.name) == _SUSPENDED


class WarmProcessWorker(ProcessWorker):
    """Prefect's process worker (same pool type, job template and settings) with forked, warm flow runs.

    A job whose ``command`` is set explicitly runs as the process worker runs it: that command is the
    operator's, and only the default engine command has a warm equivalent.
    """

    type = "process"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # "Look for runs now" requests; one pending request stands for any number (buffer of one).
        self._poll_requests, self._poll_requested = anyio.create_memory_object_stream[None](1)
        self._running: Counter[UUID] = Counter()  # a resumed run can start before its last process ends
        self._released_early: set[UUID] = set()
        self._back_to_waiting: set[UUID] = set()

    async def start(
        self, run_once: bool = False, with_healthcheck: bool = False, printer: Callable[..., None] = print
    ) -> None:
        async with anyio.create_task_group() as group:
            if not run_once:
                group.start_soon(self._poll_on_request)
                group.start_soon(self._follow_run_events)
            await super().start(run_once=run_once, with_healthcheck=with_healthcheck, printer=printer)
            group.cancel_scope.cancel()

    def _request_poll(self) -> None:
        with contextlib.suppress(anyio.WouldBlock):
            self._poll_requests.send_nowait(None)

    def _release_limit_slot(self, flow_run_id: UUID) -> None:
        if flow_run_id in self._released_early:
            # Released when the run was suspended (below); this is that submission's own, later release.
            self._released_early.discard(flow_run_id)
            return
        super()._release_limit_slot(flow_run_id)
        # A run resumed while its previous process was still exiting was skipped ("already holding" its
        # slot): look again now that the slot is free rather than at the next poll.
        self._request_poll()

    async def _release_suspended(self, flow_run_id: UUID) -> None:
        """A suspended run's process only tears down (Prefect joins its heartbeat thread, up to a second):
        give its slot back now, so an approval that comes at once resumes it at once. The submission's own
        release, when the process exits, is then skipped, so every slot taken is given back once.

        Only while the run is still Suspended: a late event must not free the slot of the process that
        resumed it (a resumed run is Pending or Running before its process starts)."""
        if self._limiter is None or flow_run_id not in self._running or flow_run_id in self._released_early:
            return
        if not await _is_suspended(self.client, flow_run_id):
            return
        with contextlib.suppress(RuntimeError):  # not holding (already released): nothing to give back
            self._limiter.release_on_behalf_of(flow_run_id)
            self._released_early.add(flow_run_id)

    async def _poll_on_request(self) -> None:
        async for _ in self._poll_requested:
            await self.get_and_submit_flow_runs()

    async def _follow_run_events(self) -> None:
        """Look for runs the moment the server schedules one in this pool (a trigger's new run, a resumed
        approval) instead of at the next poll, and free a suspended run's slot at once. The poll stays: it
        is the fallback while the event stream is down, and it picks up anything this misses."""
        retry = 1.0
        while True:
            try:
                async with get_client() as client:
                    pool = await client.read_work_pool(self._work_pool_name)
                async with get_events_subscriber(filter=_run_states_in(pool.id)) as subscriber:
                    retry = 1.0
                    async for event in subscriber:
                        if _schedules_a_run(event):
                            self._request_poll()
                        elif (suspended := _suspends_a_run(event)) is not None:
                            await self._release_suspended(suspended)
            except Exception as exc:  # noqa: BLE001 - the stream is an accelerator; polling still submits runs
                self._logger.debug("schedule events unavailable (%s); polling only, retrying in %.0fs", exc, retry)
            await anyio.sleep(retry)
            retry = min(retry * 2, 30.0)

    @classmethod
    def __dispatch_key__(cls) -> str:
        # The pool's type stays "process"; Prefect's registry of worker classes keeps its own under that key.
        return "icd-warm-process"

    async def _propose_pending_state(self, flow_run: FlowRun) -> bool:
        """The same race one step earlier: a run seen Scheduled by a poll (resumed by a refused answer) can be
        suspended again, asking anew, before the worker proposes Pending. The server answers with a ``Pause``,
        which Prefect catches here neither (``Abort`` and ``Exception`` only): it ended the whole worker in CI.
        The run is not submitted now (False: Prefect gives the slot back); its next resume is."""
        try:
            return await super()._propose_pending_state(flow_run)
        except Pause:
            self._logger.info("flow run %s is waiting again (asked anew); not submitted now", flow_run.id)
            return False

    async def _propose_submitting_state(self, flow_run: FlowRun) -> None:
        """A run answered while its suspension was still being described can be waiting again when it is
        submitted: the forced rewrite of its state puts it back, and ``describe_suspension`` gives the answer
        again a moment later. The server then refuses ``Submitting`` with a ``Pause``, which Prefect's worker
        does not catch (it ended the whole worker in CI). Here the run is only not started now; its next
        resume is submitted as usual."""
        try:
            await super()._propose_submitting_state(flow_run)
        except Pause:
            self._logger.info("flow run %s is waiting again (answered mid-suspension); not started now", flow_run.id)
            self._back_to_waiting.add(flow_run.id)

    async def run(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        if flow_run.id in self._back_to_waiting:
            self._back_to_waiting.discard(flow_run.id)
            if task_status is not None:
                task_status.started(0)  # nothing started: no process id to record
            return ProcessWorkerResult(status_code=0, identifier="")
        if configuration._command_configured:
            return await super().run(flow_run, configuration, task_status)
        self._running[flow_run.id] += 1
        try:
            return await self._run_forked(flow_run, configuration, task_status)
        finally:
            self._running[flow_run.id] -= 1
            if self._running[flow_run.id] <= 0:
                del self._running[flow_run.id]

    async def _run_forked(
        self,
        flow_run: FlowRun,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None,
    ) -> ProcessWorkerResult:
        status = task_status if task_status is not None else anyio.TASK_STATUS_IGNORED
        working_dir: Any = (
            tempfile.TemporaryDirectory(suffix="prefect")
            if not configuration.working_dir
            else contextlib.nullcontext(configuration.working_dir)
        )
        execution: FlowRunExecutionResult | None = None
        with working_dir as directory, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            async with FlowRunExecutorContext() as context:
                starter = ForkedEngineStarter(
                    cwd=Path(directory).resolve(), env=configuration.env, control_channel=context.control_channel
                )
                executor = context.create_executor(
                    flow_run, starter, resolve_flow=load_flow_from_flow_run, propose_submitting=False
                )

                async def execute(
                    *, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED
                ) -> None:
                    nonlocal execution
                    execution = await executor.submit(task_status=task_status)

                async with anyio.create_task_group() as group:
                    handle = await group.start(execute)
                    if handle.pid is None:
                        raise RuntimeError("Flow run process has no PID")
                    status.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(status_code=execution.status_code, identifier=str(execution.handle.pid))
