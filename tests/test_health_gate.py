"""The post-apply health gate against the Consul stand-in over real HTTP."""

from __future__ import annotations

import math
import threading
import time
import urllib.parse
from typing import Any

import consul
import pytest
from prefect import flow

from blocks.consul import ConsulConnection
from icd.errors import ConsulError
from icd.health.gate import (
    BatchGateResult,
    HealthGateResult,
    evaluate_instances,
    wait_until_batch_healthy,
    wait_until_healthy,
)
from icd.health.snapshot import parse_service_entries
from standins.consul import ConsulStandIn
from tasks.gate import gate_batch, gate_health
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


# --- the batch gate of a progressive rollout --------------------------------------------------------------

BATCH = ("api-1", "api-2")
RUN_1 = {"deploy_run_id": "run-1"}


def parked_after(standin: ConsulStandIn, counting: CountingClient, answers: int) -> None:
    """Wait until the gate has had ``answers`` health answers and its next blocking query is parked."""
    wait_until(
        lambda: counting.count(HEALTH_API) == answers and standin.waiting_queries >= 1,
        timeout=10,
        interval=0.01,
        message=f"the gate never blocked after {answers} answer(s)",
    )


def test_batch_is_healthy_once_every_instance_stayed_passing(consul_standin: ConsulStandIn) -> None:
    counting = CountingClient(consul_standin.http_addr)
    register(counting.client, "api-1", "v2", "passing")
    check = register(counting.client, "api-2", "v2", "critical")
    passed_at: list[float] = []

    def pass_once_the_gate_waits() -> None:
        parked_after(consul_standin, counting, 1)
        passed_at.append(time.monotonic())
        counting.client.agent.check.ttl_pass(check)

    threading.Thread(target=pass_once_the_gate_waits, daemon=True).start()
    result = wait_until_batch_healthy(
        counting.client,
        service_name="api",
        service_ids=BATCH,
        expect_meta=RUN_1,
        min_healthy_seconds=1.0,
        deadline_seconds=10,
    )
    verdict_at = time.monotonic()
    assert result.healthy
    assert result.failing is None
    assert [(i.service_id, i.status, i.output) for i in result.instances] == [
        ("api-1", "passing", ""),
        ("api-2", "passing", ""),
    ]
    # The last instance passed, then had to stay passing for min_healthy before the gate opened.
    assert verdict_at - passed_at[0] >= 1.0
    assert all(i.passing_for >= 1.0 for i in result.instances)
    assert result.instances[0].passing_for > result.instances[1].passing_for  # api-1's timer started first
    # A plain read, the query the pass woke, the query that waited out api-2's timer: no polling.
    assert counting.count(HEALTH_API) == 3


def test_an_instance_that_turns_critical_inside_the_window_fails_the_batch(consul_standin: ConsulStandIn) -> None:
    counting = CountingClient(consul_standin.http_addr)
    register(counting.client, "api-1", "v2", "passing")
    check = register(counting.client, "api-2", "v2", "passing")

    def fail_once_seen_passing() -> None:
        parked_after(consul_standin, counting, 1)  # both were passing at the first reading
        counting.client.agent.check.ttl_fail(check, "HTTP GET /health: 503 Service Unavailable")

    threading.Thread(target=fail_once_seen_passing, daemon=True).start()
    result = wait_until_batch_healthy(
        counting.client,
        service_name="api",
        service_ids=BATCH,
        expect_meta=RUN_1,
        min_healthy_seconds=1.5,
        deadline_seconds=3.0,
    )
    assert not result.healthy
    assert result.waited_seconds >= 3.0  # it gave up at the deadline, not before
    assert result.failing == result.instances[1]
    assert result.failing.service_id == "api-2"
    assert result.failing.status == "critical"
    assert result.failing.output == "app: critical: HTTP GET /health: 503 Service Unavailable"
    assert result.failing.passing_for == 0.0
    # api-1 stayed healthy: only api-2 failed the batch.
    assert result.instances[0].status == "passing"
    assert result.instances[0].passing_for >= 1.5


def test_an_instance_that_never_registers_is_missing(consul_client: consul.Consul) -> None:
    register(consul_client, "api-1", "v2", "passing")
    result = wait_until_batch_healthy(
        consul_client,
        service_name="api",
        service_ids=BATCH,
        expect_meta=RUN_1,
        min_healthy_seconds=0,
        deadline_seconds=0.5,
    )
    assert not result.healthy
    assert result.waited_seconds >= 0.5
    assert result.instances[0].status == "passing"
    assert result.failing is not None
    assert (result.failing.service_id, result.failing.status) == ("api-2", "missing")
    assert result.failing.output == "not registered"


def test_min_healthy_zero_opens_as_soon_as_every_instance_passes(consul_standin: ConsulStandIn) -> None:
    counting = CountingClient(consul_standin.http_addr)
    register(counting.client, "api-1", "v2", "passing")
    check = register(counting.client, "api-2", "v2", "critical")

    def pass_once_the_gate_waits() -> None:
        parked_after(consul_standin, counting, 1)
        counting.client.agent.check.ttl_pass(check)

    threading.Thread(target=pass_once_the_gate_waits, daemon=True).start()
    result = wait_until_batch_healthy(
        counting.client,
        service_name="api",
        service_ids=BATCH,
        expect_meta=RUN_1,
        min_healthy_seconds=0,
        deadline_seconds=30,
    )
    assert result.healthy
    assert [i.status for i in result.instances] == ["passing", "passing"]
    assert result.instances[1].passing_for == 0.0  # the reading that saw it pass was the verdict
    assert counting.count(HEALTH_API) == 2


