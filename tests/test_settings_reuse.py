"""A forked run takes the fork server's Prefect settings only when a ``Settings()`` of its own would read the
same inputs (prefect_patches/settings_reuse.py); whichever it takes, they are what ``Settings()`` gives."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect.settings import Settings
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from prefect_patches import settings_reuse

Change = Callable[[dict[str, str], Path], None]


def _write(name: str, text: str) -> Change:
    def change(environ: dict[str, str], cwd: Path) -> None:
        (cwd / name).write_text(text)

    return change


def _set(key: str, value: str) -> Change:
    def change(environ: dict[str, str], cwd: Path) -> None:
        environ[key] = value

    return change


def _profiles(text: str) -> Change:
    def change(environ: dict[str, str], cwd: Path) -> None:
        Path(environ["PREFECT_PROFILES_PATH"]).write_text(text)

    return change


@pytest.fixture
def fork_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str], Path]:
    """The fork server, its settings remembered; a run's environment and its directory (the fork server's)."""
    home, server_dir = tmp_path / "home", tmp_path / "server"
    home.mkdir()
    server_dir.mkdir()
    (home / "profiles.toml").write_text('active = "local"\n[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n')
    (server_dir / "pyproject.toml").write_text('[project]\nname = "service"\n')
    for key in [key for key in os.environ if key.upper().startswith("PREFECT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(home / "profiles.toml"))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.chdir(server_dir)
    monkeypatch.setattr(settings_reuse, "_REMEMBERED", None)
    settings_reuse.remember()
    # A run's environment as the worker builds it: its own, its settings written out, the run's keys.
    run_environ = {
        **os.environ,
        **Settings().to_environment_variables(exclude_unset=True),
        "PREFECT__FLOW_RUN_ID": "6f9c1e5a-0000-4000-8000-000000000001",
    }
    return run_environ, server_dir


def _run_settings(environ: dict[str, str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Settings]:
    """What the run takes, and what a Settings() of its own gives, in its environment and directory."""
    monkeypatch.chdir(cwd)
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    return settings_reuse.settings_for_run(), Settings()


@pytest.mark.parametrize(
    ("change", "reused"),
    [
        pytest.param(None, True, id="the-same-inputs"),
        pytest.param(_set("PREFECT__FLOW_RUN_ID", "0e2b"), True, id="a-runtime-key-is-no-setting"),
        pytest.param(_set("ICD_WORKSPACE", "prod"), True, id="another-tools-variable"),
        pytest.param(_write("pyproject.toml", '[project]\nname = "other"\n'), True, id="a-pyproject-without-prefect"),
        pytest.param(_set("PREFECT_API_URL", "http://10.0.0.9:4200/api"), False, id="a-job-variable-setting"),
        pytest.param(_set("prefect_logging_level", "DEBUG"), False, id="a-setting-in-lower-case"),
        pytest.param(_set("HOME", "/elsewhere"), False, id="another-home"),
        pytest.param(_write(".env", "PREFECT_LOGGING_LEVEL=DEBUG\n"), False, id="a-dotenv-in-the-run-directory"),
        pytest.param(_write("prefect.toml", '[logging]\nlevel = "DEBUG"\n'), False, id="a-prefect-toml"),
        pytest.param(
            _write("pyproject.toml", '[tool.prefect.logging]\nlevel = "DEBUG"\n'), False, id="a-pyproject-with-prefect"
        ),
        pytest.param(
            _profiles('active = "local"\n[profiles.local]\nPREFECT_LOGGING_LEVEL = "DEBUG"\n'),
            False,
            id="the-profiles-file-edited",
        ),
    ],
)
def test_a_run_takes_the_fork_servers_settings_only_when_they_are_its_own(
    fork_server: tuple[dict[str, str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Change | None,
    reused: bool,
) -> None:
    server_environ, server_dir = fork_server
    environ, cwd = dict(server_environ), server_dir
    if change is not None:
        change(environ, cwd)

    taken, own = _run_settings(environ, cwd, monkeypatch)

    assert settings_reuse._REMEMBERED is not None
    assert (taken is settings_reuse._REMEMBERED[1]) is reused
    assert taken.model_dump() == own.model_dump()
    assert taken.to_environment_variables(exclude_unset=True) == own.to_environment_variables(exclude_unset=True)


def test_a_run_in_another_directory_with_no_settings_files_takes_them(
    fork_server: tuple[dict[str, str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker runs a deployment without a working directory in a new temporary one.
    server_environ, _ = fork_server
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    taken, own = _run_settings(dict(server_environ), run_dir, monkeypatch)

    assert settings_reuse._REMEMBERED is not None
    assert taken is settings_reuse._REMEMBERED[1]
    assert taken.model_dump() == own.model_dump()
    assert taken.to_environment_variables(exclude_unset=True) == own.to_environment_variables(exclude_unset=True)


def _aliases(model: type[BaseSettings]) -> Iterator[str]:
    for field in model.model_fields.values():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        yield from (choice for choice in choices if isinstance(choice, str))  # AliasPath: init and TOML only
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseSettings):
            yield from _aliases(field.annotation)


def test_every_setting_is_read_from_a_prefect_variable_and_none_from_a_runtime_key() -> None:
    # What settings_inputs compares: an environment variable outside PREFECT_, or one named PREFECT__..., that a
    # Prefect upgrade made a setting would be missed there.
    aliases = list(_aliases(Settings))

    assert len(aliases) > 100
    assert [alias for alias in aliases if not alias.upper().startswith("PREFECT_")] == []
    assert [alias for alias in aliases if alias.upper().startswith("PREFECT__")] == []
