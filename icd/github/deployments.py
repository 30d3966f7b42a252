"""A deploy as a GitHub deployment of its commit, a build as a commit status.

One deployment per (commit, workspace): environment = the workspace, ``auto_merge=false`` (we deploy the
commit we built, never a merge GitHub would make) and ``required_contexts=[]`` (a rollback deploys an older
commit, whose checks may be long gone). Its statuses follow the run: ``queued`` when it claims the workspace,
``in_progress`` while the plan waits, once approved and while applying, then ``success`` / ``failure`` /
``error`` (``inactive`` for a teardown), with ``log_url`` = the Prefect run and ``environment_url`` from the
stack's outputs. A ``success`` makes the environment's older deployment ``inactive``: GitHub does it
(``auto_inactive``) except for production environments, where :class:`DeploymentReporter` does it.

The mapping is pure functions (tested as tables); :class:`DeploymentReporter` is the one place requests are
sent, and every githubkit or httpx failure leaves it as a :class:`~icd.errors.StatusReportError`
(:class:`~icd.errors.TransientStatusReportError` when a later attempt may succeed).

A report delivered late (redelivered after an outage) carries the time it was made: it is dropped when the
deployment got a status as far along after it was made (:func:`is_stale`), and its ``success`` makes no
success posted after it inactive, so a late report never turns back what GitHub shows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx
from githubkit import GitHub
from githubkit.exception import GitHubException, RateLimitExceeded, RequestError, RequestFailed
from pydantic import ValidationError

from icd.errors import StatusReportError, TransientStatusReportError
from icd.text import one_line

if TYPE_CHECKING:
    from githubkit_schemas.latest.models import Deployment, DeploymentStatus
    from githubkit_schemas.latest.types import (
        ReposOwnerRepoDeploymentsDeploymentIdStatusesPostBodyType as DeploymentStatusBody,
    )
    from githubkit_schemas.latest.types import ReposOwnerRepoDeploymentsPostBodyType as DeploymentBody
    from githubkit_schemas.latest.types import ReposOwnerRepoStatusesShaPostBodyType as CommitStatusBody

DeploymentState = Literal["error", "failure", "inactive", "in_progress", "queued", "pending", "success"]
CommitState = Literal["error", "failure", "pending", "success"]
DeployStep = Literal["queued", "waiting", "approved", "applying"]
ReportKind = Literal["deployment", "commit"]

BUILD_CONTEXT = "icd/build"
DESCRIPTION_LIMIT = 140  # GitHub refuses a longer description (422)
ENVIRONMENT_URL_OUTPUTS = ("environment_url", "url")  # the stack outputs read, first found wins

# A step of the run before it ends: its state and what the deployment says.
STEPS: Mapping[DeployStep, tuple[DeploymentState, str]] = {
    "queued": ("queued", "claimed the workspace; planning"),
    "waiting": ("in_progress", "plan waits for approval"),
    "approved": ("in_progress", "approved; applying soon"),
    "applying": ("in_progress", "applying the approved plan"),
}
# How a run's ending shows on its deployment; any other ending is a failure, and a fault ("Failed") an error.
_SUCCESS_ENDINGS = frozenset({"Deployed", "DeployedChannelMoved", "NothingToDeploy"})


def step_status(step: DeployStep, detail: str = "") -> tuple[DeploymentState, str]:
    """The state and description of a step; ``detail`` (who approved) replaces the stock description."""
    state, description = STEPS[step]
    return state, detail or description


def ending_state(outcome: str, *, teardown: bool) -> DeploymentState:
    """The final state of a run's deployment, by the run's outcome name (``icd/deploy/outcome.py``).

    A teardown that happened (or had nothing to remove) leaves nothing running: ``inactive``, not a success
    that would show the commit as live."""
    if outcome == "TornDown" or (teardown and outcome == "NothingToDeploy"):
        return "inactive"
    if outcome in _SUCCESS_ENDINGS:
        return "success"
    return "error" if outcome == "Failed" else "failure"


def build_state(succeeded: bool | None) -> CommitState:
    """The build's commit status: ``pending`` while it runs (None), then ``success`` or ``failure``."""
    if succeeded is None:
        return "pending"
    return "success" if succeeded else "failure"


def environment_url(outputs: Mapping[str, Any]) -> str | None:
    """Where the deployed environment is, from the stack's outputs: ``environment_url`` or ``url``, when it is
    an http(s) URL (anything else would be refused by GitHub, or mislead)."""
    for name in ENVIRONMENT_URL_OUTPUTS:
        value = outputs.get(name)
        if isinstance(value, str) and value.startswith(("https://", "http://")):
            return value
    return None


def short(description: str) -> str:
    """A description GitHub takes: one line, at most 140 characters."""
    return one_line(description, DESCRIPTION_LIMIT)


def split_repository(repository: str) -> tuple[str, str]:
    owner, _, name = repository.partition("/")
    if not owner or not name or "/" in name:
        raise StatusReportError(f"not a GitHub repository (owner/name): {repository!r}")
    return owner, name


