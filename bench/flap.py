"""One check flipping passing/critical 20 times in 10 s: pages, Slack messages and recorded events, with the
shipped damping against none, through the *deployed* consul-health flow and the shipped automation.

    .venv/bin/python bench/flap.py [--flips 20] [--seconds 10]

A Prefect server, ``icd-worker``, the deployments of ``prefect.yaml`` and the automations of
``automations.yaml`` (``icd-setup``) run here for real, with moto and the Slack stand-in; the Consul stand-in
runs in its own process. The alerts' notification block posts to the Slack stand-in's incoming webhook, so a
page is one webhook delivery of the ``icd-critical-health`` automation. The deployment's schedule is paused
(its runs would watch these services too); two runs of it are started by hand and watch at once, each its own
service (each run ignores the other's):

* **ours**: the shipped settings; only ``window_seconds``, ``watch_name`` and ``ignore_services`` are given.
* **baseline**: the same flow with ``recovery_hold_seconds=0`` and ``flap_changes=0``: every change is told
  and every failure pages, which is what the flow and the automation did before damping.

Both checks flip at the same moments, ``--flips`` times evenly over ``--seconds`` (critical first). Counted per
service, once ours has said "stable again" (the shipped ``stable_after``: 300 s after the last flip) and no
page or event has come for 10 s more: pages, Slack messages, and the ``icd.health.critical`` / ``.passing``
events the server stored. Also timed, from the first flip: its Slack message and its page, on both sides
(damping must not slow the first page). Goal (issue 19): <= 1 page and <= 3 Slack messages, all flips stored.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import consul
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from bench.health_common import SLACK_TOKEN, consul_standin_process, load_average
from examples.local_env import (
    LocalServices,
    api_client,
    provision,
    start_moto,
    start_prefect_server,
    start_worker,
    worker_env,
    write_config,
)
from icd.health.config import DEFAULT_STABLE_AFTER_SECONDS
from icd.health.state import decode_state
from standins.slack import SlackStandIn

DEPLOYMENT = "consul-health/consul-health"
MAX_PAGES, MAX_SLACK = 1, 3
QUIET_SECONDS = 10.0


@dataclass
class Side:
    name: str
    service: str
    parameters: dict[str, Any]
    run_id: Any = None
    page_times: list[float] = field(default_factory=list)  # time.time() each page was first seen

    @property
    def check(self) -> str:
        return f"ttl-{self.service}"


def pages_about(slack: SlackStandIn, service: str) -> int:
    return sum(1 for delivery in slack.webhook_deliveries if service in json.dumps(delivery.payload))


def slack_about(slack: SlackStandIn, service: str) -> list[Any]:
    return [message for message in slack.messages if service in message.text]


def events_about(service: str) -> int:
    page = api_client().read_events(
        filter=EventFilter(
            event=EventNameFilter(name=["icd.health.critical", "icd.health.passing"]),
            resource=EventResourceFilter(labels={"icd.service": [service]}),  # type: ignore[arg-type]
        ),
        limit=1,
    )
    return page.total  # every match, not only this page


def watching(agent: consul.Consul, side: Side, node: str) -> bool:
    """Whether the side's run has read and persisted its baseline (the instance, passing)."""
    _, item = agent.kv.get(f"icd/health-watch/bench-{side.name}/state")
    if item is None or not item.get("Value"):
        return False
    record = decode_state(item["Value"])[0].instances.get(f"{node}/{side.service}-1")
    return record is not None and record.observed_status == "passing"


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.1)


