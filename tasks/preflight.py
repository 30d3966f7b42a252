"""Step 1b: the pre-flight check. The service's template, its stacks and its workspaces' states against the
service contract (docs/service-contract.md), before anything is built: every breach at once, in the run's
state message and in the notification, instead of one at a time from Packer, Terraform or the health gate."""

from __future__ import annotations

from prefect import get_run_logger, task

from blocks.registry import ArtifactRegistry
from icd.config import load_config
from icd.deploy.credentials import UNSCOPED_WARNING
from icd.deploy.source import SourceCheckout
from icd.errors import RegistryStorageError
from icd.service.preflight import breach_error, breaches, check_service, service_under_check, warnings
from tasks.policies import ONCE_PER_RUN, transient


# Retried only for S3 (reading the states); a breach is the same breach on every try.
@task(
    name="preflight-check",
    persist_result=True,
    cache_policy=ONCE_PER_RUN,
    **transient(RegistryStorageError),
)
def preflight_check(registry: ArtifactRegistry, source: SourceCheckout, *, namespace: str) -> int:
    """Raises ``ContractBreachError`` listing every breach; returns how many workspaces were checked."""
    service = service_under_check(load_config(), namespace, source.path, read_state=registry.workspace_state)
    findings = check_service(service)
    if not registry.state_role_arn:
        get_run_logger().warning(UNSCOPED_WARNING)
    for warning in warnings(findings):
        get_run_logger().warning("pre-flight: %s", warning)
    if breaches(findings):
        raise breach_error(namespace, breaches(findings))
    workspaces = [target.workspace for target in service.workspaces]
    get_run_logger().info(
        "pre-flight: %s@%s honours the service contract (template; workspaces: %s)",
        namespace,
        source.commit[:12],
        ", ".join(workspaces) or "none follows it yet",
    )
    return len(workspaces)
