"""Consul's HTTP API as a route table: (method, path pattern) -> endpoint handler, plus the handlers.

A pattern is a literal path, or a prefix ending in ``*`` whose rest (possibly empty, possibly with
slashes) is passed to the handler as ``tail``. Routes are tried in order and the first match answers.
A request no route takes is ``405 method not allowed`` when its path is under one of the API prefixes
and ``404 page not found`` elsewhere. Blocking GETs wait on the state's condition variable.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from standins.consul.agent import Agent
from standins.consul.parsing import ApiError, normalized, parse_duration, truthy_flag
from standins.consul.state import CHECK_STATUSES, CRITICAL, PASSING, WARNING, CheckRecord, ConsulState

DEFAULT_BLOCKING_WAIT_SECONDS = 300.0
MAX_BLOCKING_WAIT_SECONDS = 600.0
API_PREFIXES = ("/v1/agent/", "/v1/kv/", "/v1/health/", "/v1/catalog/", "/v1/status/")


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    index: int | None = None


def _json_reply(payload: object, *, status: int = 200, index: int | None = None) -> Reply:
    return Reply(status, json.dumps(payload, separators=(",", ":")).encode(), index=index)


def _joined_reply(items: list[str], *, index: int) -> Reply:
    """A JSON array of already-rendered JSON items."""
    return Reply(200, ("[" + ",".join(items) + "]").encode(), index=index)


_TRUE = Reply(200, b"true")
_FALSE = Reply(200, b"false")
_EMPTY = Reply(200, b"")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes

    def param(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return truthy_flag(self.query, name)

    def int_param(self, name: str) -> int | None:
        raw = self.param(name)
        if name not in self.query:
            return None
        try:
            return int(raw)
        except ValueError as error:
            raise ApiError(400, f"Invalid {name}: {raw!r}") from error

    def enable_param(self) -> bool:
        if "enable" not in self.query:
            raise ApiError(400, "Missing value for enable")
        raw = self.param("enable").lower()
        if raw not in ("true", "false", "1", "0"):
            raise ApiError(400, f"Invalid value for enable: {raw!r}")
        return raw in ("true", "1")

    def json_body(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            decoded = json.loads(self.body)
        except ValueError as error:
            raise ApiError(400, f"Request decode failed: {error}") from error
        if not isinstance(decoded, dict):
            raise ApiError(400, "Request decode failed: expected a JSON object")
        return decoded


class Api:
    """The endpoint handlers. Each takes the request and the path's ``tail`` (empty for literal routes)."""

    def __init__(self, state: ConsulState, agent: Agent) -> None:
        self.state = state
        self.agent = agent

    def answer(self, request: Request) -> Reply:
        dc = request.param("dc")
        if dc and dc != self.state.datacenter:
            raise ApiError(500, "No path to datacenter")
        for route in ROUTES:
            if route.method == request.method:
                match = route.pattern.fullmatch(request.path)
                if match is not None:
                    return route.handler(self, request, match.groupdict().get("tail", ""))
        if request.path.startswith(API_PREFIXES):
            raise ApiError(405, "method not allowed")
        raise ApiError(404, "404 page not found")

    def blocking(
        self,
        request: Request,
        index_of: Callable[[], int],
        render: Callable[[int], Reply],
        wake_on: Callable[[], int] | None = None,
    ) -> Reply:
        """Consul's blocking query: answer at once unless ``?index`` is current, else wait for a change."""
        min_index = request.int_param("index")
        state = self.state
        with state.cond:
            if min_index and index_of() <= min_index:
                wait = (
                    parse_duration(request.param("wait")) if "wait" in request.query else DEFAULT_BLOCKING_WAIT_SECONDS
                )
                wait = min(wait, MAX_BLOCKING_WAIT_SECONDS)
                wait += random.uniform(0, wait / 16)  # noqa: S311  # Consul's jitter
                changed = wake_on or index_of
                state.waiting_queries += 1
                try:
                    state.cond.wait_for(lambda: state.stopping or changed() > min_index, timeout=wait)
                finally:
                    state.waiting_queries -= 1
            return render(index_of())

    def _checks_index(self) -> int:
        return self.state.table_index["checks"]

    def _services_index(self) -> int:
        return max(self.state.table_index["services"], self.state.table_index["checks"])

    # --- status and agent reads -----------------------------------------------------------------------

    def status_leader(self, _request: Request, _tail: str) -> Reply:
        return _json_reply(f"{self.state.host}:8300")

    def status_peers(self, _request: Request, _tail: str) -> Reply:
        return _json_reply([f"{self.state.host}:8300"])

    def agent_self(self, _request: Request, _tail: str) -> Reply:
        state = self.state
        return _json_reply(
            {
                "Config": {
                    "Datacenter": state.datacenter,
                    "NodeName": state.node_name,
                    "NodeID": state.node_id,
                    "Server": True,
                    "Version": "1.21.0-standin",
                },
                "Member": {"Name": state.node_name, "Addr": state.host, "Port": 8301, "Status": 1},
                "Meta": {},
            }
        )

    def agent_services(self, request: Request, _tail: str) -> Reply:
        state = self.state
        return self.blocking(
            request,
            self._services_index,
            lambda i: _json_reply(
                {s.service_id: state.agent_service_dict(s) for s in state.services.values()}, index=i
            ),
        )

    def agent_checks(self, request: Request, _tail: str) -> Reply:
        state = self.state
        return self.blocking(
            request,
            self._checks_index,
            lambda i: _json_reply({c.check_id: c.agent_dict() for c in state.checks.values()}, index=i),
        )

    def agent_service(self, request: Request, service_id: str) -> Reply:
        state = self.state

        def render(i: int) -> Reply:
            service = state.services.get(service_id)
            if service is None:
                raise ApiError(404, f"unknown service ID: {service_id}")
            answer = state.agent_service_dict(service)
            answer["ContentHash"] = f"{service.modify_index:016x}"
            return _json_reply(answer, index=i)

        return self.blocking(request, self._services_index, render)

    # --- agent writes ---------------------------------------------------------------------------------

    def register_service(self, request: Request, _tail: str) -> Reply:
        replace = request.flag("replace-existing-checks")
        self.agent.register_service(request.json_body(), replace)
        return _TRUE

    def deregister_service(self, _request: Request, service_id: str) -> Reply:
        self.agent.deregister_service(service_id)
        return _TRUE

    def register_check(self, request: Request, _tail: str) -> Reply:
        self.agent.register_check(request.json_body())
        return _TRUE

    def deregister_check(self, _request: Request, check_id: str) -> Reply:
        self.agent.deregister_check(check_id)
        return _TRUE

    def check_pass(self, request: Request, check_id: str) -> Reply:
        self.agent.update_ttl(check_id, PASSING, request.param("note"))
        return _EMPTY

    def check_warn(self, request: Request, check_id: str) -> Reply:
        self.agent.update_ttl(check_id, WARNING, request.param("note"))
        return _EMPTY

    def check_fail(self, request: Request, check_id: str) -> Reply:
        self.agent.update_ttl(check_id, CRITICAL, request.param("note"))
        return _EMPTY

    def check_update(self, request: Request, check_id: str) -> Reply:
        update = normalized(request.json_body())
        self.agent.update_ttl(check_id, str(update.get("status") or ""), str(update.get("output") or ""))
        return _EMPTY

    def service_maintenance(self, request: Request, service_id: str) -> Reply:
        self.agent.service_maintenance(service_id, request.enable_param(), request.param("reason"))
        return _EMPTY

    def node_maintenance(self, request: Request, _tail: str) -> Reply:
        self.agent.node_maintenance(request.enable_param(), request.param("reason"))
        return _EMPTY

    # --- health ---------------------------------------------------------------------------------------

    def health_state(self, request: Request, wanted: str) -> Reply:
        if wanted not in ("any", *CHECK_STATUSES):
            raise ApiError(400, "Bad state")
        checks = self.state.checks
        return self.blocking(
            request,
            self._checks_index,
            lambda i: _joined_reply(
                [c.health_json() for c in checks.values() if wanted == "any" or c.synced_status == wanted], index=i
            ),
        )

    def health_checks(self, request: Request, name: str) -> Reply:
        state = self.state
        return self.blocking(
            request,
            lambda: state.service_index(name),
            lambda i: _joined_reply(
                [c.health_json() for c in state.checks.values() if c.service_name == name], index=i
            ),
        )

    def health_node(self, request: Request, node: str) -> Reply:
        checks = self.state.checks
        return self.blocking(
            request,
            self._checks_index,
            lambda i: _joined_reply([c.health_json() for c in checks.values() if c.node == node], index=i),
        )

    def health_service(self, request: Request, name: str) -> Reply:
        state = self.state
        return self.blocking(
            request, lambda: state.service_index(name), lambda i: self._render_health_service(request, name, i)
        )

    def _render_health_service(self, request: Request, name: str, index: int) -> Reply:
        state = self.state
        tags = request.query.get("tag", [])
        passing_only = request.flag("passing")
        node_checks = [c for c in state.checks.values() if not c.service_id]
        by_service: dict[str, list[CheckRecord]] = {}
        for check in state.checks.values():
            if check.service_name == name and check.service_id:
                by_service.setdefault(check.service_id, []).append(check)
        node = json.dumps(state.node_dict(), separators=(",", ":"))
        entries = []
        for service in state.services_named(name, tags):
            checks = node_checks + by_service.get(service.service_id, [])
            if passing_only and any(c.synced_status != PASSING for c in checks):
                continue
            entries.append(
                '{"Node":'
                + node
                + ',"Service":'
                + json.dumps(state.health_service_dict(service), separators=(",", ":"))
                + ',"Checks":['
                + ",".join(c.health_json() for c in checks)
                + "]}"
            )
        return _joined_reply(entries, index=index)

    # --- catalog --------------------------------------------------------------------------------------

    def catalog_services(self, request: Request, _tail: str) -> Reply:
        state = self.state
        return self.blocking(
            request, lambda: state.table_index["services"], lambda i: _json_reply(state.catalog_services(), index=i)
        )

    def catalog_service(self, request: Request, name: str) -> Reply:
        state = self.state
        tags = request.query.get("tag", [])
        return self.blocking(
            request,
            lambda: state.service_index(name),
            lambda i: _json_reply([state.catalog_service_dict(s) for s in state.services_named(name, tags)], index=i),
        )

    def catalog_nodes(self, request: Request, _tail: str) -> Reply:
        state = self.state
        return self.blocking(
            request, lambda: state.table_index["nodes"], lambda i: _json_reply([state.node_dict()], index=i)
        )

    # --- KV -------------------------------------------------------------------------------------------

    def kv_get(self, request: Request, key: str) -> Reply:
        state = self.state
        recurse = request.flag("recurse")
        keys_only = "keys" in request.query
        if recurse or keys_only:

            def render_many(index: int) -> Reply:
                entries = sorted((e for k, e in state.kv.items() if k.startswith(key)), key=lambda e: e.key)
                if keys_only:
                    separator = request.param("separator")
                    listed: list[str] = []
                    for entry in entries:
                        cut = entry.key.find(separator, len(key)) if separator else -1
                        listed_key = entry.key[: cut + len(separator)] if cut >= 0 else entry.key
                        if not listed or listed[-1] != listed_key:
                            listed.append(listed_key)
                    if not listed:
                        return Reply(404, b"", index=index)
                    return _json_reply(listed, index=index)
                if not entries:
                    return Reply(404, b"", index=index)
                return _json_reply([e.as_dict() for e in entries], index=index)

            return self.blocking(request, lambda: state.table_index["kvs"], render_many)

        def render_one(index: int) -> Reply:
            entry = state.kv.get(key)
            if entry is None:
                return Reply(404, b"", index=index)
            if request.flag("raw") or ("raw" in request.query and not request.param("raw")):
                return Reply(200, entry.value, content_type="text/plain; charset=utf-8", index=index)
            return _json_reply([entry.as_dict()], index=index)

        # Consul answers with the table's index but only a change to this key wakes the watcher.
        return self.blocking(
            request, lambda: state.table_index["kvs"], render_one, wake_on=lambda: state.kv_change_index.get(key, 0)
        )

    def kv_put(self, request: Request, key: str) -> Reply:
        flags = request.int_param("flags") or 0
        return _TRUE if self.agent.kv_put(key, request.body, flags, request.int_param("cas")) else _FALSE

    def kv_delete(self, request: Request, key: str) -> Reply:
        deleted = self.agent.kv_delete(key, request.flag("recurse"), request.int_param("cas"))
        return _TRUE if deleted else _FALSE


