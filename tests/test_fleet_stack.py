"""examples/stacks/local-fleet with the real CLIs: Packer 1.6.6 builds two versions of the app's local image,
Terraform 1.0.3 (providers from the project's mirror) applies the fleet against the Consul stand-in, and the
instances run as real processes. What a rollout relies on (docs/service-contract.md#rollout): one Consul
service instance per slot, a change of one slot's version replaces that slot alone, a shorter list removes
the last slots, and destroy leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from icd.service.contract import ROLLOUT_VARIABLE, SERVICE_IDS_OUTPUT
from icd.tools.binaries import terraform_binary, terraform_cli_config
from icd.tools.process import CompletedCommand, run_command
from standins.consul import ConsulStandIn
from tests.test_examples import (
    EXAMPLES,
    NAMESPACE,
    AppTree,
    agent_services,
    kill_group_if_alive,
    packer_build,
    process_alive,
    wait_for_check_status,
)

pytestmark = pytest.mark.tools

WORKSPACE = "prod"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of examples/app's local image, built as test_examples.py builds them (a copy of the app,
    so no manifest or image lands in the repository)."""
    root = tmp_path_factory.mktemp("app") / "app"
    shutil.copytree(EXAMPLES / "app", root, ignore=shutil.ignore_patterns("packer-manifest.json", "output"))
    output_dir = tmp_path_factory.mktemp("images")
    built = {}
    for version in ("1.0.0", "2.0.0"):
        result = packer_build(AppTree(root), "null.local_image", version, output_dir)
        assert result.returncode == 0, result.stderr + result.stdout
        built[version] = output_dir / f"web-{version}.tar.gz"
    return built


