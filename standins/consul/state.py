"""The agent's and catalog's records (services, checks, KV entries) and the state that indexes them.

One condition variable guards everything: writers hold it while they change records and bump indexes,
and every bump wakes the blocking queries waiting on it.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from standins.consul.parsing import format_duration

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
CHECK_STATUSES = (PASSING, WARNING, CRITICAL)

SERF_CHECK_ID = "serfHealth"
NODE_MAINTENANCE_CHECK_ID = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
DEFAULT_SERVICE_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
DEFAULT_NODE_MAINTENANCE_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
DEFAULT_CHECK_UPDATE_INTERVAL_SECONDS = 300.0
CHECK_OUTPUT_MAX_BYTES = 4096


@dataclass(slots=True)
class ServiceRecord:
    service_id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int
    modify_index: int


@dataclass(slots=True)
class CheckRecord:
    check_id: str
    name: str
    node: str
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    check_type: str = ""
    notes: str = ""
    # What the agent knows now (``/v1/agent/checks``) ...
    status: str = CRITICAL
    output: str = ""
    # ... and what the catalog has (health endpoints); they differ only while an output-only change waits.
    synced_status: str = CRITICAL
    synced_output: str = ""
    last_synced_at: float = 0.0
    reported: bool = False  # whether the check has run (or been updated) since it was registered
    interval: float = 0.0
    run_every: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    ttl_deadline: float = 0.0
    ttl_last_output: str = ""
    target: str = ""
    method: str = "GET"
    header: dict[str, list[str]] = field(default_factory=dict)
    tls_skip_verify: bool = False
    deregister_critical_after: float = 0.0
    critical_since: float | None = None
    generation: int = 0
    create_index: int = 0
    modify_index: int = 0
    cached_json: str | None = None

    def health_dict(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.synced_status,
            "Notes": self.notes,
            "Output": self.synced_output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.check_type,
            "Interval": format_duration(self.interval),
            "Timeout": format_duration(self.timeout),
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def health_json(self) -> str:
        if self.cached_json is None:
            self.cached_json = json.dumps(self.health_dict(), separators=(",", ":"))
        return self.cached_json

    def agent_dict(self) -> dict[str, Any]:
        answer = self.health_dict()
        answer.update(Status=self.status, Output=self.output, CreateIndex=0, ModifyIndex=0)
        return answer


@dataclass(slots=True)
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "LockIndex": 0,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class ConsulState:
    """The agent's and catalog's data, guarded by one condition variable that wakes blocking queries.

    Every method below except ``stop`` expects the caller to hold ``cond``.
    """

    def __init__(self, node_name: str, datacenter: str, host: str, check_update_interval: float) -> None:
        self.cond = threading.Condition()
        self.node_name = node_name
        self.datacenter = datacenter
        self.host = host
        self.node_id = str(uuid.uuid4())
        self.check_update_interval = check_update_interval
        self.stopping = False
        # Blocking queries parked on ``cond`` right now; tests use it to know a watcher is waiting.
        self.waiting_queries = 0
        self.raft_index = 0
        self.table_index: dict[str, int] = {"nodes": 0, "services": 0, "checks": 0, "kvs": 0}
        self.service_name_index: dict[str, int] = {}
        self.services: dict[str, ServiceRecord] = {}
        self.checks: dict[str, CheckRecord] = {}
        self.kv: dict[str, KVEntry] = {}
        self.kv_change_index: dict[str, int] = {}
        self.generations = itertools.count(1)
        with self.cond:
            self._register_node(node_name)

    def _register_node(self, node_name: str) -> None:
        self.node_index = self.bump("nodes")
        serf = CheckRecord(
            check_id=SERF_CHECK_ID,
            name="Serf Health Status",
            node=node_name,
            status=PASSING,
            output="Agent alive and reachable",
            synced_status=PASSING,
            synced_output="Agent alive and reachable",
        )
        serf.create_index = serf.modify_index = self.bump("checks")
        self.checks[SERF_CHECK_ID] = serf

    def stop(self) -> None:
        """Wake every blocking query so it answers now; the caller need not hold ``cond``."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    # --- indexes --------------------------------------------------------------------------------------

    def bump(self, *tables: str, service_names: Iterable[str] = ()) -> int:
        self.raft_index += 1
        for table in tables:
            self.table_index[table] = self.raft_index
        for name in service_names:
            self.service_name_index[name] = self.raft_index
        self.cond.notify_all()
        return self.raft_index

    def checks_changed(self, check: CheckRecord) -> int:
        names = [check.service_name] if check.service_id else {service.name for service in self.services.values()}
        index = self.bump("checks", service_names=names)
        check.modify_index = index
        # Rendered on write so that reading ten thousand checks is a join of ready-made strings.
        check.cached_json = None
        check.health_json()
        return index

    # --- changes --------------------------------------------------------------------------------------

    def set_check_status(self, check: CheckRecord, status: str, output: str, now: float) -> None:
        output = output.encode()[:CHECK_OUTPUT_MAX_BYTES].decode(errors="ignore")
        if check.status == status and check.output == output:
            return
        if status == CRITICAL and check.critical_since is None:
            check.critical_since = now
        elif status != CRITICAL:
            check.critical_since = None
        check.status, check.output = status, output
        # The first result of a check reaches the catalog at once, output too (a check critical from its
        # registration on shows why from its first run, as a real agent's does); later output-only changes
        # wait for check_update_interval.
        first_result, check.reported = not check.reported, True
        status_changed = status != check.synced_status
        due_for_sync = now - check.last_synced_at >= self.check_update_interval
        if status_changed or first_result or (output != check.synced_output and due_for_sync):
            check.synced_status, check.synced_output, check.last_synced_at = status, output, now
            self.checks_changed(check)

    def deregister_service(self, service_id: str) -> None:
        service = self.services.pop(service_id)
        for check_id in [cid for cid, c in self.checks.items() if c.service_id == service_id]:
            del self.checks[check_id]
        self.bump("services", "checks", service_names=[service.name])

    # --- read views -----------------------------------------------------------------------------------

    def agent_service_dict(self, service: ServiceRecord) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Meta": dict(service.meta),
            "Port": service.port,
            "Address": service.address,
            "Weights": dict(service.weights),
            "EnableTagOverride": service.enable_tag_override,
            "Datacenter": self.datacenter,
        }

    def node_dict(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": self.host,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": self.host,
                "lan_ipv4": self.host,
                "wan": self.host,
                "wan_ipv4": self.host,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        }

    @staticmethod
    def health_service_dict(service: ServiceRecord) -> dict[str, Any]:
        return {
            "ID": service.service_id,
            "Service": service.name,
            "Tags": list(service.tags),
            "Address": service.address,
            "Meta": dict(service.meta),
            "Port": service.port,
            "Weights": dict(service.weights),
            "EnableTagOverride": service.enable_tag_override,
            "CreateIndex": service.create_index,
            "ModifyIndex": service.modify_index,
        }

    def catalog_service_dict(self, service: ServiceRecord) -> dict[str, Any]:
        node = self.node_dict()
        return {
            "ID": node["ID"],
            "Node": node["Node"],
            "Address": node["Address"],
            "Datacenter": node["Datacenter"],
            "TaggedAddresses": node["TaggedAddresses"],
            "NodeMeta": node["Meta"],
            "ServiceKind": "",
            "ServiceID": service.service_id,
            "ServiceName": service.name,
            "ServiceTags": list(service.tags),
            "ServiceAddress": service.address,
            "ServiceMeta": dict(service.meta),
            "ServicePort": service.port,
            "ServiceWeights": dict(service.weights),
            "ServiceEnableTagOverride": service.enable_tag_override,
            "CreateIndex": service.create_index,
            "ModifyIndex": service.modify_index,
        }

    def services_named(self, name: str, tags: list[str]) -> list[ServiceRecord]:
        return [s for s in self.services.values() if s.name == name and all(tag in s.tags for tag in tags)]

    def catalog_services(self) -> dict[str, list[str]]:
        answer: dict[str, list[str]] = {}
        for service in self.services.values():
            tags = answer.setdefault(service.name, [])
            tags.extend(t for t in service.tags if t not in tags)
        return answer

    def service_index(self, name: str) -> int:
        """The index a per-service-name query reports: the name's last change, else the services table."""
        return self.service_name_index.get(name, self.table_index["services"])
