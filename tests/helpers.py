"""What several test files ask of the loop under test, written once: what Slack was told, which instances
Consul knows, which task runs a flow run made, which processes run (read from ``/proc``), a bench script
loaded as a module, the scales a race runs at, and an S3 client of the tests' moto.

The ``/proc`` readers skip a process that is gone (or not ours to inspect) while they read it: every scan
races with processes starting and ending, and a test asks about the ones that stay.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import boto3
import pytest

if TYPE_CHECKING:
    from tests.plugins.deploy_env import DeployEnv

# --- the loop's outputs ----------------------------------------------------------------------------------------


def told(env: DeployEnv, *fragments: str) -> list[str]:
    """The Slack messages (texts) that hold every one of ``fragments``, oldest first."""
    return [m.text for m in env.slack.messages if all(f in m.text for f in fragments)]


def consul_instances(env: DeployEnv, service_name: str) -> list[dict[str, Any]]:
    """Consul's health entries (``Node``, ``Service``, ``Checks``) of every instance of ``service_name``."""
    import consul  # here, like Prefect below: the fast tests that only scan /proc need neither

    host, port = env.consul.address.rsplit(":", 1)
    _, entries = consul.Consul(host=host, port=int(port)).health.service(service_name)
    return list(entries)


def consul_instance_ids(env: DeployEnv, service_name: str) -> list[str]:
    """The Consul service ids of every instance of ``service_name``."""
    return [entry["Service"]["ID"] for entry in consul_instances(env, service_name)]


def task_runs(run_id: Any, task_name: str) -> list[Any]:
    """The runs of task ``task_name`` in flow run ``run_id``, which has ended, in any state (a task run is named
    ``<task>-<n>``): all of them, each as it ended (``examples.local_env.recorded_task_runs``)."""
    from examples.local_env import recorded_task_runs

    return [run for run in recorded_task_runs(run_id) if run.name.rsplit("-", 1)[0] == task_name]


def task_runs_so_far(run_id: Any, task_name: str) -> list[Any]:
    """The runs of task ``task_name`` that the server has recorded so far for flow run ``run_id``, which may
    still be running: a condition to poll (``wait_until``), up to a second behind the run."""
    from examples.local_env import read_task_runs

    return [run for run in read_task_runs(run_id) if run.name.rsplit("-", 1)[0] == task_name]


def run_artifacts(run_id: Any, key: str | None = None) -> list[Any]:
    """The artifacts flow run ``run_id`` created (only those under ``key``, when given), asked of the server
    by run: a listing of every artifact stops at its first page once the session has made enough of them."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from examples.local_env import api_client

    found = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
        key=ArtifactFilterKey(any_=[key]) if key is not None else None,
    )
    return list(api_client().read_artifacts(artifact_filter=found))


def completed_task_runs(run_id: Any, task_name: str, *, so_far: bool = False) -> list[Any]:
    """The runs of task ``task_name`` in flow run ``run_id`` that completed: of the run that has ended, or with
    ``so_far``, those recorded so far of one that may still be running (``task_runs_so_far``)."""
    runs = task_runs_so_far(run_id, task_name) if so_far else task_runs(run_id, task_name)
    return [run for run in runs if run.state and run.state.is_completed()]


# --- processes, from /proc -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """One process as ``/proc/<pid>/stat`` and ``cmdline`` showed it when read."""

    pid: int
    state: str  # "R", "S", ... "Z" for a zombie: dead, only a record left for its parent to reap
    parent: int
    session: int
    cmdline: bytes  # the arguments, each ended by a NUL (empty for a zombie or a kernel thread)

    @property
    def alive(self) -> bool:
        return self.state != "Z"

    @property
    def argv(self) -> list[bytes]:
        return self.cmdline.split(b"\0")

    @property
    def command(self) -> str:
        """The command line as a shell shows it: arguments separated by spaces."""
        return self.cmdline.replace(b"\0", b" ").decode(errors="replace")

    def cwd(self) -> str | None:
        """Its working directory; None when it is gone or not ours to inspect."""
        try:
            return os.readlink(f"/proc/{self.pid}/cwd")
        except OSError:
            return None


def _stat(pid: int | str) -> list[str]:
    # The fields after the command name, which is in parentheses and may itself hold spaces or ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes() -> Iterator[Process]:
    """Every process on the machine that can be read, as it is now."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, parent, _group, session = _stat(entry.name)[:4]
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        yield Process(int(entry.name), state, int(parent), int(session), cmdline)


def parent_pid(pid: int) -> int:
    return int(_stat(pid)[1])


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (by parent pid), so a killed worker takes its flow processes with it."""
    parents = {process.pid: process.parent for process in processes()}
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def pids_mentioning(token: str) -> list[int]:
    """Pids of processes (zombies included) whose command line, as a shell shows it, holds ``token``."""
    return [process.pid for process in processes() if token in process.command]


def live_pids_with(marker: str) -> list[int]:
    """Pids of live processes whose command line holds ``marker`` (zombies are dead)."""
    return [process.pid for process in processes() if process.alive and marker.encode() in process.cmdline]


def pids_working_in(directory: Path) -> list[int]:
    """Pids of live processes whose working directory is ``directory`` (packer, its plugins, scripts)."""
    return [process.pid for process in processes() if (cwd := process.cwd()) is not None and Path(cwd) == directory]


def session_commands(session: int) -> list[str]:
    """The command lines of the live processes of ``session`` (a zombie is only a record left to reap)."""
    return [process.command for process in processes() if process.session == session and process.alive]


def terraform_applying(icd_home: Path, run_id: str) -> list[int]:
    """Pids of `terraform apply` working in this run's apply directory.

    A child terraform has just forked (a provider, the provisioner's shell) looks the same until it execs;
    it is left out by its parent, which is a match too.
    """
    workdir = str(icd_home / "runs" / f"{run_id}-apply")
    found = {
        process.pid: process.parent
        for process in processes()
        if any(part.endswith(b"terraform") for part in process.argv[:1])
        and b"apply" in process.argv
        and process.cwd() == workdir
    }
    return [pid for pid, parent in found.items() if parent not in found]


# --- the bench scripts -----------------------------------------------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def load_bench(script: str, module_name: str) -> ModuleType:
    """``bench/<script>`` loaded as the module ``module_name`` (the bench directory is no package)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- races at two scales ---------------------------------------------------------------------------------------

FEW_AT_ONCE = 5


def crowds(full: int) -> list[Any]:
    """Parameters for a race: ``FEW_AT_ONCE`` writers in the fast tier, and ``full`` writers marked ``stress``,
    which CI runs. Five threads at a barrier already collide on every compare-and-swap the race has; twenty or
    fifty make the retries pile up, which costs the fast tier seconds of CPU (moto and botocore: about 4 ms a
    request, and a twenty-writer race makes 300-950 requests)."""
    return [
        pytest.param(FEW_AT_ONCE, id=f"{FEW_AT_ONCE}-at-once"),
        pytest.param(full, id=f"{full}-at-once", marks=pytest.mark.stress),
    ]


# --- the tests' moto -------------------------------------------------------------------------------------------

AWS_REGION = "us-east-1"


def moto_s3_client(endpoint: str) -> Any:
    """An S3 client of the tests' moto at ``endpoint`` (fake keys: moto checks none)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS_REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
