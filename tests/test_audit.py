"""``icd-audit`` joins the records the loop keeps into one chain, each link checked as it is read.

End to end (slow): a deployed version, one whose deploy was rolled back, and a rejected plan, against the real
server, Terraform, S3 (moto) and the Consul stand-in; then a doctored provenance shows as a broken link.
Fast: a rollout's plans and instances, from records handed to the auditor directly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from cli.audit import Auditor
from cli.audit import main as icd_audit
from icd.audit import PlanId, batch_gate, batch_plan_sha, chain, parse_plan_id
from icd.config import parse_config
from icd.deploy.rollout import batch_line
from icd.health.gate import BatchGateResult, InstanceHealth
from icd.registry.plans import PlanOfVersion
from icd.registry.provenance import CheckedEnvelope, VerifiedStatement
from tests.plugins.deploy_env import DeployEnv


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


@pytest.mark.slow
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


# --- fast: a rollout's plans and a fleet's instances ---------------------------------------------------------

RUN = "0492db32-75bb-4f32-a2ce-d18447d52d11"
GATE = "; ".join(  # as a rollout signs it: each applied batch's line, ending with its plan's whole hash
    (
        f"batch 1/3: web-p-0-2 healthy after 2 s (plan {'a' * 64})",
        f"batch 2/3: web-p-1-2 healthy after 2 s (plan {'b' * 64})",
        f"batch 3/3: web-p-2-2 x (plan {'c' * 64})",
    )
)
CONFIG = """
[namespaces."acme/web"]
repository = "/tmp/none"
service_name = "web"

