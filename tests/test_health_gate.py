"""The post-apply health gate against the Consul stand-in over real HTTP."""

from __future__ import annotations

import threading
import time

import consul
import pytest
from prefect import flow

from blocks.consul import ConsulConnection
from tasks.errors import ConsulError
from tasks.health_gate import HealthGateResult, evaluate_instances, health_gate, wait_until_healthy


def register(client: consul.Consul, service_id: str, version: str, status: str) -> str:
    client.agent.service.register(
        "api",
        service_id=service_id,
        meta={"artifact_version": version},
        check={"CheckID": f"ttl-{service_id}", "Name": "app", "TTL": "600s", "Status": status},
    )
    return f"ttl-{service_id}"


def test_passing_instance_is_healthy_at_once(consul_client: consul.Consul) -> None:
    register(consul_client, "api-1", "v2", "passing")
    result = wait_until_healthy(
        consul_client,
        service_name="api",
        service_id="api-1",
        expect_meta={"artifact_version": "v2"},
        deadline_seconds=5,
    )
    assert result.healthy
    assert result.status == "passing"
    assert result.waited_seconds < 0.5


def test_gate_opens_as_soon_as_the_check_passes(consul_client: consul.Consul) -> None:
    check = register(consul_client, "api-1", "v2", "critical")
    passed_at: list[float] = []

    def pass_later() -> None:
        time.sleep(0.5)
        consul_client.agent.check.ttl_pass(check)
        passed_at.append(time.monotonic())

    threading.Thread(target=pass_later, daemon=True).start()
    result = wait_until_healthy(
        consul_client,
        service_name="api",
        service_id=None,
        expect_meta={"artifact_version": "v2"},
        deadline_seconds=5,
    )
    assert result.healthy
    assert result.service_id == "api-1"
    assert 0.4 < result.waited_seconds < 1.0  # woken by the change, not by a poll interval


def test_instance_that_stays_critical_is_unhealthy_at_the_deadline(consul_client: consul.Consul) -> None:
    check = register(consul_client, "api-1", "v2", "passing")
    consul_client.agent.check.ttl_fail(check, "HTTP GET /health: 503 Service Unavailable")
    result = wait_until_healthy(
        consul_client, service_name="api", service_id="api-1", expect_meta={}, deadline_seconds=1.0
    )
    assert not result.healthy
    assert result.status == "critical"
    assert "503 Service Unavailable" in result.output
    assert 1.0 <= result.waited_seconds < 2.0


def test_old_version_passing_does_not_open_the_gate(consul_client: consul.Consul) -> None:
    register(consul_client, "api-1", "v1", "passing")
    result = wait_until_healthy(
        consul_client,
        service_name="api",
        service_id=None,
        expect_meta={"artifact_version": "v2"},
        deadline_seconds=0.5,
    )
    assert not result.healthy
    assert result.status == "missing"


def test_unreachable_consul_raises() -> None:
    client = consul.Consul(host="127.0.0.1", port=1, connections_timeout=1)
    with pytest.raises(ConsulError):
        wait_until_healthy(client, service_name="api", service_id=None, expect_meta={}, deadline_seconds=1)


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ([], "passing"),
        ([{"CheckID": "a", "Status": "passing"}, {"CheckID": "serfHealth", "Status": "warning"}], "warning"),
        ([{"CheckID": "a", "Status": "critical"}], "critical"),
        ([{"CheckID": "_service_maintenance:api-1", "Status": "critical"}], "maintenance"),
    ],
)
def test_instance_status_table(checks: list[dict[str, str]], expected: str) -> None:
    entries = [{"Service": {"ID": "api-1", "Meta": {}}, "Checks": checks}]
    assert evaluate_instances(entries, service_id=None, expect_meta={})[0] == expected


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_gate_task_in_a_flow(consul_client: consul.Consul, consul_connection: ConsulConnection) -> None:
    register(consul_client, "api-9", "v9", "passing")

    @flow
    def gate() -> HealthGateResult:
        return health_gate(
            consul_connection, service_name="api", expect_meta={"artifact_version": "v9"}, deadline_seconds=5
        )

    result = gate()
    assert result.healthy
    assert result.service_id == "api-9"
