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
* **No silent hangs while it runs.** A :class:`ToolWatch` sees every line as it comes and is asked every
  second whether the tool is stuck (``icd/tools/terraform.py``: an apply that only says "Still creating...");
  a stuck tool is stopped like a timed-out one and raises :class:`ToolStuckError`. The daemons that hold the
  output of the tool's children open from *another* session (``setsid nohup app &`` in a provisioner: the
  tool waits for their end-of-file, and killing its process group can't reach them) are found through /proc
  (:func:`escaped_holders`) and killed with it, on a stop, a timeout or a cancellation alike.
* **No orphans.** The tool is started through ``setpriv --pdeathsig TERM`` (util-linux): if the process
  that runs it dies (a worker killed mid-apply), the kernel sends the tool SIGTERM, and Terraform stops
  gracefully, saving its state and releasing its state lock, instead of applying on unsupervised.

Stopping a tool sends SIGTERM to the tool alone, then SIGKILL to its whole group after a grace: Terraform and
Packer run as a panicwrap parent that forwards SIGTERM to the real process, so a SIGTERM to the whole group
reaches the real process twice, and Terraform then exits at once ("Two interrupts received. Exiting
immediately") instead of saving its state and releasing its state lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from icd.errors import ToolError, ToolOutputHeldError, ToolStuckError, ToolTimeoutError

LineSink = Callable[[str], None]
logger = logging.getLogger(__name__)

# Grace between SIGTERM and SIGKILL: Terraform uses it to release its state lock.
_TERM_GRACE_SECONDS = 10.0
# Grace between SIGTERM and SIGKILL for a daemon that escaped the tool's process group.
_HOLDER_GRACE_SECONDS = 5.0
# What an error or a notification shows of a holder's command line: the program and the script it runs, by
# file name; never an argument (a team's daemon may carry a token there: `app --api-key=...`, `sh -c '...'`).
# The pid leads an operator to the whole command line on the host.
_SCRIPT_SUFFIXES = (".py", ".sh", ".js", ".rb", ".pl", ".jar")
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


def _pump(stream: object, collected: list[str], sinks: Sequence[LineSink]) -> None:
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]  # a text-mode pipe
        collected.append(line)
        for sink in sinks:
            sink(line.rstrip("\n"))


