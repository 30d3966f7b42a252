"""A real Prefect server (SQLite, fresh PREFECT_HOME) started once per test session.

Tests that talk to Prefect (blocks, locks, flows, deployments) share it; the test process's own client is
pointed at it with ``temporary_settings`` for the whole session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from examples.local_env import PrefectServer, start_prefect_server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home: Path = tmp_path_factory.mktemp("prefect-home")
    server = start_prefect_server(home)
    # Threads (the flow engine's among them) don't inherit the settings context; without the environment
    # they would each start an empty ephemeral server.
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PREFECT_API_URL", server.api_url)
            patch.setenv("PREFECT_HOME", str(home))
            with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_HOME: str(home)}):
                yield server
    finally:
        server.stop()
