"""push-to-deploy: the UI's one click: build a ref and deploy it to one workspace.

It builds (``build-artifact`` as a subflow, without planning the followers of ``latest``, so that only the
chosen workspace is planned) and then starts a ``deploy-artifact`` run of that version for the workspace.
The approval happens in that run; this one ends ``Completed`` with its link. When another run is building
the same commit already (a push delivered at the same moment), the build ends ``Duplicate`` and so does this
run, naming that run: nothing is deployed, and a second click once that run has ended reuses its version.
"""

from __future__ import annotations

from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Completed

from flows.build_artifact import DUPLICATE, build_artifact
from icd.config import load_config
from icd.rules import GitRef, Workspace

DEPLOY_DEPLOYMENT = "deploy-artifact/deploy-artifact"


@flow(name="push-to-deploy", log_prints=False)
def push_to_deploy(workspace: Workspace, ref: GitRef = "main", rebuild: bool = False) -> Any:
    """Build ``ref`` of the namespace ``workspace`` follows, then start its deploy to ``workspace``."""
    settings = load_config().workspace(workspace)
    built = build_artifact(
        namespace=settings.namespace,
        ref=ref,
        platform=settings.platform,
        plan=False,
        rebuild=rebuild,
        return_state=True,
    )
    if built.name == DUPLICATE:
        # Waiting here for the other run would hold a worker slot for a whole build; the click is cheap to repeat.
        other = cast(dict[str, Any], built.result())
        return Completed(
            name=DUPLICATE,
            message=f"{settings.namespace} {ref} is being built by run {other['building_run_name']} "
            f"({other['building_run_id']}); nothing deployed to {workspace}: run push-to-deploy again once that "
            "run has ended (it reuses its version)",
            data={"version": None, "deploy_run_id": None, **other},
        )
    version = cast(int, built.result())  # a failed build raises its own error here
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
