"""The deploy record: a Markdown artifact per workspace with the outcome, the decision and the facts."""

from __future__ import annotations

from collections.abc import Mapping

from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from icd.deploy.record import applied_seconds, artifact_key, record_markdown

# How many of a workspace's latest deploy records are searched for its last apply.
_RECORDS_SEARCHED = 20


@task(name="record-deploy", cache_policy=NO_CACHE)
def record_deploy(workspace: str, facts: Mapping[str, str]) -> None:
    create_markdown_artifact(
        record_markdown(workspace, facts),
        key=artifact_key("deploy", workspace),
        description=facts.get("outcome", ""),
    )


def last_apply_seconds(workspace: str) -> float | None:
    """How long the workspace's last apply took, from its deploy records (newest first); None when none of
    the last few applied anything, or Prefect can't say: the heads-up then uses its floor
    (``icd/deploy/stuck.py``)."""
    try:
        with get_client(sync_client=True) as client:
            records = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("deploy", workspace)])),
                sort=ArtifactSort.CREATED_DESC,
                limit=_RECORDS_SEARCHED,
            )
    except Exception as exc:  # noqa: BLE001  # advice only: without it the heads-up uses its floor
        get_run_logger().warning("could not read the deploy records of %s (%s)", workspace, exc)
        return None
    for record in records:
        if isinstance(record.data, str) and (seconds := applied_seconds(record.data)) is not None:
            return seconds
    return None
