"""Consul HTTP API contract: what this project relies on, asserted only as Consul documents it.

Runs against the stand-in by default and unchanged against a real agent when CONSUL_HTTP_ADDR is set
(CONSUL_HTTP_TOKEN too if ACLs are on). Every test uses its own service names and KV prefix and cleans up.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import consul
import pytest
from pydantic import SecretStr

from blocks.consul import ConsulConnection


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    body: Any


@pytest.fixture
def connection(consul_http_addr: str) -> ConsulConnection:
    token = os.environ.get("CONSUL_HTTP_TOKEN")
    return ConsulConnection(address=consul_http_addr, token=SecretStr(token) if token else None, timeout_seconds=15.0)


@pytest.fixture
def client(connection: ConsulConnection) -> consul.Consul:
    return connection.get_client()


@pytest.fixture
def raw_get(connection: ConsulConnection) -> Callable[[str], RawReply]:
    """GET with the headers visible, which py-consul hides."""

    def get(path: str) -> RawReply:
        request = urllib.request.Request(connection.address.rstrip("/") + path)  # noqa: S310  # loopback/agent
        if connection.token is not None:
            request.add_header("X-Consul-Token", connection.token.get_secret_value())
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            body = response.read()
            return RawReply(response.status, dict(response.headers.items()), json.loads(body) if body else None)

    return get


@pytest.fixture
def service_name(client: consul.Consul) -> Iterator[str]:
    """A unique service name; every instance registered under it is deregistered afterwards."""
    name = f"contract-{uuid.uuid4().hex[:10]}"
    yield name
    for service_id, service in client.agent.services().items():
        if service["Service"] == name:
            client.agent.service.deregister(service_id)


def _check(checks: list[dict[str, Any]], check_id: str) -> dict[str, Any]:
    matching = [c for c in checks if c["CheckID"] == check_id]
    assert len(matching) == 1, f"{check_id} not in {[c['CheckID'] for c in checks]}"
    return matching[0]


def _wait_for_status(
    client: consul.Consul, service_name: str, check_id: str, status: str, timeout: float
) -> dict[str, Any]:
    """Follow /v1/health/checks/:service with blocking queries until the check reaches ``status``."""
    deadline = time.monotonic() + timeout
    index = None
    while True:
        index, checks = client.health.checks(service_name, index=index, wait="1s")
        found = [c for c in checks if c["CheckID"] == check_id]
        if found and found[0]["Status"] == status:
            return dict(found[0])
        assert time.monotonic() < deadline, f"{check_id} never became {status}: {found}"


def test_registered_service_with_ttl_check_shows_in_catalog_health_and_agent(
    client: consul.Consul, service_name: str
) -> None:
    service_id = f"{service_name}-1"
    registered = client.agent.service.register(
        service_name,
        service_id=service_id,
        address="127.0.0.1",
        port=8080,
        tags=["blue", "v1"],
        meta={"version": "1.2.3"},
        check=consul.Check.ttl("30s"),
    )

    assert registered is True
    _, catalog = client.catalog.services()
    assert sorted(catalog[service_name]) == ["blue", "v1"]
    _, instances = client.catalog.service(service_name)
    assert [(i["ServiceID"], i["ServicePort"], i["ServiceMeta"]) for i in instances] == [
        (service_id, 8080, {"version": "1.2.3"})
    ]
    _, entries = client.health.service(service_name)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["Service"]["ID"] == service_id
    assert entry["Service"]["Service"] == service_name
    assert entry["Service"]["Address"] == "127.0.0.1"
    assert entry["Service"]["Port"] == 8080
    assert sorted(entry["Service"]["Tags"]) == ["blue", "v1"]
    assert entry["Service"]["Meta"] == {"version": "1.2.3"}
    assert entry["Node"]["Node"]
    service_check = _check(entry["Checks"], f"service:{service_id}")
    # A check starts critical until something says otherwise.
    assert service_check["Status"] == "critical"
    assert service_check["Type"] == "ttl"
    assert service_check["ServiceName"] == service_name
    assert service_check["Name"] == f"Service '{service_name}' check"
    assert _check(entry["Checks"], "serfHealth")["Status"] == "passing"
    agent_check = client.agent.checks()[f"service:{service_id}"]
    assert (agent_check["ServiceID"], agent_check["Status"]) == (service_id, "critical")
    assert client.agent.services()[service_id]["Meta"] == {"version": "1.2.3"}


def test_ttl_updates_move_the_check_between_health_states(client: consul.Consul, service_name: str) -> None:
    service_id = f"{service_name}-1"
    check_id = f"service:{service_id}"
    client.agent.service.register(service_name, service_id=service_id, check=consul.Check.ttl("30s"))

    def ids_in(state: str) -> set[str]:
        _, checks = client.health.state(state)
        return {c["CheckID"] for c in checks if c["ServiceName"] == service_name}

    assert ids_in("critical") == {check_id}
    client.agent.check.ttl_pass(check_id, "all good")
    assert (ids_in("passing"), ids_in("critical")) == ({check_id}, set())
    _, checks = client.health.state("any")
    assert _check(checks, check_id)["Output"] == "all good"
    client.agent.check.ttl_warn(check_id, "slow")
    assert (ids_in("warning"), ids_in("passing")) == ({check_id}, set())
    client.agent.check.ttl_fail(check_id, "down")
    assert (ids_in("critical"), ids_in("warning")) == ({check_id}, set())
    _, checks = client.health.state("critical")
    assert _check(checks, check_id)["Output"] == "down"


def test_query_responses_carry_consul_headers(
    client: consul.Consul, service_name: str, raw_get: Callable[[str], RawReply]
) -> None:
    client.agent.service.register(service_name, service_id=f"{service_name}-1", check=consul.Check.ttl("30s"))

    reply = raw_get(f"/v1/health/service/{service_name}")

    assert reply.status == 200
    assert int(reply.headers["X-Consul-Index"]) > 0
    assert reply.headers["X-Consul-KnownLeader"] == "true"
    assert "X-Consul-LastContact" in reply.headers


# A blocking query's wait in the tests that it answers a change: far longer than any bound the test waits for
# it, so an answer within that bound can only come from the change (no test asserts how long it took).
_LONG_WAIT_SECONDS = 300


def test_blocking_query_returns_as_soon_as_a_check_changes(
    client: consul.Consul, service_name: str, connection: ConsulConnection
) -> None:
    service_id = f"{service_name}-1"
    client.agent.service.register(service_name, service_id=service_id, check=consul.Check.ttl("30s"))
    index, _ = client.health.service(service_name)
    sent = threading.Event()
    answered: list[tuple[str, list[dict[str, Any]]]] = []

    def watch() -> None:
        # Plain HTTP rather than py-consul, so that the test knows when the query is on the wire.
        agent = urllib.parse.urlsplit(connection.address)
        opener = http.client.HTTPSConnection if agent.scheme == "https" else http.client.HTTPConnection
        conn = opener(agent.netloc, timeout=_LONG_WAIT_SECONDS + 60)
        headers = {"X-Consul-Token": connection.token.get_secret_value()} if connection.token is not None else {}
        try:
            query = f"/v1/health/service/{service_name}?index={index}&wait={_LONG_WAIT_SECONDS}s"
            conn.request("GET", query, headers=headers)
            sent.set()
            response = conn.getresponse()
            entries = json.loads(response.read())
            answered.append((response.headers["X-Consul-Index"], entries))
        finally:
            conn.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert sent.wait(timeout=10), "the blocking query was never sent"
    # An agent does not show that a query waits; a round trip after it was sent lets the agent take it up.
    # Had the change still come first, the query would answer at once with it: the same answer as asserted.
    client.status.leader()
    client.agent.check.ttl_pass(f"service:{service_id}", "up")
    # The query may wait 5 minutes, far beyond this bound on a hang: if it answered at all, the change woke it.
    watcher.join(timeout=30)

    assert answered, "the blocking query did not answer the change (it still waits out its 5 min)"
    new_index, entries = answered[0]
    assert int(new_index) > int(index)
    assert _check(entries[0]["Checks"], f"service:{service_id}")["Status"] == "passing"


def test_blocking_query_without_change_returns_after_wait_with_same_index(
    client: consul.Consul, service_name: str
) -> None:
    client.agent.service.register(service_name, service_id=f"{service_name}-1", check=consul.Check.ttl("30s"))
    index, _ = client.health.service(service_name)

    new_index, _ = client.health.service(service_name, index=index, wait="500ms")

    assert new_index == index


@pytest.fixture
def kv_prefix(client: consul.Consul) -> Iterator[str]:
    prefix = f"contract/{uuid.uuid4().hex[:10]}/"
    yield prefix
    client.kv.delete(prefix, recurse=True)


def test_kv_shapes_and_check_and_set(client: consul.Consul, kv_prefix: str) -> None:
    key = f"{kv_prefix}app/version"

    assert client.kv.get(key)[1] is None
    assert client.kv.put(key, "1.0.0", flags=42) is True
    _, entry = client.kv.get(key)
    assert entry["Key"] == key
    assert entry["Value"] == b"1.0.0"
    assert entry["Flags"] == 42
    assert entry["LockIndex"] == 0
    assert entry["CreateIndex"] == entry["ModifyIndex"] > 0
    # cas=0 only creates; a stale ModifyIndex loses; the current one wins.
    assert client.kv.put(key, "clobber", cas=0) is False
    assert client.kv.put(key, "stale", cas=entry["ModifyIndex"] - 1) is False
    assert client.kv.put(key, "1.1.0", cas=entry["ModifyIndex"]) is True
    _, updated = client.kv.get(key)
    assert updated["Value"] == b"1.1.0"
    assert updated["CreateIndex"] == entry["CreateIndex"]
    assert updated["ModifyIndex"] > entry["ModifyIndex"]
    assert client.kv.delete(key, cas=entry["ModifyIndex"]) is False
    assert client.kv.delete(key, cas=updated["ModifyIndex"]) is True
    assert client.kv.get(key)[1] is None


def test_kv_recurse_keys_and_raw(
    client: consul.Consul, kv_prefix: str, raw_get: Callable[[str], RawReply], connection: ConsulConnection
) -> None:
    for suffix, value in (("b/two", "2"), ("a", "1"), ("b/three", "3")):
        client.kv.put(f"{kv_prefix}{suffix}", value)

    _, entries = client.kv.get(kv_prefix, recurse=True)
    assert [(e["Key"], e["Value"]) for e in entries] == [
        (f"{kv_prefix}a", b"1"),
        (f"{kv_prefix}b/three", b"3"),
        (f"{kv_prefix}b/two", b"2"),
    ]
    _, keys = client.kv.get(kv_prefix, keys=True, separator="/")
    assert keys == [f"{kv_prefix}a", f"{kv_prefix}b/"]
    reply = raw_get(f"/v1/kv/{kv_prefix}a")
    assert reply.body[0]["Value"] == "MQ=="  # base64 of "1" in JSON
    request = urllib.request.Request(f"{connection.address}/v1/kv/{kv_prefix}b/two?raw")  # noqa: S310
    if connection.token is not None:
        request.add_header("X-Consul-Token", connection.token.get_secret_value())
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.read() == b"2"
    assert client.kv.delete(f"{kv_prefix}b/", recurse=True) is True
    _, left = client.kv.get(kv_prefix, recurse=True)
    assert [e["Key"] for e in left] == [f"{kv_prefix}a"]


def test_service_maintenance_adds_and_removes_a_critical_check(client: consul.Consul, service_name: str) -> None:
    service_id = f"{service_name}-1"
    client.agent.service.register(service_name, service_id=service_id, check=consul.Check.ttl("30s"))
    client.agent.check.ttl_pass(f"service:{service_id}")

    client.agent.service.maintenance(service_id, True, reason="deploying v2")

    _, checks = client.health.checks(service_name)
    maintenance = _check(checks, f"_service_maintenance:{service_id}")
    assert maintenance["Status"] == "critical"
    assert maintenance["Name"] == "Service Maintenance Mode"
    assert maintenance["Notes"] == "deploying v2"
    _, passing = client.health.service(service_name, passing=True)
    assert passing == []
    client.agent.service.maintenance(service_id, False)
    _, checks = client.health.checks(service_name)
    assert {c["CheckID"] for c in checks} == {f"service:{service_id}"}


def test_deregister_removes_the_service_and_its_checks(client: consul.Consul, service_name: str) -> None:
    service_id = f"{service_name}-1"
    client.agent.service.register(
        service_name,
        service_id=service_id,
        check=consul.Check.ttl("30s"),
        extra_checks=[consul.Check.ttl("30s")],
    )
    assert {c for c in client.agent.checks() if service_id in c} == {
        f"service:{service_id}:1",
        f"service:{service_id}:2",
    }

    assert client.agent.service.deregister(service_id) is True

    assert service_id not in client.agent.services()
    assert not [c for c in client.agent.checks().values() if c["ServiceID"] == service_id]
    assert service_name not in client.catalog.services()[1]
    assert client.health.service(service_name)[1] == []
    assert client.health.checks(service_name)[1] == []


class _FlippableHealth(BaseHTTPRequestHandler):
    healthy = True

    def do_GET(self) -> None:
        code, body = (200, b"ok") if type(self).healthy else (500, b"broken")
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def flippable_health_url() -> Iterator[tuple[str, type[_FlippableHealth]]]:
    handler = type("Health", (_FlippableHealth,), {"healthy": True})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health", handler
    finally:
        server.shutdown()
        server.server_close()


def test_http_check_runs_on_its_interval_and_follows_the_endpoint(
    client: consul.Consul, service_name: str, flippable_health_url: tuple[str, type[_FlippableHealth]]
) -> None:
    url, handler = flippable_health_url
    service_id = f"{service_name}-1"
    client.agent.service.register(
        service_name, service_id=service_id, check=consul.Check.http(url, interval="1s", timeout="1s")
    )
    check_id = f"service:{service_id}"

    passing = _wait_for_status(client, service_name, check_id, "passing", timeout=10)
    assert passing["Type"] == "http"
    assert passing["Output"] == f"HTTP GET {url}: 200 OK Output: ok"
    handler.healthy = False
    critical = _wait_for_status(client, service_name, check_id, "critical", timeout=10)
    assert critical["Output"] == f"HTTP GET {url}: 500 Internal Server Error Output: broken"


def test_a_check_critical_from_its_registration_on_shows_why_from_its_first_run(
    client: consul.Consul, service_name: str, flippable_health_url: tuple[str, type[_FlippableHealth]]
) -> None:
    url, handler = flippable_health_url
    handler.healthy = False
    service_id = f"{service_name}-1"
    # No initial status: an HTTP check starts critical, and its first run keeps it critical.
    client.agent.service.register(
        service_name, service_id=service_id, check=consul.Check.http(url, interval="1s", timeout="1s")
    )
    check_id = f"service:{service_id}"

    deadline = time.monotonic() + 10
    index = None
    while True:
        index, checks = client.health.checks(service_name, index=index, wait="1s")
        found = _check(checks, check_id)
        if found["Output"]:
            break
        assert time.monotonic() < deadline, f"the catalog never showed the first run's output: {found}"
    assert found["Status"] == "critical"
    assert found["Output"] == f"HTTP GET {url}: 500 Internal Server Error Output: broken"
