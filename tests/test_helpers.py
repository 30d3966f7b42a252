"""tests/helpers.py's /proc readers, on a process of the test's own: most of their callers are slow e2e tests."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.helpers import (
    descendants,
    live_pids_with,
    parent_pid,
    pids_mentioning,
    pids_working_in,
    session_commands,
)
from tests.waiting import wait_until


def test_a_child_is_found_by_its_command_line_parent_session_and_directory_until_it_ends(tmp_path: Path) -> None:
    marker = f"helpers-{uuid.uuid4().hex}"
    # Reads stdin until it closes: it runs exactly as long as the test wants, with the marker in its argv.
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", marker],
        stdin=subprocess.PIPE,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        assert live_pids_with(marker) == [child.pid]
        assert pids_mentioning(f"sys.stdin.read() {marker}") == [child.pid], "arguments joined by spaces"
        assert parent_pid(child.pid) == os.getpid()
        assert child.pid in descendants(os.getpid())
        assert pids_working_in(tmp_path.resolve()) == [child.pid]
        assert [command for command in session_commands(child.pid) if marker in command] != []
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    wait_until(lambda: not live_pids_with(marker), timeout=10, message="the ended child is still listed")
    assert session_commands(child.pid) == []
