"""The guard on prefect_patches/: every private Prefect, botocore and interpreter name the patches rely on is
still what it was when they were written (prefect_patches/seams.py), and a change is named, with the patch to
re-check. Fast: it reads installed source, it starts nothing."""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from icd.paths import PROJECT_ROOT
from prefect_patches import seams

PATCHES = PROJECT_ROOT / "prefect_patches"


def test_every_private_seam_is_as_recorded() -> None:
    problems = seams.verify()
    assert not problems, "Prefect's private seams moved:\n" + "\n".join(problems)


def test_the_recorded_prefect_version_is_the_pinned_one() -> None:
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert f"prefect=={seams.CHECKED_AGAINST_PREFECT}" in pyproject["project"]["dependencies"]


def _private_imports(path: Path) -> set[str]:
    """The private modules (a part starting with ``_``) of Prefect and botocore a patch imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] in ("prefect", "botocore") and any(part.startswith("_") for part in parts):
                found.add(name)
    return found


@pytest.mark.parametrize("patch", sorted(p.name for p in PATCHES.glob("*.py") if p.name != "seams.py"))
def test_every_private_module_a_patch_imports_is_a_recorded_seam(patch: str) -> None:
    recorded = {seam.module for seam in seams.SEAMS}
    missing = _private_imports(PATCHES / patch) - recorded
    assert not missing, f"prefect_patches/{patch} imports {sorted(missing)}: record them in prefect_patches/seams.py"


# --- the guard fails, and says what to do ---------------------------------------------------------------


def test_a_changed_seam_is_named_with_the_patch_to_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    executor = next(seam for seam in seams.SEAMS if seam.attribute == "FlowRunExecutor")
    changed = dataclasses.replace(executor, fingerprint="0" * 64)
    monkeypatch.setattr(seams, "SEAMS", (changed,))
    [problem] = seams.verify()
    assert problem.startswith(
        f"prefect.runner._flow_run_executor.FlowRunExecutor changed since Prefect {seams.CHECKED_AGAINST_PREFECT}"
    ), problem
    assert f"recorded {'0' * 64})" in problem
    assert "Re-check prefect_patches/warm_worker.py, or run on Prefect's stock worker." in problem


def test_a_seam_that_is_gone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = [
        seams.Seam("prefect.runner._no_such_module", "X", "something", "prefect_patches/warm_worker.py", "source", ""),
        seams.Seam("botocore.session", "Session._no_such_method", "a loader", "prefect_patches/x.py", "present", ""),
    ]
    monkeypatch.setattr(seams, "SEAMS", tuple(gone))
    module_gone, attribute_gone = seams.verify()
    assert module_gone.startswith("prefect.runner._no_such_module.X is gone since Prefect"), module_gone
    assert "module prefect.runner._no_such_module does not import" in module_gone
    assert "botocore.session.Session._no_such_method does not exist" in attribute_gone
    assert "Re-check prefect_patches/x.py" in attribute_gone


def test_another_prefect_version_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seams, "CHECKED_AGAINST_PREFECT", "3.0.0")
    problems = seams.verify()
    installed = metadata.version("prefect")
    assert problems[0].startswith(
        f"Prefect is {installed}, but its private seams were checked against Prefect 3.0.0"
    ), problems
    assert "python -m prefect_patches.seams --record" in problems[0]


def test_the_shared_tls_wrapper_does_not_hide_prefects_constructor() -> None:
    """The test session wraps the clients' constructors (tests/conftest.py): the guard reads Prefect's own."""
    from prefect.client.orchestration import PrefectClient

    assert hasattr(PrefectClient.__init__, "__wrapped__"), "conftest applies shared_tls"
    [seam] = [s for s in seams.SEAMS if s.attribute == "PrefectClient.__init__"]
    assert seams.current_fingerprint(seam) == seam.fingerprint
