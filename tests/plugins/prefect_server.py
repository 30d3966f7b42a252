"""A real Prefect server with a fresh PREFECT_HOME, started once per test session.

It runs on the team set-up of ``docs/operations.md``: a fresh database on the machine's PostgreSQL
(``ICD_POSTGRES_DSN``, default ``postgresql://postgres@127.0.0.1:5432/test``), or SQLite where no PostgreSQL
answers (``PrefectServer.database`` says which). Tests that talk to Prefect (blocks, locks, flows,
deployments) share it; the test process's own client is pointed at it with ``temporary_settings`` for the
whole session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.context import refresh_global_settings_context
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from examples.local_env import (
    PrefectServer,
    create_postgres_database,
    drop_postgres_database,
    postgres_available,
    start_prefect_server,
)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home: Path = tmp_path_factory.mktemp("prefect-home")
    database_url = create_postgres_database("icd_test") if postgres_available() else None
    # icd-server as it ships: task runs recorded in one-second batches, so a test that counts a run's task runs
    # waits until the server has recorded them (examples/local_env.py recorded_task_runs).
    server = start_prefect_server(home, database_url=database_url)
    # Subprocesses read the environment. Threads without a settings context (the flow engine's, Prefect's log
    # and event senders) read the process-wide one, which Prefect made at import from the environment of
    # then: refreshed from this environment, they talk to this server instead of each starting a temporary
    # one of their own (about 10 s of CPU).
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PREFECT_API_URL", server.api_url)
            patch.setenv("PREFECT_HOME", str(home))
            refresh_global_settings_context()
            with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_HOME: str(home)}):
                yield server
                # What flow runs in this process (a few tests run one) left queued is sent while the server
                # still answers.
                for queued in (APILogWorker, EventsWorker):
                    queued.drain_all(timeout=30)
    finally:
        refresh_global_settings_context()
        server.stop()
        if database_url:
            drop_postgres_database(database_url)
