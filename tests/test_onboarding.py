"""End to end: a second service onboarded as a team would, sharing nothing with the example but the project.

``icd-service new`` writes the service's own repository (a tiny HTTP service, its Packer template), its own
stack and its icd.toml entries (its own namespace, service name and workspace); the team commits it to its
own git repository, runs ``icd-service check``, and the deployed flows take it from v1 to v2 through the
pre-flight step, Packer, the registry, Terraform, the approval and the health gate. A breach fails the
build before Packer runs, with every finding in the run's state message and in Slack.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli.service import main as icd_service
from examples.local_env import git
from icd.config import load_config
from icd.service.preflight import check_service, service_under_check
from tests.helpers import consul_instances, run_artifacts, task_runs
from tests.plugins.deploy_env import DeployEnv, Names
from tests.waiting import wait_until


def _scaffold(env: DeployEnv, tmp_path: Path) -> tuple[Names, Path]:
    """A new service from the scaffold, committed as v1 to a git repository of its own."""
    tag = uuid.uuid4().hex[:6]
    names = Names(f"acmeinc/inventory-{tag}", f"inventory-{tag}-staging", f"inventory-{tag}")
    root = tmp_path / f"inventory-{tag}"
    command = ["--config", str(env.config_path), "new", names.service_name, "--namespace", names.namespace]
    assert icd_service([*command, "--workspace", names.workspace, "--channel", "latest", "--dir", str(root)]) == 0
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "v1")
    return names, root


def _commit(root: Path, message: str, path: Path, old: str, new: str, *, branch: str = "main") -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    git(root, "checkout", "-q", "-B", branch)
    path.write_text(text.replace(old, new, 1))
    git(root, "commit", "-q", "-am", message)
    git(root, "checkout", "-q", "main")


def _answer(instance: dict[str, Any]) -> Any:
    """What the deployed service answers on GET /, where Consul says it listens."""
    service = instance["Service"]
    return httpx.get(f"http://{service['Address']}:{service['Port']}/", timeout=10).json()


def _plan_document(workspace: str, run_id: Any) -> str:
    return "".join(str(a.data) for a in run_artifacts(run_id, f"plan-{workspace}"))


def test_a_scaffolded_service_is_onboarded_from_v1_to_v2(
    deploy_env: DeployEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deploy_env
    names, root = _scaffold(env, tmp_path)
    ns, ws = names.namespace, names.workspace
    check = ["--config", str(env.config_path), "check", str(root), "--namespace", ns, "--block", "registry"]
    capsys.readouterr()
    assert icd_service(check) == 0, capsys.readouterr()
    assert capsys.readouterr().out.startswith(f"{ns} honours the service contract")

    run1, v1 = env.deploy_until_paused(names)
    [build1] = env.runs_of("build-artifact", namespace=ns)
    assert [t.state.name for t in task_runs(build1.id, "preflight-check")] == ["Completed"]
    done1 = env.approve(run1.id, ws)
    assert done1.state is not None
    assert done1.state.name == "Deployed", done1.state
    label1 = env.registry.registry().get(ns, v1).build_label
    [instance] = consul_instances(env, names.service_name)
    assert instance["Service"]["ID"] == f"{names.service_name}-{ws}-{label1}"
    meta = instance["Service"]["Meta"]
    assert (meta["deploy_run_id"], meta["namespace"], meta["artifact_version"]) == (str(run1.id), ns, label1)
    assert all(check["Status"] == "passing" for check in instance["Checks"])
    assert _answer(instance) == {"service": names.service_name, "version": label1}
    assert consul_instances(env, "web") == [], "the example's service is not involved"

    _commit(
        root,
        "v2",
        root / "src" / "app.py",
        '{"service": release.get("service_name"), "version": release.get("version")}',
        '{"service": release.get("service_name"), "version": release.get("version"), "items": []}',
    )
    run2, v2 = env.deploy_until_paused(names)
    assert v2 == v1 + 1
    build2 = env.runs_of("build-artifact", namespace=ns)[-1]
    # The second pre-flight read the workspace's state, which now holds this service: no breach.
    assert [t.state.name for t in task_runs(build2.id, "preflight-check")] == ["Completed"]
    assert f"{ns} v{v1} -> v{v2}" in _plan_document(ws, run2.id), "the plan shows the artifact version diff"
    done2 = env.approve(run2.id, ws)
    assert done2.state is not None
    assert done2.state.name == "Deployed", done2.state
    label2 = env.registry.registry().get(ns, v2).build_label
    [instance] = consul_instances(env, names.service_name)
    assert instance["Service"]["Meta"]["deploy_run_id"] == str(run2.id), "v1 was replaced"
    assert _answer(instance) == {"service": names.service_name, "version": label2, "items": []}
    assert env.registry.registry().get_channel(ns, ws).version == v2  # type: ignore[union-attr]


def test_a_breach_fails_the_build_before_packer_with_every_finding(deploy_env: DeployEnv, tmp_path: Path) -> None:
    env = deploy_env
    names, root = _scaffold(env, tmp_path)
    template = root / "packer" / f"{names.service_name}.pkr.hcl"
    # The template stops declaring a variable the build passes (committed: the build checks out the branch) ...
    declared = re.search(r'variable "commit" \{.*?\n\}\n\n', template.read_text(), flags=re.DOTALL)
    assert declared is not None
    _commit(root, "drop commit", template, declared.group(0), "", branch="broken")
    # ... and the stack (read from the workers' disk) stops handing the instance the gate's Service Meta.
    stack = root / "stack" / "main.tf"
    stack.write_text(stack.read_text().replace('      "DEPLOY_RUN_ID=${var.deploy_run_id}",\n', "", 1))

    git(root, "checkout", "-q", "broken")
    expected = check_service(service_under_check(load_config(env.config_path), names.namespace, root))
    git(root, "checkout", "-q", "main")
    assert [finding.kind for finding in expected] == ["packer-variable-undeclared", "gate-meta-missing"]

    done = env.build(names, "broken", expect="FAILED")
    message = (done.state.message or "") if done.state is not None else ""
    assert f"ContractBreachError: {names.namespace} breaks the service contract" in message, message
    for finding in expected:
        assert finding.message in message
    assert task_runs(done.id, "build-artifact") == [], "Packer never ran"
    assert env.registry.registry().last_version(names.namespace) == 0, "nothing was registered"
    told = wait_until(
        lambda: [m for m in env.slack.messages if f"Build of {names.namespace} broken failed" in m.text],
        timeout=30,
        message="operators were not told",
    )
    assert "ContractBreachError" in told[0].text
    # Every breach reaches Slack too, not only the run's page (the text is mrkdwn-escaped there).
    assert all(cause in str(told[0].payload) for cause in ("declares no variable", "never reads var.deploy_run_id"))