def _kill_group(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM to the tool itself (see the module docstring: not to its group), SIGKILL to the group after
    ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # The leader may have exited while its plugins or provisioners linger in the group; SIGKILL what is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- the processes of a running tool, from /proc ----------------------------------------------------------


@dataclass(frozen=True)
class PipeHolder:
    """A process that holds a pipe of a tool open from outside the tool's own process tree."""

    pid: int
    command: str  # the program and its script, by name (command_label): never an argument
    session: int

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


@dataclass(frozen=True)
class _Process:
    pid: int
    ppid: int
    session: int
    pipes: frozenset[tuple[int, bool]]  # (pipe inode, opened for writing)


def _read_process(entry: Path) -> _Process | None:
    try:
        raw = (entry / "stat").read_text()
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = raw[raw.rindex(")") + 2 :].split()
        pipes = set()
        for fd in (entry / "fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("pipe:["):
                writable = bool(os.lstat(fd).st_mode & stat.S_IWUSR)  # the link's mode is the fd's access mode
                pipes.add((int(target[6:-1]), writable))
    except (OSError, ValueError):
        return None  # gone, or not ours to read
    return _Process(int(entry.name), int(fields[1]), int(fields[3]), frozenset(pipes))


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [word.decode(errors="replace") for word in argv if word]
    return command_label(words)


def command_label(words: Sequence[str]) -> str:
    """``python3 app.py …`` for ``["/usr/bin/python3", "/srv/app.py", "--token=…"]``: the program's name and a
    script's file name, nothing else of the command line."""
    if not words:
        return "?"
    shown = [Path(words[0]).name]
    if len(words) > 1 and not words[1].startswith("-") and words[1].endswith(_SCRIPT_SUFFIXES):
        shown.append(Path(words[1]).name)
    return " ".join(shown) + (" …" if len(words) > len(shown) else "")


def escaped_holders(session: int) -> list[PipeHolder]:
    """The processes that hold a pipe of the tool whose session is ``session`` open for writing although the
    tool's process tree no longer owns them: in another session (a provisioner's ``setsid nohup app &``), or
    in the tool's session with a parent outside it (a ``nohup app &`` whose shell has exited).

    Such a process keeps the tool waiting for end-of-file (Terraform's local-exec waits for its output pipe
    to close), and only a kill by pid reaches one in another session. The tool's own children (provider
    plugins, a provisioner's shell and what that shell waits for) are not listed. Linux /proc; empty elsewhere.
    """
    me = os.getpid()
    try:
        entries = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    processes = [found for entry in entries if (found := _read_process(entry)) is not None and found.pid != me]
    in_session = {process.pid for process in processes if process.session == session}
    # pipe inode -> the processes of the tool's session that hold it
    tool_pipes: dict[int, set[int]] = {}
    for process in processes:
        if process.session == session:
            for inode, _ in process.pipes:
                tool_pipes.setdefault(inode, set()).add(process.pid)
    holders = []
    for process in processes:
        if process.pid == session:
            continue  # the tool itself
        if process.session == session and process.ppid in in_session:
            continue  # a live child of the tool's tree
        if any(writable and tool_pipes.get(inode, set()) - {process.pid} for inode, writable in process.pipes):
            holders.append(PipeHolder(process.pid, _command(process.pid), process.session))
    return holders


def held_output_cause(holders: Iterable[PipeHolder | str], tool: str = "terraform") -> str:
    """What an operator reads about processes that hold a tool's output open, and the fix."""
    who = ", ".join(str(holder) for holder in holders)
    return (
        f"{who}, a daemon started without redirecting its output (by a provisioner), holds that output open "
        f"and {tool} waits for it to close: start daemons with their output redirected "
        "(`setsid app </dev/null >app.log 2>&1 &`), see docs/service-contract.md#detached-daemons"
    )


def _pin(holder: PipeHolder) -> int | None:
    """A pidfd of ``holder`` (signals can't reach another process that reused its pid), None if it is gone."""
    try:
        return os.pidfd_open(holder.pid)
    except ProcessLookupError:
        return None
    except (OSError, AttributeError):  # no pidfd on this kernel: signal by pid
        return -1


def _signal(holder: PipeHolder, pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(holder.pid, signum)


def _exited(pidfd: int, holder: PipeHolder) -> bool:
    if pidfd >= 0:
        return bool(select.select([pidfd], [], [], 0)[0])  # a pidfd reads ready once the process has exited
    try:
        state = Path(f"/proc/{holder.pid}/stat").read_text()
    except OSError:
        return True
    return state[state.rindex(")") + 2 :].startswith("Z")


def kill_holders(holders: Sequence[PipeHolder], grace: float = _HOLDER_GRACE_SECONDS) -> list[PipeHolder]:
    """SIGTERM each holder, SIGKILL the ones still alive after ``grace``; the ones that were signalled."""
    pinned = [(holder, fd) for holder in holders if (fd := _pin(holder)) is not None]
    try:
        for holder, fd in pinned:
            _signal(holder, fd, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not all(_exited(fd, holder) for holder, fd in pinned):
            time.sleep(0.1)
        for holder, fd in pinned:
            if not _exited(fd, holder):
                _signal(holder, fd, signal.SIGKILL)
    finally:
        for _, fd in pinned:
            if fd >= 0:
                os.close(fd)
    if pinned:
        logger.warning("killed %s: they held the output of a tool that was stopped", ", ".join(map(str, holders)))
    return [holder for holder, _ in pinned]


def _stop(proc: subprocess.Popen[str], grace: float) -> tuple[list[PipeHolder], list[PipeHolder]]:
    """Stop the tool and every daemon of it that escaped its group; (the holders found, the ones killed).

    The holders are looked for while the tool still runs: once it has exited, nothing says whose they were.
    """
    holders = escaped_holders(proc.pid) if proc.poll() is None else []
    _kill_group(proc, grace)
    return holders, kill_holders(holders)


# --- watching a running tool ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningTool:
    """What a :class:`ToolWatch` may ask about the tool it watches."""

    name: str
    pid: int
    started: float  # time.monotonic() when it was started

    def escaped_holders(self) -> list[PipeHolder]:
        return escaped_holders(self.pid)


class ToolWatch(Protocol):
    """Judges a tool while it runs: ``saw`` gets every line (from the reader threads), ``check`` is called
    every ``poll_seconds`` from the waiting thread and returns why the tool is stuck, or None."""

    poll_seconds: float

    def saw(self, line: str) -> None: ...

    def check(self, tool: RunningTool) -> str | None: ...


def _wait(proc: subprocess.Popen[str], tool: RunningTool, timeout: float | None, watch: ToolWatch | None) -> str | None:
    """Wait for the tool to exit; the watch's reason if it says the tool is stuck first. ``TimeoutExpired``
    when ``timeout`` passes."""
    deadline = None if timeout is None else tool.started + timeout
    while True:
        step = watch.poll_seconds if watch is not None else None
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.0)
            step = left if step is None else min(step, left)
        try:
            proc.wait(timeout=step)
            return None
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise
        if watch is not None and (reason := watch.check(tool)) is not None:
            return reason


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
            words = [w.decode(errors="replace") for w in (entry / "cmdline").read_bytes().split(b"\0") if w]
        except OSError:
            continue
        holders.append(f"{entry.name} ({command_label(words)})")
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
    watch: ToolWatch | None = None,
) -> CompletedCommand:
    """Run ``argv`` to completion and return its output; never raises for a non-zero exit.

    The tool's environment is :func:`base_environment` plus ``env``. Raises ``ToolTimeoutError`` after
    killing the process group when ``timeout`` passes, ``ToolStuckError`` when ``watch`` says the tool is
    stuck (stopped the same way), ``ToolOutputHeldError`` when the tool exited but something it started
    still holds its output, and ``ToolError`` when the binary can't be started. Any exception raised while
    waiting (a cancelled Prefect run delivers one) also stops the tool. Each stop also kills the daemons of
    the tool that hold its children's output from another session (:func:`escaped_holders`).
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
    seen = [watch.saw] if watch is not None else []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out_lines, [*seen, *filter(None, [on_stdout])]), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err_lines, [*seen, *filter(None, [on_stderr])]), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    name = Path(argv[0]).name
    try:
        stuck = _wait(proc, RunningTool(name, proc.pid, started), timeout, watch)
    except subprocess.TimeoutExpired as exc:
        holders, killed = _stop(proc, term_grace)
        for pump in pumps:
            pump.join(timeout=drain_seconds)
        cause = f". {held_output_cause(holders, name)}; killed them too" if holders else ""
        raise ToolTimeoutError(
            f"{name} timed out after {timeout:.0f}s; its process group was killed{cause}",
            argv=shown,
            stderr_tail=last_lines("".join(err_lines)),
        ) from exc
    except BaseException:
        _stop(proc, term_grace)
        raise
    if stuck is not None:
        holders, killed = _stop(proc, term_grace)
        for pump in pumps:
            pump.join(timeout=drain_seconds)
        cause = f". Likely cause: {held_output_cause(holders, name)}" if holders else ""
        gone = f"; killed {', '.join(map(str, killed))}" if killed else ""
        raise ToolStuckError(
            f"{stuck}{cause}. Stopped {name} (exit code {proc.returncode}){gone}",
            argv=shown,
            exit_code=proc.returncode,
            stderr_tail=last_lines("".join(err_lines)),
            holders=[str(holder) for holder in holders],
            killed=[str(holder) for holder in killed],
        )
    for pump in pumps:
        pump.join(timeout=drain_seconds)
    if any(pump.is_alive() for pump in pumps):
        held_by = sorted({*pipe_holders(proc.stdout), *pipe_holders(proc.stderr)})
        who = ", ".join(held_by) or "a process that has since exited"
        raise ToolOutputHeldError(
            f"{name} exited with code {proc.returncode}, but {who} still holds its output open "
            f"{drain_seconds:.0f}s later. A daemon started by a provisioner must not inherit the tool's "
            "stdout/stderr: redirect them (`> app.log 2>&1 < /dev/null`). "
            "See docs/service-contract.md#detached-daemons.",
            argv=shown,
            exit_code=proc.returncode,
            stderr_tail=last_lines("".join(err_lines)),
            holders=held_by,
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