[workspaces.p]
follows = "acme/web@production"
stack = "examples/stacks/local-fleet"
rollout = {instances = 3, max_parallel = 1}
"""


@pytest.mark.parametrize(
    ("plan_id", "expected"),
    [
        pytest.param(RUN, PlanId(RUN), id="approved"),
        pytest.param(f"{RUN}-b2", PlanId(RUN, "batch", 2), id="batch"),
        pytest.param(f"{RUN}-b100", PlanId(RUN, "batch", 100), id="batch-100"),
        pytest.param(f"{RUN}-rollback", PlanId(RUN, "rollback"), id="rollback"),
        pytest.param(f"{RUN}-revert", PlanId(RUN, "revert"), id="revert"),
        pytest.param("0492db32-75bb-4f32-a2ce-b23456789012", PlanId("0492db32-75bb-4f32-a2ce-b23456789012"), id="uuid"),
        pytest.param("run-b", PlanId("run-b"), id="b-without-number"),
    ],
)
def test_parse_plan_id(plan_id: str, expected: PlanId) -> None:
    assert parse_plan_id(plan_id) == expected


def test_batch_gate_finds_its_batchs_line() -> None:
    assert batch_gate(GATE, 2) == f"batch 2/3: web-p-1-2 healthy after 2 s (plan {'b' * 64})"
    assert batch_gate(GATE, 4) is None
    assert batch_gate("", 1) is None


def test_each_batch_line_a_rollout_signs_is_read_back_whole() -> None:
    """The lines as the rollout writes them (``batch_line``), joined as it signs them: a line that holds "; "
    itself (a batch that moved no slot, a check's output) is still one line, with its plan's hash."""
    shas = ["a" * 64, "b" * 64, "c" * 64]
    healthy = BatchGateResult(True, 2.0, (InstanceHealth("web-p-0-2", "passing", "", 2.0),))
    untouched = BatchGateResult(True, 0.0, ())
    output = "http: critical: HTTP 500; batch 3/3: web-p-2-2 healthy after 1 s (plan " + "d" * 64 + ")"
    failing = BatchGateResult(False, 5.0, (InstanceHealth("web-p-2-2", "critical", output, 0.0),))
    lines = [
        f"{batch_line(f'batch {n}/3', gate)} (plan {sha})"
        for n, gate, sha in zip((1, 2, 3), (healthy, untouched, failing), shas, strict=True)
    ]
    assert lines[1] == f"batch 2/3: applied; no instance replaced (plan {shas[1]})"
    signed = "; ".join(lines)
    assert [batch_gate(signed, n) for n in (1, 2, 3)] == lines
    assert [batch_plan_sha(batch_gate(signed, n) or "") for n in (1, 2, 3)] == shas
    assert "; batch 3/3" not in lines[2], "a check's text can't pass for another batch's line"


def _entry(service_id: str, **meta: str) -> dict[str, Any]:
    return {
        "Node": {"Node": "node-1"},
        "Service": {"ID": service_id, "Service": "web", "Meta": meta},
        "Checks": [
            {"Node": "node-1", "CheckID": f"service:{service_id}", "Status": "passing", "ServiceID": service_id}
        ],
    }


def _auditor(plan_ids: list[str], records: list[str]) -> Auditor:
    """An auditor over records handed to it: the stored plans of acme/web v2 in p, the signed deploy records of
    ``records`` (runs), and Consul's instances of web (two of the fleet's three slots, one of another workspace)."""
    statement = {
        "plan": {"sha256": "a" * 64},
        "approval": {"approvers": "ops", "source": "slack"},
        "verdict": {"outcome": "Deployed", "gate": GATE},
        "apply": {"runId": RUN, "outputs": {"service_ids": ["web-p-0-2", "web-p-1-2", "web-p-2-2"]}},
        "recordedAt": "2026-12-01T12:00:00Z",
    }
    checked = [
        CheckedEnvelope(f"records/p/{run}.dsse.json", None, VerifiedStatement(statement, "key", "t")) for run in records
    ]
    shas = {RUN: "a" * 64, f"{RUN}-b2": "b" * 64, f"{RUN}-b3": "c" * 64}
    plans = [PlanOfVersion("p", plan_id, shas.get(plan_id, "d" * 64)) for plan_id in plan_ids]
    entries = [
        _entry("web-p-0-2", workspace="p", deploy_run_id=RUN, artifact_version="2", slot="0"),
        _entry("web-p-1-2", workspace="p", deploy_run_id=RUN, artifact_version="2", slot="1"),
        _entry("web-s-0-2", workspace="s", deploy_run_id="other", artifact_version="2", slot="0"),
    ]
    block = SimpleNamespace(
        registry=lambda: SimpleNamespace(deployment_records=lambda workspace: checked),
        plan_store=lambda: SimpleNamespace(plans_of=lambda namespace, version: plans),
    )
    consul = SimpleNamespace(
        get_client=lambda: SimpleNamespace(health=SimpleNamespace(service=lambda name: (1, entries)))
    )
    auditor = Auditor(block, consul, parse_config(CONFIG, where="test"))  # type: ignore[arg-type]
    auditor._drift_memories["p"] = None  # no drift check has run: a fact, not a gap
    return auditor


def _plans_chain(auditor: Auditor) -> dict[str, Any]:
    version = SimpleNamespace(namespace="acme/web", version=2, build_label="2")
    links = auditor._plans(version, "p")  # type: ignore[arg-type]  # the fields _plans reads
    found: dict[str, Any] = json.loads(chain("test", links).to_json())
    return found


def test_a_rollouts_batch_plans_are_covered_by_its_approval_and_every_instance_is_listed() -> None:
    found = _plans_chain(_auditor([RUN, f"{RUN}-b2", f"{RUN}-b3"], records=[RUN]))
    assert found["intact"]
    batches = [link for link in found["links"] if "batch" in link["facts"]]
    assert [(b["facts"]["run"], b["facts"]["batch"]) for b in batches] == [(RUN, "2"), (RUN, "3")]
    decisions = [b["children"][0] for b in batches]
    assert [(d["status"], d["label"]) for d in decisions] == [
        ("ok", f"covered by the rollout's approval (run {RUN})")
    ] * 2
    assert [d["facts"]["gate"] for d in decisions] == [batch_gate(GATE, 2), f"batch 3/3: web-p-2-2 x (plan {'c' * 64})"]
    instances = _kinds(found["links"], "instance")
    assert [(i["label"], i["facts"]["slot"], i["facts"]["health"]) for i in instances] == [
        ("web-p-0-2", "0", "passing"),
        ("web-p-1-2", "1", "passing"),
    ]


def test_a_batch_plan_without_its_runs_signed_decision_is_missing() -> None:
    found = _plans_chain(_auditor([f"{RUN}-b2"], records=[]))
    assert not found["intact"]
    (decision,) = _kinds(found["links"], "decision")
    assert (decision["status"], decision["label"]) == ("missing", f"batch 2 of run {RUN}")


def test_a_batch_plan_other_than_the_one_its_signed_line_names_is_broken() -> None:
    auditor = _auditor([f"{RUN}-b2"], records=[RUN])
    [record] = auditor.block.registry().deployment_records("p")  # type: ignore[attr-defined]
    verdict = record.verified.statement["verdict"]
    verdict["gate"] = f"batch 2/3: web-p-1-2 healthy after 2 s (plan {'e' * 64})"
    found = _plans_chain(auditor)
    assert not found["intact"]
    (decision,) = _kinds(found["links"], "decision")
    assert decision["status"] == "broken"
    assert f"applied plan {'e' * 64}, the stored one is {'b' * 64}" in decision["reason"]
    verdict["gate"] = f"batch 2/3: web-p-1-2 healthy after 2 s (plan {'b' * 64})"
    assert _plans_chain(auditor)["intact"]
    # A line that ends with no plan: every rollout signs one per applied batch, so nothing vouches for this plan.
    verdict["gate"] = f"batch 2/3: web-p-1-2 healthy after 2 s (plan {'b' * 64}) and more"
    (decision,) = _kinds(_plans_chain(auditor)["links"], "decision")
    assert (decision["status"], decision["reason"]) == ("broken", "the signed record's line for batch 2 names no plan")
