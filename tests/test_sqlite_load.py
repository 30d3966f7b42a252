"""The embedded SQLite default under load: resumes and writes never meet ``database is locked``.

The server is started as the demo, the tests and the README start it (``icd-server``), on its own SQLite
database, and gets the load of ``bench/sqlite_load.py``: runs suspended and resumed at once (each resume
sent once, as the UI's Resume button does) while logs, task runs and events are written. With
``prefect server start`` the same load failed every resume that met a writer (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType

import pytest

from examples.local_env import start_prefect_server
from tests.helpers import load_bench


def _bench() -> ModuleType:
    return load_bench("sqlite_load.py", "sqlite_load")


@pytest.mark.slow
def test_resumes_under_load_on_the_embedded_sqlite_are_all_taken(tmp_path: Path) -> None:
    bench = _bench()
    # Errors the server answers with a 503 are logged too, so a locked database can't hide behind a retry.
    # (Its services' INFO lines too: the task-run recorder's says how it writes.)
    env = {"PREFECT_API_LOG_RETRYABLE_ERRORS": "true", "PREFECT_SERVER_LOGGING_LEVEL": "INFO"}
    server = start_prefect_server(tmp_path / "prefect", env=env)
    try:
        tally = asyncio.run(bench.load(server.api_url, runs=20, cycles=2, writers=4))
    finally:
        server.stop()
    log = server.process.log_path.read_text(errors="replace")
    assert tally.resumes == 40, tally.failure_samples
    assert (tally.resume_failures, tally.other_503s, tally.other_failures) == (0, 0, 0), tally.failure_samples
    assert log.count("database is locked") == 0, log[-3000:]
    # The server ran with the task-run recorder's batches (cli/server.py), as icd-server ships them. (This load
    # makes its task runs through the API, which the recorder does not see: it shows the setting arrived.)
    assert "TaskRunRecorder consumer with batch size 200 and flush every 1 seconds" in log


@pytest.mark.parametrize(
    ("operator_set", "added"),
    [
        ({}, {"BATCH_SIZE": "200", "FLUSH_INTERVAL": "1"}),  # Prefect's defaults: a transaction per event
        ({"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "1"}, {}),  # set, to the default on purpose
        ({"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "3"}, {}),  # either one
        ({"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "True"}, {"BATCH_SIZE": "200", "FLUSH_INTERVAL": "1"}),
        ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, {"BATCH_SIZE": "200", "FLUSH_INTERVAL": "1"}),
    ],
)
def test_icd_server_records_task_runs_in_batches_unless_the_operator_set_the_recorder(
    operator_set: dict[str, str], added: dict[str, str]
) -> None:
    from cli.server import recorder_batching

    prefix = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_"
    assert recorder_batching(operator_set) == {prefix + k: v for k, v in added.items()}


def test_a_recorder_setting_in_a_profile_is_the_operators(tmp_path: Path) -> None:
    """What icd-server passes to recorder_batching: a value from the profile counts as set, as one from the
    environment does, even at Prefect's default."""
    from prefect.settings import Settings

    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        'active = "team"\n[profiles.team]\nPREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE = "1"\n'
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_PROFILES_PATH", str(profiles))
        written = Settings().to_environment_variables(exclude_unset=True)
    assert written.get("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE") == "1"


@pytest.mark.parametrize("flag", ["--background", "-b", "--workers=2"])
def test_icd_server_refuses_what_would_serve_sqlite_without_its_configuration(
    flag: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, temporary_settings

    from cli.server import main

    with temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{tmp_path}/prefect.db"}):
        assert main(["start", flag]) == 2
    assert "another process" in capsys.readouterr().err
