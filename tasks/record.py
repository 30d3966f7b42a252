"""The deploy record: a Markdown artifact per workspace with the outcome, the decision and the facts."""

from __future__ import annotations

from collections.abc import Mapping

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from icd.deploy.record import artifact_key, record_markdown


@task(name="record-deploy", cache_policy=NO_CACHE)
def record_deploy(workspace: str, facts: Mapping[str, str]) -> None:
    create_markdown_artifact(
        record_markdown(workspace, facts),
        key=artifact_key("deploy", workspace),
        description=facts.get("outcome", ""),
    )
