"""The loop under a stream of events, end to end (real Prefect server, worker, Terraform, stand-ins): latest
wins per workspace, a superseded plan never applies and says so where operators look, and nothing waits for
a workspace in a process. The rules themselves are tested as tables in tests/test_queue.py."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from cli.approve import main as icd_approve
from cli.lock import main as icd_lock
from examples.local_env import api_client
from icd import events, operations
from icd.config import load_config
from icd.deploy.dispatch import submit
from icd.registry.models import ArtifactVersion
from tests.helpers import consul_instance_ids
from tests.plugins.deploy_env import ENDED, DeployEnv, Names
from tests.test_events import stored_events
from tests.test_provenance import sign_as_built
from tests.waiting import wait_until

# What a run that lost the race may end as; never Deployed.
NOT_APPLIED = {"Superseded", "StalePlan", "LockLost", "Queued", "AlreadyInProgress", "NothingQueued", "Rejected"}


def _register_copies(env: DeployEnv, names: Names, base: ArtifactVersion, count: int) -> list[int]:
    """``count`` more versions of the namespace at once, each its own commit, all of ``base``'s image (a real
    build each would take minutes; what is measured here is the loop, not Packer)."""
    registry = env.registry.registry()
    versions = []
    for _ in range(count):
        label = registry.next_build_label(names.namespace)
        result = registry.register(
            names.namespace,
            git_commit=uuid.uuid4().hex + uuid.uuid4().hex[:8],
            git_ref="main",
            packer_run_uuid=str(uuid.uuid4()),
            builder_type=base.builder_type,
            artifacts=dict(base.artifacts),
            artifact_sha256=dict(base.artifact_sha256),
            created_by="test",
            labels={"build_label": label, "service_name": names.service_name},
        )
        sign_as_built(registry, result.version)  # as a build would: deploys refuse a version without provenance
        versions.append(result.version.version)
    return versions


def _announce(env: DeployEnv, names: Names, version: int) -> None:
    """What build-artifact's registration does: the event, and a queued request per follower of latest."""
    cause = events.artifact_registered(
        namespace=names.namespace, version=version, commit="0" * 40, ref="main", build_run_id=None
    )
    events.emit(cause)
    queue = env.registry.workspace_queue()
    for spec in events.plan_requests(load_config(), cause):
        submit(queue, spec)


def _deploy_runs(env: DeployEnv, workspace: str) -> list[Any]:
    return env.runs_of("deploy-artifact", workspace=workspace)


def _state(run: Any) -> tuple[str, str]:
    assert run.state is not None
    return run.state.type.value, run.state.name


def test_a_waiting_plan_is_superseded_by_a_newer_version_and_says_so_in_the_run_the_thread_and_the_plan(
    deploy_env: DeployEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deploy_env
    names = env.service()
    ws = names.workspace
    env.build(names, plan=True)  # a registration: its request gets a run
    [first] = wait_until(lambda: _deploy_runs(env, ws), timeout=120)
    env.wait_for(first.id, states={"PAUSED"})
    sha = env.plan_sha(ws, first.id)
    asked = wait_until(lambda: [m for m in env.slack.messages if sha in str(m.payload)], timeout=30)
    held = wait_until(lambda: (h := env.holder(ws)) is not None and h.phase == "awaiting" and h, timeout=30)
    assert held.notice is not None and held.notice.ts == asked[0].ts, "the lock remembers the approval thread"

    env.repo.commit("v2", {"src/app.py": env.repo.read("src/app.py") + f"\n# v2 {ws}\n"}, branch=f"v2-{ws}")
    env.build(names, f"v2-{ws}", plan=True)
    second = wait_until(lambda: [r for r in _deploy_runs(env, ws) if r.id != first.id], timeout=120)[0]
    env.wait_for(second.id, states={"PAUSED"})

    ended = env.wait_for(first.id, states=ENDED)
    assert _state(ended) == ("CANCELLED", "Superseded"), ended.state
    says = f"superseded by {names.namespace} v2, planned in run {second.name}"
    assert says in (ended.state.message or ""), ended.state  # type: ignore[union-attr]
    reply = wait_until(
        lambda: [m for m in env.slack.messages if m.thread_ts == asked[0].ts and "Superseded" in m.text], timeout=30
    )
    assert says in reply[0].text, "the approval thread hears it"
    # and the channel's one line for that deploy, its approval notice, now says how it ended
    rewritten = wait_until(
        lambda: [m for m in env.slack.top_level() if m.ts == asked[0].ts and m.edited and "Superseded" in m.text],
        timeout=30,
        message="the superseded run's approval notice was never rewritten",
    )
    assert "Review and approve" not in str(rewritten[0].blocks)
    plan_doc = api_client().read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first.id]))
    )
    plans = [a for a in plan_doc if a.key == f"plan-{ws}"]
    assert plans and str(plans[0].data).startswith("> **Superseded: this plan can no longer be approved.**")
    [superseded] = wait_until(lambda: stored_events("icd.plan.superseded", **{"icd.workspace": ws}), timeout=30)
    assert (superseded.payload["version"], superseded.payload["by_version"]) == (1, 2)
    # The form is gone; an answer sent anyway is refused, naming why.
    assert icd_approve(["answer", str(first.id), "--approve", "--approver", "late", "--plan-sha256", sha]) == 1
    assert f"not waiting for approval (Superseded: {says}" in capsys.readouterr().out
    assert env.approve(second.id, ws).state.name == "Deployed"  # type: ignore[union-attr]
    assert consul_instance_ids(env, names.service_name) == [f"{names.service_name}-{ws}-2"]


