"""End to end: GitHub sees each deploy as a deployment of its commit and each build as a commit status, through a
GitHub API stand-in; an outage of GitHub changes no deploy and its statuses arrive once GitHub is back."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from blocks.github import GITHUB_BLOCK, GitHubConnection
from standins.github import GitHubStandIn
from tests.plugins.deploy_env import DeployEnv, Names
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

BEFORE_THE_END = ["queued", "in_progress", "in_progress", "in_progress", "in_progress"]


@pytest.fixture
def github(deploy_env: DeployEnv) -> Iterator[GitHubStandIn]:
    """A GitHub stand-in, and the ``github`` block pointing at it (removed after: other tests report nowhere)."""
    with GitHubStandIn() as standin:
        block = GitHubConnection(token=SecretStr(standin.token), api_url=standin.api_url, timeout_seconds=5)
        block.save(GITHUB_BLOCK, overwrite=True)
        try:
            yield standin
        finally:
            with contextlib.suppress(ValueError):
                GitHubConnection.delete(GITHUB_BLOCK)


def reporting_service(env: DeployEnv, **workspace_settings: object) -> tuple[Names, str]:
    repository = f"acmeinc/web-{uuid.uuid4().hex[:6]}"
    names = env.service(namespace_settings={"github_repository": repository}, **workspace_settings)
    return names, repository


def deployment_of(github: GitHubStandIn, repository: str, sha: str) -> dict[str, Any]:
    [deployment] = [d for d in github.deployments(repository) if d["sha"] == sha]
    return deployment


def commit_of(env: DeployEnv, names: Names, version: int) -> str:
    return env.registry.registry().get(names.namespace, version).git_commit


def test_github_sees_each_deploy_of_a_commit_and_its_build(deploy_env: DeployEnv, github: GitHubStandIn) -> None:
    env = deploy_env
    names, repository = reporting_service(env, health_deadline_seconds=8)
    ws = names.workspace

    # A full cycle: built, planned, waits, approved, applied, healthy.
    run1, v1 = env.deploy_until_paused(names)
    sha1 = commit_of(env, names, v1)
    built = [s for s in github.commit_statuses(sha1) if s["repository"] == repository]
    assert [(s["context"], s["state"], s["description"]) for s in built] == [
        ("icd/build", "pending", "building"),
        ("icd/build", "success", f"built v{v1}"),
    ]
    first = deployment_of(github, repository, sha1)
    assert first["states"] == ["queued", "in_progress"], "claimed, then the plan waits"
    assert (first["environment"], first["ref"], first["payload"]["version"]) == (ws, sha1, v1)
    assert first["payload"]["run_id"] == str(run1.id)
    done = env.approve(run1.id, ws, approver="bob")
    assert done.state is not None
    assert done.state.name == "Deployed", done.state
    statuses = github.statuses_of(first["id"])
    assert [(s.state, s.description) for s in statuses[:-1]] == [
        ("queued", "claimed the workspace; planning"),
        ("in_progress", "plan waits for approval"),
        ("in_progress", "approved by bob"),
        ("in_progress", "applying the approved plan"),
        ("in_progress", "applied; checking health"),
    ]
    assert statuses[-1].state == "success"
    assert statuses[-1].description.startswith("Deployed "), statuses[-1]
    assert statuses[-1].description.endswith(f" to {ws}"), statuses[-1]
    assert all(str(run1.id) in s.log_url for s in statuses), "each status links to the run"
    # Nothing was asked of GitHub's own checks: the request names no required context and merges nothing.
    created = [r for r in github.requests if r.method == "POST" and r.path.endswith("/deployments")]
    assert [(r.body["auto_merge"], r.body["required_contexts"]) for r in created] == [(False, [])]

    # A second deploy, of a newer commit: the first deployment becomes inactive.
    sha2 = env.repo.commit("notes", {f"notes-{ws}.txt": "v2"}, branch=f"good-{ws}")
    run2, v2 = env.deploy_until_paused(names, ref=f"good-{ws}")
    assert env.approve(run2.id, ws).state.name == "Deployed"  # type: ignore[union-attr]
    assert deployment_of(github, repository, sha2)["states"] == [*BEFORE_THE_END, "success"]
    assert deployment_of(github, repository, sha1)["states"] == [*BEFORE_THE_END, "success", "inactive"]

    # A rollback: the new commit's deployment fails, the restored commit's is live again.
    app = env.repo.read("src/app.py")
    broken = app.replace("healthy = not (instance_dir / UNHEALTHY_SWITCH).exists()", "healthy = False")
    sha3 = env.repo.commit("bad", {"src/app.py": broken}, branch=f"bad-{ws}")
    run3, _ = env.deploy_until_paused(names, ref=f"bad-{ws}")
    rolled = env.approve(run3.id, ws)
    assert rolled.state is not None
    assert rolled.state.name == "RolledBack", rolled.state
    bad = deployment_of(github, repository, sha3)
    assert bad["states"] == [*BEFORE_THE_END, "failure"]
    restored = github.statuses_of(deployment_of(github, repository, sha2)["id"])
    assert [s.state for s in restored] == [*BEFORE_THE_END, "success", "success"]
    assert restored[-1].description.startswith(f"v{v2} restored"), restored[-1]
    assert str(run3.id) in restored[-1].log_url
    assert deployment_of(github, repository, sha1)["states"][-1] == "inactive"


def test_a_github_outage_changes_no_deploy_and_its_statuses_arrive_later(
    deploy_env: DeployEnv, github: GitHubStandIn
) -> None:
    env = deploy_env
    names, repository = reporting_service(env)
    run, version = env.deploy_until_paused(names)
    sha = commit_of(env, names, version)
    github.down()
    done = env.approve(run.id, names.workspace)
    assert done.state is not None
    assert done.state.name == "Deployed", done.state
    assert deployment_of(github, repository, sha)["states"] == ["queued", "in_progress"], "nothing got through"
    redeliveries = wait_until(
        lambda: [r for r in env.runs_of("deliver-status") if r.parameters["report"]["repository"] == repository],
        timeout=30,
        message="no redelivery was scheduled",
    )
    assert {r.parameters["report"]["environment"] for r in redeliveries} == {names.workspace}
    github.up()

    def live() -> bool:
        return deployment_of(github, repository, sha)["states"][-1] == "success"

    wait_until(live, timeout=150, interval=1.0, message="the deploy's success never reached GitHub")
    states = deployment_of(github, repository, sha)["states"]
    # What arrived late kept the order GitHub shows: nothing after the success set it back.
    assert states[:2] == ["queued", "in_progress"]
    assert states.count("success") == 1, states
    assert set(states[2:-1]) <= {"in_progress"}, states
    success = github.statuses_of(deployment_of(github, repository, sha)["id"])[-1]
    assert str(run.id) in success.log_url
