"""End to end: the drift check (flows/drift_check.py) against a deployed workspace, the real server, Terraform,
S3 (moto) and the Consul and Slack stand-ins. Drift is made out of band in Consul, and on disk: the local
stack's null provider reads nothing back, so a refresh-only plan finds no resource drift, but the stack's
``instance_present`` output is evaluated again and leaves the state when the instance's files are gone
(tests/test_terraform.py covers resource drift and a hand-edited state on the real binary)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import consul
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from icd.deploy.workdir import open_terraform
from icd.health.consul import parse_consul_address
from icd.paths import PROJECT_ROOT
from icd.tools.terraform import Terraform, build_env
from standins.slack import ReceivedMessage
from tests.plugins.deploy_env import ENDED, DeployEnv

pytestmark = pytest.mark.slow


def _check(env: DeployEnv, workspace: str) -> str:
    """Run the drift check of ``workspace`` now (as the schedule would once its interval passed); its state
    message."""
    run: FlowRun = run_deployment(  # type: ignore[assignment]  # the sync variant
        "drift-check/drift-check", parameters={"workspaces": [workspace], "force": True}, timeout=0
    )
    done = env.wait_for(run.id, states=ENDED)
    assert done.state is not None
    assert done.state.type.value == "COMPLETED", f"{done.state}\n{env.worker.log_tail(60)}"
    return done.state.message or ""


def _told(env: DeployEnv, workspace: str) -> list[ReceivedMessage]:
    return [m for m in env.slack.messages if m.thread_key == f"drift:{workspace}"]


def _terraform(env: DeployEnv, workspace: str, tmp_path: Path) -> Terraform:
    """A working directory on the workspace's state, with the credentials a deploy's apply step gets."""
    credentials, _ = env.registry.terraform_env(workspace, "apply")
    return open_terraform(
        PROJECT_ROOT / "examples/stacks/local",
        tmp_path / f"edit-{uuid.uuid4().hex[:6]}",
        backend=env.registry.state_backend(),
        workspace=workspace,
        env=credentials,
    )


def _raw(terraform: Terraform, *args: str, credentials: dict[str, str]) -> str:
    done = subprocess.run(  # the pinned binary, fixed arguments
        [terraform.binary, *args],
        cwd=terraform.working_dir,
        env=build_env(terraform.cli_config_file, credentials),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _push_state(env: DeployEnv, workspace: str, tmp_path: Path, state: dict[str, Any]) -> None:
    """``terraform state push`` of ``state`` with the next serial: S3 and the lock table's digest agree."""
    terraform = _terraform(env, workspace, tmp_path)
    credentials, _ = env.registry.terraform_env(workspace, "apply")
    current = json.loads(_raw(terraform, "state", "pull", credentials=credentials))
    pushed = {**state, "serial": int(current["serial"]) + 1}
    (terraform.working_dir / "edited.tfstate").write_text(json.dumps(pushed))
    _raw(terraform, "state", "push", "edited.tfstate", credentials=credentials)


def _edit_state(env: DeployEnv, workspace: str, tmp_path: Path, attribute: str, value: str) -> dict[str, Any]:
    """Change one attribute of the instance in the workspace's state, by hand; returns the state as it was."""
    terraform = _terraform(env, workspace, tmp_path)
    credentials, _ = env.registry.terraform_env(workspace, "apply")
    original: dict[str, Any] = json.loads(_raw(terraform, "state", "pull", credentials=credentials))
    edited = json.loads(json.dumps(original))
    [instance] = next(r for r in edited["resources"] if r["name"] == "instance")["instances"]
    target = instance["attributes"]
    *parents, leaf = attribute.split(".")
    for part in parents:
        target = target[part]
    target[leaf] = value
    _push_state(env, workspace, tmp_path, edited)
    return original


