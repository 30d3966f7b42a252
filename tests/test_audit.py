"""End to end: ``icd-audit`` joins the records the loop keeps into one chain, each link checked as it is read.

A deployed version, one whose deploy was rolled back, and a rejected plan, against the real server,
Terraform, S3 (moto) and the Consul stand-in; then a doctored provenance shows as a broken link.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cli.audit import main as icd_audit
from tests.plugins.deploy_env import DeployEnv

pytestmark = pytest.mark.slow


def _audit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = icd_audit([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _walk(links: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for link in links:
        found.append(link)
        found += _walk(link["children"])
    return found


def _kinds(links: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [link for link in _walk(links) if link["kind"] == kind]


def test_the_audit_shows_every_link_of_a_deployed_a_rolled_back_and_a_rejected_version(
    deploy_env: DeployEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deploy_env
    names = env.service(approval_timeout_seconds=900, health_deadline_seconds=8)
    ws = names.workspace
    run, good = env.deploy_until_paused(names)
    assert env.approve(run.id, ws, approver="bob").state.name == "Deployed"  # type: ignore[union-attr]

    code, deployed = _audit(capsys, names.namespace, str(good))
    assert code == 0, json.dumps(deployed, indent=1)
    assert deployed["intact"] is True
    links = deployed["links"]
    [commit] = _kinds(links, "commit")
    version = env.registry.registry().get(names.namespace, good)
    assert commit["label"] == version.git_commit
    assert commit["facts"]["commit author"] == "dev <dev@example.com>"
    [provenance] = _kinds(links, "provenance")
    assert provenance["status"] == "ok"
    assert provenance["facts"]["build run"] == version.labels["build_run_id"]
    [plan] = _kinds(links, "plan")
    assert plan["facts"]["run"] == str(run.id)
    [decision] = _kinds(links, "decision")
    assert (decision["label"], decision["facts"]["by"]) == (f"approved (run {run.id})", "bob")
    assert decision["facts"]["source"] == "Prefect UI / API (typed name)"
    [applied] = _kinds(links, "apply")
    assert applied["facts"]["outcome"] == "Deployed"
    [instance] = _kinds(links, "instance")
    assert instance["facts"]["health"] == "passing"
    # The same chain from what the workspace runs, and from its Consul instance.
    assert _audit(capsys, "--workspace", ws)[1]["subject"] == f"{names.namespace} v{good} in {ws}"
    assert _audit(capsys, "--instance", instance["label"])[1]["subject"] == f"{names.namespace} v{good} in {ws}"

    # A version whose deploy is rolled back, then a plan of it that is rejected.
    app = env.repo.read("src/app.py")
    broken_app = app.replace("healthy = not (instance_dir / UNHEALTHY_SWITCH).exists()", "healthy = False")
    env.repo.commit("bad", {"src/app.py": broken_app}, branch=f"bad-{ws}")
    bad_run, bad = env.deploy_until_paused(names, ref=f"bad-{ws}")
    assert env.approve(bad_run.id, ws, approver="carol").state.name == "RolledBack"  # type: ignore[union-attr]
    again = env.deploy(ws, bad)
    env.wait_for(again.id, states={"PAUSED"})
    env.wait_for_question(again.id)
    env.answer(again.id, env.plan_sha(ws, again.id), approver="dave", decision="reject")
    assert env.wait_for(again.id, states={"CANCELLED", "COMPLETED"}).state.name == "Rejected"  # type: ignore[union-attr]

    code, audited = _audit(capsys, names.namespace, str(bad))
    assert code == 0, json.dumps(audited, indent=1)
    decisions = {d["label"]: d["facts"]["by"] for d in _kinds(audited["links"], "decision")}
    assert decisions == {f"approved (run {bad_run.id})": "carol", f"rejected (run {again.id})": "dave"}
    applies = [a["facts"].get("outcome", a["label"]) for a in _kinds(audited["links"], "apply")]
    assert sorted(applies) == ["RolledBack", "nothing applied: rejected"]
    assert _kinds(audited["links"], "instance")[0]["label"] == "none carries this deploy now"
    # The good version's chain now holds the rollback to it, decided by the workspace's policy.
    rolled = _kinds(_audit(capsys, names.namespace, str(good))[1]["links"], "decision")
    assert f"automatic rollback by run {bad_run.id}" in [d["label"] for d in rolled]

    # A doctored provenance: that link is broken, with the reason, and the exit code says so.
    store = env.registry.s3_client()
    key = f"{env.registry.prefix}namespaces/{names.namespace}/versions/{good:08d}.provenance.dsse.json"
    genuine = store.get_object(Bucket=env.registry.bucket, Key=key)["Body"].read()
    envelope = json.loads(genuine)
    envelope["payload"] = envelope["payload"][:-8] + "AAAAAAA="
    store.put_object(Bucket=env.registry.bucket, Key=key, Body=json.dumps(envelope).encode())
    try:
        code, doctored = _audit(capsys, names.namespace, str(good))
        assert code == 1
        [provenance] = _kinds(doctored["links"], "provenance")
        assert provenance["status"] == "broken"
        assert provenance["reason"]
        text_code = icd_audit([names.namespace, str(good)])
        assert text_code == 1
        assert "✗ provenance" in capsys.readouterr().out
    finally:
        store.put_object(Bucket=env.registry.bucket, Key=key, Body=genuine)