@dataclass(frozen=True)
class StatusReport:
    """One status to send: a deployment's (``kind="deployment"``) or a commit's (``kind="commit"``).

    Plain data, so a report that could not be delivered is handed to a later flow run as it is."""

    kind: ReportKind
    repository: str  # owner/name
    sha: str
    state: str
    description: str
    at: str  # when it was made (ISO 8601, UTC): a late delivery older than what GitHub shows is dropped
    log_url: str | None = None  # deployment: the run; commit: its target_url
    environment: str = ""
    environment_url: str | None = None
    payload: Mapping[str, str | int] = field(default_factory=dict)
    context: str = BUILD_CONTEXT

    @property
    def made_at(self) -> datetime:
        return datetime.fromisoformat(self.at)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "payload": dict(self.payload)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StatusReport:
        return cls(**data)

    def what(self) -> str:
        """The report in a few words, for logs."""
        where = f"deployment of {self.sha[:12]} to {self.environment}" if self.kind == "deployment" else self.context
        return f"{self.state} on {self.repository} {where}"


def deploy_report(
    repository: str,
    sha: str,
    environment: str,
    state: DeploymentState,
    description: str,
    *,
    namespace: str,
    version: int,
    run_id: str,
    log_url: str | None,
    environment_url: str | None = None,
    at: datetime | None = None,
) -> StatusReport:
    return StatusReport(
        kind="deployment",
        repository=repository,
        sha=sha,
        state=state,
        description=short(description),
        at=(at or datetime.now(UTC)).isoformat(),
        log_url=log_url,
        environment=environment,
        environment_url=environment_url,
        payload={"namespace": namespace, "version": version, "run_id": run_id},
    )


def build_report(
    repository: str,
    sha: str,
    state: CommitState,
    description: str,
    *,
    target_url: str | None,
    at: datetime | None = None,
) -> StatusReport:
    return StatusReport(
        kind="commit",
        repository=repository,
        sha=sha,
        state=state,
        description=short(description),
        at=(at or datetime.now(UTC)).isoformat(),
        log_url=target_url,
    )


def deployment_request(report: StatusReport) -> DeploymentBody:
    """POST /repos/{owner}/{repo}/deployments: the commit itself, to the workspace's environment."""
    namespace, version = report.payload.get("namespace", ""), report.payload.get("version", "")
    return {
        "ref": report.sha,
        "environment": report.environment,
        "auto_merge": False,
        "required_contexts": [],
        "payload": cast(Any, dict(report.payload)),  # GitHub's payload is any JSON object
        "description": short(f"{namespace} v{version}"),
        "transient_environment": False,
    }


def deployment_status_request(report: StatusReport, *, auto_inactive: bool = True) -> DeploymentStatusBody:
    """POST /repos/{owner}/{repo}/deployments/{id}/statuses."""
    state = cast(DeploymentState, report.state)
    body: DeploymentStatusBody = {"state": state, "description": short(report.description)}
    if report.log_url:
        body["log_url"] = report.log_url
    if report.environment_url:
        body["environment_url"] = report.environment_url
    if report.state == "success":
        body["auto_inactive"] = auto_inactive
    return body


def commit_status_request(report: StatusReport) -> CommitStatusBody:
    """POST /repos/{owner}/{repo}/statuses/{sha}."""
    body: CommitStatusBody = {
        "state": cast(CommitState, report.state),
        "context": report.context,
        "description": short(report.description),
    }
    if report.log_url:
        body["target_url"] = report.log_url
    return body


def posted_after(made_at: datetime, posted_at: datetime) -> bool:
    """GitHub took a status after ``made_at`` (its timestamps have whole seconds: the same second is not
    after)."""
    return posted_at.replace(microsecond=0) > made_at.replace(microsecond=0)


def _rank(state: str) -> int:
    return {"queued": 0, "pending": 0, "in_progress": 1}.get(state, 2)  # 2: an ending (inactive too)


def is_stale(made_at: datetime, state: str, newest_at: datetime | None, newest_state: str | None) -> bool:
    """A late report of ``state`` is stale when the deployment's newest status was posted after it was made
    and is as far along (queued < in_progress < an ending). Posting time alone can't tell: redeliveries are
    posted out of order, so a late ``success`` may come after an older, later-delivered ``in_progress``."""
    if newest_at is None or newest_state is None:
        return False
    return posted_after(made_at, newest_at) and _rank(newest_state) >= _rank(state)


@contextmanager
def github_errors(what: str) -> Iterator[None]:
    """Translate githubkit's and httpx's failures into ours, naming what was being done."""
    try:
        yield
    except RequestFailed as exc:
        status = exc.response.status_code
        transient = status >= 500 or status == 429 or isinstance(exc, RateLimitExceeded)
        kind = TransientStatusReportError if transient else StatusReportError
        raise kind(f"GitHub refused {what}: HTTP {status} {_message(exc)}") from exc
    except RequestError as exc:  # a timeout or a connection that failed (githubkit wraps httpx's error)
        raise TransientStatusReportError(f"GitHub unreachable for {what}: {exc.exc or type(exc.exc).__name__}") from exc
    except httpx.HTTPError as exc:
        raise TransientStatusReportError(f"GitHub unreachable for {what}: {exc or type(exc).__name__}") from exc
    except (GitHubException, ValidationError, ValueError) as exc:
        raise StatusReportError(f"GitHub answered {what} with something unusable: {one_line(str(exc), 300)}") from exc


