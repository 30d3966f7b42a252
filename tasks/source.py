"""Resolve what a developer pushed: a git repository (path or URL) and a ref, to an exact commit, checked
out into a clean work directory. Everything downstream (build, registry, plan) keys on that commit SHA."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from tasks.errors import InvalidSourceError
from tasks.process import run_command
from tasks.run_cache import run_scoped_cache_key

_REF_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,199}$")
_GIT_TIMEOUT = 300.0


@dataclass(frozen=True)
class SourceCheckout:
    repo: str
    ref: str
    commit: str
    path: Path


def _git(*args: str, cwd: Path | None = None) -> str:
    result = run_command(["git", *args], cwd=cwd, timeout=_GIT_TIMEOUT, env={"GIT_TERMINAL_PROMPT": "0"})
    if result.returncode != 0:
        raise InvalidSourceError(f"git {args[0]} failed: {result.stderr_tail(5)}")
    return result.stdout.strip()


def _resolve_commit(workdir: Path, ref: str) -> str:
    # A clone has the pushed branches as origin/<branch>; tags and SHAs resolve as given.
    for candidate in (f"refs/remotes/origin/{ref}", ref):
        result = run_command(
            ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}"],
            cwd=workdir,
            timeout=_GIT_TIMEOUT,
        )
        if result.returncode == 0:
            return result.stdout.strip()
    raise InvalidSourceError(f"ref {ref!r} is not a branch, tag or commit of the repository")


def checkout_source(repo: str, ref: str, workdir: Path) -> SourceCheckout:
    """Clone ``repo`` and check out ``ref`` detached into ``workdir`` (replaced if it exists)."""
    if not _REF_RULE.match(ref) or ".." in ref:
        raise InvalidSourceError(f"invalid git ref {ref!r}")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    _git("clone", "--quiet", "--no-checkout", "--", repo, str(workdir))
    commit = _resolve_commit(workdir, ref)
    _git("-c", "advice.detachedHead=false", "checkout", "--quiet", commit, cwd=workdir)
    return SourceCheckout(repo=repo, ref=ref, commit=commit, path=workdir)


# Git faults are not transient in a way a retry fixes (bad ref, missing repo), so no retries.
@task(name="resolve-source", persist_result=True, cache_key_fn=run_scoped_cache_key)
def resolve_source(repo: str, ref: str, workdir: str) -> SourceCheckout:
    checkout = checkout_source(repo, ref, Path(workdir))
    get_run_logger().info("resolved %s@%s to %s", repo, ref, checkout.commit)
    return checkout