Handler = Callable[[Api, Request, str], Reply]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


def _route(method: str, path: str, handler: Handler) -> Route:
    if path.endswith("*"):  # the rest of the path, whatever it holds (slashes, even newlines), is the tail
        return Route(method, re.compile(re.escape(path[:-1]) + "(?P<tail>.*)", re.DOTALL), handler)
    return Route(method, re.compile(re.escape(path)), handler)


# The HTTP layer hands a POST over as a PUT.
ROUTES = tuple(
    _route(*route)
    for route in (
        ("GET", "/v1/status/leader", Api.status_leader),
        ("GET", "/v1/status/peers", Api.status_peers),
        ("GET", "/v1/agent/self", Api.agent_self),
        ("GET", "/v1/agent/services", Api.agent_services),
        ("GET", "/v1/agent/checks", Api.agent_checks),
        ("GET", "/v1/agent/service/*", Api.agent_service),
        ("GET", "/v1/health/state/*", Api.health_state),
        ("GET", "/v1/health/checks/*", Api.health_checks),
        ("GET", "/v1/health/node/*", Api.health_node),
        ("GET", "/v1/health/service/*", Api.health_service),
        ("GET", "/v1/catalog/services", Api.catalog_services),
        ("GET", "/v1/catalog/service/*", Api.catalog_service),
        ("GET", "/v1/catalog/nodes", Api.catalog_nodes),
        ("GET", "/v1/kv/*", Api.kv_get),
        ("PUT", "/v1/agent/service/register", Api.register_service),
        ("PUT", "/v1/agent/service/deregister/*", Api.deregister_service),
        ("PUT", "/v1/agent/check/register", Api.register_check),
        ("PUT", "/v1/agent/check/deregister/*", Api.deregister_check),
        ("PUT", "/v1/agent/check/pass/*", Api.check_pass),
        ("PUT", "/v1/agent/check/warn/*", Api.check_warn),
        ("PUT", "/v1/agent/check/fail/*", Api.check_fail),
        ("PUT", "/v1/agent/check/update/*", Api.check_update),
        ("PUT", "/v1/agent/service/maintenance/*", Api.service_maintenance),
        ("PUT", "/v1/agent/maintenance", Api.node_maintenance),
        ("PUT", "/v1/kv/*", Api.kv_put),
        ("DELETE", "/v1/kv/*", Api.kv_delete),
    )
)
