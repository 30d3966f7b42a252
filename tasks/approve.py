"""Step 6: show the plan where the operator approves: the plan artifacts of the run.

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
def publish_plan(planned: PlannedDeploy, *, run_url: str | None) -> str:
    """The plan summary as Markdown (returned for the approval form) and a table of resource changes."""
    markdown = planned.view.markdown(workspace=planned.workspace, extra={"Run": run_url or "-"})
    create_markdown_artifact(
        markdown, key=artifact_key("plan", planned.workspace), description=f"Plan {planned.plan_sha256[:12]}"
    )
    if planned.view.table_rows():
        create_table_artifact(
            planned.view.table_rows(),
            key=artifact_key("plan-resources", planned.workspace),
            description=planned.view.version_diff,
        )
    return markdown
