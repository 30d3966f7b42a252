"""Step 8: gate on Consul health: the new instance must pass before the channel moves.

While the gate decides, a deploy window marks the replacement as expected, so the health watch records the
instances' transitions instead of paging; the gate's verdict is the one message.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.consul import ConsulConnection
from icd.errors import ConsulError
from icd.health.gate import BatchGateResult, HealthGateResult, wait_until_batch_healthy, wait_until_healthy
from icd.health.windows import close_deploy_window, open_deploy_window
from icd.service.contract import GATE_META_KEY


@task(name="open-deploy-window", cache_policy=NO_CACHE)
def open_window(
    consul: ConsulConnection,
    service_name: str,
    *,
    deploy_run_id: str,
    from_version: str,
    to_version: str,
    seconds: float,
) -> None:
    open_deploy_window(
        consul.get_client(),
        service_name,
        deploy_run_id=deploy_run_id,
        from_version=from_version,
        to_version=to_version,
        duration=timedelta(seconds=seconds),
    )


@task(name="close-deploy-window", cache_policy=NO_CACHE)
def close_window(consul: ConsulConnection, service_name: str, *, deploy_run_id: str) -> None:
    try:
        close_deploy_window(consul.get_client(), service_name, deploy_run_id=deploy_run_id)
    except ConsulError as exc:
        # The window expires on its own; failing the deploy over it would be worse.
        get_run_logger().warning("could not close the deploy window: %s", exc)


@task(name="health-gate", cache_policy=NO_CACHE)
def gate_health(
    consul: ConsulConnection,
    *,
    service_name: str,
    service_id: str | None,
    deploy_run_id: str,
    deadline_seconds: float,
) -> HealthGateResult:
    result = wait_until_healthy(
        consul.get_client(),
        service_name=service_name,
        service_id=service_id,
        # Contract: docs/service-contract.md#consul-registration (the pre-flight check reports a stack that
        # never hands the instance this value).
        expect_meta={GATE_META_KEY: deploy_run_id},
        deadline_seconds=deadline_seconds,
    )
    logger = get_run_logger()
    if result.healthy:
        logger.info("health gate: %s (%s) passing after %.1fs", service_name, result.service_id, result.waited_seconds)
    else:
        logger.warning(
            "health gate: %s after %.1fs; looked for %s, found %s",
            result.status,
            result.waited_seconds,
            result.criteria,
            result.found,
        )
    return result


@task(name="batch-health-gate", cache_policy=NO_CACHE)
def gate_batch(
    consul: ConsulConnection,
    *,
    service_name: str,
    service_ids: Sequence[str],
    deploy_run_id: str,
    min_healthy_seconds: float,
    deadline_seconds: float,
) -> BatchGateResult:
    """One batch of a rollout: its new instances pass and stay passing (docs in ``icd.health.gate``)."""
    result = wait_until_batch_healthy(
        consul.get_client(),
        service_name=service_name,
        service_ids=service_ids,
        # The same contract as gate_health: each new instance carries the deploy run that registered it.
        expect_meta={GATE_META_KEY: deploy_run_id},
        min_healthy_seconds=min_healthy_seconds,
        deadline_seconds=deadline_seconds,
    )
    logger = get_run_logger()
    if result.healthy:
        logger.info(
            "batch gate: %s healthy after %.1fs",
            ", ".join(i.service_id for i in result.instances),
            result.waited_seconds,
        )
    else:
        logger.warning("batch gate: not healthy after %.1fs; looked for %s", result.waited_seconds, result.criteria)
    for instance in result.instances:
        if instance.status == "passing":
            logger.info(
                "batch gate: %s passing for %.1fs (needs %gs)",
                instance.service_id,
                instance.passing_for,
                result.min_healthy_seconds,
            )
        else:
            logger.warning("batch gate: %s %s: %s", instance.service_id, instance.status, instance.output)
    return result
