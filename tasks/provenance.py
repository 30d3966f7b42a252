"""Step 9: the signed deployment record of an apply, whatever the gate said (``icd/registry/provenance.py``).

Written once the run knows how the apply ended (promoted, rolled back, left unhealthy, torn down, or a fault
after the apply), so every apply that touched a workspace has a record an auditor can check with the
registry's public key. The apply has happened by then: a record S3 won't take (after retries) is logged as an
error and the run still ends as it did; the audit then shows that link as missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.registry import ArtifactRegistry
from icd.deploy.approval import ApprovalDecision
from icd.deploy.outcome import Outcome
from icd.deploy.plan import PlannedDeploy
from icd.registry.provenance import DeploymentFacts, subject_digest
from tasks.policies import registry_blip


# No cache: the record is written once per apply run in S3 (IfNoneMatch), so a retry finds it there.
@task(
    name="record-deployment",
    cache_policy=NO_CACHE,
    **registry_blip(),
)
def record_deployment_task(registry: ArtifactRegistry, facts: DeploymentFacts) -> None:
    registry.registry().record_deployment(facts)


def deployment_facts(
    registry: ArtifactRegistry,
    run_id: str,
    planned: PlannedDeploy,
    decision: ApprovalDecision,
    outputs: Mapping[str, Any],
    ended: Outcome,
    *,
    gate: str = "",
) -> DeploymentFacts:
    """What the record says: the plan, who approved it and through what, the apply run, its outputs, the end."""
    version = registry.registry().get(planned.namespace, planned.version)
    return DeploymentFacts(
        workspace=planned.workspace,
        namespace=planned.namespace,
        version=planned.version,
        artifact_id=planned.artifact_id,
        artifact_sha256=subject_digest(version, planned.platform) if planned.platform in version.artifacts else "",
        plan_sha256=decision.plan_sha256,
        approver=decision.approver,
        approval_source=decision.source,
        approval_comment=decision.comment,
        apply_run_id=run_id,
        outputs=dict(outputs),
        verdict=ended.name,
        gate=gate,
        detail=ended.message,
        recorded_at=datetime.now(UTC),
    )


def record_deployment(
    registry: ArtifactRegistry,
    run_id: str,
    planned: PlannedDeploy,
    decision: ApprovalDecision,
    outputs: Mapping[str, Any],
    ended: Outcome,
    *,
    gate: str = "",
) -> bool:
    """Sign and store the record; False (logged as an error) when it could not be written."""
    log = get_run_logger()
    try:
        facts = deployment_facts(registry, run_id, planned, decision, outputs, ended, gate=gate)
        state = record_deployment_task(registry, facts, return_state=True)
        state.result()
    except Exception as exc:  # noqa: BLE001  # the apply happened: a missing record must not change its outcome
        log.error("the deployment record of %s was not written: %s: %s", planned.workspace, type(exc).__name__, exc)
        return False
    log.info("signed the deployment record of %s (%s)", planned.workspace, ended.name)
    return True
