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
    return HealthStateParser().parse(index, entries).snapshot


@dataclass(frozen=True)
class ParsedHealth:
    """One answer parsed: the snapshot, and which instances changed since the answer parsed before it.

    ``changed`` holds the keys of instances whose checks changed, that appeared or that went away; ``None``
    means the whole answer was parsed afresh (the first answer, or one that could not be diffed).
    """

    snapshot: HealthSnapshot
    changed: frozenset[str] | None


_Owner = tuple[str, str] | None  # the (node, service id) a check row belongs to; None: a node check


class HealthStateParser:
    """Parses successive answers of ``/v1/health/state/any``, re-parsing only the rows that changed.

    Consul stamps every check row with the ``ModifyIndex`` of its last change and answers with the index of
    the table (``X-Consul-Index``) from one consistent read. So against the answer parsed before (index
    ``i``), only rows with ``ModifyIndex > i`` can differ: every other row is exactly as it was, and its
    parsed form is kept. A row that went away shows in the count (fewer unchanged rows than before); then,
    as for the first answer, an index that went backwards (a restore) or a check that moved to another
    service, the answer is parsed afresh. A watch under churn thus builds objects for the few rows that
    changed, not for ten thousand.
    """

    def __init__(self) -> None:
        self._index = -1  # nothing parsed yet
        self._owners: dict[tuple[str, str], _Owner] = {}  # (node, check id) -> owner, one entry per row
        self._service_checks: dict[tuple[str, str], dict[str, CheckHealth]] = {}
        self._service_names: dict[tuple[str, str], str] = {}
        self._node_checks: dict[str, dict[str, CheckHealth]] = {}
        self._instances: dict[str, InstanceHealth] = {}  # handed out in snapshots: replaced, never mutated

    def parse(self, index: int, entries: Iterable[Mapping[str, Any]]) -> ParsedHealth:
        rows = entries if isinstance(entries, Sequence) else list(entries)
        if self._index < 0 or index < self._index:
            return self._parse_all(index, rows)
        since = self._index
        fresh = [row for row in rows if not isinstance(mi := row.get("ModifyIndex"), int) or mi > since]
        known = sum(1 for row in fresh if (row["Node"], row["CheckID"]) in self._owners)
        if len(rows) - len(fresh) + known != len(self._owners):
            return self._parse_all(index, rows)  # a row went away
        affected: set[tuple[str, str]] = set()
        for row in fresh:
            node, check = row["Node"], _check(row)
            service_id = row.get("ServiceID") or ""
            owner: _Owner = (node, service_id) if service_id else None
            if self._owners.get((node, check.check_id), owner) != owner:
                return self._parse_all(index, rows)  # the check moved to another service
            self._owners[(node, check.check_id)] = owner
            if owner is None:
                self._node_checks.setdefault(node, {})[check.check_id] = check
                affected.update(ident for ident in self._service_checks if ident[0] == node)
            else:
                self._service_checks.setdefault(owner, {})[check.check_id] = check
                self._service_names[owner] = row.get("ServiceName") or service_id
                affected.add(owner)
        self._index = index
        if affected:
            instances = dict(self._instances)
            for ident in affected:
                built = self._instance(ident)
                instances[built.key] = built
            self._instances = instances
        return ParsedHealth(
            HealthSnapshot(index=index, instances=self._instances),
            frozenset(instance_key(*ident) for ident in affected),
        )

    def _parse_all(self, index: int, rows: Sequence[Mapping[str, Any]]) -> ParsedHealth:
        self._owners = {}
        self._service_checks = {}
        self._service_names = {}
        self._node_checks = {}
        for row in rows:
            node, check = row["Node"], _check(row)
            service_id = row.get("ServiceID") or ""
            if service_id:
                ident = (node, service_id)
                self._owners[(node, check.check_id)] = ident
                self._service_checks.setdefault(ident, {})[check.check_id] = check
                self._service_names[ident] = row.get("ServiceName") or service_id
            else:
                self._owners[(node, check.check_id)] = None
                self._node_checks.setdefault(node, {})[check.check_id] = check
        self._instances = {instance_key(*ident): self._instance(ident) for ident in self._service_checks}
        self._index = index
        return ParsedHealth(HealthSnapshot(index=index, instances=self._instances), None)

    def _instance(self, ident: tuple[str, str]) -> InstanceHealth:
        node, service_id = ident
        return InstanceHealth(
            node=node,
            service_id=service_id,
            service_name=self._service_names[ident],
            checks=(*self._service_checks[ident].values(), *self._node_checks.get(node, {}).values()),
        )


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
