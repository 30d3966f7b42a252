"""The post-apply health gate: wait, with Consul blocking queries, until the new instance is passing.

The deploy flow calls this after ``terraform apply`` registers the new instance. It never sleeps and polls:
each round is one blocking query on ``/v1/health/service/:name`` that Consul answers the moment that
service's health changes, so the gate opens within milliseconds of the last check passing. An instance
that stays unhealthy is an expected outcome, returned as ``HealthGateResult(healthy=False, ...)`` with
Consul's own check output for the operator; only a failing Consul raises (``ConsulError``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import consul
import requests
from prefect import task
from prefect.logging import get_run_logger

from blocks.consul import ConsulConnection
from tasks.errors import ConsulError

GateStatus = Literal["passing", "warning", "critical", "maintenance", "missing"]

_STATUS_RANK: Mapping[str, int] = {"passing": 0, "warning": 1, "critical": 2}
_MAINTENANCE_CHECKS = ("_node_maintenance", "_service_maintenance:")


@dataclass(frozen=True)
class HealthGateResult:
    """``status`` is the matched instance's worst check status, or ``missing`` when none matched yet."""

    healthy: bool
    status: GateStatus
    output: str
    waited_seconds: float
    service_id: str | None = None


def evaluate_instances(
    entries: Iterable[Mapping[str, Any]], *, service_id: str | None, expect_meta: Mapping[str, str]
) -> tuple[GateStatus, str, str | None]:
    """Pure: the best matching instance's status, the output of its failing checks and its service ID.

    With several matches (no ``service_id``, only meta), the gate follows the healthiest, since one
    passing instance of the new version is what the deploy waits for.
    """
    best: tuple[int, GateStatus, str, str | None] | None = None
    for entry in entries:
        service = entry["Service"]
        if service_id is not None and service["ID"] != service_id:
            continue
        meta = service.get("Meta") or {}
        if any(meta.get(key) != value for key, value in expect_meta.items()):
            continue
        checks = entry.get("Checks") or []
        if any(str(c["CheckID"]).startswith(_MAINTENANCE_CHECKS) for c in checks):
            candidate: tuple[int, GateStatus, str, str | None] = (3, "maintenance", "", service["ID"])
        else:
            rank = max((_STATUS_RANK.get(c["Status"], 2) for c in checks), default=0)
            status: GateStatus = ("passing", "warning", "critical")[rank]
            failing = [
                f"{c.get('Name') or c['CheckID']}: {c['Status']}: {(c.get('Output') or '').strip()}"
                for c in checks
                if c["Status"] != "passing"
            ]
            candidate = (rank, status, "\n".join(failing), service["ID"])
        if best is None or candidate[0] < best[0]:
            best = candidate
    if best is None:
        return "missing", "no registered instance matches", None
    return best[1], best[2], best[3]


def wait_until_healthy(
    client: consul.Consul,
    *,
    service_name: str,
    service_id: str | None,
    expect_meta: Mapping[str, str],
    deadline_seconds: float,
) -> HealthGateResult:
    """Block until an instance of ``service_name`` (this ``service_id``, with ``expect_meta``) passes.

    Returns ``healthy=True`` as soon as it does, else ``healthy=False`` with the last status and check
    output once ``deadline_seconds`` have passed. Raises ``ConsulError`` if Consul can't be queried.
    """
    started = time.monotonic()
    index: str | None = None
    while True:
        remaining = deadline_seconds - (time.monotonic() - started)
        kwargs: dict[str, Any] = {}
        if index is not None:
            kwargs = {"index": index, "wait": f"{max(1, int(remaining * 1000))}ms"}
        try:
            new_index, entries = client.health.service(service_name, **kwargs)
        except (consul.ConsulException, requests.RequestException) as exc:
            raise ConsulError(f"Consul health query for {service_name!r} failed: {exc}") from exc
        status, output, matched_id = evaluate_instances(entries or (), service_id=service_id, expect_meta=expect_meta)
        waited = time.monotonic() - started
        if status == "passing" or waited >= deadline_seconds:
            return HealthGateResult(
                healthy=status == "passing",
                status=status,
                output=output,
                waited_seconds=round(waited, 3),
                service_id=matched_id,
            )
        # An index that went backwards (agent restart) means "start over", as Consul's docs advise.
        index = str(new_index) if index is None or int(new_index) >= int(index) else None


@task(name="health-gate")
def health_gate(
    consul_connection: ConsulConnection,
    *,
    service_name: str,
    service_id: str | None = None,
    expect_meta: Mapping[str, str] | None = None,
    deadline_seconds: float = 300,
) -> HealthGateResult:
    """The deploy flow's gate: ``wait_until_healthy`` with the block's client, logged for the run."""
    logger = get_run_logger()
    result = wait_until_healthy(
        consul_connection.get_client(),
        service_name=service_name,
        service_id=service_id,
        expect_meta=expect_meta or {},
        deadline_seconds=deadline_seconds,
    )
    if result.healthy:
        logger.info("%s (%s) is passing after %.1f s", service_name, result.service_id, result.waited_seconds)
    else:
        logger.warning("%s is %s after %.1f s: %s", service_name, result.status, result.waited_seconds, result.output)
    return result
