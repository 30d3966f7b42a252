"""End to end: the push-to-deploy deployment on a real Prefect server and process worker, with real Packer,
real Terraform (S3 backend on moto), the Consul and Slack stand-ins.

Each test uses its own namespace, workspace and service name, so they share one environment safely.
"""

from __future__ import annotations

import uuid
from typing import Any

import consul
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.flow_runs import resume_flow_run

from flows.approval_housekeeping import approval_housekeeping
from icd.deploy import lock as workspace_lock
from tests.plugins.deploy_env import DeployEnv
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

BROKEN_HEALTH = '''"""An app whose health endpoint always fails."""
from http.server import BaseHTTPRequestHandler
'''


def _names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    return {"namespace": f"acmeinc/t{tag}", "workspace": f"ws{tag}", "service_name": f"svc{tag}"}


def _approve(run_id: Any, plan_sha256: str, approver: str = "alice", decision: str = "approve") -> None:
    resume_flow_run(
        run_id,
        run_input={"decision": decision, "approver": approver, "comment": "lgtm", "plan_sha256": plan_sha256},
    )


def _plan_sha(env: DeployEnv, workspace: str, run_id: Any) -> str:
    sha = env.registry.plan_store().sha256_of(workspace, str(run_id))
    assert sha, "the saved plan must be in S3 before the run pauses"
    return sha


def _services(env: DeployEnv, service_name: str) -> list[dict[str, Any]]:
    host, port = env.consul.address.rsplit(":", 1)
    _, entries = consul.Consul(host=host, port=int(port)).health.service(service_name)
    return list(entries)


