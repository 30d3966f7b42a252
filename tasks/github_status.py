"""Report to GitHub: a deploy as a deployment of its commit, a build as the commit's ``icd/build`` status.

Best effort, like notifications (``tasks/notify.py``): nothing here raises into a flow or changes an outcome.
A report GitHub can't take now (down, 5xx, rate-limited) is handed to the ``deliver-status`` deployment as a
flow run scheduled a little later, which tries again with backoff; a report GitHub refuses for good (a
revoked token, a repository it does not know) is a warning in the run's log. A namespace without
``github_repository`` in icd.toml, or an installation without the ``github`` block, reports nothing (one
debug line).

The deploy flow reports through :func:`deploy_status` alone: the steps before the end (``queued``,
``waiting``, ``approved``, ``applying``, ``applied``) and the run's ending (an outcome's name). The tasks are
cached per run and inputs, so a run resumed after its approval wait does not report a step twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from prefect import get_run_logger, task
from prefect.client.schemas.objects import FlowRun, State
from prefect.deployments import run_deployment

from blocks.github import GITHUB_BLOCK, GitHubConnection
from blocks.notifier import load_notifier
from blocks.registry import ArtifactRegistry
from icd.config import NamespaceConfig, load_config
from icd.errors import DeployError, StatusReportError, TransientStatusReportError
from icd.github.deployments import (
    STEPS,
    DeploymentReporter,
    DeploymentState,
    DeployStep,
    StatusReport,
    build_report,
    build_state,
    deploy_report,
    ending_state,
    environment_url,
    step_status,
)
from icd.text import one_line
from tasks.context import DeployContext
from tasks.notify import redelivery_backoff
from tasks.policies import ONCE_PER_RUN

DELIVERY_DEPLOYMENT = "deliver-status/deliver-status"
# After the apply, before the gate: the environment is there (its URL known), its health not yet.
APPLIED: Mapping[str, tuple[DeploymentState, str]] = {"applied": ("in_progress", "applied; checking health")}


@dataclass
class _RunReports:
    """What a deploy run reported so far, for its later reports (this process: a resumed run sets it again
    with :func:`deployment_reported`, when it reads its claim back)."""

    version: int
    environment_url: str | None = None


_RUNS: dict[str, _RunReports] = {}


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001  # outside a run (a test, a command): the module's logger
        return logging.getLogger(__name__)


def github_repository(namespace: str) -> str | None:
    """Where ``namespace`` reports, from icd.toml; None (and a debug line) when it reports nowhere."""
    try:
        repository = load_config().namespace(namespace).github_repository
    except DeployError as exc:
        _logger().debug("nothing reported to GitHub for %s: %s", namespace, exc)
        return None
    if repository is None:
        _logger().debug("nothing reported to GitHub: %s has no github_repository in icd.toml", namespace)
    return repository


def load_reporter(github_block: str) -> DeploymentReporter | None:
    """The reporter of the saved ``github`` block; None (and a debug line) when there is none."""
    try:
        block = GitHubConnection.load(github_block)
    except ValueError:  # Prefect's "Unable to find block document named ..."
        _logger().debug(
            "nothing reported to GitHub: no %r block (icd-setup blocks with ICD_GITHUB_TOKEN)", github_block
        )
        return None
    return DeploymentReporter(cast(GitHubConnection, block).get_client())


def deliver(report: StatusReport, *, github_block: str, attempt: int = 0) -> bool:
    """Send ``report`` (``attempt`` > 0: a redelivery); never raises. A transient failure schedules the next
    attempt; True when GitHub has it (or it was stale, superseded by what GitHub shows)."""
    logger = _logger()
    try:
        reporter = load_reporter(github_block)
        if reporter is None:
            return False
        delivered = reporter.deliver(report, late=attempt > 0)
    except TransientStatusReportError as exc:
        schedule_status_redelivery(report, github_block=github_block, attempt=attempt + 1, reason=str(exc))
        return False
    except StatusReportError as exc:
        logger.warning("GitHub did not take the %s, and will not later: %s", report.what(), exc)
        return False
    except Exception as exc:  # noqa: BLE001  # best effort: a report never fails the run it reports on
        logger.warning("the %s was not reported to GitHub: %s", report.what(), one_line(str(exc), 300))
        return False
    if delivered.stale:
        logger.info("dropped the late %s: GitHub shows a newer status", report.what())
    else:
        logger.info("reported the %s", report.what())
    return True


def schedule_status_redelivery(report: StatusReport, *, github_block: str, attempt: int, reason: str) -> bool:
    """Schedule delivery attempt ``attempt`` (1-based) of ``report``; False when none is left or Prefect
    refused (the report is lost then, and said so in the log)."""
    logger = _logger()
    backoff = status_backoff()
    if attempt > len(backoff):
        logger.error("giving up on the %s after %d attempts: %s", report.what(), attempt - 1, reason)
        return False
    delay = backoff[attempt - 1]
    try:
        run: FlowRun = run_deployment(  # type: ignore[assignment]  # the sync variant, in a sync context
            DELIVERY_DEPLOYMENT,
            parameters={"report": report.to_dict(), "attempt": attempt, "github_block": github_block},
            scheduled_time=datetime.now(UTC) + timedelta(seconds=delay),
            timeout=0,
            as_subflow=False,
            tags=["housekeeping"],
        )
    except Exception as exc:  # noqa: BLE001  # best effort: whatever Prefect says, the run goes on
        logger.error("the %s is lost (%s); its redelivery could not be scheduled: %s", report.what(), reason, exc)
        return False
    logger.warning("the %s was not delivered (%s); retrying in %ds as run %s", report.what(), reason, delay, run.name)
    return True


def status_backoff() -> tuple[int, ...]:
    """Waits between delivery attempts: a worker's ICD_STATUS_REDELIVERY_BACKOFF_SECONDS ("30,60,120"), else
    the notifications' (``tasks/notify.py``)."""
    configured = os.environ.get("ICD_STATUS_REDELIVERY_BACKOFF_SECONDS", "")
    waits = tuple(int(part) for part in configured.split(",") if part.strip().isdigit())
    return waits or redelivery_backoff()


