"""End to end: one commit, many runs at once. However many deliveries of one push start builds, one run
builds and the commit gets one version; the others end `Duplicate` naming it, or `Reused` naming it."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.deployments import run_deployment
from prefect.states import Scheduled

from examples.local_env import api_client, git
from flows.build_artifact import build_artifact
from tests.helpers import task_runs
from tests.plugins.deploy_env import ENDED, DeployEnv
from tests.test_events import push_of, stored_events, webhook
from tests.waiting import wait_until

DELIVERIES = 10


def _state(run: Any) -> tuple[str, str, str]:
    state = run.state
    assert state is not None
    return state.type.value, state.name, state.message or ""


def test_ten_deliveries_of_one_push_at_once_build_once_and_register_one_version(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    ns = names.namespace
    commit = git(env.repo.path, "rev-parse", "HEAD")
    push = push_of(env, names, commit)
    barrier = threading.Barrier(DELIVERIES)

    def deliver(_: int) -> int:
        barrier.wait()
        return webhook(env, names, push, delivery=str(uuid.uuid4())).status_code

    with ThreadPoolExecutor(max_workers=DELIVERIES) as pool:
        assert list(pool.map(deliver, range(DELIVERIES))) == [202] * DELIVERIES

    def every_delivery_started_a_build() -> list[Any]:
        found = env.runs_of("build-artifact", namespace=ns)
        return found if len(found) == DELIVERIES else []

    runs = wait_until(every_delivery_started_a_build, timeout=120, message="not every delivery started a build run")
    ended = [env.wait_for(run.id, states=ENDED, timeout=300) for run in runs]

    assert {_state(run)[0] for run in ended} == {"COMPLETED"}, [_state(run) for run in ended]
    [builder] = [run for run in ended if _state(run)[1] == "Completed"]
    registry = env.registry.registry()
    assert registry.commit_versions(ns, commit) == [1]
    assert registry.last_version(ns) == 1
    assert registry.get(ns, 1).labels["build_run_id"] == str(builder.id)
    assert [run.id for run in ended if task_runs(run.id, "build-artifact")] == [builder.id], "one Packer build"
    for run in ended:
        if run.id != builder.id:
            _, name, message = _state(run)
            assert name in {"Duplicate", "Reused"}, (name, message)
            assert str(builder.id) in message, f"a {name} run names the run that built: {message}"
            assert task_runs(run.id, "resolve-source") == [], "a push names its commit: nothing checked out"
    claim = registry.build_claim(ns, commit)
    assert claim is not None
    # Released by the builder, or by a run that came after it, claimed and reused v1.
    assert (claim.released_at is not None, claim.outcome) in {(True, "registered v1"), (True, "reused v1")}
    # The version was announced once: only the builder's registration, never a duplicate's.
    announced = wait_until(lambda: stored_events("icd.artifact.registered", **{"icd.namespace": ns}), timeout=30)
    assert len(announced) == 1


def test_a_click_while_the_commit_is_being_built_ends_duplicate_naming_that_run(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    commit = git(env.repo.path, "rev-parse", "HEAD")
    client = api_client()
    # A run that holds the commit's build and has not ended: scheduled an hour ahead, outside any deployment.
    holder = client.create_flow_run(
        build_artifact,
        parameters={"namespace": names.namespace},
        state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(hours=1)),
    )
    try:
        env.registry.registry().claim_build(
            names.namespace, commit, run_id=str(holder.id), run_name=holder.name, lease=timedelta(hours=1)
        )
        click = run_deployment("push-to-deploy/push-to-deploy", parameters={"workspace": names.workspace}, timeout=0)
        done = env.wait_for(click.id, states=ENDED)
    finally:
        client.delete_flow_run(holder.id)

    kind, name, message = _state(done)
    assert (kind, name) == ("COMPLETED", "Duplicate"), message
    assert f"run {holder.name} ({holder.id})" in message
    assert f"nothing deployed to {names.workspace}" in message
    assert env.runs_of("deploy-artifact", workspace=names.workspace) == []
    assert env.registry.registry().last_version(names.namespace) == 0, "nothing was built or registered"


def test_a_run_that_registered_and_ended_unannounced_is_finished_by_the_next_build_of_the_commit(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service()
    ns = names.namespace
    commit = git(env.repo.path, "rev-parse", "HEAD")
    first = env.build(names)
    registry = env.registry.registry()
    assert registry.get(ns, 1).labels["build_run_id"] == str(first.id)
    # As if the first run had ended (crashed) after registering v1, before announcing it and releasing: its
    # claim is left behind, unexpired.
    registry.claim_build(ns, commit, run_id=str(first.id), run_name=first.name, lease=timedelta(hours=1))

    second = env.build(names)

    kind, name, message = _state(second)
    assert (kind, name) == ("COMPLETED", "Reused"), message
    assert str(first.id) in message
    assert task_runs(second.id, "build-artifact") == [], "nothing was built"
    assert registry.last_version(ns) == 1
    claim = registry.build_claim(ns, commit)
    assert claim is not None
    assert (claim.holder_run_id, claim.outcome) == (str(second.id), "reused v1")
    announced_by = wait_until(
        lambda: [
            event
            for event in stored_events("icd.artifact.registered", **{"icd.namespace": ns})
            if any(related.id == f"prefect.flow-run.{second.id}" for related in event.related)
        ],
        timeout=30,
        message="the version the first run left unannounced was not announced",
    )
    assert announced_by[0].payload["version"] == 1
