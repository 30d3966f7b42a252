"""The one place where this project starts an external CLI.

Both the Packer and the Terraform adapters build their argv with pure functions and hand it here. This
module owns what every CLI call needs: line-by-line streaming (so a long build is visible while it runs),
a deadline, and killing the whole process group on timeout or cancellation (Packer and Terraform both
fork plugins that would otherwise outlive them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ToolError, ToolTimeoutError

LineSink = Callable[[str], None]

# Grace between SIGTERM and SIGKILL: Terraform uses it to release its state lock.
_TERM_GRACE_SECONDS = 10.0
_TAIL_LINES = 40


@dataclass(frozen=True)
class CompletedCommand:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_seconds: float

    def stderr_tail(self, lines: int = _TAIL_LINES) -> str:
        return "\n".join(self.stderr.rstrip().splitlines()[-lines:])


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


def run_command(
    argv: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    on_stdout: LineSink | None = None,
    on_stderr: LineSink | None = None,
    term_grace: float = _TERM_GRACE_SECONDS,
) -> CompletedCommand:
    """Run ``argv`` to completion and return its output; never raises for a non-zero exit.

    ``env`` is merged over ``os.environ``. Raises ``ToolTimeoutError`` after killing the process group
    when ``timeout`` passes, and ``ToolError`` when the binary can't be started. Any exception raised
    while waiting (a cancelled Prefect run delivers one) also kills the group before it propagates.
    """
    full_env = {**os.environ, **(env or {})}
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
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
        raise ToolError(f"could not start {argv[0]!r}: {exc}", argv=argv) from exc

    out_lines: list[str] = []
    err_lines: list[str] = []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, out_lines, on_stdout), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, err_lines, on_stderr), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc, term_grace)
        for pump in pumps:
            pump.join(timeout=5)
        tail = "\n".join("".join(err_lines).splitlines()[-_TAIL_LINES:])
        raise ToolTimeoutError(
            f"{Path(argv[0]).name} timed out after {timeout:.0f}s; its process group was killed",
            argv=argv,
            stderr_tail=tail,
        ) from exc
    except BaseException:
        _kill_group(proc, term_grace)
        raise
    for pump in pumps:
        pump.join()
    return CompletedCommand(
        argv=tuple(argv),
        returncode=proc.returncode,
        stdout="".join(out_lines),
        stderr="".join(err_lines),
        duration_seconds=time.monotonic() - started,
    )


def last_lines(text: str, count: int = _TAIL_LINES) -> str:
    """The tail an error message carries: enough to diagnose, short enough for a notification."""
    return "\n".join(deque(text.rstrip().splitlines(), maxlen=count))
