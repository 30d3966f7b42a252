"""The agent's write operations: service and check (de)registration, TTL updates, maintenance, KV writes.

Each takes the lock, changes records through ``ConsulState`` (which bumps indexes and wakes blocking
queries), and raises ``ApiError`` with Consul's status and message when Consul would refuse.
"""

from __future__ import annotations

import time
from typing import Any

from standins.consul.checks import CheckScheduler
from standins.consul.parsing import ApiError, normalized, parse_duration
from standins.consul.state import (
    CHECK_STATUSES,
    CRITICAL,
    DEFAULT_NODE_MAINTENANCE_REASON,
    DEFAULT_SERVICE_MAINTENANCE_REASON,
    NODE_MAINTENANCE_CHECK_ID,
    SERF_CHECK_ID,
    SERVICE_MAINTENANCE_PREFIX,
    CheckRecord,
    ConsulState,
    KVEntry,
    ServiceRecord,
)


def _unknown_service(service_id: str) -> str:
    return f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'


def _unknown_check(check_id: str) -> str:
    return f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'


class Agent:
    def __init__(self, state: ConsulState, scheduler: CheckScheduler) -> None:
        self.state = state
        self.scheduler = scheduler

    # --- services and checks --------------------------------------------------------------------------

    def register_service(self, body: dict[str, Any], replace_existing_checks: bool) -> None:
        spec = normalized(body)
        name = spec.get("name")
        if not name:
            raise ApiError(400, "Missing service name")
        service_id = str(spec.get("id") or name)
        definitions = [normalized(c) for c in ([spec["check"]] if spec.get("check") else [])]
        definitions += [normalized(c) for c in (spec.get("checks") or [])]
        state = self.state
        with state.cond:
            existing = state.services.get(service_id)
            service = ServiceRecord(
                service_id=service_id,
                name=str(name),
                tags=[str(t) for t in spec.get("tags") or []],
                address=str(spec.get("address") or ""),
                port=int(spec.get("port") or 0),
                meta={str(k): str(v) for k, v in (spec.get("meta") or {}).items()},
                weights=dict(spec.get("weights") or {"Passing": 1, "Warning": 1}),
                enable_tag_override=bool(spec.get("enabletagoverride")),
                create_index=0,
                modify_index=0,
            )
            new_checks: list[tuple[CheckRecord, dict[str, Any]]] = []
            for position, definition in enumerate(definitions, start=1):
                check_id = str(definition.get("checkid") or definition.get("id") or f"service:{service_id}")
                if not (definition.get("checkid") or definition.get("id")) and len(definitions) > 1:
                    check_id += f":{position}"
                check_name = str(definition.get("name") or f"Service '{name}' check")
                new_checks.append((CheckRecord(check_id=check_id, name=check_name, node=state.node_name), definition))
            names = [service.name] + ([existing.name] if existing and existing.name != service.name else [])
            index = state.bump("services", service_names=names)
            service.create_index = existing.create_index if existing else index
            service.modify_index = index
            state.services[service_id] = service
            kept = {check.check_id for check, _ in new_checks}
            # A new service owns no checks yet, so only a re-registration needs the scans below.
            if existing is not None and replace_existing_checks:
                for check_id in [c.check_id for c in state.checks.values() if c.service_id == service_id]:
                    if check_id not in kept and not check_id.startswith(SERVICE_MAINTENANCE_PREFIX):
                        del state.checks[check_id]
            for check in state.checks.values() if existing is not None else ():
                if check.service_id == service_id:
                    check.service_name, check.service_tags, check.cached_json = service.name, service.tags, None
            for check, definition in new_checks:
                check.service_id, check.service_name, check.service_tags = service_id, service.name, service.tags
                self._add_check(check, definition)

    def deregister_service(self, service_id: str) -> None:
        with self.state.cond:
            if service_id not in self.state.services:
                raise ApiError(404, _unknown_service(service_id))
            self.state.deregister_service(service_id)

    def register_check(self, body: dict[str, Any]) -> None:
        definition = normalized(body)
        name = definition.get("name")
        if not name:
            raise ApiError(400, "Missing check name")
        state = self.state
        with state.cond:
            check = CheckRecord(
                check_id=str(definition.get("checkid") or definition.get("id") or name),
                name=str(name),
                node=state.node_name,
            )
            service_id = str(definition.get("serviceid") or "")
            if service_id:
                service = state.services.get(service_id)
                if service is None:
                    raise ApiError(400, f'ServiceID "{service_id}" does not exist')
                check.service_id, check.service_name, check.service_tags = service_id, service.name, service.tags
            self._add_check(check, definition)

    def _add_check(self, check: CheckRecord, definition: dict[str, Any]) -> None:
        """Fill ``check`` from a normalized definition, keep a re-registered check's status, schedule it."""
        state = self.state
        if "args" in definition or "script" in definition:
            raise ApiError(
                400,
                "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or "
                "'enable_local_script_checks' to true",
            )
        check.notes = str(definition.get("notes") or "")
        check.deregister_critical_after = parse_duration(definition.get("deregistercriticalserviceafter"))
        check.timeout = parse_duration(definition.get("timeout"))
        interval = parse_duration(definition.get("interval"))
        if definition.get("ttl"):
            check.check_type, check.ttl = "ttl", parse_duration(definition["ttl"])
            if check.ttl <= 0:
                raise ApiError(400, "Invalid check: TTL must be > 0 for TTL checks")
        elif definition.get("http") or definition.get("tcp"):
            check.check_type = "http" if definition.get("http") else "tcp"
            check.target = str(definition.get("http") or definition.get("tcp"))
            if interval <= 0:
                raise ApiError(400, "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks")
            check.interval = interval
            check.run_every = self.scheduler.run_every(interval)
            check.method = str(definition.get("method") or "GET")
            check.header = {str(k): [str(v) for v in vs] for k, vs in (definition.get("header") or {}).items()}
            check.tls_skip_verify = bool(definition.get("tlsskipverify"))
        else:
            raise ApiError(400, "Invalid check: TTL or Interval and one of HTTP or TCP must be specified")
        status = str(definition.get("status") or CRITICAL)
        if status not in CHECK_STATUSES:
            raise ApiError(400, f"Status for checks must 'passing', 'warning', 'critical', got {status!r}")
        existing = state.checks.get(check.check_id)
        # Consul restores a re-registered check's status and output from its snapshot.
        if existing is not None:
            check.status, check.output = existing.status, existing.output
            check.ttl_last_output = existing.ttl_last_output
            check.synced_status, check.synced_output = existing.synced_status, existing.synced_output
            check.critical_since = existing.critical_since
            check.create_index = existing.create_index
        else:
            check.status = check.synced_status = status
            check.critical_since = time.monotonic() if status == CRITICAL else None
        check.generation = next(state.generations)
        now = time.monotonic()
        check.last_synced_at = now
        state.checks[check.check_id] = check
        index = state.checks_changed(check)
        if not check.create_index:
            check.create_index = index
        self.scheduler.start_check(check, now)

    def deregister_check(self, check_id: str) -> None:
        with self.state.cond:
            check = self.state.checks.pop(check_id, None)
            if check is None or check_id == SERF_CHECK_ID:
                raise ApiError(404, _unknown_check(check_id))
            self.state.checks_changed(check)

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        if status not in CHECK_STATUSES:
            raise ApiError(400, f'Invalid status: "{status}"')
        with self.state.cond:
            check = self.state.checks.get(check_id)
            if check is None:
                raise ApiError(404, _unknown_check(check_id))
            if check.check_type != "ttl":
                raise ApiError(500, f'CheckID "{check_id}" does not have associated TTL')
            now = time.monotonic()
            check.ttl_deadline = now + check.ttl
            check.ttl_last_output = output
            self.state.set_check_status(check, status, output, now)

    # --- maintenance ----------------------------------------------------------------------------------

    def service_maintenance(self, service_id: str, enable: bool, reason: str) -> None:
        state = self.state
        with state.cond:
            service = state.services.get(service_id)
            if service is None:
                raise ApiError(404, f'No service registered with ID "{service_id}"')
            check_id = SERVICE_MAINTENANCE_PREFIX + service_id
            if enable and check_id not in state.checks:
                check = CheckRecord(
                    check_id=check_id,
                    name="Service Maintenance Mode",
                    node=state.node_name,
                    service_id=service_id,
                    service_name=service.name,
                    service_tags=service.tags,
                    notes=reason or DEFAULT_SERVICE_MAINTENANCE_REASON,
                )
                state.checks[check_id] = check
                check.create_index = state.checks_changed(check)
            elif not enable and check_id in state.checks:
                state.checks_changed(state.checks.pop(check_id))

    def node_maintenance(self, enable: bool, reason: str) -> None:
        state = self.state
        with state.cond:
            if enable and NODE_MAINTENANCE_CHECK_ID not in state.checks:
                check = CheckRecord(
                    check_id=NODE_MAINTENANCE_CHECK_ID,
                    name="Node Maintenance Mode",
                    node=state.node_name,
                    notes=reason or DEFAULT_NODE_MAINTENANCE_REASON,
                )
                state.checks[check.check_id] = check
                check.create_index = state.checks_changed(check)
            elif not enable and NODE_MAINTENANCE_CHECK_ID in state.checks:
                state.checks_changed(state.checks.pop(NODE_MAINTENANCE_CHECK_ID))

    # --- KV -------------------------------------------------------------------------------------------

    def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        """Store ``value``; False when ``cas`` is given and is not the key's current ModifyIndex (0: absent)."""
        if not key:
            raise ApiError(400, "Missing key name")
        state = self.state
        with state.cond:
            existing = state.kv.get(key)
            if cas is not None and (existing.modify_index if existing else 0) != cas:
                return False
            index = state.bump("kvs")
            state.kv[key] = KVEntry(key, value, flags, existing.create_index if existing else index, index)
            state.kv_change_index[key] = index
        return True

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        state = self.state
        with state.cond:
            if recurse:
                doomed = [k for k in state.kv if k.startswith(key)]
            else:
                existing = state.kv.get(key)
                if cas is not None and (existing is None or existing.modify_index != cas):
                    return False
                doomed = [key] if existing else []
            if doomed:
                index = state.bump("kvs")
                for k in doomed:
                    del state.kv[k]
                    state.kv_change_index[k] = index
        return True