@task(name="report-deploy-status", persist_result=True, cache_policy=ONCE_PER_RUN)
def report_deploy_status(
    registry: ArtifactRegistry,
    repository: str,
    namespace: str,
    workspace: str,
    version: int,
    state: str,
    description: str,
    *,
    run_id: str,
    log_url: str | None,
    environment_url: str | None = None,
    github_block: str = GITHUB_BLOCK,
) -> bool:
    """Report ``state`` on the deployment of ``version``'s commit to ``workspace``; never raises."""
    try:
        if load_reporter(github_block) is None:
            return False
        sha = registry.registry().get(namespace, version).git_commit
    except Exception as exc:  # noqa: BLE001  # best effort: a report never fails the run it reports on
        _logger().warning("%s v%d not reported to GitHub (%s): %s", namespace, version, state, one_line(str(exc), 300))
        return False
    report = deploy_report(
        repository,
        sha,
        workspace,
        state,  # type: ignore[arg-type]  # from STEPS or ending_state: a deployment state
        description,
        namespace=namespace,
        version=version,
        run_id=run_id,
        log_url=log_url,
        environment_url=environment_url,
    )
    return deliver(report, github_block=github_block)


@task(name="report-build-status", persist_result=True, cache_policy=ONCE_PER_RUN)
def report_build_status(
    repository: str,
    sha: str,
    succeeded: bool | None,
    description: str,
    *,
    target_url: str | None,
    github_block: str = GITHUB_BLOCK,
) -> bool:
    """The commit's ``icd/build`` status: pending (``succeeded`` None), success or failure; never raises."""
    report = build_report(repository, sha, build_state(succeeded), description, target_url=target_url)
    return deliver(report, github_block=github_block)


def deploy_status(
    ctx: DeployContext,
    event: str,
    *,
    version: int | None = None,
    detail: str = "",
    outputs: Mapping[str, Any] | None = None,
) -> None:
    """Report a step of the deploy run (``queued``: ``version`` given; ``waiting``, ``approved``,
    ``applying``, ``applied`` with the stack's ``outputs``) or its ending (an outcome's name, ``detail`` its
    title). ``version`` names another version's deployment (the one a rollback restored). Never raises."""
    try:
        _deploy_status(ctx, event, version=version, detail=detail, outputs=outputs)
    except Exception as exc:  # noqa: BLE001  # best effort: a report never fails the run it reports on
        _logger().warning("%s not reported to GitHub: %s", event, one_line(str(exc), 300))