def follow_pages(slack: SlackStandIn, sides: list[Side], stop: threading.Event) -> None:
    """Note when each page arrives (webhook deliveries carry no time of their own)."""
    while not stop.wait(0.05):
        for side in sides:
            count = pages_about(slack, side.service)
            side.page_times.extend([time.time()] * (count - len(side.page_times)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=20, help="passing/critical flips of each check")
    parser.add_argument("--seconds", type=float, default=10.0, help="over how long the flips are spread")
    args = parser.parse_args(argv)
    print(f"load average at start: {load_average()}", flush=True)
    tag = uuid.uuid4().hex[:4]
    sides = [
        Side("ours", f"flapours{tag}", {}),
        Side("baseline", f"flapbase{tag}", {"recovery_hold_seconds": 0, "flap_changes": 0}),
    ]
    home = Path(tempfile.mkdtemp(prefix="icd-bench-flap-"))
    moto, moto_url = start_moto()
    slack = SlackStandIn(token=SLACK_TOKEN).start()
    server = start_prefect_server(home / "prefect")
    processes = []
    stop_following = threading.Event()
    try:
        with consul_standin_process() as consul_addr, temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            config = write_config(home / "icd.toml", namespaces={}, workspaces={})
            os.environ["ICD_CONFIG"] = str(config)
            services = LocalServices(moto_url, "icd-bench", "b", "b", slack.api_url, SLACK_TOKEN, consul_addr)
            provision(server, services, alerts_url=slack.webhook_url("alerts"))
            client = api_client()
            client.pause_deployment(client.read_deployment_by_name(DEPLOYMENT).id)
            processes.append(start_worker(server, "local-pool", env=worker_env(home / "icd", config)))
            host, port = consul_addr.removeprefix("http://").rsplit(":", 1)
            agent = consul.Consul(host=host, port=int(port))
            node = agent.agent.self()["Config"]["NodeName"]
            for side in sides:
                agent.agent.service.register(
                    side.service, service_id=f"{side.service}-1", check={"CheckID": side.check, "TTL": "3600s"}
                )
                agent.agent.check.ttl_pass(side.check)
            window = args.seconds + DEFAULT_STABLE_AFTER_SECONDS + 180
            for side in sides:
                others = [other.service for other in sides if other is not side]
                side.run_id = run_deployment(  # type: ignore[union-attr]  # the sync variant
                    DEPLOYMENT,
                    parameters={
                        "window_seconds": window,
                        "watch_name": f"bench-{side.name}",
                        "ignore_services": others,
                        **side.parameters,
                    },
                    timeout=0,
                ).id
            for side in sides:
                wait_for(lambda side=side: watching(agent, side, node), 180, f"the {side.name} run's baseline")
            threading.Thread(target=follow_pages, args=(slack, sides, stop_following), daemon=True).start()

            print(f"both runs watching; {args.flips} flips of each check over {args.seconds:.1f} s", flush=True)
            started = time.time()
            every = args.seconds / args.flips
            for n in range(args.flips):
                time.sleep(max(0.0, started + n * every - time.time()))
                for side in sides:
                    if n % 2:
                        agent.agent.check.ttl_pass(side.check, f"flip {n}: ok")
                    else:
                        agent.agent.check.ttl_fail(side.check, f"flip {n}: connection refused")
            flipped = time.time() - started
            print(f"flipped in {flipped:.1f} s; waiting for ours to say 'stable again'", flush=True)
            ours = sides[0]
            wait_for(
                lambda: any(f"{ours.service} is stable again" in m.text for m in slack_about(slack, ours.service)),
                DEFAULT_STABLE_AFTER_SECONDS + 120,
                "ours to say 'stable again'",
            )
            settle(slack, sides)
            stop_following.set()
            for side in sides:
                client.set_flow_run_state(side.run_id, Cancelling(), force=True)
            print(f"load average at end: {load_average()}")
            report(args, sides, slack, started)
    finally:
        stop_following.set()
        for process in processes:
            process.stop()
        server.stop()
        slack.stop()
        moto.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def settle(slack: SlackStandIn, sides: list[Side]) -> None:
    """Wait until no page, message or stored event has come for ``QUIET_SECONDS`` (the server stores events
    in batches and the automation acts after that)."""

    def counts() -> list[tuple[int, int, int]]:
        return [
            (pages_about(slack, s.service), len(slack_about(slack, s.service)), events_about(s.service)) for s in sides
        ]

    last, since = counts(), time.monotonic()
    while time.monotonic() - since < QUIET_SECONDS:
        time.sleep(1.0)
        now = counts()
        if now != last:
            last, since = now, time.monotonic()


def report(args: argparse.Namespace, sides: list[Side], slack: SlackStandIn, started: float) -> None:
    labels = (
        "pages",
        "Slack messages",
        f"events recorded (of {args.flips})",
        "first flip -> its Slack message",
        "first flip -> its page",
    )
    goals = (f"<= {MAX_PAGES}", f"<= {MAX_SLACK}", f"all {args.flips}", "", "")
    figures: dict[str, tuple[int, int, int]] = {}
    columns: list[tuple[str, ...]] = []
    for side in sides:
        told = slack_about(slack, side.service)
        figures[side.name] = (pages_about(slack, side.service), len(told), events_about(side.service))
        columns.append(
            (
                *(str(figure) for figure in figures[side.name]),
                f"{told[0].received_at - started:.2f} s" if told else "-",
                f"{side.page_times[0] - started:.2f} s" if side.page_times else "-",
            )
        )
    print(f"{'':<34}{'ours (shipped)':>16}{'baseline (none)':>17}   goal")
    for row, (label, goal) in enumerate(zip(labels, goals, strict=True)):
        print(f"{label:<34}{columns[0][row]:>16}{columns[1][row]:>17}   {goal}")
    print("ours told, from the first flip:")
    for message in slack_about(slack, sides[0].service):
        print(f"  +{message.received_at - started:6.1f} s  {message.text.splitlines()[0][:100]}")
    pages, messages, events = figures["ours"]
    met = pages <= MAX_PAGES and messages <= MAX_SLACK and events == args.flips
    print(f"goal <= {MAX_PAGES} page, <= {MAX_SLACK} Slack messages, all flips recorded: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    raise SystemExit(main())
