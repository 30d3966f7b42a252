"""End to end: a build signs its artifact's provenance, a deploy refuses a doctored or unsigned one (the run
ends Failed with the reason, nothing planned or applied), and an apply signs its deployment record."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cli.registry import main as icd_registry
from icd.registry import provenance as prov
from tests.plugins.deploy_env import ENDED, DeployEnv, Names
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def _envelope_key(env: DeployEnv, names: Names, version: int) -> str:
    return f"{env.registry.prefix}namespaces/{names.namespace}/versions/{version:08d}.provenance.dsse.json"


def _put(env: DeployEnv, key: str, envelope: Any) -> None:
    env.registry.s3_client().put_object(Bucket=env.registry.bucket, Key=key, Body=json.dumps(envelope).encode())


def _refused(env: DeployEnv, names: Names, version: int, says: str) -> None:
    """A deploy of ``version`` ends Failed naming the broken provenance, told to operators, nothing planned."""
    run = env.deploy(names.workspace, version)
    done = env.wait_for(run.id, states=ENDED)
    assert done.state is not None
    assert (done.state.type.value, done.state.name) == ("FAILED", "Failed"), done.state
    message = env.state_message(run.id)
    assert says in message, message
    assert f"{names.namespace} v{version}" in message, message
    told = [m.text for m in env.slack.messages if f"Deploy failed on {names.workspace}: ProvenanceError" in m.text]
    assert told, [m.text for m in env.slack.messages][-5:]
    assert env.registry.plan_store().sha256_of(names.workspace, str(run.id)) is None, "nothing was planned"
    assert env.registry.workspace_state(names.workspace)[0] is None, "nothing was applied"


def test_a_doctored_or_unsigned_provenance_is_refused_and_the_genuine_one_deploys(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service(approval_timeout_seconds=900)
    build = env.build(names)
    registry = env.registry.registry()
    version = registry.last_version(names.namespace)
    record = registry.get(names.namespace, version)

    # The build wrote it beside the version, signed with the registry block's key, naming the image.
    genuine = registry.provenance(names.namespace, version)
    verified = registry.verify_provenance(record, "local")
    statement = verified.statement
    assert statement["subject"][0] == {
        "name": record.artifacts["local"],
        "digest": {"sha256": record.artifact_sha256["local"]},
        "annotations": {"platform": "local"},
    }
    external = statement["predicate"]["buildDefinition"]["externalParameters"]
    assert external["repository"] == str(env.repo.path)
    assert (external["ref"], external["commit"]) == ("main", record.git_commit)
    assert len(external["templateDigest"]["sha256"]) == 64
    assert statement["predicate"]["runDetails"]["metadata"]["invocationId"] == str(build.id)
    assert statement["predicate"]["runDetails"]["builder"]["id"] == registry.builder_id

    key = _envelope_key(env, names, version)
    # Doctored: the payload names another commit, its signature left as it was.
    doctored = json.loads(base64.b64decode(genuine["payload"]))
    doctored["predicate"]["buildDefinition"]["externalParameters"]["commit"] = "0" * 40
    _put(env, key, {**genuine, "payload": base64.b64encode(json.dumps(doctored).encode()).decode()})
    _refused(env, names, version, "changed after it was signed")
    # Unsigned.
    _put(env, key, {**genuine, "signatures": []})
    _refused(env, names, version, "is unsigned")
    # Gone (as for a version registered before provenance existed).
    env.registry.s3_client().delete_object(Bucket=env.registry.bucket, Key=key)
    _refused(env, names, version, "has no provenance")

    # The genuine one back: the same version plans and asks (so nothing else was what refused it).
    _put(env, key, genuine)
    run = env.deploy(names.workspace, version)
    paused = env.wait_for(run.id, states={"PAUSED", *ENDED})
    assert paused.state is not None
    assert paused.state.type.value == "PAUSED", paused.state
    env.wait_for_question(run.id)
    env.answer(run.id, env.plan_sha(names.workspace, run.id), decision="reject")
    rejected = env.wait_for(run.id, states=ENDED)
    assert rejected.state is not None
    assert rejected.state.name == "Rejected", rejected.state
    # A rejection applies nothing, and its decision is kept signed all the same (the audit's "decision" link).
    [record] = registry.deployment_records(names.workspace)
    assert record.verified is not None, record.problem
    said = record.verified.statement
    assert said["verdict"]["outcome"] == "Rejected"
    assert said["approval"]["source"] == "ui"
    assert said["apply"]["outputs"] == {}


def test_an_apply_signs_a_deployment_record_naming_the_plan_the_approver_and_the_outputs_rolled_back_too(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service(approval_timeout_seconds=900, health_deadline_seconds=8)
    run, version = env.deploy_until_paused(names)
    sha = env.plan_sha(names.workspace, run.id)
    done = env.approve(run.id, names.workspace, approver="bob")
    assert done.state is not None
    assert done.state.name == "Deployed", done.state

    registry = env.registry.registry()
    [record] = registry.deployment_records(names.workspace)
    assert record.problem == ""
    assert record.where.endswith(f"/deployments/{names.workspace}/{run.id}.dsse.json")
    assert record.verified is not None
    assert record.verified.payload_type == prov.DEPLOYMENT_PAYLOAD_TYPE
    assert record.verified.keyid in registry.provenance_public_keys()
    said = record.verified.statement
    artifact = registry.get(names.namespace, version)
    assert said["artifact"] == {
        "namespace": names.namespace,
        "version": version,
        "name": artifact.artifacts["local"],
        "digest": {"sha256": artifact.artifact_sha256["local"]},
    }
    assert said["plan"] == {"sha256": sha}
    assert said["approval"] == {"approvers": "bob", "source": "ui", "comment": "lgtm"}
    assert said["apply"]["runId"] == str(run.id)
    assert said["apply"]["outputs"], "the stack's outputs"
    assert said["verdict"]["outcome"] == "Deployed"
    assert said["verdict"]["gate"].startswith("passing after ")
    # Its signature is DSSE over the stored bytes: checkable with the public key alone.
    public = prov.load_public_key(
        base64.b64encode(prov.raw_public_key(next(iter(registry.provenance_public_keys().values())))).decode()
    )
    assert prov.verify_envelope(record.envelope, [public], payload_type=prov.DEPLOYMENT_PAYLOAD_TYPE).statement == said

    # An unhealthy deploy that rolls back is recorded too, with the gate's verdict.
    app = env.repo.read("src/app.py")
    broken = app.replace("healthy = not (instance_dir / UNHEALTHY_SWITCH).exists()", "healthy = False")
    assert broken != app
    env.repo.commit("bad", {"src/app.py": broken}, branch=f"bad-{names.workspace}")
    bad_run, _ = env.deploy_until_paused(names, ref=f"bad-{names.workspace}")
    rolled = env.approve(bad_run.id, names.workspace, approver="carol")
    assert rolled.state is not None
    assert rolled.state.name == "RolledBack", (rolled.state.message, env.worker.log_tail(60))
    records = registry.deployment_records(names.workspace)
    assert [r.verified.statement["verdict"]["outcome"] for r in records if r.verified] == ["Deployed", "RolledBack"]
    verdict = records[1].verified.statement["verdict"]  # type: ignore[union-attr]
    assert not verdict["gate"].startswith("passing"), verdict
    assert f"v{version}" in verdict["detail"], verdict
    assert records[1].verified.statement["approval"]["approvers"] == "carol"  # type: ignore[union-attr]

    # A teardown applies too (no image, so no provenance checked): its record says so.
    teardown_argv = ["--block", "registry", "teardown", names.workspace, "--by", "ops", "--why", "retired"]
    assert icd_registry(teardown_argv) == 0
    [teardown] = wait_until(
        lambda: env.runs_of("deploy-artifact", workspace=names.workspace, teardown=True), timeout=120
    )
    env.wait_for(teardown.id, states={"PAUSED"})
    wait_until(lambda: "Tear down" in env.state_message(teardown.id), timeout=30, message="the run never asked")
    torn = env.approve(teardown.id, names.workspace, approver="dave")
    assert torn.state is not None
    assert torn.state.name == "TornDown", torn.state
    last = registry.deployment_records(names.workspace)[-1].verified
    assert last is not None
    assert (last.statement["verdict"]["outcome"], last.statement["verdict"]["gate"]) == ("TornDown", "")
    assert last.statement["approval"]["approvers"] == "dave"