def _deploy_status(
    ctx: DeployContext, event: str, *, version: int | None, detail: str, outputs: Mapping[str, Any] | None
) -> None:
    repository = github_repository(ctx.namespace)
    if repository is None:
        return
    run = _RUNS.get(ctx.run_id)
    if event == "queued" and version is not None:
        run = _RUNS[ctx.run_id] = _RunReports(version)
    if version is None and run is None:
        return  # the run claimed nothing: no deployment of it
    url = environment_url(outputs) if outputs else None
    if run is not None and version is None and url:
        run.environment_url = url
    ending = event not in STEPS and event not in APPLIED
    if event in STEPS:
        state, description = step_status(cast(DeployStep, event), detail)
    elif event in APPLIED:
        state, description = APPLIED[event]
    else:
        state, description = ending_state(event, teardown=ctx.teardown), detail or event
    reported_version = version if version is not None else cast(_RunReports, run).version
    report_deploy_status(
        ctx.registry,
        repository,
        ctx.namespace,
        ctx.workspace,
        reported_version,
        state,
        description,
        run_id=ctx.run_id,
        log_url=ctx.run_url,
        environment_url=url or (run.environment_url if run is not None and version is None else None),
    )
    if ending and version is None:
        _RUNS.pop(ctx.run_id, None)


def deployment_reported(ctx: DeployContext, version: int) -> None:
    """Name ``version`` as the deployment this run's later reports are about, in this process, as reporting
    ``queued`` did the first time: a re-run after approval reads the claim and that report back, and
    reports nothing again. Nothing is named for a namespace that reports nowhere. Never raises: it runs while
    the run holds the workspace, before the path that releases it."""
    try:
        if ctx.run_id not in _RUNS and github_repository(ctx.namespace) is not None:
            _RUNS[ctx.run_id] = _RunReports(version)
    except Exception as exc:  # noqa: BLE001  # best effort: a report never fails the run it reports on
        _logger().warning("the deployment of v%d not named for GitHub: %s", version, one_line(str(exc), 300))


def superseded_status(ctx: DeployContext, *, run_id: str, version: int, detail: str) -> None:
    """The deployment of a run that ended Superseded while it waited: ``failure``. That run has no process of
    its own (or is suspended, and the server refuses its tasks), so this is no task: whoever ended it reports.
    Never raises."""
    try:
        repository = github_repository(ctx.namespace)
        if repository is None:
            return
        sha = ctx.registry.registry().get(ctx.namespace, version).git_commit
        report = deploy_report(
            repository,
            sha,
            ctx.workspace,
            "failure",
            detail,
            namespace=ctx.namespace,
            version=version,
            run_id=run_id,
            log_url=ctx.notifier.flow_run_url(run_id),
        )
        deliver(report, github_block=GITHUB_BLOCK)
    except Exception as exc:  # noqa: BLE001  # best effort: a report never fails the run it reports on
        _logger().warning("the superseded run %s not reported to GitHub: %s", run_id, one_line(str(exc), 300))


def build_status(
    config: NamespaceConfig,
    sha: str,
    result: int | State[Any] | BaseException | None,
    *,
    run_id: str,
    notifier_block: str,
) -> None:
    """Report the build of ``sha``: pending (``result`` None), its version, or the failure. Never raises."""
    if config.github_repository is None:
        _logger().debug("build not reported to GitHub: the namespace has no github_repository in icd.toml")
        return
    try:
        target_url = load_notifier(notifier_block).flow_run_url(run_id)
    except Exception:  # noqa: BLE001  # a status without its link is still worth posting
        target_url = None
    if result is None:
        succeeded, description = None, "building"
    elif isinstance(result, BaseException):
        succeeded, description = False, f"build failed: {type(result).__name__}"
    else:
        data = result if isinstance(result, int) else result.data
        version = data if isinstance(data, int) else None
        succeeded, description = True, f"built v{version}" if version is not None else "built"
    try:
        report_build_status(config.github_repository, sha, succeeded, description, target_url=target_url)
    except Exception as exc:  # noqa: BLE001  # best effort: a report never fails the run it reports on
        _logger().warning("build status not reported to GitHub: %s", one_line(str(exc), 300))
