"""push-to-deploy: the UI's one click: build a ref and deploy it to one workspace.

It builds (``build-artifact`` as a subflow, without planning the followers of ``latest``, so that only the
chosen workspace is planned) and then starts a ``deploy-artifact`` run of that version for the workspace.
The approval happens in that run; this one ends ``Completed`` with its link.
"""

from __future__ import annotations

from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Completed

from flows.build_artifact import build_artifact
from icd.config import load_config
from icd.rules import GitRef, Workspace

DEPLOY_DEPLOYMENT = "deploy-artifact/deploy-artifact"


@flow(name="push-to-deploy", log_prints=False)
def push_to_deploy(workspace: Workspace, ref: GitRef = "main", rebuild: bool = False) -> Any:
    """Build ``ref`` of the namespace ``workspace`` follows, then start its deploy to ``workspace``."""
    settings = load_config().workspace(workspace)
    version = build_artifact(
        namespace=settings.namespace, ref=ref, platform=settings.platform, plan=False, rebuild=rebuild
    )
    run = cast(
        FlowRun,
        run_deployment(
            DEPLOY_DEPLOYMENT,
            parameters={"workspace": workspace, "version": version},
            timeout=0,
            as_subflow=False,
            tags=["deploy"],
        ),
    )
    get_run_logger().info(
        "deploying %s v%d to %s in run %s (%s)", settings.namespace, version, workspace, run.name, run.id
    )
    return Completed(
        name="DeployStarted",
        message=f"{settings.namespace} v{version} -> {workspace}: approve in run {run.name} ({run.id})",
        data={"version": version, "deploy_run_id": str(run.id)},
    )