@dataclass(frozen=True)
class FleetStack:
    workdir: Path
    instance_root: Path
    consul_addr: str
    images: dict[str, Path]

    def run(self, *args: str, timeout: float = 180) -> CompletedCommand:
        env = {"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
        if (cli_config := terraform_cli_config()) is not None:
            env["TF_CLI_CONFIG_FILE"] = str(cli_config)
        result = run_command([terraform_binary(), *args], cwd=self.workdir, env=env, timeout=timeout)
        assert result.returncode in (0, 2), f"terraform {args[0]} failed:\n{result.stderr}\n{result.stdout}"
        return result

    def var_args(self, versions: list[str], deploy_run_id: str) -> list[str]:
        """What a rollout passes: every contract variable (the target is the newest version here) and the
        fleet, slot i on versions[i], as JSON text."""
        fleet = [{"artifact_id": str(self.images[version]), "artifact_version": version} for version in versions]
        target = max(versions) if versions else "1.0.0"
        values = {
            "artifact_id": str(self.images[target]),
            "artifact_version": target,
            "namespace": NAMESPACE,
            "service_name": "web",
            "consul_addr": self.consul_addr,
            "deploy_run_id": deploy_run_id,
            "workspace": WORKSPACE,
            "instance_root": str(self.instance_root),
            ROLLOUT_VARIABLE: json.dumps(fleet),
        }
        return [arg for name, value in values.items() for arg in ("-var", f"{name}={value}")]

    def apply(self, versions: list[str], deploy_run_id: str) -> CompletedCommand:
        return self.run("apply", "-auto-approve", "-input=false", *self.var_args(versions, deploy_run_id))

    def plan(self, versions: list[str], deploy_run_id: str, out: str) -> dict[str, list[str]]:
        """The plan's actions by resource address (``terraform show -json`` of the saved plan)."""
        self.run("plan", "-input=false", f"-out={out}", *self.var_args(versions, deploy_run_id))
        shown = json.loads(self.run("show", "-json", out).stdout)
        return {change["address"]: change["change"]["actions"] for change in shown.get("resource_changes", [])}

    def outputs(self) -> dict[str, Any]:
        raw = json.loads(self.run("output", "-json").stdout)
        return {name: value["value"] for name, value in raw.items()}

    def pids(self) -> list[int]:
        return [int((Path(path) / "app.pid").read_text()) for path in self.outputs()["instance_dirs"]]


@pytest.fixture
def fleet(consul_standin: ConsulStandIn, images: dict[str, Path], tmp_path: Path) -> Iterator[FleetStack]:
    workdir = tmp_path / "stack"
    workdir.mkdir()
    shutil.copy(EXAMPLES / "stacks" / "local-fleet" / "main.tf", workdir / "main.tf")
    stack = FleetStack(workdir, tmp_path / "instances", consul_standin.http_addr, images)
    stack.run("init", "-input=false")
    yield stack
    # Whatever the test did, leave no instance running.
    if (workdir / "terraform.tfstate").exists():
        run_command(
            [terraform_binary(), "destroy", "-auto-approve", "-input=false", *stack.var_args([], "cleanup")],
            cwd=workdir,
            env={"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"},
            timeout=120,
        )
    for pid_file in stack.instance_root.glob("*/app.pid"):
        kill_group_if_alive(pid_file)


def wait_passing(consul_addr: str, service_ids: list[str]) -> None:
    for service_id in service_ids:
        wait_for_check_status(consul_addr, f"service:{service_id}", "passing")


def test_the_fleet_runs_one_instance_per_slot_and_replaces_only_the_slot_that_changes(fleet: FleetStack) -> None:
    consul_addr = fleet.consul_addr
    fleet.apply(["1.0.0"] * 3, deploy_run_id="run-1")

    first = [f"web-{WORKSPACE}-{slot}-1.0.0" for slot in range(3)]
    outputs = fleet.outputs()
    assert outputs[SERVICE_IDS_OUTPUT] == first
    assert outputs["artifact_versions"] == ["1.0.0"] * 3
    assert outputs["instance_present"] == [True] * 3
    assert [Path(path).name for path in outputs["instance_dirs"]] == [f"web-{slot}-1.0.0" for slot in range(3)]
    services = agent_services(consul_addr)
    assert sorted(services) == first
    assert len({services[service_id]["Port"] for service_id in first}) == 3
    for slot, service_id in enumerate(first):
        meta = services[service_id]["Meta"]
        assert (meta["slot"], meta["deploy_run_id"], meta["artifact_version"]) == (str(slot), "run-1", "1.0.0")
        assert services[service_id]["Service"] == "web"
    wait_passing(consul_addr, first)
    pids = fleet.pids()
    assert len(set(pids)) == 3
    assert all(process_alive(pid) for pid in pids)

    # A new deploy run of the same fleet changes nothing: deploy_run_id is not a trigger.
    same = fleet.run("plan", "-detailed-exitcode", "-input=false", *fleet.var_args(["1.0.0"] * 3, "run-2"))
    assert same.returncode == 0, same.stdout

    # One batch: slot 1 moves to 2.0.0, and only slot 1 is replaced (created before its old one goes).
    moved = ["1.0.0", "2.0.0", "1.0.0"]
    actions = fleet.plan(moved, "run-3", out="batch.tfplan")
    assert actions == {
        "null_resource.instance[0]": ["no-op"],
        "null_resource.instance[1]": ["create", "delete"],
        "null_resource.instance[2]": ["no-op"],
    }
    fleet.run("apply", "-input=false", "batch.tfplan")

    second = [first[0], f"web-{WORKSPACE}-1-2.0.0", first[2]]
    outputs = fleet.outputs()
    assert outputs[SERVICE_IDS_OUTPUT] == second
    assert outputs["artifact_versions"] == moved
    services = agent_services(consul_addr)
    assert sorted(services) == sorted(second)
    assert services[second[1]]["Meta"]["deploy_run_id"] == "run-3"
    # The slots that did not change were not touched: same registration, same process.
    assert [services[service_id]["Meta"]["deploy_run_id"] for service_id in (second[0], second[2])] == ["run-1"] * 2
    assert fleet.pids()[0::2] == pids[0::2]
    assert all(process_alive(pid) for pid in pids[0::2])
    assert not process_alive(pids[1])
    assert not (fleet.instance_root / "web-1-1.0.0").exists()
    wait_passing(consul_addr, second)
    moved_pids = fleet.pids()

    # A shorter list removes the last slot: its destroy provisioner deregisters and stops it.
    assert fleet.plan(moved[:2], "run-4", out="shrink.tfplan")["null_resource.instance[2]"] == ["delete"]
    fleet.run("apply", "-input=false", "shrink.tfplan")
    assert sorted(agent_services(consul_addr)) == sorted(second[:2])
    assert fleet.outputs()[SERVICE_IDS_OUTPUT] == second[:2]
    assert not process_alive(moved_pids[2])
    assert not (fleet.instance_root / "web-2-1.0.0").exists()
    assert all(process_alive(pid) for pid in moved_pids[:2])

    fleet.run("destroy", "-auto-approve", "-input=false", *fleet.var_args(moved[:2], "run-5"))
    assert agent_services(consul_addr) == {}
    assert not any(process_alive(pid) for pid in moved_pids)
    assert list(fleet.instance_root.iterdir()) == []
