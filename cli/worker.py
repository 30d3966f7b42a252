"""``icd-worker``: Prefect's process worker for this project's pool, with warm flow runs.

The warm worker itself is ``prefect_patches/warm_worker.py``.

Same pool, job template and settings as ``prefect worker start --type process``; each flow run is forked
from a process that has already imported Prefect and the project's flows instead of a fresh interpreter.
Its runs send a heartbeat every 30 s (``icd.worker_settings.HEARTBEAT_SECONDS``; Prefect's default is 180 s) unless
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set, so the ``icd-zombie-runs`` automation notices a dead one in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, get_current_settings
from prefect.utilities.processutils import setup_signal_handlers_worker

from icd.paths import PROJECT_ROOT
from icd.worker_settings import HEARTBEAT_ENV, HEARTBEAT_SECONDS
from prefect_patches.shared_tls import reuse_tls_context_for_plain_http
from prefect_patches.warm_worker import WarmProcessWorker, start_fork_server

VERSION_CHECK_ENV = "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"


def _for_runs(name: str, value: str) -> None:
    """Set Prefect setting ``name`` for every run, unless the operator set it (in the environment or the Prefect
    profile: theirs wins). Before the fork server, whose environment every run inherits; written as Prefect writes
    settings out, so that a run's settings are read from the same inputs as the fork server's and reused
    (prefect_patches/settings_reuse.py compares the text)."""
    if name not in get_current_settings().to_environment_variables(exclude_unset=True):
        os.environ[name] = value


def heartbeat_for_runs() -> None:
    """Prefect's own 180 s would let a dead run look alive for minutes."""
    _for_runs(HEARTBEAT_ENV, str(HEARTBEAT_SECONDS))


def leave_version_check_to_the_worker() -> None:
    """The worker's client checks the server's API version when it starts; its runs talk to the same server, so
    each need not ask again (two or three /admin/version calls per run start; Prefect's setting says it is for
    "worker subprocesses that inherit a known-compatible server configuration")."""
    _for_runs(VERSION_CHECK_ENV, "False")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icd-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="the process work pool to poll")
    parser.add_argument("--name", help="the worker's name (default: Prefect's generated one)")
    parser.add_argument("--limit", type=int, help="at most this many flow runs at once")
    parser.add_argument(
        "--project-dir",
        type=Path,
        default=Path(os.environ.get("ICD_PROJECT_DIR") or PROJECT_ROOT),
        help="the project whose prefect.yaml names the flows to preload (default: $ICD_PROJECT_DIR)",
    )
    args = parser.parse_args(argv)
    heartbeat_for_runs()
    leave_version_check_to_the_worker()
    reuse_tls_context_for_plain_http()  # the worker's own clients; its fork server does it for the runs
    # Before the event loop and its threads: the fork server must start from a single-threaded process.
    for module, error in start_fork_server(args.project_dir.resolve()).items():
        print(f"icd-worker: could not preload {module} ({error}); runs that need it import it themselves")
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # Started in the background of a script (`icd-worker &`, as in the README), the worker inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt for it. Prefect's stop turns SIGTERM into a
        # SIGINT to itself, which would be dropped: the worker would run on until killed, and a kill leaves
        # its fork server and runs behind.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    setup_signal_handlers_worker(os.getpid(), "the warm process worker", print)
    worker = WarmProcessWorker(
        work_pool_name=args.pool,
        name=args.name,
        limit=args.limit,
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
    )
    try:
        asyncio.run(worker.start())
    except KeyboardInterrupt:  # SIGTERM and SIGINT arrive as this (setup_signal_handlers_worker)
        print(f"Worker {worker.name!r} stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
