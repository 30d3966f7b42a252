"""A forked flow run reuses the fork server's Prefect settings when they would be read from the same inputs.

Prefect builds a run's settings anew in its process (``Settings()``, as ``run_flow_in_subprocess`` does once
it has set the run's environment): 25-90 ms of pydantic-settings work per run, three runs per deploy cycle.
The fork server builds them once (:func:`remember`, at preload); a run forked from it takes that object when
every input a ``Settings()`` reads is what the fork server read, and builds its own otherwise
(:func:`settings_for_run`). The inputs, from ``PrefectBaseSettings.settings_customise_sources`` and the
sources it lists (their code is fingerprinted in ``seams.py``):

* environment variables named ``PREFECT_...`` in any case (every alias of every setting starts so; the
  ``PREFECT__...`` keys are a run's runtime values, such as its id, and no setting's; a test reads every
  alias), and ``HOME``, which places the default profiles file;
* in the working directory: ``.env``, ``prefect.toml`` and ``pyproject.toml``'s ``[tool.prefect]`` table;
* the profiles file Prefect's profile source reads (``_get_profiles_path``, which the inputs above decide).

A file is compared by its content, so an edit made while the worker runs reaches the next run, as in a cold
process. Anything that can't be read the same way (an unreadable file) builds the run's own settings.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.settings import Settings

Inputs = tuple[tuple[tuple[str, str], ...], tuple[bytes | None, ...], str]

_REMEMBERED: tuple[Inputs, Settings] | None = None


def settings_inputs() -> Inputs | None:
    """Everything a ``Settings()`` made now would read, from this process's environment and working
    directory; None when a file can't be read."""
    from prefect.settings.sources import _get_profiles_path  # the path Prefect's profile source reads

    env = tuple(
        sorted(
            (key, value)  # as written: pydantic-settings matches case-insensitively, last one wins
            for key, value in os.environ.items()
            if key.upper().startswith("PREFECT_") and not key.upper().startswith("PREFECT__")
        )
    )
    cwd = Path.cwd()
    try:
        files = (_content(cwd / ".env"), _content(cwd / "prefect.toml"), _content(_get_profiles_path()))
        pyproject = _content(cwd / "pyproject.toml")
        table = tomllib.loads(pyproject.decode()).get("tool", {}).get("prefect") if pyproject else None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return (*env, ("HOME", os.environ.get("HOME", ""))), files, repr(table)


def _content(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def remember() -> None:
    """In the fork server: build the settings once, as a run's process would, with what they were read from.

    A run's environment is the worker's with the worker's settings written out as variables (Prefect's
    ``EngineCommandStarter`` does it; so does ours, ``ForkedEngineStarter``): the same values, often written
    otherwise (``false`` as ``False``, defaults made explicit). The fork server, started from the worker's
    environment, reads them the same way here, then puts its own environment back (it is still one thread:
    the preload runs before it forks anything)."""
    global _REMEMBERED
    from prefect.settings import Settings

    written = Settings().to_environment_variables(exclude_unset=True)
    before = {key: os.environ.get(key) for key in written}
    os.environ.update(written)
    try:
        settings, inputs = Settings(), settings_inputs()
    finally:
        for key, value in before.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    _REMEMBERED = (inputs, settings) if inputs is not None else None


def settings_for_run() -> Settings:
    """In a forked run, once its environment and working directory are set: the fork server's settings when
    read from the same inputs, else the run's own."""
    from prefect.settings import Settings

    if _REMEMBERED is not None:
        inputs, settings = _REMEMBERED
        if settings_inputs() == inputs:
            return settings
    return Settings()
