"""One page per incident, end to end: a check flapping under the deployed ``consul-health`` flow with its
shipped settings, through the real server's event store, the ``icd-critical-health`` automation of
``automations.yaml`` and the alerts' notification block (the local receiver), and the Slack stand-in."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, cast

import consul
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent
from prefect.states import Cancelling

from examples.local_env import api_client
from icd.health.state import decode_state
from tests.plugins.deploy_env import DeployEnv
from tests.waiting import wait_until

FLIPS = 20


def transition_events(service: str) -> list[ReceivedEvent]:
    """The ``icd.health.critical`` / ``.passing`` events the server stored about ``service`` (in batches:
    callers poll)."""
    page = api_client().read_events(
        filter=EventFilter(
            event=EventNameFilter(name=["icd.health.critical", "icd.health.passing"]),
            resource=EventResourceFilter(labels={"icd.service": [service]}),  # type: ignore[arg-type]
        ),
        limit=50,
    )
    return list(page.events)


def pages_about(env: DeployEnv, service: str) -> list[dict[str, Any]]:
    return [post for post in env.receiver.posts if service in json.dumps(post)]


def test_twenty_flips_page_once_reach_slack_at_most_three_times_and_are_all_recorded(deploy_env: DeployEnv) -> None:
    env = deploy_env
    tag = uuid.uuid4().hex[:6]
    service, sentinel = f"flap{tag}", f"sentinel{tag}"
    host, port = env.consul.address.rsplit(":", 1)
    agent = consul.Consul(host=host, port=int(port))
    for name in (service, sentinel):
        agent.agent.service.register(name, service_id=f"{name}-1", check={"CheckID": f"ttl-{name}", "TTL": "600s"})
        agent.agent.check.ttl_pass(f"ttl-{name}")
    watch_name = f"flaps-{tag}"
    # The shipped settings: only the window and the state's name are given.
    watch = cast(
        FlowRun,  # the sync variant
        run_deployment(
            "consul-health/consul-health", parameters={"window_seconds": 300, "watch_name": watch_name}, timeout=0
        ),
    )
    env.wait_for(watch.id, states={"RUNNING"})

    def observed(status: str) -> Callable[[], bool]:
        """Whether the watch has seen and persisted the instance in ``status``."""

        def seen() -> bool:
            _, item = agent.kv.get(f"icd/health-watch/{watch_name}/state")
            if item is None or not item.get("Value"):
                return False
            record = decode_state(item["Value"])[0].instances.get(f"{env.consul.node_name}/{service}-1")
            return record is not None and record.observed_status == status

        return seen

    wait_until(observed("passing"), timeout=60, message="the watch never read its baseline")
    for n in range(FLIPS):
        if n % 2:
            agent.agent.check.ttl_pass(f"ttl-{service}", f"flip {n}: ok")
        else:
            agent.agent.check.ttl_fail(f"ttl-{service}", f"flip {n}: connection refused")
        wait_until(observed("passing" if n % 2 else "critical"), timeout=30, message=f"flip {n} was not seen")

    def all_recorded() -> list[ReceivedEvent]:
        stored = transition_events(service)
        return stored if len(stored) == FLIPS else []

    recorded = wait_until(all_recorded, timeout=60, message="not every flip was stored as an event")
    assert sorted(event.event for event in recorded) == ["icd.health.critical"] * 10 + ["icd.health.passing"] * 10
    assert [event.payload["announced"] for event in recorded].count(True) == 1, "the first failure only"
    [labelled] = [event for event in recorded if event.resource["icd.page"] == "true"]
    assert labelled.payload["previous"] == "passing"
    flapping = wait_until(
        lambda: [m for m in env.slack.messages if service in m.text and "flapping" in m.text],
        timeout=30,
        message="no flapping notice",
    )
    assert f"{service} is flapping" in flapping[0].text

    # A later failure of another service pages too; once its page is in, the automation has judged every
    # event of the flaps before it, so the count below is final, not a snapshot.
    agent.agent.check.ttl_fail(f"ttl-{sentinel}", "the barrier")
    wait_until(lambda: pages_about(env, sentinel), timeout=60, message="the sentinel's page never came")
    [page] = pages_about(env, service)
    assert "Critical" in page["text"]
    told = [m.text for m in env.slack.messages if service in m.text]
    assert len(told) <= 3
    assert f"{service} is critical" in told[0]
    assert f"{service} is flapping" in told[1]

    api_client().set_flow_run_state(watch.id, Cancelling(), force=True)
    env.wait_for(watch.id, states={"CANCELLED"}, timeout=120)
