"""What Consul says about health, parsed into service instances, and the one rule that aggregates an
instance's checks into its status (used by the watch and by the post-apply gate alike).

An operator thinks in instances ("web-3 on node-7 is critical because `http` and `disk` fail"), not in
check rows, so an instance's status is the worst of its own checks and its node's checks; maintenance mode
(Consul's ``_node_maintenance`` / ``_service_maintenance:<id>`` checks) is tracked apart from health.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

HealthStatus = Literal["passing", "warning", "critical"]
STATUS_RANK: Mapping[str, int] = {"passing": 0, "warning": 1, "critical": 2}
STATUSES: tuple[HealthStatus, HealthStatus, HealthStatus] = ("passing", "warning", "critical")
# Service Meta the deploy writes and the watch reports (see docs/service-contract.md).
META_KEYS = ("artifact_version", "commit", "deploy_run_id", "namespace")
NODE_MAINTENANCE_CHECK = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
OUTPUT_MAX = 300


@dataclass(frozen=True)
class CheckHealth:
    check_id: str
    name: str
    status: str
    output: str


@dataclass(frozen=True)
class FailingCheck:
    check_id: str
    name: str
    status: str
    output: str


@dataclass(frozen=True)
class InstanceHealth:
    """One service instance as Consul sees it: its own checks plus the checks of the node it runs on."""

    node: str
    service_id: str
    service_name: str
    checks: tuple[CheckHealth, ...]

    @property
    def key(self) -> str:
        return instance_key(self.node, self.service_id)


@dataclass(frozen=True)
class InstanceStatus:
    """An instance's checks aggregated: the worst status, whether it is in maintenance, what fails."""

    status: HealthStatus
    maintenance: bool
    failing: tuple[FailingCheck, ...]


@dataclass(frozen=True)
class HealthSnapshot:
    """Everything one ``/v1/health/state/any`` answer says, keyed by ``node/service_id``.

    ``meta`` holds the Service Meta of the instances it was fetched for (usually none of them).
    """

    index: int
    instances: Mapping[str, InstanceHealth]
    meta: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def with_meta(self, meta: Mapping[str, Mapping[str, str]]) -> HealthSnapshot:
        return dataclasses.replace(self, meta={**self.meta, **meta})


def instance_key(node: str, service_id: str) -> str:
    return f"{node}/{service_id}"


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def is_maintenance(check: CheckHealth) -> bool:
    return check.check_id == NODE_MAINTENANCE_CHECK or check.check_id.startswith(SERVICE_MAINTENANCE_PREFIX)


def aggregate(instance: InstanceHealth, ignore_check: Callable[[CheckHealth], bool] | None = None) -> InstanceStatus:
    """The instance's worst check status (unknown statuses count as critical) and its failing checks."""
    rank = 0
    maintenance = False
    failing: list[FailingCheck] = []
    for check in instance.checks:
        if is_maintenance(check):
            maintenance = True
            continue
        if ignore_check is not None and ignore_check(check):
            continue
        check_rank = STATUS_RANK.get(check.status, 2)
        if check_rank:
            failing.append(FailingCheck(check.check_id, check.name, check.status, check.output[:OUTPUT_MAX]))
        rank = max(rank, check_rank)
    return InstanceStatus(STATUSES[rank], maintenance, tuple(failing))


def _check(entry: Mapping[str, Any]) -> CheckHealth:
    return CheckHealth(
        check_id=entry["CheckID"],
        name=entry.get("Name") or entry["CheckID"],
        status=entry["Status"],
        output=entry.get("Output") or "",
    )


def parse_health_state(index: int, entries: Iterable[Mapping[str, Any]]) -> HealthSnapshot:
    """Group the rows of ``/v1/health/state/any`` into instances; node checks apply to every instance."""
    node_checks: dict[str, list[CheckHealth]] = {}
    service_checks: dict[tuple[str, str], list[CheckHealth]] = {}
    service_names: dict[tuple[str, str], str] = {}
    for entry in entries:
        check = _check(entry)
        node = entry["Node"]
        service_id = entry.get("ServiceID") or ""
        if service_id:
            ident = (node, service_id)
            service_checks.setdefault(ident, []).append(check)
            service_names[ident] = entry.get("ServiceName") or service_id
        else:
            node_checks.setdefault(node, []).append(check)
    instances = {
        instance_key(node, service_id): InstanceHealth(
            node=node,
            service_id=service_id,
            service_name=service_names[(node, service_id)],
            checks=(*checks, *node_checks.get(node, ())),
        )
        for (node, service_id), checks in service_checks.items()
    }
    return HealthSnapshot(index=index, instances=instances)


@dataclass(frozen=True)
class ServiceEntry:
    """One row of ``/v1/health/service/:name``: an instance with its checks and its Service Meta."""

    instance: InstanceHealth
    meta: Mapping[str, str]


def parse_service_entries(entries: Iterable[Mapping[str, Any]]) -> list[ServiceEntry]:
    parsed = []
    for entry in entries:
        service = entry["Service"]
        node = entry["Node"]["Node"] if isinstance(entry.get("Node"), Mapping) else str(entry.get("Node", ""))
        instance = InstanceHealth(
            node=node,
            service_id=service["ID"],
            service_name=service.get("Service") or service["ID"],
            checks=tuple(_check(check) for check in entry.get("Checks") or ()),
        )
        meta = {str(k): str(v) for k, v in (service.get("Meta") or {}).items()}
        parsed.append(ServiceEntry(instance, meta))
    return parsed


def parse_service_meta(entries: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """``/v1/health/service/:name`` rows -> the deploy-relevant Service Meta per instance key."""
    return {
        entry.instance.key: {key: entry.meta[key] for key in META_KEYS if key in entry.meta}
        for entry in parse_service_entries(entries)
    }
