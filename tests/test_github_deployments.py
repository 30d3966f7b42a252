"""The deploy lifecycle as GitHub requests (tables), the reporter against the GitHub stand-in, and what a deploy run
remembers of its deployment (fast tier)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import cast

import pytest
from githubkit import GitHub
from pydantic import SecretStr

from blocks.github import GitHubConnection
from icd.errors import StatusReportError, TransientStatusReportError
from icd.github.deployments import (
    BUILD_CONTEXT,
    DeploymentReporter,
    StatusReport,
    build_report,
    build_state,
    commit_status_request,
    deploy_report,
    deployment_request,
    deployment_status_request,
    ending_state,
    environment_url,
    is_stale,
    split_repository,
    step_status,
)
from standins.github import GitHubStandIn
from tasks import github_status
from tasks.context import DeployContext

SHA_A = "a" * 40
SHA_B = "b" * 40
REPO = "acmeinc/web"
RUN_URL = "http://prefect.local/runs/flow-run/1"


@pytest.mark.parametrize(
    ("outcome", "teardown", "state"),
    [
        ("Deployed", False, "success"),
        ("DeployedChannelMoved", False, "success"),
        ("NothingToDeploy", False, "success"),
        ("NothingToDeploy", True, "inactive"),
        ("TornDown", True, "inactive"),
        ("RolledBack", False, "failure"),
        ("Unhealthy", False, "failure"),
        ("RollbackFailed", False, "failure"),
        ("Rejected", False, "failure"),
        ("Superseded", False, "failure"),
        ("StalePlan", False, "failure"),
        ("LockLost", False, "failure"),
        ("Failed", False, "error"),
    ],
)
def test_how_a_runs_ending_shows_on_its_deployment(outcome: str, teardown: bool, state: str) -> None:
    assert ending_state(outcome, teardown=teardown) == state


@pytest.mark.parametrize(
    ("step", "detail", "expected"),
    [
        ("queued", "", ("queued", "claimed the workspace; planning")),
        ("waiting", "", ("in_progress", "plan waits for approval")),
        ("approved", "approved by jane", ("in_progress", "approved by jane")),
        ("applying", "", ("in_progress", "applying the approved plan")),
    ],
)
def test_steps_before_the_end(step: str, detail: str, expected: tuple[str, str]) -> None:
    assert step_status(step, detail) == expected  # type: ignore[arg-type]  # the table's strings are the steps


@pytest.mark.parametrize(
    ("outputs", "url"),
    [
        ({"url": "https://web.example"}, "https://web.example"),
        ({"environment_url": "http://a", "url": "http://b"}, "http://a"),
        ({"url": "web.example"}, None),
        ({"url": 3}, None),
        ({"service_id": "web-1"}, None),
    ],
)
def test_environment_url_from_the_stacks_outputs(outputs: dict[str, object], url: str | None) -> None:
    assert environment_url(outputs) == url


@pytest.mark.parametrize(("succeeded", "state"), [(None, "pending"), (True, "success"), (False, "failure")])
def test_build_states(succeeded: bool | None, state: str) -> None:
    assert build_state(succeeded) == state


def report(state: str = "queued", sha: str = SHA_A, environment: str = "staging", **kwargs: object) -> StatusReport:
    return deploy_report(
        REPO,
        sha,
        environment,
        state,  # type: ignore[arg-type]  # the table's strings are states
        "d" * 200,
        namespace="acmeinc/web",
        version=3,
        run_id="run-1",
        log_url=RUN_URL,
        **kwargs,  # type: ignore[arg-type]  # environment_url / at
    )


def test_the_deployment_request_is_the_commit_itself_with_no_checks_and_no_merge() -> None:
    assert deployment_request(report()) == {
        "ref": SHA_A,
        "environment": "staging",
        "auto_merge": False,
        "required_contexts": [],
        "payload": {"namespace": "acmeinc/web", "version": 3, "run_id": "run-1"},
        "description": "acmeinc/web v3",
        "transient_environment": False,
    }


def test_status_requests_carry_the_run_the_url_and_a_short_description() -> None:
    body = deployment_status_request(report("success", environment_url="https://web.example"))
    assert body == {
        "state": "success",
        "description": "d" * 139 + "…",
        "log_url": RUN_URL,
        "environment_url": "https://web.example",
        "auto_inactive": True,
    }
    assert "auto_inactive" not in deployment_status_request(report("in_progress"))
    build = build_report(REPO, SHA_A, "pending", "building", target_url=RUN_URL)
    assert commit_status_request(build) == {
        "state": "pending",
        "context": BUILD_CONTEXT,
        "description": "building",
        "target_url": RUN_URL,
    }
    assert StatusReport.from_dict(build.to_dict()) == build


def test_staleness_and_repository_names() -> None:
    made = datetime(2026, 1, 1, 12, 0, 0, 600_000, tzinfo=UTC)
    later = made + timedelta(seconds=1)
    assert not is_stale(made, "queued", None, None)
    assert not is_stale(made, "in_progress", made.replace(microsecond=0), "success")  # the same second
    assert is_stale(made, "in_progress", later, "success")
    assert is_stale(made, "in_progress", later, "in_progress")  # a later step went first: order kept
    assert is_stale(made, "success", later, "inactive")  # a newer deploy took the environment
    # A success made after an in_progress that was delivered after it: not stale.
    assert not is_stale(made, "success", later, "in_progress")
    assert split_repository("acme/web") == ("acme", "web")
    with pytest.raises(StatusReportError):
        split_repository("web")


@pytest.fixture
def standin() -> Iterator[GitHubStandIn]:
    with GitHubStandIn() as running:
        yield running


@pytest.fixture
def reporter(standin: GitHubStandIn) -> DeploymentReporter:
    block = GitHubConnection(token=SecretStr(standin.token), api_url=standin.api_url, timeout_seconds=2)
    return DeploymentReporter(block.get_client())


def test_one_deployment_per_commit_and_environment(standin: GitHubStandIn, reporter: DeploymentReporter) -> None:
    first = reporter.deliver(report("queued"))
    again = reporter.deliver(report("in_progress"))
    elsewhere = reporter.deliver(report("queued", environment="prod-eu"))
    assert first.deployment_id == again.deployment_id != elsewhere.deployment_id
    assert [(d["environment"], d["states"]) for d in standin.deployments(REPO)] == [
        ("staging", ["queued", "in_progress"]),
        ("prod-eu", ["queued"]),
    ]


def test_a_success_makes_the_older_deployment_inactive_production_too(
    standin: GitHubStandIn, reporter: DeploymentReporter
) -> None:
    for environment in ("staging", "production"):
        older = reporter.deliver(report("success", environment=environment))
        newer = reporter.deliver(report("success", sha=SHA_B, environment=environment))
        assert [s.state for s in standin.statuses_of(older.deployment_id or 0)] == ["success", "inactive"]
        assert newer.deactivated == ((older.deployment_id,) if environment == "production" else ())


def test_a_late_report_never_turns_back_what_github_shows(standin: GitHubStandIn, reporter: DeploymentReporter) -> None:
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    reporter.deliver(report("success"))
    stale = reporter.deliver(report("queued", at=long_ago), late=True)
    assert stale.stale
    # B's success, made before A's and delivered late, leaves A live.
    late_success = reporter.deliver(report("success", sha=SHA_B, at=long_ago), late=True)
    assert not late_success.stale
    states = {d["sha"]: d["states"] for d in standin.deployments(REPO)}
    assert states == {SHA_A: ["success"], SHA_B: ["success"]}
    # A timely late report is delivered as usual.
    assert not reporter.deliver(report("in_progress", sha=SHA_B), late=True).stale


def test_failures_become_ours(standin: GitHubStandIn, reporter: DeploymentReporter) -> None:
    standin.fail_next(1, status=502)
    with pytest.raises(TransientStatusReportError, match="HTTP 502"):
        reporter.deliver(report())
    refused = GitHub("wrong-token", base_url=standin.api_url, auto_retry=False, http_cache=False)
    with pytest.raises(StatusReportError, match="Bad credentials") as bad:
        DeploymentReporter(refused).deliver(report())
    assert not isinstance(bad.value, TransientStatusReportError)
    with pytest.raises(StatusReportError, match="No commit found") as invalid:
        reporter.deliver(build_report(REPO, "not-a-sha", "pending", "x", target_url=None))
    assert not isinstance(invalid.value, TransientStatusReportError)
    standin.down()
    with pytest.raises(TransientStatusReportError, match="unreachable"):
        reporter.deliver(report())


def test_naming_the_deployment_again_after_a_resume_never_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A resumed run names its deployment while it holds the workspace, before the path that releases it: a
    broken icd.toml then is a warning, as for any report."""
    ctx = cast(DeployContext, SimpleNamespace(run_id=f"run-{uuid.uuid4()}", namespace="acme/web"))

    def unreadable(namespace: str) -> str | None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(github_status, "github_repository", unreadable)
    github_status.deployment_reported(ctx, 3)
    assert ctx.run_id not in github_status._RUNS
    assert "the deployment of v3 not named for GitHub: 'utf-8' codec can't decode" in caplog.text

    monkeypatch.setattr(github_status, "github_repository", lambda namespace: None)
    github_status.deployment_reported(ctx, 3)
    assert ctx.run_id not in github_status._RUNS, "a namespace that reports nowhere names nothing"

    monkeypatch.setattr(github_status, "github_repository", lambda namespace: "acme/web")
    github_status.deployment_reported(ctx, 3)
    assert github_status._RUNS.pop(ctx.run_id).version == 3
