"""The one place where this project starts an external CLI (git, packer, terraform).

The adapters build their argv with pure functions and hand it here. This module owns what every call needs:

* **An explicit environment.** A tool gets a small base (``PATH``, ``HOME``, locale, ``TMPDIR``) plus what
  its step passes, never the worker's whole environment: whatever credentials the worker holds stay out
  of Packer, Terraform and everything they start.
* **Redacted argv.** ``-var`` and ``-backend-config`` values are replaced before an argv is stored in a
  result or an error, so no caller can leak them by accident.
* **Streaming and deadlines.** Lines are forwarded as they come; a timeout or a cancellation kills the
  whole process group (Packer and Terraform fork plugins that would otherwise outlive them).
* **No silent hangs after exit.** Reading the output after the tool exits is bounded: a daemon the tool
  started that kept its stdout or stderr open is named in a :class:`ToolOutputHeldError` instead of
  blocking the run forever.
* **No orphans.** The tool is started through ``setpriv --pdeathsig TERM`` (util-linux): if the process
  that runs it dies (a worker killed mid-apply), the kernel sends the tool SIGTERM, and Terraform stops
  gracefully, saving its state and releasing its state lock, instead of applying on unsupervised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from icd.errors import ToolError, ToolOutputHeldError, ToolTimeoutError

LineSink = Callable[[str], None]
logger = logging.getLogger(__name__)

# Grace between SIGTERM and SIGKILL: Terraform uses it to release its state lock.
_TERM_GRACE_SECONDS = 10.0
# How long the output may stay open after the tool itself exited.
OUTPUT_DRAIN_SECONDS = 5.0
_TAIL_LINES = 40
REDACTED = "***"
# Flags whose value is `name=value` with a value that may be secret.
_VALUE_FLAGS = ("-var", "-backend-config")
# What every tool may see of the worker's environment; nothing else is inherited.
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "USER", "LOGNAME")
_SETPRIV = shutil.which("setpriv")


@dataclass(frozen=True)
class CompletedCommand:
    argv: tuple[str, ...]  # redacted
    returncode: int
    stdout: str
    stderr: str
    duration_seconds: float

    def stderr_tail(self, lines: int = _TAIL_LINES) -> str:
        return last_lines(self.stderr, lines)


def redact_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` with the value of every ``-var``/``-backend-config`` pair replaced, in both spellings
    (``-var name=value`` and ``-var=name=value``)."""
    redacted: list[str] = []
    after_flag = False
    for arg in argv:
        if after_flag and "=" in arg:
            arg = f"{arg.split('=', 1)[0]}={REDACTED}"
        else:
            for flag in _VALUE_FLAGS:
                prefix = f"{flag}="
                if arg.startswith(prefix) and "=" in arg[len(prefix) :]:
                    arg = f"{prefix}{arg[len(prefix) :].split('=', 1)[0]}={REDACTED}"
        redacted.append(arg)
        after_flag = arg in _VALUE_FLAGS
    return tuple(redacted)


def base_environment() -> dict[str, str]:
    """The part of the worker's environment every tool may see."""
    return {key: os.environ[key] for key in BASE_ENV_KEYS if key in os.environ}


def last_lines(text: str, count: int = _TAIL_LINES) -> str:
    """The tail an error message carries: enough to diagnose, short enough for a notification."""
    return "\n".join(deque(text.rstrip().splitlines(), maxlen=count))


def _pump(stream: object, collected: list[str], sink: LineSink | None) -> None:
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]  # a text-mode pipe
        collected.append(line)
        if sink is not None:
            sink(line.rstrip("\n"))


def _kill_group(proc: subprocess.Popen[str], grace: float) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # The leader may have exited while its plugins linger in the group; SIGKILL whatever is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def pipe_holders(pipe: object) -> list[str]:
    """``pid (command line)`` of every process that still has ``pipe``'s write end open (Linux /proc)."""
    try:
        inode = os.fstat(pipe.fileno()).st_ino  # type: ignore[attr-defined]  # a file object
    except (OSError, ValueError):
        return []
    target = f"pipe:[{inode}]"
    holders: list[str] = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if not any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        holders.append(f"{entry.name} ({cmdline[:200]})")
    return holders


def run_command(
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_stdout: LineSink | None = None,
    on_stderr: LineSink | None = None,
    term_grace: float = _TERM_GRACE_SECONDS,
    drain_seconds: float = OUTPUT_DRAIN_SECONDS,
) -> CompletedCommand:
    """Run ``argv`` to completion and return its output; never raises for a non-zero exit.

    The tool's environment is :func:`base_environment` plus ``env``. Raises ``ToolTimeoutError`` after
    killing the process group when ``timeout`` passes, ``ToolOutputHeldError`` when the tool exited but
    something it started still holds its output, and ``ToolError`` when the binary can't be started. Any
    exception raised while waiting (a cancelled Prefect run delivers one) also kills the group.
    """
    shown = redact_argv(argv)
    full_env = {**base_environment(), **(env or {})}
    binary = shutil.which(argv[0], path=full_env.get("PATH")) if argv else None
    if binary is None:
        raise ToolError(f"could not start {Path(argv[0]).name if argv else '(nothing)'!r}: not found", argv=shown)
    # The tool dies with its supervisor (see the module docstring); setpriv execs it in place.
    launch = [_SETPRIV, "--pdeathsig", "TERM", "--", binary, *argv[1:]] if _SETPRIV else [binary, *argv[1:]]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            launch,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group, so we can kill plugins with it
        )
    except OSError as exc:
        raise ToolError(f"could not start {Path(argv[0]).name!r}: {exc}", argv=shown) from exc

    out_lines: list[str] = []
    err_lines: list[str] = []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out_lines, on_stdout), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err_lines, on_stderr), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    name = Path(argv[0]).name
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc, term_grace)
        for pump in pumps:
            pump.join(timeout=drain_seconds)
        raise ToolTimeoutError(
            f"{name} timed out after {timeout:.0f}s; its process group was killed",
            argv=shown,
            stderr_tail=last_lines("".join(err_lines)),
        ) from exc
    except BaseException:
        _kill_group(proc, term_grace)
        raise
    for pump in pumps:
        pump.join(timeout=drain_seconds)
    if any(pump.is_alive() for pump in pumps):
        holders = sorted({*pipe_holders(proc.stdout), *pipe_holders(proc.stderr)})
        who = ", ".join(holders) or "a process that has since exited"
        raise ToolOutputHeldError(
            f"{name} exited with code {proc.returncode}, but {who} still holds its output open "
            f"{drain_seconds:.0f}s later. A daemon started by a provisioner must not inherit the tool's "
            "stdout/stderr: redirect them (`> app.log 2>&1 < /dev/null`). "
            "See docs/service-contract.md#detached-daemons.",
            argv=shown,
            exit_code=proc.returncode,
            stderr_tail=last_lines("".join(err_lines)),
            holders=holders,
        )
    completed = CompletedCommand(
        argv=shown,
        returncode=proc.returncode,
        stdout="".join(out_lines),
        stderr="".join(err_lines),
        duration_seconds=time.monotonic() - started,
    )
    # One line per tool call, for the run log (PREFECT_LOGGING_EXTRA_LOGGERS=icd) and bench/cycle.py.
    logger.info(
        "tool %s %s exited %d in %.3fs",
        name,
        shown[1] if len(shown) > 1 else "",
        proc.returncode,
        completed.duration_seconds,
    )
    return completed
