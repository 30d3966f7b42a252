"""Step 6: show the plan where the operator approves: the plan artifacts of the run, and the form's text.

The wait itself is the flow's (``suspend_flow_run`` can't run inside a task); the form and the rules an
answer must pass are in ``icd/deploy/approval.py``.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from icd.deploy.plan import PlannedDeploy
from icd.deploy.record import artifact_key
from tasks.policies import ONCE_PER_RUN


@task(name="publish-plan", persist_result=True, cache_policy=ONCE_PER_RUN)
def publish_plan(planned: PlannedDeploy, *, run_url: str | None, ui_url: str | None = None) -> str:
    """Publish the full plan (Markdown) and its resource changes (a table) as artifacts of the run; return
    the approval form's compact description, which links to the full plan."""
    markdown = planned.view.markdown(workspace=planned.workspace, extra={"Run": run_url or "-"})
    plan_artifact = create_markdown_artifact(
        markdown, key=artifact_key("plan", planned.workspace), description=f"Plan {planned.plan_sha256[:12]}"
    )
    if planned.view.table_rows():
        create_table_artifact(
            planned.view.table_rows(),
            key=artifact_key("plan-resources", planned.workspace),
            description=planned.view.version_diff,
        )
    # The form is only ever read in the Prefect UI, so a path relative to the UI's root works when the UI's
    # address is not configured; the configured address also works behind a path prefix.
    details_url = f"{(ui_url or '').rstrip('/')}/artifacts/artifact/{plan_artifact}"
    return planned.view.approval_markdown(workspace=planned.workspace, details_url=details_url)
