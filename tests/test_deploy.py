"""End to end: build-artifact and deploy-artifact as deployed flows on a real Prefect server and process
worker, with real Packer, real Terraform (S3 backend and DynamoDB lock table on moto), the Consul and Slack
stand-ins. Each test uses its own namespace, workspace and service, so they share one environment safely."""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from examples.local_env import recorded_task_runs
from tests.helpers import consul_instances, run_artifacts, task_runs
from tests.plugins.deploy_env import ENDED, DeployEnv, Names
from tests.waiting import wait_until


def _slack_mentions(env: DeployEnv, text: str) -> list[str]:
    return [m.text for m in env.slack.messages if text in m.text]


def test_full_cycle_v1_then_the_same_commit_then_v2_across_a_worker_restart(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    ns, ws = names.namespace, names.workspace

    run1, v1 = env.deploy_until_paused(names)
    assert env.holder(ws) is not None, "the lock is held across the approval wait"
    sha1 = env.plan_sha(ws, run1.id)
    waiting = [m for m in env.slack.messages if sha1 in str(m.payload)]
    assert waiting, "operators get the plan hash"
    assert str(run1.id) in str(waiting[0].payload), "and a link to the run"
    done1 = env.approve(run1.id, ws)
    assert done1.state is not None and done1.state.name == "Deployed", done1.state
    reg = env.registry.registry()
    assert reg.get_channel(ns, ws).version == v1  # type: ignore[union-attr]  # the workspace's own channel
    history = reg.channel_history(ns, ws)
    assert history[-1].assigned_by == "alice"
    assert history[-1].metadata["plan_sha256"] == sha1
    instances = consul_instances(env, names.service_name)
    assert len(instances) == 1
    assert instances[0]["Service"]["Meta"]["deploy_run_id"] == str(run1.id)
    assert instances[0]["Service"]["Meta"]["workspace"] == ws
    assert all(check["Status"] == "passing" for check in instances[0]["Checks"])
    assert env.holder(ws) is None

    # The same commit again: reused, not rebuilt, and already deployed.
    env.build(names)
    assert reg.last_version(ns) == v1, "no second build"
    again = env.wait_for(env.deploy(ws, v1).id, states=ENDED)
    assert again.state is not None and again.state.name == "NothingToDeploy", again.state

    env.repo.commit("v2", {"src/app.py": env.repo.read("src/app.py") + "\n# v2\n"})
    run2, v2 = env.deploy_until_paused(names)
    plan_docs = run_artifacts(run2.id, f"plan-{ws}")
    assert plan_docs, "the plan is published as an artifact of the run"
    assert f"{ns} v{v1} -> v{v2}" in str(plan_docs[0].data), "the plan shows the artifact version diff"
    # v2's wait outlives its worker: another worker resumes it, and nothing before the wait runs twice.
    env.restart_worker()
    done2 = env.approve(run2.id, ws)
    assert done2.state is not None and done2.state.name == "Deployed", done2.state
    plans = task_runs(run2.id, "plan-deploy")
    assert [p.state.name for p in plans].count("Completed") == 1, [p.state.name for p in plans]
    assert len(task_runs(run2.id, "apply-plan")) == 1
    assert reg.get_channel(ns, ws).version == v2  # type: ignore[union-attr]
    instances = consul_instances(env, names.service_name)
    assert [i["Service"]["Meta"]["deploy_run_id"] for i in instances] == [str(run2.id)], "v1 was replaced"


def test_refused_answers_move_neither_the_deadline_nor_the_lock_and_replay_nothing(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service(approval_timeout_seconds=900)
    ws = names.workspace
    run, _ = env.deploy_until_paused(names)
    sha = env.plan_sha(ws, run.id)
    # Prefect suspends the run first; the flow then adds what it waits for to that state's message.
    paused = wait_until(
        lambda: (state := env.read(run.id).state) is not None and "answer before" in (state.message or "") and state,
        timeout=30,
        message="the suspended run never said what it waits for",
    )
    assert paused.state_details.pause_timeout is not None
    deadline = paused.state_details.pause_timeout
    told = re.search(r"answer before (.+ UTC)", paused.message or "")
    assert told, paused.message
    holder = wait_until(
        lambda: (held := env.holder(ws)) is not None and held.phase == "awaiting" and held,
        timeout=30,
        message="the waiting run never held the workspace as awaiting approval",
    )
    assert holder.expires_at >= deadline + timedelta(minutes=5), "the lease covers the wait"
    assert holder.plan_sha256 == sha, "the lock names the plan it waits on"
    # A stale or mistyped hash is refused by Prefect against the form's schema, before the run resumes: the run
    # waits under the same question.
    refused = env.answer(run.id, "0" * 64)
    assert refused is not None and "plan_sha256" in refused.reason, refused
    assert env.read(run.id).state.state_details.pause_key == "approval-0"  # type: ignore[union-attr]
    # Twice an approver with nothing visible (no space, so the schema lets it by): refused by the flow, asked again.
    for attempt in (1, 2):
        env.answer(run.id, sha, approver=" \u200b ")
        again = env.wait_for_pause(run.id, f"approval-{attempt}").state
        assert again is not None and again.state_details.pause_timeout is not None
        # Each re-ask waits only for what is left (rounded up to the second), so the deadline stays put.
        assert abs(again.state_details.pause_timeout - deadline) < timedelta(seconds=1), attempt
        wait_until(lambda: "not accepted" in env.state_message(run.id), timeout=30, message="the reason never showed")
        assert consul_instances(env, names.service_name) == [], "a refused answer applies nothing"
        assert f"answer before {told.group(1)}" in env.state_message(run.id), "the run names the same deadline"
        assert env.holder(ws) == holder, "the same lease still holds the workspace"
    done = env.approve(run.id, ws)
    assert done.state is not None and done.state.name == "Deployed", done.state

    # Two refused answers and an approval re-ran the flow three times, yet every step before the wait ran
    # once and none was replayed as Cached; each refusal the flow made was told once.
    tasks = recorded_task_runs(run.id)
    ended = [(t.name, t.state.name if t.state else None) for t in tasks]
    assert [(name, state) for name, state in ended if state != "Completed"] == [], "a step replayed (Cached) or failed"
    steps = Counter(t.name.rsplit("-", 1)[0] for t in tasks)
    before_the_wait = ("claim-workspace", "plan-deploy", "publish-plan", "approval-deadline")
    assert [steps[name] for name in before_the_wait] == [1, 1, 1, 1], steps
    assert len(_slack_mentions(env, f"Approval not accepted for {ws}")) == 2


def test_approval_timeout_cancels_releases_and_notifies(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service(approval_timeout_seconds=2)
    run, _ = env.deploy_until_paused(names)
    # The server fails the expired suspension; the deploy-ended trigger gives it its real ending.
    done = wait_until(
        lambda: (r := env.read(run.id)).state is not None and r.state.name == "ApprovalTimedOut" and r,
        timeout=120,
        message="the timed-out run never became ApprovalTimedOut",
    )
    assert done.state is not None and done.state.type.value == "CANCELLED"
    assert env.holder(names.workspace) is None
    assert consul_instances(env, names.service_name) == []
    wait_until(lambda: _slack_mentions(env, f"Approval timed out on {names.workspace}"), timeout=60)
    # deploy-ended tells it in the run's approval thread, and rewrites the notice: one line in the channel.
    key = f"deploy-run:{run.id}"
    [root] = wait_until(
        lambda: [m for m in env.slack.top_level() if m.thread_key == key and m.edited],
        timeout=60,
        message="the approval notice of the timed-out run was never rewritten",
    )
    assert f"Approval timed out on {names.workspace}" in root.text
    [told] = [m for m in env.slack.thread(root.ts) if "Approval timed out" in m.text]
    assert told.thread_key == key


def test_tampered_plan_is_refused_and_told(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    run, _ = env.deploy_until_paused(names)
    sha = env.plan_sha(names.workspace, run.id)
    key = env.registry.plan_store().key_for(names.workspace, str(run.id))
    env.registry.s3_client().put_object(
        Bucket=env.registry.bucket, Key=key, Body=b"not the approved plan", Metadata={"sha256": sha}
    )
    env.answer(run.id, sha)
    done = env.wait_for(run.id, states=ENDED)
    assert done.state is not None and done.state.type.value == "FAILED"
    assert "sha256" in (done.state.message or "")
    assert consul_instances(env, names.service_name) == []
    assert env.holder(names.workspace) is None
    wait_until(lambda: _slack_mentions(env, f"Deploy failed on {names.workspace}: PlanIntegrityError"), timeout=30)


def _waiting_run_then_another_forced_through(env: DeployEnv, names: Names) -> tuple[Any, str, Any]:
    """A run waiting for approval (and its plan's hash); an operator breaks its lock and starts another deploy
    of the same version, which takes the workspace and waits for approval too."""
    first, version = env.deploy_until_paused(names)
    first_sha = env.plan_sha(names.workspace, first.id)
    env.registry.workspace_queue().break_lock(names.workspace, force=True)
    other = env.deploy(names.workspace, version)
    env.wait_for(other.id, states={"PAUSED"})  # holding the workspace while it waits
    return first, first_sha, other


def test_stale_plan_is_not_applied(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    stale, stale_sha, other = _waiting_run_then_another_forced_through(env, names)
    assert env.approve(other.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]
    env.answer(stale.id, stale_sha)
    done = env.wait_for(stale.id, states=ENDED)
    assert done.state is not None and done.state.name == "StalePlan", done.state
    services = consul_instances(env, names.service_name)
    assert [s["Service"]["Meta"]["deploy_run_id"] for s in services] == [str(other.id)]


def test_an_approved_run_whose_lock_was_broken_and_taken_applies_nothing(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    first, first_sha, other = _waiting_run_then_another_forced_through(env, names)
    env.answer(first.id, first_sha)
    done = env.wait_for(first.id, states=ENDED)
    assert done.state is not None and done.state.name == "LockLost", done.state
    assert consul_instances(env, names.service_name) == [], "nothing applied"
    holder = env.holder(names.workspace)
    assert holder is not None and holder.run_id == str(other.id), "the other run keeps the workspace"
    env.answer(other.id, env.plan_sha(names.workspace, other.id), decision="reject")
    env.wait_for(other.id, states={"CANCELLED"})


def test_a_second_run_for_the_plan_waiting_ends_at_once_and_a_rejection_applies_nothing_and_frees_the_workspace(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    a, b = env.service(), env.service()
    first, version = env.deploy_until_paused(a)
    # The same version by hand while its plan waits: nothing more to do, and nothing waits in a process.
    second = env.wait_for(env.deploy(a.workspace, version).id, states=ENDED)
    assert second.state is not None and (second.state.type.value, second.state.name) == (
        "COMPLETED",
        "AlreadyInProgress",
    )
    assert first.name in (second.state.message or "")
    other_ws, _ = env.deploy_until_paused(b)  # a different workspace reaches its approval meanwhile
    env.answer(first.id, env.plan_sha(a.workspace, first.id), approver="bob", decision="reject")
    rejected = env.wait_for(first.id, states=ENDED)
    assert rejected.state is not None
    assert (rejected.state.type.value, rejected.state.name) == ("CANCELLED", "Rejected")
    assert env.holder(a.workspace) is None, "the rejection released the workspace"
    assert env.registry.registry().get_channel(a.namespace, a.workspace) is None, "the rejection applied nothing"
    assert consul_instances(env, a.service_name) == []
    env.answer(other_ws.id, env.plan_sha(b.workspace, other_ws.id), decision="reject")
    env.wait_for(other_ws.id, states={"CANCELLED"})


def test_failing_packer_template_fails_the_build_registers_nothing_and_tells(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    template = env.repo.read("packer/app.pkr.hcl")
    broken = template.replace('source "null" "local_image" {', 'source "null" "local_image" {\n  bogus_setting = 1', 1)
    env.repo.commit("broken", {"packer/app.pkr.hcl": broken}, branch="broken")
    done = env.build(names, "broken", expect="FAILED")
    assert done.state is not None and "app.pkr.hcl" in (done.state.message or ""), done.state.message
    assert env.registry.registry().last_version(names.namespace) == 0
    wait_until(lambda: _slack_mentions(env, f"Build of {names.namespace} broken failed"), timeout=30)


def test_unhealthy_deploy_rolls_back_never_moves_the_channel_and_verifies_the_image_it_rolls_back_to(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service(health_deadline_seconds=8)
    ns, ws = names.namespace, names.workspace
    run1, v1 = env.deploy_until_paused(names)
    assert env.approve(run1.id, ws).state.name == "Deployed"  # type: ignore[union-attr]
    app = env.repo.read("src/app.py")
    broken = app.replace("healthy = not (instance_dir / UNHEALTHY_SWITCH).exists()", "healthy = False")
    assert broken != app
    env.repo.commit("bad", {"src/app.py": broken}, branch=f"bad-{ws}")
    run2, v2 = env.deploy_until_paused(names, ref=f"bad-{ws}")
    done = env.approve(run2.id, ws)
    assert done.state is not None and done.state.name == "RolledBack", done.state
    reg = env.registry.registry()
    assert reg.get_channel(ns, ws).version == v1  # type: ignore[union-attr]
    # Gate, then promote: the channel never pointed at the unhealthy version.
    assert [h.to_version for h in reg.channel_history(ns, ws)] == [v1]
    services = consul_instances(env, names.service_name)
    assert [s["Service"]["ID"] for s in services] == [f"{names.service_name}-{ws}-{v1}"]

    # The rollback goes through the same plan and apply as a forward deploy, so it verifies v1's image the same
    # way: doctored meanwhile, it is refused, told, and the channel stays on v1.
    Path(reg.get(ns, v1).artifacts["local"]).write_bytes(b"doctored v1")
    run3 = env.deploy(ws, v2)
    env.wait_for(run3.id, states={"PAUSED"})
    refused = env.approve(run3.id, ws)
    assert refused.state is not None and refused.state.type.value == "FAILED", refused.state
    wait_until(lambda: _slack_mentions(env, f"Deploy failed on {ws}: ArtifactIntegrityError"), timeout=30)
    assert f"{ns} v{v1}: image" in (refused.state.message or ""), refused.state.message
    services = consul_instances(env, names.service_name)
    assert [s["Service"]["ID"] for s in services] == [f"{names.service_name}-{ws}-{v2}"], (
        "nothing started from the doctored image"
    )
    assert env.holder(ws) is None
    assert reg.get_channel(ns, ws).version == v1  # type: ignore[union-attr]


def test_one_click_builds_a_ref_and_starts_its_deploy(deploy_env: DeployEnv) -> None:
    from prefect.deployments import run_deployment

    env = deploy_env
    names = env.service()
    click = run_deployment("push-to-deploy/push-to-deploy", parameters={"workspace": names.workspace}, timeout=0)
    done = env.wait_for(click.id, states=ENDED)
    assert done.state is not None and done.state.name == "DeployStarted", done.state
    [deploy] = env.runs_of("deploy-artifact", workspace=names.workspace)
    env.wait_for(deploy.id, states={"PAUSED"})
    assert env.approve(deploy.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]