def test_an_instance_with_other_meta_is_not_counted(consul_client: consul.Consul) -> None:
    register(consul_client, "api-1", "v2", "passing")
    register(consul_client, "api-2", "v1", "passing", run="run-old")
    result = wait_until_batch_healthy(
        consul_client,
        service_name="api",
        service_ids=BATCH,
        expect_meta=RUN_1,
        min_healthy_seconds=0,
        deadline_seconds=0.5,
    )
    assert not result.healthy
    assert result.failing is not None
    assert (result.failing.service_id, result.failing.status) == ("api-2", "missing")
    assert (
        result.failing.output == "registered without the expected Meta: api-2 (passing; Meta.deploy_run_id='run-old')"
    )
    assert (
        result.criteria == "service 'api', Meta.deploy_run_id='run-1'; IDs 'api-1', 'api-2'; each passing within 0.5s"
    )


class SteppedClock:
    """A clock only the test moves, so the gate's timers and the waits it asks Consul for are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_reading_that_is_not_passing_restarts_the_timer(consul_standin: ConsulStandIn) -> None:
    counting = CountingClient(consul_standin.http_addr)
    waits: list[str] = []

    def record_wait(response: Any, *args: Any, **kwargs: Any) -> None:
        url = urllib.parse.urlsplit(response.url)
        if url.path == HEALTH_API:
            waits.append(urllib.parse.parse_qs(url.query).get("wait", [""])[0])

    counting.client.http.session.hooks["response"].append(record_wait)
    register(counting.client, "api-1", "v2", "passing")
    check = register(counting.client, "api-2", "v2", "passing")
    other = register(counting.client, "api-3", "v2", "passing")  # not in the batch
    clock = SteppedClock()

    def script() -> None:
        parked_after(consul_standin, counting, 1)
        clock.now = 4.0
        counting.client.agent.check.ttl_fail(check, "HTTP GET /health: 503")
        parked_after(consul_standin, counting, 2)
        clock.now = 5.0
        counting.client.agent.check.ttl_pass(check)
        parked_after(consul_standin, counting, 3)
        clock.now = 15.0
        counting.client.agent.check.ttl_fail(other, "unrelated")  # only wakes the gate at t=15

    threading.Thread(target=script, daemon=True).start()
    result = wait_until_batch_healthy(
        counting.client,
        service_name="api",
        service_ids=BATCH,
        expect_meta=RUN_1,
        min_healthy_seconds=10,
        deadline_seconds=60,
        clock=clock,
    )
    assert result.healthy
    assert result.waited_seconds == 15.0
    # api-1 passed throughout; api-2's timer restarted at t=5, when the gate saw it passing again.
    assert [i.passing_for for i in result.instances] == [15.0, 10.0]
    # t=0 a plain read; all passing: wait for the timers (t=10); api-2 critical at t=4: only the deadline
    # (t=60) can turn the verdict; passing again at t=5: wait for its new timer (t=15).
    assert waits == ["", "10000ms", "56000ms", "10000ms"]


@pytest.mark.parametrize(
    ("service_ids", "min_healthy", "deadline", "error"),
    [
        ("api-1", 0, 1, TypeError),
        ((), 0, 1, ValueError),
        (("api-1", "api-1"), 0, 1, ValueError),
        (("api-1", ""), 0, 1, ValueError),
        (BATCH, 5, 5, ValueError),
        (BATCH, -1, 5, ValueError),
        (BATCH, 0, math.nan, ValueError),
    ],
)
def test_a_malformed_batch_is_refused_before_asking_consul(
    service_ids: Any, min_healthy: float, deadline: float, error: type[Exception]
) -> None:
    client = consul.Consul(host="127.0.0.1", port=1, connections_timeout=1)  # never reached
    with pytest.raises(error):
        wait_until_batch_healthy(
            client,
            service_name="api",
            service_ids=service_ids,
            expect_meta={},
            min_healthy_seconds=min_healthy,
            deadline_seconds=deadline,
        )


def test_batch_gate_raises_when_consul_is_unreachable() -> None:
    client = consul.Consul(host="127.0.0.1", port=1, connections_timeout=1)
    with pytest.raises(ConsulError):
        wait_until_batch_healthy(
            client, service_name="api", service_ids=BATCH, expect_meta={}, min_healthy_seconds=0, deadline_seconds=1
        )


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_batch_gate_task_in_a_flow(consul_client: consul.Consul, consul_connection: ConsulConnection) -> None:
    register(consul_client, "api-8", "v9", "passing", run="run-9")
    register(consul_client, "api-9", "v9", "passing", run="run-9")

    @flow
    def gate() -> BatchGateResult:
        return gate_batch(
            consul_connection,
            service_name="api",
            service_ids=["api-8", "api-9"],
            deploy_run_id="run-9",
            min_healthy_seconds=0.2,
            deadline_seconds=5,
        )

    result = gate()
    assert result.healthy
    assert [i.service_id for i in result.instances] == ["api-8", "api-9"]