def test_a_channel_flapping_v1_v2_v1_v2_ends_on_its_last_version_whatever_was_answered_meanwhile(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service()
    production = f"prod{names.workspace[2:]}"
    env.workspace(production, follows=f"{names.namespace}@production", stack="examples/stacks/local")
    env.build(names)
    [v2] = _register_copies(env, names, env.registry.registry().get(names.namespace, 1), 1)
    registry, queue, config = env.registry.registry(), env.registry.workspace_queue(), load_config()

    def promote(version: int) -> None:
        operations.promote(registry, queue, config, names.namespace, version, "production", by="ops", why="flap")

    promote(1)
    [first] = wait_until(lambda: _deploy_runs(env, production), timeout=120)
    env.wait_for(first.id, states={"PAUSED"})
    wait_until(lambda: (h := env.holder(production)) is not None and h.phase == "awaiting", timeout=30)
    sha = env.plan_sha(production, first.id)
    # Within a second: v2, v1, v2, and someone approves the v1 plan in the middle of it.
    promote(v2)
    answer = threading.Thread(target=env.answer, args=(first.id, sha))
    answer.start()
    promote(1)
    promote(v2)
    answer.join()

    def settled() -> Any:
        runs = _deploy_runs(env, production)
        waiting = [r for r in runs if r.state is not None and r.state.type.value == "PAUSED"]
        busy = [r for r in runs if r.state is None or r.state.type.value not in {"PAUSED", *ENDED}]
        return waiting if len(waiting) == 1 and not busy and env.holder(production) is not None else None

    [last] = wait_until(settled, timeout=180, message="the workspace never settled on one waiting plan")
    assert env.holder(production).request.version == v2  # type: ignore[union-attr]
    # The run says what it waits for a moment after it suspends (describe_suspension): wait for the words.
    wait_until(lambda: f"v{v2}" in env.state_message(last.id), timeout=60, message="the waiting run never named v2")
    assert env.approve(last.id, production).state.name == "Deployed"  # type: ignore[union-attr]
    endings = Counter(_state(r)[1] for r in _deploy_runs(env, production) if r.id != last.id)
    assert set(endings) <= NOT_APPLIED, endings
    assert _state(env.read(first.id))[1] in {"Superseded", "StalePlan"}, "the approved v1 plan was never applied"
    assert consul_instance_ids(env, names.service_name) == [f"{names.service_name}-{production}-{v2}"]


def test_a_burst_of_registrations_leaves_one_plan_per_workspace_for_the_newest_and_nothing_waiting_in_a_process(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service()
    second_ws = f"wb{names.workspace[2:]}"
    env.workspace(second_ws, follows=f"{names.namespace}@latest", stack="examples/stacks/local")
    bystander = env.service()
    env.build(names)
    base = env.registry.registry().get(names.namespace, 1)
    versions = _register_copies(env, names, base, 20)
    newest = versions[-1]
    running: Counter[str] = Counter()
    stop = threading.Event()

    def watch_slots() -> None:
        """The most deploy runs of one workspace running at once (a run waiting in a process would show)."""
        while not stop.wait(0.2):
            for ws in (names.workspace, second_ws):
                now = sum(1 for r in _deploy_runs(env, ws) if r.state and r.state.type.value in {"RUNNING", "PENDING"})
                running[ws] = max(running[ws], now)

    sampler = threading.Thread(target=watch_slots, daemon=True)
    sampler.start()
    build = None
    try:
        for version in versions:
            _announce(env, names, version)
            if version == versions[len(versions) // 2]:
                from prefect.deployments import run_deployment

                build = run_deployment(
                    "build-artifact/build-artifact",
                    parameters={"namespace": bystander.namespace, "plan": False},
                    timeout=0,
                )
        for ws in (names.workspace, second_ws):

            def one_plan_for_the_newest(ws: str = ws) -> Any:
                runs = _deploy_runs(env, ws)
                waiting = [r for r in runs if r.state is not None and r.state.type.value == "PAUSED"]
                busy = [r for r in runs if r.state is None or r.state.type.value not in {"PAUSED", *ENDED}]
                held = env.holder(ws)
                ok = len(waiting) == 1 and not busy and held is not None and held.request.version == newest
                return waiting if ok and held.phase == "awaiting" else None  # type: ignore[union-attr]

            wait_until(one_plan_for_the_newest, timeout=240, message=f"{ws} never settled on one plan of v{newest}")
    finally:
        stop.set()
        sampler.join()
    assert build is not None
    assert _state(env.wait_for(build.id, states=ENDED)) == ("COMPLETED", "Completed"), "an unrelated build was served"
    for ws in (names.workspace, second_ws):
        runs = _deploy_runs(env, ws)
        assert len(runs) <= 8, f"{len(runs)} runs for 20 requests: requests were not coalesced"
        assert running[ws] <= 2, f"{running[ws]} runs of {ws} in a worker slot at once"
        endings = Counter(_state(r)[1] for r in runs if r.state and r.state.type.value != "PAUSED")
        assert set(endings) <= NOT_APPLIED, endings
    assert len(stored_events("icd.plan.requested", **{"icd.namespace": names.namespace})) >= 40
    # A rejection is processed at once and applies nothing; the workspace is free again.
    [waiting] = [r for r in _deploy_runs(env, names.workspace) if r.state and r.state.type.value == "PAUSED"]
    env.answer(waiting.id, env.plan_sha(names.workspace, waiting.id), decision="reject")
    assert _state(env.wait_for(waiting.id, states=ENDED)) == ("CANCELLED", "Rejected")
    assert env.holder(names.workspace) is None
    [other] = [r for r in _deploy_runs(env, second_ws) if r.state and r.state.type.value == "PAUSED"]
    env.answer(other.id, env.plan_sha(second_ws, other.id), decision="reject")
    env.wait_for(other.id, states=ENDED)


def test_a_run_by_hand_for_a_version_the_channel_left_plans_nothing(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    env.build(names)
    _register_copies(env, names, env.registry.registry().get(names.namespace, 1), 1)  # latest is v2 now
    done = env.wait_for(env.deploy(names.workspace, 1).id, states=ENDED)
    assert _state(done) == ("CANCELLED", "Superseded")
    assert f"{names.namespace}@latest points at v2 (the newest deployable version), not v1" in env.state_message(
        done.id
    )
    assert env.registry.plan_store().sha256_of(names.workspace, str(done.id)) is None, "nothing was planned"
    assert env.holder(names.workspace) is None


def test_icd_lock_shows_the_queue_refuses_to_break_a_live_holder_and_a_cancelled_waiting_run_frees_it(
    deploy_env: DeployEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from prefect.states import Cancelled

    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    wait_until(lambda: (h := env.holder(names.workspace)) is not None and h.phase == "awaiting", timeout=30)
    capsys.readouterr()
    assert icd_lock(["list"]) == 0
    [row] = [r for r in json.loads(capsys.readouterr().out) if r["workspace"] == names.workspace]
    assert row["holder"]["run_id"] == str(run.id)
    assert (row["holder"]["phase"], row["holder"]["deploying"]) == ("awaiting", f"{names.namespace} v{version}")
    assert icd_lock(["break", names.workspace]) == 2
    assert "still alive" in capsys.readouterr().out
    # An operator cancels the waiting run in the UI: it has no process, deploy-ended frees its workspace.
    api_client().set_flow_run_state(run.id, Cancelled(message="not today"))
    wait_until(lambda: env.holder(names.workspace) is None, timeout=120, message="the cancelled run kept the workspace")
    wait_until(
        lambda: [m for m in env.slack.messages if f"Deploy run cancelled on {names.workspace}" in m.text], timeout=60
    )
