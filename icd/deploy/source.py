"""Resolve what a developer pushed: a git repository (path or URL) and a ref, to an exact commit, checked
out into a clean work directory. Everything downstream (build, registry, plan) keys on that commit SHA.

Git runs through the chokepoint with only what it needs: the base environment, no terminal prompts, and
the SSH agent socket when the worker has one (for private repositories). Only local paths and the
``https``/``ssh``/``git``/``file`` transports are accepted: git's ``ext::`` transport would run a command.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from icd.errors import InvalidInputError, InvalidSourceError
from icd.rules import check_ref
from icd.tools.process import run_command

_GIT_TIMEOUT = 300.0
_URL = re.compile(r"(https?|ssh|git|file)://[^\s]+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]+")


@dataclass(frozen=True)
class SourceCheckout:
    repo: str
    ref: str
    commit: str
    path: Path
    # Who wrote the commit, as git records it ("Name <email>"): the approval notice names them, and an
    # approval policy can keep them from being the only approver (icd.toml's [people] map them to Slack).
    author: str = ""


def check_repo(repo: str) -> str:
    """A repository as git is given it: an absolute local path, or a URL of an allowed transport."""
    if not isinstance(repo, str) or not repo or repo.startswith("-") or "\n" in repo:
        raise InvalidInputError(f"invalid repository {repo!r}")
    if Path(repo).is_absolute() or _URL.fullmatch(repo):
        return repo
    raise InvalidInputError(
        f"invalid repository {repo!r}: an absolute path, or an https://, ssh://, git://, file:// or user@host:path URL"
    )


def _git_env() -> dict[str, str]:
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": "file:git:http:https:ssh"}
    if sock := os.environ.get("SSH_AUTH_SOCK"):
        env["SSH_AUTH_SOCK"] = sock
    return env


def _git(*args: str, cwd: Path | None = None) -> str:
    result = run_command(["git", *args], cwd=cwd, timeout=_GIT_TIMEOUT, env=_git_env())
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
            env=_git_env(),
        )
        if result.returncode == 0:
            return result.stdout.strip()
    raise InvalidSourceError(f"ref {ref!r} is not a branch, tag or commit of the repository")


def checkout_source(repo: str, ref: str, workdir: Path) -> SourceCheckout:
    """Clone ``repo`` and check out ``ref`` detached into ``workdir`` (replaced if it exists)."""
    check_ref(ref)
    check_repo(repo)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    _git("clone", "--quiet", "--no-checkout", "--", repo, str(workdir))
    commit = _resolve_commit(workdir, ref)
    _git("-c", "advice.detachedHead=false", "checkout", "--quiet", commit, cwd=workdir)
    author = _git("log", "-1", "--format=%an <%ae>", commit, cwd=workdir)
    return SourceCheckout(repo=repo, ref=ref, commit=commit, path=workdir, author=author)
