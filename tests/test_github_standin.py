"""The GitHub stand-in answers as GitHub does: auth, shapes, auto_inactive, faults (fast tier, no server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from githubkit import GitHub
from githubkit.exception import RequestFailed

from standins.github import GitHubStandIn

SHA_A = "a" * 40
SHA_B = "b" * 40
REPO = "acmeinc/web"


@pytest.fixture
def standin() -> Iterator[GitHubStandIn]:
    with GitHubStandIn() as running:
        yield running


def post(standin: GitHubStandIn, path: str, body: Any, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or standin.token}"}
    return httpx.post(f"{standin.api_url}/repos/{REPO}{path}", json=body, headers=headers)


def deploy(standin: GitHubStandIn, sha: str, environment: str = "staging", **extra: Any) -> int:
    body = {"ref": sha, "environment": environment, "auto_merge": False, "required_contexts": [], **extra}
    response = post(standin, "/deployments", body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_githubkit_round_trip_parses_every_answer(standin: GitHubStandIn) -> None:
    github = GitHub(standin.token, base_url=standin.api_url, auto_retry=False, http_cache=False)
    created = github.rest.repos.create_deployment(
        "acmeinc", "web", ref=SHA_A, environment="staging", auto_merge=False, required_contexts=[], payload={"v": 1}
    ).parsed_data
    assert (created.sha, created.environment, created.production_environment) == (SHA_A, "staging", False)
    status = github.rest.repos.create_deployment_status(
        "acmeinc", "web", created.id, state="in_progress", log_url="http://prefect/runs/1", description="applying"
    ).parsed_data
    assert status.state == "in_progress"
    listed = github.rest.repos.list_deployments("acmeinc", "web", sha=SHA_A, environment="staging").parsed_data
    assert [d.id for d in listed] == [created.id]
    assert github.rest.repos.list_deployments("acmeinc", "web", sha=SHA_B).parsed_data == []
    statuses = github.rest.repos.list_deployment_statuses("acmeinc", "web", created.id).parsed_data
    assert [s.state for s in statuses] == ["in_progress"]
    commit = github.rest.repos.create_commit_status(
        "acmeinc", "web", SHA_A, state="success", context="icd/build", description="v3"
    ).parsed_data
    assert (commit.state, commit.context) == ("success", "icd/build")
    assert standin.commit_statuses(SHA_A)[0]["repository"] == REPO


@pytest.mark.parametrize("authorization", ["Bearer wrong", "Basic x", None])
def test_a_wrong_token_is_bad_credentials(standin: GitHubStandIn, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(f"{standin.api_url}/repos/{REPO}/deployments", json={"ref": SHA_A}, headers=headers)
    assert (response.status_code, response.json()["message"]) == (401, "Bad credentials")
    assert standin.deployments() == []


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/deployments", {"environment": "staging"}, 422, '"ref" wasn\'t supplied'),
        ("/deployments", {"ref": "no-such-branch", "required_contexts": []}, 422, "No ref found"),
        ("/deployments", {"ref": SHA_A, "auto_merge": "no"}, 422, "auto_merge"),
        ("/deployments", {"ref": SHA_A, "required_contexts": [1]}, 422, "required_contexts"),
        ("/deployments", {"ref": SHA_A, "enviroment": "staging"}, 422, "enviroment"),
        ("/statuses/" + SHA_A, {"state": "in_progress"}, 422, "is not one of"),
        ("/statuses/" + SHA_A, {"state": "success", "description": "x" * 141}, 422, "Validation Failed"),
        ("/statuses/not-a-sha", {"state": "success"}, 422, "No commit found"),
        ("/deployments/999/statuses", {"state": "success"}, 404, "Not Found"),
    ],
)
def test_malformed_requests_are_refused_as_github_does(
    standin: GitHubStandIn, path: str, body: dict[str, Any], status: int, says: str
) -> None:
    response = post(standin, path, body)
    assert response.status_code == status
    assert says in response.json()["message"] + str(response.json().get("errors", ""))


def test_a_deployment_status_is_checked(standin: GitHubStandIn) -> None:
    deployment = deploy(standin, SHA_A)
    assert post(standin, f"/deployments/{deployment}/statuses", {"state": "done"}).status_code == 422
    too_long = {"state": "success", "description": "x" * 141}
    assert post(standin, f"/deployments/{deployment}/statuses", too_long).status_code == 422
    assert standin.statuses_of(deployment) == []


def test_required_contexts_left_out_waits_for_every_commit_status(standin: GitHubStandIn) -> None:
    """GitHub's default checks every context of the commit: a pending build status refuses the deployment,
    while required_contexts=[] (what the deploy sends: rollbacks deploy older commits) skips the check."""
    assert post(standin, f"/statuses/{SHA_A}", {"state": "pending", "context": "icd/build"}).status_code == 201
    refused = post(standin, "/deployments", {"ref": SHA_A, "environment": "staging"})
    assert refused.status_code == 409
    assert refused.json()["contexts"] == ["icd/build"]
    deploy(standin, SHA_A)


def test_success_makes_the_environments_older_success_inactive(standin: GitHubStandIn) -> None:
    first = deploy(standin, SHA_A)
    assert post(standin, f"/deployments/{first}/statuses", {"state": "success"}).status_code == 201
    elsewhere = deploy(standin, SHA_A, environment="prod-eu")
    post(standin, f"/deployments/{elsewhere}/statuses", {"state": "success"})
    failed = deploy(standin, SHA_B, environment="staging", description="never healthy")
    post(standin, f"/deployments/{failed}/statuses", {"state": "failure"})
    second = deploy(standin, SHA_B, environment="staging", task="deploy:again")
    post(standin, f"/deployments/{second}/statuses", {"state": "success"})

    assert [s.state for s in standin.statuses_of(first)] == ["success", "inactive"]
    assert standin.statuses_of(first)[-1].auto
    assert [s.state for s in standin.statuses_of(failed)] == ["failure"]  # only a success is made inactive
    assert [s.state for s in standin.statuses_of(elsewhere)] == ["success"]  # another environment


def test_auto_inactive_false_and_production_environments_keep_older_deployments(standin: GitHubStandIn) -> None:
    first = deploy(standin, SHA_A)
    post(standin, f"/deployments/{first}/statuses", {"state": "success"})
    second = deploy(standin, SHA_B)
    post(standin, f"/deployments/{second}/statuses", {"state": "success", "auto_inactive": False})
    prod_one = deploy(standin, SHA_A, environment="production")
    post(standin, f"/deployments/{prod_one}/statuses", {"state": "success"})
    prod_two = deploy(standin, SHA_B, environment="production")
    post(standin, f"/deployments/{prod_two}/statuses", {"state": "success"})

    assert [s.state for s in standin.statuses_of(first)] == ["success"]
    assert [s.state for s in standin.statuses_of(prod_one)] == ["success"]


def test_fail_next_answers_server_errors_then_recovers(standin: GitHubStandIn) -> None:
    standin.fail_next(2, status=503)
    assert post(standin, "/deployments", {"ref": SHA_A}).status_code == 503
    github = GitHub(standin.token, base_url=standin.api_url, auto_retry=False, http_cache=False)
    with pytest.raises(RequestFailed) as failed:
        github.rest.repos.list_deployments("acmeinc", "web")
    assert failed.value.response.status_code == 503
    deploy(standin, SHA_A)
    assert [r.status for r in standin.requests] == [503, 503, 201]


def test_down_refuses_connections_and_up_serves_on_the_same_port(standin: GitHubStandIn) -> None:
    first = deploy(standin, SHA_A)
    port = standin.port
    standin.down()
    with pytest.raises(httpx.ConnectError):
        post(standin, "/deployments", {"ref": SHA_A})
    standin.up()
    assert standin.port == port
    assert post(standin, f"/deployments/{first}/statuses", {"state": "queued"}).status_code == 201
    assert standin.deployments(REPO)[0]["states"] == ["queued"]