def test_drift_is_told_once_per_change_ignored_when_asked_and_never_checked_during_a_deploy(
    deploy_env: DeployEnv, tmp_path: Path
) -> None:
    env = deploy_env
    names = env.service(approval_timeout_seconds=900)
    ws = names.workspace
    run, version = env.deploy_until_paused(names)
    deployed = env.approve(run.id, ws)
    assert deployed.state is not None
    assert deployed.state.name == "Deployed", deployed.state
    running = env.registry.running(ws, names.namespace)
    assert running is not None
    assert running.service_id
    endpoint = parse_consul_address(env.consul.http_addr)
    agent = consul.Consul(host=endpoint.host, port=endpoint.port).agent

    # A clean workspace stays quiet.
    assert f"{ws}: clean" in _check(env, ws)
    assert _told(env, ws) == []

    # The instance deregistered out of band: told once, naming it, the deploy that made it and the way back.
    agent.service.deregister(running.service_id)
    said = _check(env, ws)
    assert f"{ws}: 1 drifted (told: detected)" in said, said
    [detected] = _told(env, ws)
    assert f"consul.{running.service_id}" in detected.text
    assert "not registered in Consul" in detected.text
    assert str(run.id) in detected.text, "the deploy run that last touched it"
    assert f"-p workspace={ws} -p version={version}" in detected.text
    # The same drift again: nothing new to tell.
    assert f"{ws}: 1 drifted;" in _check(env, ws) + ";"
    assert len(_told(env, ws)) == 1

    # An instance the ignore list names (who and why) stays quiet.
    env.workspaces[ws]["drift_ignore"] = [{"address": "consul.canary-*", "by": "alice", "why": "load test"}]
    env.write_config()
    canary = f"canary-{uuid.uuid4().hex[:6]}"
    agent.service.register(names.service_name, service_id=canary, meta={"workspace": ws, "deploy_run_id": "by-hand"})
    said = _check(env, ws)
    assert f"{ws}: 1 drifted;" in said + ";", said
    assert len(_told(env, ws)) == 1

    # A change in the drift is told again.
    stray = f"stray-{uuid.uuid4().hex[:6]}"
    agent.service.register(names.service_name, service_id=stray, meta={"workspace": ws, "deploy_run_id": "by-hand"})
    said = _check(env, ws)
    assert f"{ws}: 2 drifted (told: changed)" in said, said
    changed = _told(env, ws)[-1]
    assert len(_told(env, ws)) == 2
    assert f"consul.{stray}" in changed.text
    assert "registered in Consul for this workspace, but not in its state" in changed.text
    assert "load test" in changed.text, "what the ignore list hid is shown, with why"

    # Put back: told resolved, once.
    agent.service.deregister(stray)
    agent.service.deregister(canary)
    agent.service.register(
        names.service_name, service_id=running.service_id, meta={"workspace": ws, "deploy_run_id": str(run.id)}
    )
    assert f"{ws}: clean (told: resolved)" in _check(env, ws)
    assert len(_told(env, ws)) == 3
    assert "resolved" in _told(env, ws)[-1].text
    assert f"{ws}: clean;" in _check(env, ws) + ";"
    assert len(_told(env, ws)) == 3

    # The instance's files removed behind Terraform's back: its refresh-only plan sees the stack's
    # instance_present output leave the state. Told; put back, told resolved.
    pid_file = Path(str(running.outputs["instance_dir"])) / ".owner"
    kept = pid_file.read_bytes()
    pid_file.unlink()
    said = _check(env, ws)
    assert f"{ws}: 1 drifted (told: detected)" in said, said
    assert "output.instance_present" in _told(env, ws)[-1].text
    pid_file.write_bytes(kept)
    assert f"{ws}: clean (told: resolved)" in _check(env, ws)
    assert len(_told(env, ws)) == 5

    # The state edited by hand (pushed through Terraform, as an operator would): what it records no longer
    # gives its outputs. Told; the original pushed back, told resolved.
    original = _edit_state(env, ws, tmp_path, "triggers.artifact_version", "edited-by-hand")
    said = _check(env, ws)
    assert f"{ws}: 1 drifted (told: detected)" in said, said
    assert "output.artifact_version" in _told(env, ws)[-1].text
    _push_state(env, ws, tmp_path, original)
    assert f"{ws}: clean (told: resolved)" in _check(env, ws)
    assert len(_told(env, ws)) == 7

    # While a deploy of the workspace is in progress, the check leaves it alone and says so.
    env.repo.commit("a second version")
    waiting, _ = env.deploy_until_paused(names)
    agent.service.deregister(running.service_id)
    said = _check(env, ws)
    assert f"{ws}: skipped, a deploy of it is in progress" in said, said
    assert len(_told(env, ws)) == 7
    env.answer(waiting.id, env.plan_sha(ws, waiting.id), decision="reject")
    env.wait_for(waiting.id, states=ENDED)