def _task_runs(run_id: Any, task_name: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return [run for run in runs if run.name.rsplit("-", 1)[0] == task_name]


def _deploy(env: DeployEnv, names: dict[str, str], ref: str = "main", **extra: Any) -> Any:
    run = env.start(ref=ref, **names, **extra)
    paused = env.wait_for(run.id, states={"PAUSED", "COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert paused.state is not None and paused.state.type.value == "PAUSED", paused.state
    return run


def test_full_cycle_push_v1_then_v2(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    ns, ws = names["namespace"], names["workspace"]

    run1 = _deploy(env, names)
    assert workspace_lock.current_holder(ws) is not None, "the lock is held across the approval wait"
    sha1 = _plan_sha(env, ws, run1.id)
    waiting = [m for m in env.slack.messages if sha1 in str(m.payload)]
    assert waiting and str(run1.id) in str(waiting[0].payload), "operators get the plan hash and a run link"
    _approve(run1.id, sha1)
    done1 = env.wait_for(run1.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done1.state and done1.state.name == "Deployed", done1.state
    reg = env.registry.registry()
    assert reg.get_channel(ns, ws).version == 1  # type: ignore[union-attr]
    history = reg.channel_history(ns, ws)
    assert history[-1].assigned_by == "alice"
    assert history[-1].metadata["plan_sha256"] == sha1
    instances = _services(env, names["service_name"])
    assert len(instances) == 1
    assert instances[0]["Service"]["Meta"]["deploy_run_id"] == str(run1.id)
    assert all(check["Status"] == "passing" for check in instances[0]["Checks"])
    assert workspace_lock.current_holder(ws) is None

    env.repo.commit("v2", {"src/app.py": env.repo.read("src/app.py") + "\n# v2\n"})
    run2 = _deploy(env, names)
    sha2 = _plan_sha(env, ws, run2.id)
    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts()
    plan_docs = [a for a in artifact if a.key == f"plan-{ws}" and a.flow_run_id == run2.id]
    assert plan_docs and f"{ns} v1 -> v2" in str(plan_docs[0].data), "the plan shows the artifact version diff"
    _approve(run2.id, sha2)
    done2 = env.wait_for(run2.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done2.state and done2.state.name == "Deployed", done2.state
    assert reg.get_channel(ns, ws).version == 2  # type: ignore[union-attr]
    instances = _services(env, names["service_name"])
    assert [i["Service"]["Meta"]["deploy_run_id"] for i in instances] == [str(run2.id)], "v1 was replaced"


def test_rejection_applies_nothing_and_releases_the_lock(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    run = _deploy(env, names)
    _approve(run.id, _plan_sha(env, names["workspace"], run.id), approver="bob", decision="reject")
    done = env.wait_for(run.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state
    assert done.state.type.value == "CANCELLED"
    assert done.state.name == "Rejected"
    assert env.registry.registry().get_channel(names["namespace"], names["workspace"]) is None
    assert _services(env, names["service_name"]) == []
    assert workspace_lock.current_holder(names["workspace"]) is None


def test_invalid_approval_is_asked_again_then_a_valid_one_applies(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    run = _deploy(env, names)
    sha = _plan_sha(env, names["workspace"], run.id)
    _approve(run.id, "0" * 64)  # a stale or mistyped hash
    again = env.wait_for_pause(run.id, "approval-1")
    assert again.state and again.state.type.value == "PAUSED", "a wrong hash applies nothing and asks again"
    assert _services(env, names["service_name"]) == []
    _approve(run.id, sha)
    done = env.wait_for(run.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state
    assert done.state.name == "Deployed"


def test_approval_timeout_cancels_releases_and_notifies(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    run = _deploy(env, names, approval_timeout_seconds=2)
    # The server fails a suspension whose deadline passed (its pause-expiration service); then nothing can
    # resume it, and housekeeping must release the lock and tell operators.
    env.wait_for(run.id, states={"FAILED"}, timeout=60)
    ended = approval_housekeeping()
    assert str(run.id) in [e.flow_run_id for e in ended]
    done = env.read(run.id)
    assert done.state
    assert done.state.type.value == "CANCELLED"
    assert done.state.name == "ApprovalTimedOut"
    assert workspace_lock.current_holder(names["workspace"]) is None
    assert _services(env, names["service_name"]) == []
    assert any("Approval timed out" in m.text for m in env.slack.messages)


def test_same_commit_again_is_nothing_to_deploy(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    run = _deploy(env, names)
    _approve(run.id, _plan_sha(env, names["workspace"], run.id))
    assert env.wait_for(run.id, states={"COMPLETED", "FAILED", "CANCELLED"}).state.name == "Deployed"  # type: ignore[union-attr]
    again = env.start(ref="main", **names)
    done = env.wait_for(again.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state and done.state.name == "NothingToDeploy", done.state
    assert len(env.registry.registry().list_versions(names["namespace"])) == 1, "no second build"


def test_tampered_plan_is_refused(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    run = _deploy(env, names)
    sha = _plan_sha(env, names["workspace"], run.id)
    store = env.registry.plan_store()
    key = store.key_for(names["workspace"], str(run.id))
    env.registry.aws_credentials.get_s3_client().put_object(
        Bucket=env.registry.bucket, Key=key, Body=b"not the approved plan", Metadata={"sha256": sha}
    )
    _approve(run.id, sha)
    done = env.wait_for(run.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state
    assert done.state.type.value == "FAILED"
    assert "sha256" in (done.state.message or "") or "hash" in (done.state.message or "")
    assert _services(env, names["service_name"]) == []
    assert workspace_lock.current_holder(names["workspace"]) is None


def test_stale_plan_is_not_applied(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    first = _deploy(env, names)
    # A second run plans against the same state, then the first one applies: the second's plan is stale.
    _approve(first.id, _plan_sha(env, names["workspace"], first.id), decision="reject")
    env.wait_for(first.id, states={"CANCELLED"})
    stale = _deploy(env, names)
    stale_sha = _plan_sha(env, names["workspace"], stale.id)
    lease = workspace_lock.current_holder(names["workspace"])
    assert lease is not None
    workspace_lock.break_lock(names["workspace"], force=True)  # an operator forces another deploy through
    env.repo.commit("v-other", {"src/app.py": env.repo.read("src/app.py") + "\n# other\n"}, branch="other")
    other = _deploy(env, names, ref="other")
    _approve(other.id, _plan_sha(env, names["workspace"], other.id))
    assert env.wait_for(other.id, states={"COMPLETED", "FAILED", "CANCELLED"}).state.name == "Deployed"  # type: ignore[union-attr]
    _approve(stale.id, stale_sha)
    done = env.wait_for(stale.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state and done.state.name == "StalePlan", done.state
    services = _services(env, names["service_name"])
    assert [s["Service"]["Meta"]["deploy_run_id"] for s in services] == [str(other.id)]


def test_concurrent_runs_serialize_per_workspace_and_parallelize_across(deploy_env: DeployEnv) -> None:
    env = deploy_env
    a, b = _names(), _names()
    first = _deploy(env, a)
    second = env.start(ref="main", **a)
    other_ws = _deploy(env, {**b})  # a different workspace reaches its approval while `a` is held
    wait_until(
        lambda: any(t.state and t.state.type.value == "RUNNING" for t in _task_runs(second.id, "lock-workspace")),
        timeout=120,
        message="the second run never asked for the workspace",
    )
    waiting = env.read(second.id)
    assert waiting.state and waiting.state.type.value == "RUNNING", "the second run waits for the workspace"
    _approve(first.id, _plan_sha(env, a["workspace"], first.id), decision="reject")
    env.wait_for(second.id, states={"PAUSED"})
    for run, names in ((second, a), (other_ws, b)):
        _approve(run.id, _plan_sha(env, names["workspace"], run.id), decision="reject")
        env.wait_for(run.id, states={"CANCELLED"})


def test_resume_after_worker_restart_runs_nothing_twice(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    run = _deploy(env, names)
    env.restart_worker()
    _approve(run.id, _plan_sha(env, names["workspace"], run.id))
    done = env.wait_for(run.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state and done.state.name == "Deployed", done.state
    builds = _task_runs(run.id, "build-artifact")
    assert [b.state.name for b in builds].count("Completed") == 1, [b.state.name for b in builds]
    assert len(env.registry.registry().list_versions(names["namespace"])) == 1
    applies = _task_runs(run.id, "apply-plan")
    assert len(applies) == 1


def test_failing_packer_template_fails_the_run_and_registers_nothing(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    template = env.repo.read("packer/app.pkr.hcl")
    env.repo.commit(
        "broken",
        {
            "packer/app.pkr.hcl": template.replace(
                'source "null" "local_image" {', 'source "null" "local_image" {\n  bogus_setting = 1', 1
            )
        },
        branch="broken",
    )
    run = env.start(ref="broken", **names)
    done = env.wait_for(run.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state
    assert done.state.type.value == "FAILED"
    assert "app.pkr.hcl" in (done.state.message or ""), done.state.message
    assert env.registry.registry().list_versions(names["namespace"]) == []
    assert workspace_lock.current_holder(names["workspace"]) is None


def test_unhealthy_deploy_rolls_back_and_moves_the_channel_back(deploy_env: DeployEnv) -> None:
    env, names = deploy_env, _names()
    run1 = _deploy(env, names)
    _approve(run1.id, _plan_sha(env, names["workspace"], run1.id))
    assert env.wait_for(run1.id, states={"COMPLETED", "FAILED", "CANCELLED"}).state.name == "Deployed"  # type: ignore[union-attr]
    app = env.repo.read("src/app.py")
    broken = app.replace("healthy = not (instance_dir / UNHEALTHY_SWITCH).exists()", "healthy = False")
    assert broken != app
    env.repo.commit("bad", {"src/app.py": broken}, branch="bad")
    run2 = _deploy(env, names, ref="bad", health_deadline_seconds=8)
    _approve(run2.id, _plan_sha(env, names["workspace"], run2.id))
    done = env.wait_for(run2.id, states={"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
    assert done.state and done.state.name == "RolledBack", done.state
    reg = env.registry.registry()
    assert reg.get_channel(names["namespace"], names["workspace"]).version == 1  # type: ignore[union-attr]
    # Gate, then promote: the channel never moved to the unhealthy version.
    assert [h.to_version for h in reg.channel_history(names["namespace"], names["workspace"])] == [1]
    services = _services(env, names["service_name"])
    assert [s["Service"]["ID"] for s in services] == [f"{names['service_name']}-1"]
