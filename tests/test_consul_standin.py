"""Stand-in behaviour beyond the contract: ACLs, index discipline, check execution, scale, the block."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import consul
import pytest
from pydantic import SecretStr

from blocks.consul import ConsulConnection
from examples.local_env import free_port
from icd.errors import ConsulError
from icd.health.consul import ConsulEndpoint, consul_call, consul_errors, parse_consul_address
from standins.consul import ConsulStandIn, format_duration, parse_duration
from tests.waiting import wait_until


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310  # loopback only
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers.items()), error.read()


def _put(url: str, body: object) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            return int(error.code)


# --- pure helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("0", 0.0),
        ("", 0.0),
        (2_000_000_000, 2.0),
    ],
)
def test_parse_duration_reads_go_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, ""), (0.5, "500ms"), (10.0, "10s"), (90.0, "1m30s"), (600.0, "10m0s"), (3600.0, "1h0m0s")],
)
def test_format_duration_writes_go_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://127.0.0.1:8500", ConsulEndpoint("http", "127.0.0.1", 8500)),
        ("https://consul.internal", ConsulEndpoint("https", "consul.internal", 8501)),
        ("10.0.0.5:9500", ConsulEndpoint("http", "10.0.0.5", 9500)),
        ("localhost", ConsulEndpoint("http", "localhost", 8500)),
    ],
)
def test_parse_consul_address(address: str, expected: ConsulEndpoint) -> None:
    assert parse_consul_address(address) == expected


@pytest.mark.parametrize("address", ["ftp://host:21", "http://host:notaport", "http://:8500"])
def test_parse_consul_address_rejects_unusable_addresses(address: str) -> None:
    with pytest.raises(ConsulError):
        parse_consul_address(address)


# --- ACL ----------------------------------------------------------------------------------------------


@pytest.fixture
def acl_standin() -> Iterator[ConsulStandIn]:
    with ConsulStandIn(acl_token="s3cret-token") as standin:
        yield standin


def test_acl_rejects_missing_and_wrong_tokens_like_consul(acl_standin: ConsulStandIn) -> None:
    url = f"{acl_standin.http_addr}/v1/agent/services"

    missing = _get(url)
    wrong = _get(url, {"X-Consul-Token": "nope"})
    right = _get(url, {"X-Consul-Token": "s3cret-token"})
    by_query = _get(f"{url}?token=s3cret-token")

    assert missing[0] == 403
    assert missing[2].startswith(b"Permission denied")
    assert (wrong[0], wrong[2]) == (403, b"ACL not found")
    assert (right[0], json.loads(right[2])) == (200, {})
    assert by_query[0] == 200


def test_block_token_is_sent_and_missing_token_becomes_consul_error(
    acl_standin: ConsulStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # py-consul would let this override an explicit token; the block must not.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-environment")
    with_token = ConsulConnection(address=acl_standin.http_addr, token=SecretStr("s3cret-token"))
    without_token = ConsulConnection(address=acl_standin.http_addr)

    assert with_token.get_client().agent.services() == {}
    with pytest.raises(ConsulError, match="Permission denied"), consul_errors("list services"):
        without_token.get_client().agent.services()


def test_an_unreachable_agent_is_a_consul_error() -> None:
    client = ConsulConnection(address=f"http://127.0.0.1:{free_port()}", timeout_seconds=2.0).get_client()

    with pytest.raises(ConsulError, match="could not be reached to read the leader"):
        consul_call("read the leader", client.status.leader)


def test_the_block_client_talks_to_the_standin(consul_connection: ConsulConnection) -> None:
    assert consul_call("read the leader", consul_connection.get_client().status.leader).endswith(":8300")


# --- index discipline ---------------------------------------------------------------------------------


def test_no_op_check_update_does_not_bump_index_or_wake_watchers(
    consul_standin: ConsulStandIn, consul_client: consul.Consul
) -> None:
    consul_client.agent.service.register("api", service_id="api-1", check=consul.Check.ttl("30s"))
    consul_client.agent.check.ttl_pass("service:api-1", "fine")
    index, _ = consul_client.health.state("any")
    answered: list[tuple[str, list[dict[str, Any]]]] = []

    def watch() -> None:
        answered.append(consul_client.health.state("any", index=index, wait="10s"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_until(lambda: consul_standin.waiting_queries == 1, timeout=10, message="the watcher never started waiting")

    consul_client.agent.check.ttl_pass("service:api-1", "fine")
    same_index, _ = consul_client.health.state("any", index=index, wait="500ms")

    assert same_index == index
    assert answered == [], "the no-op update woke the watcher"
    # A real change does wake it, and it answers with that change.
    consul_client.agent.check.ttl_warn("service:api-1", "slow")
    watcher.join(timeout=15)
    [(new_index, checks)] = answered
    assert int(new_index) > int(index)
    assert [c["Status"] for c in checks if c["CheckID"] == "service:api-1"] == ["warning"]


def test_output_only_change_reaches_agent_view_at_once_and_catalog_later(
    consul_client: consul.Consul,
) -> None:
    consul_client.agent.service.register("api", service_id="api-1", check=consul.Check.ttl("30s"))
    consul_client.agent.check.ttl_pass("service:api-1", "first")
    index, _ = consul_client.health.checks("api")

    consul_client.agent.check.ttl_pass("service:api-1", "second")

    assert consul_client.agent.checks()["service:api-1"]["Output"] == "second"
    same_index, checks = consul_client.health.checks("api")
    assert (same_index, checks[0]["Output"]) == (index, "first")


def test_kv_watcher_wakes_for_its_key_not_for_others(
    consul_standin: ConsulStandIn, consul_client: consul.Consul
) -> None:
    consul_client.kv.put("watched", "1")
    kv_index, _ = consul_client.kv.get("watched")
    answered: list[dict[str, Any]] = []
    # A 5 min wait, on a client that does not time out first: far beyond the bound the test waits for it below,
    # so an answer within that bound can only come from the change (no test asserts how long it took).
    host, port = consul_standin.address.rsplit(":", 1)
    patient = consul.Consul(host=host, port=int(port), token=None, connections_timeout=None)

    def watch() -> None:
        _, entry = patient.kv.get("watched", index=kv_index, wait="5m")
        answered.append(entry)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_until(lambda: consul_standin.waiting_queries == 1, timeout=10, message="the watcher never started waiting")
    consul_client.kv.put("other", "1")
    assert answered == [], "a write to another key woke the watcher"
    assert consul_standin.waiting_queries == 1, "a write to another key woke the watcher"
    consul_client.kv.put("watched", "2")
    watcher.join(timeout=30)

    assert answered, "the watcher did not answer the change of its key (it still waits out its 5 min)"
    assert answered[0]["Value"] == b"2"
    assert consul_standin.waiting_queries == 0


# --- check execution ----------------------------------------------------------------------------------


class _SlowOr429(BaseHTTPRequestHandler):
    mode = "429"
    # In "slow" mode an answer waits for this (set when the test ends), far longer than the check's timeout.
    release: ClassVar[threading.Event]

    def do_GET(self) -> None:
        if type(self).mode == "slow":
            type(self).release.wait(timeout=30)
        body = b"slow down"
        self.send_response(429 if type(self).mode == "429" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def target() -> Iterator[tuple[str, type[_SlowOr429]]]:
    class Target(_SlowOr429):
        mode = "429"
        release: ClassVar[threading.Event] = threading.Event()

    handler = Target
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()


def _wait_status(client: consul.Consul, check_id: str, status: str, timeout: float = 8.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    index = None
    while time.monotonic() < deadline:
        index, checks = client.health.state("any", index=index, wait="1s")
        found = [c for c in checks if c["CheckID"] == check_id and c["Status"] == status]
        if found:
            return dict(found[0])
    raise AssertionError(f"{check_id} never became {status}")


def test_http_429_is_warning_and_timeout_is_critical(
    consul_client: consul.Consul, target: tuple[str, type[_SlowOr429]]
) -> None:
    url, handler = target
    consul_client.agent.service.register(
        "web", service_id="web-1", check=consul.Check.http(url, interval="1s", timeout="500ms")
    )

    warning = _wait_status(consul_client, "service:web-1", "warning")
    assert warning["Output"] == f"HTTP GET {url}: 429 Too Many Requests Output: slow down"
    handler.mode = "slow"
    critical = _wait_status(consul_client, "service:web-1", "critical")
    assert "Client.Timeout exceeded" in critical["Output"]


def test_connection_refused_http_check_is_critical_with_go_style_output(consul_client: consul.Consul) -> None:
    url = f"http://127.0.0.1:{free_port()}/health"
    consul_client.agent.service.register(
        "web", service_id="web-1", check={"http": url, "interval": "1s", "status": "passing"}
    )

    critical = _wait_status(consul_client, "service:web-1", "critical")

    port = url.split(":")[2].split("/")[0]
    assert critical["Output"] == f'Get "{url}": dial tcp 127.0.0.1:{port}: connect: connection refused'


def test_ttl_expiry_turns_check_critical_and_deregister_after_reaps_service(
    consul_client: consul.Consul,
) -> None:
    consul_client.agent.service.register(
        "batch",
        service_id="batch-1",
        check={"TTL": "500ms", "Status": "passing", "DeregisterCriticalServiceAfter": "1s"},
    )
    assert consul_client.health.checks("batch")[1][0]["Status"] == "passing"

    expired = _wait_status(consul_client, "service:batch-1", "critical", timeout=3)
    assert expired["Output"] == "TTL expired"
    wait_until(lambda: "batch-1" not in consul_client.agent.services(), timeout=5, message="service was not reaped")
    assert consul_client.catalog.services()[1] == {}


def test_ttl_expiry_output_keeps_the_last_update(consul_client: consul.Consul) -> None:
    consul_client.agent.service.register("batch", service_id="batch-1", check={"TTL": "500ms"})
    consul_client.agent.check.ttl_pass("service:batch-1", "processed 12 jobs")

    expired = _wait_status(consul_client, "service:batch-1", "critical", timeout=3)

    assert expired["Output"] == "TTL expired (last output before timeout follows): processed 12 jobs"


class _Counting(BaseHTTPRequestHandler):
    hits: ClassVar[list[float]] = []

    def do_GET(self) -> None:
        type(self).hits.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_interval_shows_as_given_but_runs_no_faster_than_one_second(consul_client: consul.Consul) -> None:
    class Counting(_Counting):
        hits: ClassVar[list[float]] = []

    handler = Counting
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        consul_client.agent.service.register(
            "web", service_id="web-1", check={"HTTP": url, "Interval": "200ms", "Timeout": "2s"}
        )
        passing = _wait_status(consul_client, "service:web-1", "passing")
        wait_until(lambda: len(handler.hits) >= 3, timeout=10, message="the check did not keep running")
    finally:
        server.shutdown()
        server.server_close()

    assert (passing["Interval"], passing["Timeout"]) == ("200ms", "2s")
    gaps = [later - earlier for earlier, later in zip(handler.hits, handler.hits[1:], strict=False)]
    assert gaps, "the check ran only once"
    assert min(gaps) >= 0.9


def test_tcp_check_passes_against_a_listening_port(
    consul_client: consul.Consul, target: tuple[str, type[_SlowOr429]]
) -> None:
    address = target[0].removeprefix("http://").rstrip("/")
    consul_client.agent.service.register(
        "db", service_id="db-1", check={"TCP": address, "Interval": "1s", "Timeout": "1s"}
    )

    passing = _wait_status(consul_client, "service:db-1", "passing")

    assert (passing["Type"], passing["Output"]) == ("tcp", f"TCP connect {address}: Success")


def test_re_registering_keeps_check_status_and_replace_existing_drops_others(
    consul_standin: ConsulStandIn, consul_client: consul.Consul
) -> None:
    consul_client.agent.service.register(
        "api",
        service_id="api-1",
        check={"CheckID": "a", "TTL": "30s"},
        extra_checks=[{"CheckID": "b", "TTL": "30s"}],
    )
    consul_client.agent.check.ttl_pass("a", "ok")

    consul_client.agent.service.register(
        "api",
        service_id="api-1",
        tags=["v2"],
        check={"CheckID": "a", "TTL": "30s"},
        replace_existing_checks=True,
    )

    checks = consul_client.agent.checks()
    assert "b" not in checks
    assert (checks["a"]["Status"], checks["a"]["ServiceTags"]) == ("passing", ["v2"])


def test_check_update_endpoint_sets_status_and_output(
    consul_standin: ConsulStandIn, consul_client: consul.Consul
) -> None:
    consul_client.agent.service.register("api", service_id="api-1", check=consul.Check.ttl("30s"))

    status = _put(
        f"{consul_standin.http_addr}/v1/agent/check/update/service:api-1",
        {"Status": "warning", "Output": "disk 91%"},
    )
    bad = _put(f"{consul_standin.http_addr}/v1/agent/check/update/service:api-1", {"Status": "sideways"})

    assert (status, bad) == (200, 400)
    _, checks = consul_client.health.state("warning")
    assert [(c["CheckID"], c["Output"]) for c in checks] == [("service:api-1", "disk 91%")]


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("PUT", "/v1/agent/service/maintenance/ghost?enable=true", 404),
        ("PUT", "/v1/agent/service/deregister/ghost", 404),
        ("PUT", "/v1/agent/maintenance", 400),
        ("GET", "/v1/health/state/sideways", 400),
        ("GET", "/v1/kv/nothing/?keys", 404),
        ("GET", "/v1/catalog/services?dc=elsewhere", 500),
        ("GET", "/v1/nowhere", 404),
    ],
)
def test_error_answers_match_consul_status_codes(
    consul_standin: ConsulStandIn, method: str, path: str, expected: int
) -> None:
    url = consul_standin.http_addr + path
    if method == "GET":
        assert _get(url)[0] == expected
    else:
        assert _put(url, None) == expected


def test_script_checks_are_refused_as_on_a_default_agent(consul_standin: ConsulStandIn) -> None:
    status = _put(
        f"{consul_standin.http_addr}/v1/agent/service/register",
        {"Name": "x", "Check": {"Args": ["true"], "Interval": "1s"}},
    )
    assert status == 400


def test_unknown_check_update_is_404(consul_standin: ConsulStandIn) -> None:
    assert _put(f"{consul_standin.http_addr}/v1/agent/check/pass/missing", None) == 404


def test_node_maintenance_fails_every_service_until_disabled(consul_client: consul.Consul) -> None:
    consul_client.agent.service.register("api", service_id="api-1", check={"TTL": "30s", "Status": "passing"})
    assert len(consul_client.health.service("api", passing=True)[1]) == 1

    consul_client.agent.maintenance(True, "kernel upgrade")
    _, node_checks = consul_client.health.node("standin-node")
    maintenance = [c for c in node_checks if c["CheckID"] == "_node_maintenance"]
    assert [(c["Status"], c["Notes"]) for c in maintenance] == [("critical", "kernel upgrade")]
    assert consul_client.health.service("api", passing=True)[1] == []

    consul_client.agent.maintenance(False)
    assert len(consul_client.health.service("api", passing=True)[1]) == 1


# --- scale --------------------------------------------------------------------------------------------


def test_ten_thousand_ttl_checks_register_and_health_state_answers(
    consul_standin: ConsulStandIn, consul_client: consul.Consul
) -> None:
    for service_number in range(1000):
        checks = [{"CheckID": f"svc-{service_number}-ttl-{n}", "TTL": "10m"} for n in range(10)]
        consul_client.agent.service.register(f"svc-{service_number}", check=checks[0], extra_checks=checks[1:])

    status, headers, body = _get(f"{consul_standin.http_addr}/v1/health/state/any")
    _, critical = consul_client.health.state("critical")

    assert status == 200
    assert int(headers["X-Consul-Index"]) > 10_000
    assert len(json.loads(body)) == 10_001  # and serfHealth
    assert len(critical) == 10_000


# --- clients that go away -----------------------------------------------------------------------------


@pytest.mark.parametrize("hang_up", ["close", "reset"])
def test_client_leaving_a_blocking_query_is_not_an_error(
    consul_standin: ConsulStandIn, capfd: pytest.CaptureFixture[str], hang_up: str
) -> None:
    base = consul_standin.http_addr
    assert _put(f"{base}/v1/kv/watched", 1) == 200
    _, headers, _ = _get(f"{base}/v1/kv/watched")
    threads_before = set(threading.enumerate())
    host, port = consul_standin.address.rsplit(":", 1)
    watcher = socket.create_connection((host, int(port)), timeout=10)
    index = headers["X-Consul-Index"]
    watcher.sendall(f"GET /v1/kv/watched?index={index}&wait=10s HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    wait_until(
        lambda: consul_standin.waiting_queries == 1, timeout=10, message="the blocking query never started waiting"
    )
    # The stand-in serves each connection on its own thread: the ones started since are this watcher's.
    handlers = set(threading.enumerate()) - threads_before

    if hang_up == "reset":  # an abortive close: the stand-in's next write meets ECONNRESET
        watcher.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    watcher.close()
    assert _put(f"{base}/v1/kv/watched", 2) == 200  # wakes the query; its answer has no one to go to
    wait_until(
        lambda: not any(t.is_alive() for t in handlers),
        timeout=10,
        message="the abandoned query's handler never finished",
    )

    assert capfd.readouterr().err == ""
    status, _, body = _get(f"{base}/v1/kv/watched?index={index}&wait=10s")
    assert status == 200
    assert [entry["Value"] for entry in json.loads(body)] == ["Mg=="]  # base64 of "2"


# --- CLI ----------------------------------------------------------------------------------------------


def test_module_runs_as_a_server_from_the_command_line() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "standins.consul", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def leader() -> tuple[int, bytes] | None:
        try:
            status, _, body = _get(f"http://127.0.0.1:{port}/v1/status/leader")
        except urllib.error.URLError:
            return None
        return status, body

    try:
        status, body = wait_until(leader, timeout=15, message="stand-in did not start")
        assert (status, json.loads(body)) == (200, "127.0.0.1:8300")
    finally:
        process.terminate()
        process.wait(timeout=10)