def _message(exc: RequestFailed) -> str:
    try:
        message = exc.response.json().get("message", "")
    except (ValueError, AttributeError):
        message = ""
    return one_line(str(message), 300)


@dataclass(frozen=True)
class Delivered:
    """What :meth:`DeploymentReporter.deliver` did: the deployment it reported on (None for a commit
    status), whether the report was dropped as stale, and the deployments it made inactive itself."""

    deployment_id: int | None
    stale: bool = False
    deactivated: tuple[int, ...] = ()


class DeploymentReporter:
    """Sends :class:`StatusReport` s through a githubkit client (``blocks/github.py`` hands it out)."""

    def __init__(self, github: GitHub[Any]) -> None:
        self._github = github

    def deliver(self, report: StatusReport, *, late: bool = False) -> Delivered:
        """Send ``report``; ``late``: it is a redelivery, checked against what GitHub shows by now.
        Raises :class:`StatusReportError` (transient or not)."""
        if report.kind == "commit":
            self.post_commit_status(report)
            return Delivered(None)
        deployment = self.deployment_for(report)
        newest_of_others: list[tuple[Deployment, DeploymentStatus]] = []
        if late:
            mine = self._statuses(report, deployment.id, per_page=1)
            if mine and is_stale(report.made_at, report.state, mine[0].created_at, mine[0].state):
                return Delivered(deployment.id, stale=True)
        if report.state == "success" and (late or deployment.production_environment):
            newest_of_others = self._environment_successes(report, deployment.id)
        # A late success must not take the environment from a deployment that succeeded after it was made.
        newer = [d for d, status in newest_of_others if posted_after(report.made_at, status.created_at)]
        owner, name = split_repository(report.repository)
        body = deployment_status_request(report, auto_inactive=not newer)
        with github_errors(f"the {report.what()}"):
            self._github.rest.repos.create_deployment_status(owner, name, deployment.id, data=body)
        deactivated: tuple[int, ...] = ()
        if report.state == "success" and deployment.production_environment and not newer:
            # GitHub's auto_inactive skips production environments: the older success is made inactive here.
            deactivated = tuple(self._deactivate(report, [d for d, _ in newest_of_others]))
        return Delivered(deployment.id, deactivated=deactivated)

    def deployment_for(self, report: StatusReport) -> Deployment:
        """The deployment of (commit, environment): the newest GitHub holds, else a new one."""
        owner, name = split_repository(report.repository)
        what = f"the deployments of {report.sha[:12]} to {report.environment}"
        with github_errors(f"listing {what}"):
            found = self._github.rest.repos.list_deployments(
                owner, name, sha=report.sha, environment=report.environment, per_page=1
            ).parsed_data
        if found:
            return found[0]
        with github_errors(f"creating {what}"):
            return self._github.rest.repos.create_deployment(owner, name, data=deployment_request(report)).parsed_data

    def post_commit_status(self, report: StatusReport) -> None:
        owner, name = split_repository(report.repository)
        with github_errors(f"the {report.what()} status of {report.sha[:12]}"):
            self._github.rest.repos.create_commit_status(owner, name, report.sha, data=commit_status_request(report))

    def _statuses(self, report: StatusReport, deployment_id: int, *, per_page: int) -> list[DeploymentStatus]:
        owner, name = split_repository(report.repository)
        with github_errors(f"listing the statuses of deployment {deployment_id}"):
            return self._github.rest.repos.list_deployment_statuses(
                owner, name, deployment_id, per_page=per_page
            ).parsed_data

    def _environment_successes(self, report: StatusReport, mine: int) -> list[tuple[Deployment, DeploymentStatus]]:
        """The environment's other deployments whose newest status is ``success``, with that status."""
        owner, name = split_repository(report.repository)
        with github_errors(f"listing the deployments to {report.environment}"):
            deployments = self._github.rest.repos.list_deployments(
                owner, name, environment=report.environment, per_page=100
            ).parsed_data
        successes = []
        for deployment in deployments:
            if deployment.id == mine or deployment.transient_environment is True:
                continue
            newest = self._statuses(report, deployment.id, per_page=1)
            if newest and newest[0].state == "success":
                successes.append((deployment, newest[0]))
        return successes

    def _deactivate(self, report: StatusReport, deployments: list[Deployment]) -> Iterator[int]:
        owner, name = split_repository(report.repository)
        for deployment in deployments:
            body: DeploymentStatusBody = {"state": "inactive", "description": short(f"replaced by {report.sha[:12]}")}
            with github_errors(f"making deployment {deployment.id} inactive"):
                self._github.rest.repos.create_deployment_status(owner, name, deployment.id, data=body)
            yield deployment.id
