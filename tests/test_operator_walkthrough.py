"""The README's operator walkthrough, run as written: its shell commands, in order, in a fresh site directory
with a clean environment (no PREFECT_*, ICD_* or AWS_* variables inherited). Only the four ports are
replaced, by free ones, so the test can't collide with anything else on the machine."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from examples.local_env import free_port, stop_instances
from tests.helpers import session_commands
from tests.waiting import wait_until

PROJECT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- walkthrough:begin -->\s*```sh\n(.*?)```\s*<!-- walkthrough:end -->", re.DOTALL)
_PORTS = ("4200", "5000", "8500", "8600")
_INHERITED = ("PREFECT_", "ICD_", "AWS_")


def walkthrough() -> str:
    found = _BLOCK.search((PROJECT / "README.md").read_text())
    assert found, "README.md has no walkthrough block between its markers"
    return found.group(1)


def test_the_walkthrough_is_one_shell_block_with_the_ports_it_documents() -> None:
    script = walkthrough()
    for port in _PORTS:
        assert f"127.0.0.1:{port}" in script or f"--port {port}" in script or f"-p {port}" in script, port


@pytest.mark.slow
def test_the_operator_walkthrough_works_as_written(tmp_path: Path) -> None:
    script = walkthrough()
    for port in _PORTS:
        script = re.sub(rf"(?<![0-9]){port}(?![0-9])", str(free_port()), script)
    site = tmp_path / "site"
    env = {key: value for key, value in os.environ.items() if not key.startswith(_INHERITED)}
    env["SITE"] = str(site)
    log = tmp_path / "walkthrough.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        left: list[str] = []
        try:
            code = process.wait(timeout=900)
            if code == 0:
                left = _left_running(session=process.pid)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # Whatever the script left running (on failure): its background jobs share its process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            stop_instances(site / "state")
    output = log.read_text(errors="replace")
    assert code == 0, f"the walkthrough stopped (exit {code}):\n{output[-6000:]}"
    assert "approve accepted" in output
    assert '"Status": "passing"' in output, "the deployed instance passed its check in Consul"
    assert "Plan waiting for approval" in output, "Slack got the plan"
    assert "teardown of hello-staging (acmeinc/hello) requested" in output
    # `prefect flow-run watch` says "finished successfully in" or, when the run ended before it looked,
    # "already finished in": either way the state is the one the teardown must end in.
    assert "finished successfully in 'TornDown'" in output or "already finished in 'TornDown'" in output, (
        "the teardown run ended as it should"
    )
    assert "\n[]" in output, "and Consul has no instance of the service left"
    assert left == [], f"the walkthrough's stop left these running: {left}"


def _left_running(session: int, timeout: float = 60) -> list[str]:
    """What the walkthrough started and its stop left running: its session's processes still alive after
    ``timeout`` (a worker stopped after its server, or a run still retrying against the stopped server)."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not session_commands(session), timeout=timeout)
    return session_commands(session)
