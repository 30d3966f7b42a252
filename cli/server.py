"""``icd-server``: ``prefect server start`` (same arguments), tuned for this loop: SQLite transactions that take
the write lock first, and task runs recorded in batches.

On the embedded SQLite database, Prefect begins most transactions ``DEFERRED``: they read, then write. In
WAL mode a transaction that already reads and then wants to write while another connection writes gets
``database is locked`` at once; SQLite's busy timeout (60 s, set by Prefect) only covers a transaction that
holds nothing yet. The resume endpoint is such a transaction (read the run, then set its state): under load,
the UI's Resume answered "Failed to resume flow run" (Prefect's client retries the 503, the UI does not), and
the server's services logged ``database is locked``. Here every transaction Prefect opens on SQLite begins
``IMMEDIATE`` (Prefect already does so for its state changes): it waits for the lock within the busy timeout
instead of failing. Reads outside a transaction are unchanged. PostgreSQL is not touched.
``bench/sqlite_load.py`` measures it (``docs/benchmarks.md``).

**Task runs recorded in batches.** Prefect's task-run recorder writes each task-run event (three per task run) in
a transaction of its own by default (``batch_size`` 1), and every deploy cycle makes about 30 task runs: 15 %
of the server's busy samples in a cycle were its flushes (py-spy, docs/benchmarks.md). Unless the operator set
either setting (in the environment, a profile or a settings file), it writes what arrived within
:data:`RECORDER_FLUSH_SECONDS` in one transaction, so a task run shows in the UI up to that much later. One
second is Prefect's shortest: it truncates the interval to whole seconds, and below one it flushes in a busy
loop.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager

from prefect.context import refresh_global_settings_context
from prefect.server.database.configurations import SQLITE_BEGIN_MODE, AioSqliteConfiguration
from prefect.server.database.dependencies import MODELS_DEPENDENCIES
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, get_current_settings
from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction


class WriteFirstSqliteConfiguration(AioSqliteConfiguration):
    """Prefect's SQLite configuration, with every transaction begun ``IMMEDIATE``."""

    @asynccontextmanager
    async def begin_transaction(
        self, session: AsyncSession, with_for_update: bool = False
    ) -> AsyncGenerator[AsyncSessionTransaction, None]:
        token = SQLITE_BEGIN_MODE.set("IMMEDIATE")
        try:
            async with session.begin() as transaction:
                yield transaction
        finally:
            SQLITE_BEGIN_MODE.reset(token)


def use_write_first_transactions() -> bool:
    """Make this process's Prefect server use :class:`WriteFirstSqliteConfiguration` if its database is SQLite
    (Prefect's default); whether it did."""
    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    if not url.startswith("sqlite"):
        return False
    MODELS_DEPENDENCIES["database_config"] = WriteFirstSqliteConfiguration(connection_url=url)
    return True


RECORDER_BATCH_SIZE = 200  # task-run events per transaction at most: a burst writes at once, in a few
RECORDER_FLUSH_SECONDS = 1
_RECORDER = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_"


def recorder_batching(operator_set: Mapping[str, str]) -> dict[str, str]:
    """The task-run recorder's settings to add to the environment: batches, unless the operator set its batch size
    or its flush interval anywhere Prefect reads settings from (``operator_set``: the settings as Prefect writes
    out the ones that were set, ``to_environment_variables(exclude_unset=True)``)."""
    names = {
        f"{_RECORDER}BATCH_SIZE": str(RECORDER_BATCH_SIZE),
        f"{_RECORDER}FLUSH_INTERVAL": str(RECORDER_FLUSH_SECONDS),
    }
    return {} if names.keys() & operator_set.keys() else names


# Prefect starts the API in a separate uvicorn process for these, where this module's configuration is not
# installed: refused rather than silently serving without it.
_OTHER_PROCESS_FLAGS = ("--background", "-b", "--workers")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    refused = [arg for arg in args if arg.split("=", 1)[0] in _OTHER_PROCESS_FLAGS]
    if refused and PREFECT_API_DATABASE_CONNECTION_URL.value().startswith("sqlite"):
        print(
            f"icd-server: {' '.join(refused)} would run the API in another process, without the SQLite "
            "configuration this command adds; run it in the foreground (`icd-server start &` in a script)",
            file=sys.stderr,
        )
        return 2
    from prefect.cli import app

    use_write_first_transactions()
    # Written to the environment, which a server Prefect starts in another process inherits, and read again into
    # this process's settings (Prefect made them at import).
    os.environ.update(recorder_batching(get_current_settings().to_environment_variables(exclude_unset=True)))
    refresh_global_settings_context()
    # Prefect's CLI reads its arguments from sys.argv: this is `prefect server ARGS`.
    sys.argv = ["prefect", "server", *args]
    app()
    return 0


if __name__ == "__main__":
    sys.exit(main())
