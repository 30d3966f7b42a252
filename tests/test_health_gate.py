"""The post-apply health gate against the Consul stand-in over real HTTP."""

from __future__ import annotations

import threading
from typing import Any

import consul
import pytest
from prefect import flow

from blocks.consul import ConsulConnection
from icd.errors import ConsulError
from icd.health.gate import HealthGateResult, evaluate_instances, wait_until_healthy
from icd.health.snapshot import parse_service_entries
from standins.consul import ConsulStandIn
from tasks.gate import gate_health
from tests.plugins.consul import CountingClient
from tests.waiting import wait_until

HEALTH_API = "/v1/health/service/api"


def register(client: consul.Consul, service_id: str, version: str, status: str, run: str = "run-1") -> str:
    client.agent.service.register(
        "api",
        service_id=service_id,
        meta={"artifact_version": version, "deploy_run_id": run},
        check={"CheckID": f"ttl-{service_id}", "Name": "app", "TTL": "600s", "Status": status},
    )
    return f"ttl-{service_id}"


def test_passing_instance_is_healthy_with_one_query(consul_standin: ConsulStandIn) -> None:
    counting = CountingClient(consul_standin.http_addr)
    register(counting.client, "api-1", "v2", "passing")
    result = wait_until_healthy(
        counting.client,
        service_name="api",
        service_id="api-1",
        expect_meta={"artifact_version": "v2"},
        deadline_seconds=30,
    )
    assert result.healthy
    assert result.status == "passing"
    assert counting.count(HEALTH_API) == 1


def test_gate_opens_on_the_change_itself_not_on_a_poll(consul_standin: ConsulStandIn) -> None:
    counting = CountingClient(consul_standin.http_addr)
    check = register(counting.client, "api-1", "v2", "critical")

    def pass_once_the_gate_waits() -> None:
        wait_until(lambda: consul_standin.waiting_queries >= 1, timeout=10, message="the gate never blocked")
        counting.client.agent.check.ttl_pass(check)

    threading.Thread(target=pass_once_the_gate_waits, daemon=True).start()
    result = wait_until_healthy(
        counting.client,
        service_name="api",
        service_id=None,
        expect_meta={"artifact_version": "v2"},
        deadline_seconds=30,
    )
    assert result.healthy
    assert result.service_id == "api-1"
    # One plain read, one blocking query that the check passing answered: no polling in between.
    assert counting.count(HEALTH_API) == 2


def test_instance_that_stays_critical_is_unhealthy_at_the_deadline(consul_client: consul.Consul) -> None:
    check = register(consul_client, "api-1", "v2", "passing")
    consul_client.agent.check.ttl_fail(check, "HTTP GET /health: 503 Service Unavailable")
    result = wait_until_healthy(
        consul_client, service_name="api", service_id="api-1", expect_meta={}, deadline_seconds=1.0
    )
    assert not result.healthy
    assert result.status == "critical"
    assert "503 Service Unavailable" in result.output
    assert result.waited_seconds >= 1.0  # it gave up at the deadline, not before


def test_a_miss_names_the_criteria_and_what_was_found(consul_client: consul.Consul) -> None:
    register(consul_client, "api-1", "v1", "passing", run="run-old")
    result = wait_until_healthy(
        consul_client,
        service_name="api",
        service_id=None,
        expect_meta={"deploy_run_id": "run-new"},
        deadline_seconds=0.3,
    )
    assert not result.healthy
    assert result.status == "missing"
    assert result.criteria == "service 'api', Meta.deploy_run_id='run-new'"
    assert result.found == "api-1 (passing; Meta.deploy_run_id='run-old')"


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
        ([{"CheckID": "a", "Status": "bogus"}], "critical"),
        ([{"CheckID": "_service_maintenance:api-1", "Status": "critical"}], "maintenance"),
    ],
)
def test_instance_status_table(checks: list[dict[str, str]], expected: str) -> None:
    raw: list[dict[str, Any]] = [{"Node": {"Node": "n1"}, "Service": {"ID": "api-1", "Meta": {}}, "Checks": checks}]
    assert evaluate_instances(parse_service_entries(raw), service_id=None, expect_meta={})[0] == expected


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_gate_task_in_a_flow(consul_client: consul.Consul, consul_connection: ConsulConnection) -> None:
    register(consul_client, "api-9", "v9", "passing", run="run-9")

    @flow
    def gate() -> HealthGateResult:
        return gate_health(
            consul_connection, service_name="api", service_id=None, deploy_run_id="run-9", deadline_seconds=5
        )

    result = gate()
    assert result.healthy
    assert result.service_id == "api-9"
