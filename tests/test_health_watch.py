"""The health watch: the pure engine as tables, then the watch loop over real HTTP against the stand-ins."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import consul
import pytest
from prefect.client.orchestration import get_client

from blocks.consul import ConsulConnection
from blocks.notifier import SlackNotifier
from flows.consul_health import build_watch_config, consul_health
from icd.errors import ConsulError
from icd.health.config import NO_DAMPING, WatchConfig
from icd.health.engine import Alert, FlapSummary, WatchState, evaluate, next_wakeup
from icd.health.handover import HandOver
from icd.health.render import alert_notification, alert_title
from icd.health.snapshot import CheckHealth, HealthSnapshot, HealthStateParser, InstanceHealth, parse_health_state
from icd.health.state import HealthStateStore, decode_state, encode_state
from icd.health.watch import WatchReport, watch
from icd.health.windows import DeployWindow, close_deploy_window, open_deploy_window, read_deploy_windows
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn
from tests.plugins.consul import CountingClient
from tests.waiting import wait_until

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
NO_WINDOWS: Mapping[str, DeployWindow] = {}


# --- engine tables ------------------------------------------------------------------------------------


def instance(
    service: str = "web",
    sid: str = "web-1",
    node: str = "node-1",
    status: str = "passing",
    *,
    extra: tuple[CheckHealth, ...] = (),
) -> InstanceHealth:
    return InstanceHealth(
        node=node,
        service_id=sid,
        service_name=service,
        checks=(CheckHealth(f"service:{sid}", "http", status, f"HTTP {status}"), *extra),
    )


def snap(
    *instances: InstanceHealth, index: int = 10, meta: Mapping[str, Mapping[str, str]] | None = None
) -> HealthSnapshot:
    return HealthSnapshot(index=index, instances={i.key: i for i in instances}, meta=meta or {})


def run(
    steps: list[tuple[float, HealthSnapshot]],
    config: WatchConfig | None = None,
    windows: Mapping[str, DeployWindow] = NO_WINDOWS,
) -> list[list[Alert]]:
    """Feed snapshots at T0 + seconds, starting from a baseline of the first; the alerts of each step."""
    cfg = config or WatchConfig()
    state = WatchState()
    out: list[list[Alert]] = []
    for seconds, snapshot in steps:
        alerts, state = evaluate(state, snapshot, T0 + timedelta(seconds=seconds), cfg, windows)
        out.append(alerts)
    return out


def kinds(alerts: list[Alert]) -> list[tuple[str, str | None, str]]:
    """Each alert as (kind, from, to); a damped one (recorded as an event, not sent) says so in its kind."""
    return [(f"{a.kind} (damped)" if a.damped else a.kind, a.previous_status, a.status) for a in alerts]


MAINT = CheckHealth("_service_maintenance:web-1", "Service Maintenance Mode", "critical", "reason")


@pytest.mark.parametrize(
    ("steps", "config", "expected"),
    [
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(status="critical"))), (2, snap(instance()))],
            NO_DAMPING,
            [[], [("status", "passing", "critical")], [("status", "critical", "passing")]],
            id="critical-then-recovery-undamped",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="critical"))),
                (2, snap(instance())),
                (61, snap(instance())),
                (62, snap(instance())),
            ],
            WatchConfig(),
            [
                [],
                [("status", "passing", "critical")],
                [("status (damped)", "critical", "passing")],
                [],
                [("settled", "critical", "passing")],
            ],
            id="recovery-told-once-it-held",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="critical"))),
                (2, snap(instance())),
                (30, snap(instance(status="critical"))),
                (200, snap(instance(status="critical"))),
            ],
            WatchConfig(),
            [
                [],
                [("status", "passing", "critical")],
                [("status (damped)", "critical", "passing")],
                [("status (damped)", "passing", "critical")],
                [],
            ],
            id="recovery-that-did-not-hold-is-not-news",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="critical"))),
                (2, snap(instance(status="critical"))),
            ],
            WatchConfig(),
            [[], [("status", "passing", "critical")], []],
            id="staying-critical-alerts-once",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(status="critical"))), (5, snap(instance()))],
            WatchConfig(thresholds={"web": 30}),
            [[], [("status (damped)", "passing", "critical")], [("status (damped)", "critical", "passing")]],
            id="flap-inside-threshold",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="critical"))),
                (31, snap(instance(status="critical"))),
            ],
            WatchConfig(thresholds={"w*": 30}),
            [[], [("status (damped)", "passing", "critical")], [("settled", "passing", "critical")]],
            id="threshold-glob-elapses",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(status="critical")))],
            WatchConfig(ignore_services=("we?",)),
            [[], []],
            id="ignored-service",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(status="critical")))],
            WatchConfig(ignore_checks=("service:*",)),
            [[], []],
            id="ignored-check",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(status="critical")))],
            WatchConfig(ignore_nodes=("node-*",)),
            [[], []],
            id="ignored-node",
        ),
        pytest.param(
            [(0, snap()), (1, snap(instance(sid="web-2")))],
            WatchConfig(),
            [[], []],
            id="new-passing-instance",
        ),
        pytest.param(
            [(0, snap()), (1, snap(instance(sid="web-2", status="critical")))],
            WatchConfig(),
            [[], [("appeared", None, "critical")]],
            id="new-critical-instance",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap())],
            WatchConfig(),
            [[], [("disappeared", "passing", "absent")]],
            id="disappearing-instance",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(extra=(MAINT,)))), (2, snap(instance()))],
            WatchConfig(),
            [[], [("maintenance_on", "passing", "passing")], [("maintenance_off", "passing", "passing")]],
            id="maintenance-on-off",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(extra=(MAINT,), status="critical"))),
                (2, snap(instance(extra=(MAINT,), status="critical"))),
                (3, snap(instance(status="critical"))),
            ],
            WatchConfig(),
            [
                [],
                [("maintenance_on", "passing", "critical")],
                [],
                [("maintenance_off", "passing", "critical"), ("status", "passing", "critical")],
            ],
            id="status-held-back-during-maintenance",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="critical"))),
                (1800, snap(instance(status="critical"))),
                (3601, snap(instance(status="critical"))),
                (3700, snap(instance(status="critical"))),
            ],
            WatchConfig(reminder_interval=timedelta(hours=1)),
            [[], [("status", "passing", "critical")], [], [("reminder", "critical", "critical")], []],
            id="reminder-after-interval",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="warning"))),
                (2, snap(instance(status="critical"))),
            ],
            WatchConfig(),
            [[], [("status", "passing", "warning")], [("status", "warning", "critical")]],
            id="passing-warning-critical",
        ),
    ],
)
def test_engine_transitions(
    steps: list[tuple[float, HealthSnapshot]],
    config: WatchConfig,
    expected: list[list[tuple[str, str | None, str]]],
) -> None:
    assert [kinds(step) for step in run(steps, config)] == expected


def test_first_state_is_remembered_across_restart_without_realerting() -> None:
    config = WatchConfig()
    _, state = evaluate(WatchState(), snap(instance(status="critical")), T0, config, NO_WINDOWS)
    restored, _, _, _ = decode_state(encode_state(state))
    alerts, again = evaluate(restored, snap(instance(status="critical")), T0 + timedelta(seconds=5), config, NO_WINDOWS)
    assert alerts == []
    assert again == restored


def test_node_check_makes_every_instance_on_the_node_fail_and_names_it() -> None:
    entries = [
        {
            "Node": "n1",
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "critical",
            "ServiceID": "",
        },
        {
            "Node": "n1",
            "CheckID": "service:a",
            "Name": "a",
            "Status": "passing",
            "ServiceID": "a",
            "ServiceName": "a",
        },
        {
            "Node": "n2",
            "CheckID": "service:b",
            "Name": "b",
            "Status": "passing",
            "ServiceID": "b",
            "ServiceName": "b",
        },
    ]
    before = parse_health_state(1, [{**entries[0], "Status": "passing"}, *entries[1:]])
    after = parse_health_state(2, entries)
    config = WatchConfig()
    _, state = evaluate(WatchState(), before, T0, config, NO_WINDOWS)
    alerts, _ = evaluate(state, after, T0, config, NO_WINDOWS)
    assert [(a.service_id, a.status) for a in alerts] == [("a", "critical")]
    assert [c.check_id for c in alerts[0].failing_checks] == ["serfHealth"]


def test_deploy_window_marks_old_version_alerts_expected_at_info() -> None:
    window = DeployWindow("run-42", "v3", "v4", until=T0 + timedelta(minutes=10))
    old = {"node-1/web-1": {"artifact_version": "v3", "deploy_run_id": "run-41"}}
    new = {"node-1/web-2": {"artifact_version": "v4", "deploy_run_id": "run-42"}}
    config = WatchConfig()
    _, state = evaluate(WatchState(), snap(instance(), meta=old), T0, config, NO_WINDOWS)
    alerts, _ = evaluate(
        state,
        snap(instance(status="critical"), instance(sid="web-2", status="critical"), meta=new),
        T0 + timedelta(seconds=1),
        config,
        {"web": window},
    )
    by_id = {a.service_id: a for a in alerts}
    assert by_id["web-1"].expected_by == window
    assert by_id["web-1"].severity == "info"
    # The incoming instance of this deploy starts critical, as Consul's checks do: the gate judges it.
    assert by_id["web-2"].expected_by == window
    assert by_id["web-2"].severity == "info"
    message = alert_notification(by_id["web-1"])
    assert "expected during deploy of v3 -> v4" in message.text.lower()
    assert message.fields["Version"] == "v3"
    assert message.fields["Deploy run"] == "run-41"
    # After the window the same alert is a page again.
    late, _ = evaluate(state, snap(instance(status="critical")), T0 + timedelta(minutes=11), config, {"web": window})
    assert late[0].expected_by is None
    assert late[0].severity == "critical"


def test_next_wakeup_is_the_earliest_threshold_or_reminder() -> None:
    config = WatchConfig(thresholds={"web": 30}, reminder_interval=timedelta(minutes=5))
    db_down = instance("db", "db-1", status="critical")
    _, state = evaluate(WatchState(), snap(instance(), db_down), T0, config, {})
    assert next_wakeup(state, config) == T0 + timedelta(minutes=5)  # db's reminder
    _, state = evaluate(state, snap(instance(status="critical"), db_down), T0 + timedelta(seconds=10), config, {})
    assert next_wakeup(state, config) == T0 + timedelta(seconds=40)  # web's threshold
    _, state = evaluate(state, snap(instance(), db_down), T0 + timedelta(seconds=20), config, {})
    assert next_wakeup(state, config) == T0 + timedelta(minutes=5)  # web flapped back: nothing pending


def test_dedup_key_identifies_one_transition() -> None:
    [[], [first]] = run([(0, snap(instance())), (1, snap(instance(status="critical"), index=77))])
    assert first.dedup_key == "status:node-1/web-1:passing->critical@77"


# --- damping: one page per incident; a burst of changes is one "flapping" notice, then "stable again" --------


def flips(count: int, every: float, first_at: float = 1.0) -> list[tuple[float, HealthSnapshot]]:
    """A passing baseline, then ``count`` passing/critical flips ``every`` seconds apart (critical first)."""
    return [(0, snap(instance())), *((first_at + n * every, flip_snapshot(n)) for n in range(count))]


def flip_snapshot(n: int) -> HealthSnapshot:
    return snap(instance(status="passing" if n % 2 else "critical"), index=100 + n)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_twenty_flips_in_ten_seconds_page_once_and_tell_a_flap_then_stable_again() -> None:
    # Flips at 1.0, 1.5, ... 10.5 s; nothing changes after, until "stable again" is due 300 s after the last.
    steps = [*flips(20, every=0.5), (200, snap(instance(), index=200)), (310.5, snap(instance(), index=200))]
    alerts = [a for step in run(steps) for a in step]

    transitions = [a for a in alerts if a.kind == "status"]
    assert [a.status for a in transitions] == ["critical", "passing"] * 10, "every flip is recorded"
    told = [a for a in alerts if a.announced]
    assert kinds(told) == [
        ("status", "passing", "critical"),
        ("flapping", "critical", "critical"),  # at the 5th change in 10 minutes
        ("settled", "critical", "passing"),
    ]
    assert [a for a in alerts if a.page] == [transitions[0]]
    assert told[1].flap == FlapSummary(changes=5, first=at(1.0), last=at(3.0))
    assert told[2].flap == FlapSummary(changes=20, first=at(1.0), last=at(10.5))
    assert told[2].at == at(310.5)
    assert "5 status changes in 2.0 s, now critical" in alert_notification(told[1]).text
    stable = alert_notification(told[2])
    assert stable.title == "web is stable again on node-1: passing"
    assert "stable again: passing after 20 changes over 9.5 s" in stable.text
    assert stable.severity == "success"


def test_without_damping_every_flip_is_told_and_every_failure_pages() -> None:
    alerts = [a for step in run(flips(20, every=0.5), NO_DAMPING) for a in step]
    assert len([a for a in alerts if a.announced]) == 20
    assert len([a for a in alerts if a.page]) == 10  # what the shipped automation did before damping


@pytest.mark.parametrize(
    ("steps", "config", "pages"),
    [
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="critical"))),
                (2, snap(instance())),
                (3, snap(instance(status="critical"))),
            ],
            WatchConfig(),
            [1],
            id="a-bounce-inside-the-recovery-hold-is-one-incident",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="critical"))),
                (2, snap(instance())),
                (70, snap(instance())),
                (80, snap(instance(status="critical"))),
            ],
            WatchConfig(),
            [1, 80],
            id="a-failure-after-a-told-recovery-is-a-new-incident",
        ),
        pytest.param(
            [
                (0, snap(instance())),
                (1, snap(instance(status="warning"))),
                (2, snap(instance(status="critical"))),
                (3, snap(instance(status="warning"))),
                (4, snap(instance(status="critical"))),
            ],
            WatchConfig(),
            [2],
            id="warning-does-not-page-its-escalation-does-once",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(status="critical"))), (7202, snap(instance(status="critical")))],
            WatchConfig(reminder_interval=timedelta(hours=1)),
            [1],
            id="reminders-do-not-page",
        ),
        pytest.param(
            [(0, snap(instance())), (1, snap(instance(status="critical"))), (31, snap(instance(status="critical")))],
            WatchConfig(thresholds={"web": 30}),
            [31],
            id="a-threshold-pages-when-the-failure-held",
        ),
        pytest.param(
            [(0, snap()), (1, snap(instance(status="critical")))],
            WatchConfig(),
            [1],
            id="a-new-critical-instance-pages",
        ),
    ],
)
def test_one_page_per_incident(
    steps: list[tuple[float, HealthSnapshot]], config: WatchConfig, pages: list[float]
) -> None:
    paged_at = [a.at for step in run(steps, config) for a in step if a.page]
    assert paged_at == [at(seconds) for seconds in pages]
    assert all(a.status == "critical" for step in run(steps, config) for a in step if a.page)


def test_a_deploys_own_failure_does_not_page_nor_use_up_the_incidents_page() -> None:
    window = {"web": DeployWindow("run-42", "v3", "v4", until=at(600))}
    meta = {"node-1/web-1": {"artifact_version": "v3", "deploy_run_id": "run-41"}}
    config = WatchConfig()
    _, state = evaluate(WatchState(), snap(instance(), meta=meta), T0, config, NO_WINDOWS)
    [expected], state = evaluate(state, snap(instance(status="critical")), at(1), config, window)
    assert expected.expected_by is not None
    assert not expected.page
    # Still critical after the window, and another failure: the incident pages now, once.
    _, state = evaluate(state, snap(instance(status="warning")), at(700), config, window)
    [late], _ = evaluate(state, snap(instance(status="critical")), at(701), config, window)
    assert late.expected_by is None
    assert late.page


def test_a_deploys_incoming_instance_turning_healthy_is_not_told_after_its_window_closes() -> None:
    window = {"web": DeployWindow("run-42", "v3", "v4", until=at(120))}
    config = WatchConfig()
    state = WatchState()
    told: list[Alert] = []
    for seconds, snapshot in [
        (0, snap()),
        (
            1,
            snap(
                instance(sid="web-2", status="critical"),
                meta={"node-1/web-2": {"artifact_version": "v4", "deploy_run_id": "run-42"}},
            ),
        ),
        (5, snap(instance(sid="web-2"))),  # healthy: the gate passes, the deploy ends
        (300, snap(instance(sid="web-2"))),  # long after the window and the recovery hold
    ]:
        alerts, state = evaluate(state, snapshot, at(seconds), config, window)
        told += [a for a in alerts if a.announced]
    assert told == [], "the gate's verdict is the one message about a deploy"
    assert state.instances["node-1/web-2"].alerted_status == "passing"


def test_a_deploys_incoming_instance_is_recognised_by_its_version_without_its_run_id() -> None:
    """The contract names ``artifact_version``: an instance whose stack gives no ``deploy_run_id`` Meta is this
    deploy's as well (the gate can match it on the ``service_id`` output)."""
    window = {"web": DeployWindow("run-42", "v3", "v4", until=at(600))}
    config = WatchConfig()
    _, state = evaluate(WatchState(), snap(), T0, config, NO_WINDOWS)
    incoming = snap(instance(sid="web-2", status="critical"), meta={"node-1/web-2": {"artifact_version": "v4"}})
    [appeared], state = evaluate(state, incoming, at(1), config, window)
    [healthy], _ = evaluate(state, snap(instance(sid="web-2")), at(5), config, window)
    assert (appeared.expected_by, healthy.expected_by) == (window["web"], window["web"])
    assert not appeared.page
    assert not appeared.announced
    assert not healthy.announced


def test_an_instance_running_the_outgoing_version_when_the_window_opened_is_expected_to_leave() -> None:
    """A teardown deregisters before the watch ever asked for the instance's Meta: the window names it."""
    window = {"web": DeployWindow("run-42", "v3", "", until=at(600), leaving=("node-1/web-1",))}
    config = WatchConfig()
    _, state = evaluate(WatchState(), snap(instance(), instance(sid="web-9")), T0, config, NO_WINDOWS)
    assert state.instances["node-1/web-1"].meta is None
    alerts, _ = evaluate(state, snap(), at(1), config, window)
    by_id = {a.service_id: a for a in alerts}
    assert by_id["web-1"].expected_by == window["web"]
    assert by_id["web-9"].expected_by is None, "an instance the window did not name still leaves loudly"


def test_a_flapping_instance_is_reminded_as_flapping_and_settles_in_its_last_status() -> None:
    config = WatchConfig(reminder_interval=timedelta(minutes=5), stable_after=timedelta(minutes=10))
    steps = [
        *flips(5, every=60),  # the 5th change, at 241 s, makes it flap
        (400, flip_snapshot(5)),
        (520, flip_snapshot(6)),  # critical again
        (545, flip_snapshot(6)),  # a reminder: 5 min since the flapping notice
        (1200, flip_snapshot(6)),  # 10 min without a change: stable again, critical
    ]
    alerts = [a for step in run(steps, config) for a in step]
    told = [a for a in alerts if a.announced]
    assert kinds(told) == [
        ("status", "passing", "critical"),
        ("flapping", "critical", "critical"),
        ("reminder", "critical", "critical"),
        ("settled", "critical", "critical"),
    ]
    assert [a.at for a in told] == [at(1), at(241), at(545), at(1200)]
    assert alert_title(told[2]) == "web is still flapping on node-1"
    assert "7 changes over 9 min so far" in alert_notification(told[2]).text
    assert "stable again: critical after 7 changes over 9 min" in alert_notification(told[3]).text
    assert told[3].severity == "critical"
    assert [a.at for a in alerts if a.page] == [at(1)], "settling in critical is the same incident"


def test_next_wakeup_covers_a_held_recovery_and_a_flap_settling() -> None:
    config = WatchConfig()
    state = WatchState()
    for seconds, snapshot in [(0, snap(instance())), (1, snap(instance(status="critical"))), (2, snap(instance()))]:
        _, state = evaluate(state, snapshot, at(seconds), config, NO_WINDOWS)
    assert next_wakeup(state, config) == at(2) + config.recovery_hold
    for n, seconds in enumerate([3, 4, 5], start=2):
        _, state = evaluate(state, flip_snapshot(n), at(seconds), config, NO_WINDOWS)
    assert state.instances["node-1/web-1"].flapping_since == at(1)
    assert next_wakeup(state, config) == at(5) + config.stable_after


# --- the shortcut under churn: diff only what changed, and find what a full diff finds --------------------


def random_snapshot(rng: random.Random, index: int) -> HealthSnapshot:
    """Up to 8 instances of 2 services on 2 nodes, each present or not, with random checks and maintenance."""
    instances = []
    for service in ("web", "db"):
        for node in ("node-1", "node-2"):
            for n in (1, 2):
                if rng.random() < 0.2:
                    continue  # absent this time: it disappears, or appears later
                sid = f"{service}-{node[-1]}{n}"
                extra = (MAINT.__class__(f"_service_maintenance:{sid}", "maint", "critical", ""),)
                instances.append(
                    instance(
                        service,
                        sid,
                        node,
                        rng.choice(["passing", "passing", "warning", "critical"]),
                        extra=extra if rng.random() < 0.15 else (),
                    )
                )
    meta = {i.key: {"artifact_version": f"v{rng.randrange(3)}"} for i in instances if rng.random() < 0.2}
    return snap(*instances, index=index, meta=meta)


def by_key(alert: Alert) -> str:
    return alert.dedup_key


@pytest.mark.parametrize("seed", range(6))
def test_evaluating_only_the_changed_instances_finds_what_a_full_diff_finds(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311  # reproducible test tables, not secrets
    config = WatchConfig(
        thresholds={"db": 20},
        reminder_interval=timedelta(seconds=90),
        ignore_nodes=("*-2",) * (seed % 2),
        stable_after=timedelta(seconds=120),  # flaps start and settle within the 200 steps
    )
    window = {"web": DeployWindow("run-9", "v1", "v2", until=T0 + timedelta(minutes=30))}
    full = short = WatchState()
    before = snap(index=0)
    now = T0
    pages_this_incident: dict[str, int] = {}
    kinds_seen: set[str] = set()
    for step in range(200):
        now += timedelta(seconds=rng.choice([0, 1, 5, 25, 60]))
        after = random_snapshot(rng, step + 1) if rng.random() < 0.7 else dataclasses.replace(before, meta={})
        changed = {
            k for k in {*before.instances, *after.instances} if before.instances.get(k) != after.instances.get(k)
        }
        windows = window if step % 3 else NO_WINDOWS
        full_alerts, full = evaluate(full, after, now, config, windows)
        short_alerts, short = evaluate(short, after, now, config, windows, changed=changed)
        # The same alerts; their order within a round may differ (records are kept in another order).
        assert sorted(short_alerts, key=by_key) == sorted(full_alerts, key=by_key), f"step {step}"
        assert short == full, f"step {step}"
        # One page per incident: an incident ends when passing is told, or the instance goes away.
        for alert in full_alerts:
            key = f"{alert.node}/{alert.service_id}"
            pages_this_incident[key] = pages_this_incident.get(key, 0) + alert.page
            assert pages_this_incident[key] <= 1, f"step {step}: {key} paged twice in one incident"
        for key in list(pages_this_incident):
            rec = full.instances.get(key)
            if rec is None or rec.alerted_status == "passing":
                del pages_this_incident[key]
        kinds_seen.update(a.kind for a in full_alerts)
        before = after
    assert {"flapping", "settled", "reminder"} <= kinds_seen, "the churn exercised the damping"


class ConsulChecks:
    """A check table as Consul keeps it: rows with the index of their last change, a table index."""

    def __init__(self) -> None:
        self.index = 1
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}

    def put(self, node: str, check_id: str, status: str, service_id: str = "") -> None:
        self.index += 1
        row = self.rows.get((node, check_id), {"CreateIndex": self.index})
        self.rows[(node, check_id)] = {
            **row,
            "Node": node,
            "CheckID": check_id,
            "Name": check_id,
            "Status": status,
            "Output": f"{status} at {self.index}",
            "ServiceID": service_id,
            "ServiceName": service_id.split("-")[0] if service_id else "",
            "ModifyIndex": self.index,
        }

    def delete(self, key: tuple[str, str]) -> None:
        self.index += 1
        del self.rows[key]

    def answer(self) -> tuple[int, list[dict[str, Any]]]:
        return self.index, [dict(row) for row in self.rows.values()]


def comparable(snapshot: HealthSnapshot) -> dict[str, tuple[str, str, str, list[CheckHealth]]]:
    return {
        key: (i.node, i.service_id, i.service_name, sorted(i.checks, key=lambda c: c.check_id))
        for key, i in snapshot.instances.items()
    }


@pytest.mark.parametrize("seed", range(4))
def test_the_parser_reparses_only_changed_rows_and_matches_a_fresh_parse(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311  # reproducible test tables, not secrets
    table = ConsulChecks()
    for node in ("n1", "n2", "n3"):
        table.put(node, "serfHealth", "passing")
        for n in range(4):
            for c in range(3):
                table.put(node, f"c{c}-{node}-svc{n}", "passing", f"svc{n}-{node}")
    parser = HealthStateParser()
    previous = parser.parse(*table.answer()).snapshot
    diffed = 0
    for _ in range(300):
        for _change in range(rng.choice([0, 1, 1, 3])):
            roll = rng.random()
            key = rng.choice(list(table.rows))
            if roll < 0.7:
                table.put(*key, rng.choice(["passing", "warning", "critical"]), table.rows[key]["ServiceID"])
            elif roll < 0.8:
                table.put(key[0], f"new-{table.index}", "critical", f"svc{rng.randrange(6)}-{key[0]}")
            elif roll < 0.9:
                table.delete(key)
            else:
                table.put(key[0], "serfHealth", rng.choice(["passing", "critical"]))
        parsed = parser.parse(*table.answer())
        fresh = parse_health_state(*table.answer())
        assert comparable(parsed.snapshot) == comparable(fresh)
        if parsed.changed is not None:
            diffed += 1
            moved = {
                k
                for k in {*previous.instances, *fresh.instances}
                if comparable(previous).get(k) != comparable(fresh).get(k)
            }
            assert moved <= parsed.changed
        previous = parsed.snapshot
    assert diffed > 150  # most answers were diffed, not parsed afresh


# --- against the stand-ins ----------------------------------------------------------------------------


def register_ttl(
    agent: consul.Consul, service_id: str, *, version: str = "v1", status: str = "passing", run_meta: bool = True
) -> str:
    """A ``web`` instance with a TTL check; ``run_meta``: its Meta names the deploy run (``run-<version>``)."""
    meta = {"artifact_version": version, "commit": "abc123"} | ({"deploy_run_id": f"run-{version}"} if run_meta else {})
    agent.agent.service.register(
        "web",
        service_id=service_id,
        meta=meta,
        check={"CheckID": f"ttl-{service_id}", "Name": "app ttl", "TTL": "600s", "Status": status},
    )
    return f"ttl-{service_id}"


@dataclass(frozen=True)
class Scheduled:
    """A watch run as the schedule starts it: its run id, whether a next run is expected, its overtime cap."""

    run_id: str
    successor_expected: Callable[[], bool] = lambda: True
    max_overtime_seconds: float = 60.0


class WatchThread:
    def __init__(
        self,
        http_addr: str,
        notifier: SlackNotifier,
        window: float,
        config: WatchConfig | None = None,
        scheduled: Scheduled | None = None,
    ):
        self.counting = CountingClient(http_addr)
        self.report: WatchReport | None = None
        self.error: BaseException | None = None
        self.alerts: list[Alert] = []
        self._stop = threading.Event()
        self._scheduled = scheduled
        self._thread = threading.Thread(target=self._run, args=(notifier, window, config or WatchConfig()), daemon=True)

    def _run(self, notifier: SlackNotifier, window: float, config: WatchConfig) -> None:
        run = self._scheduled
        hand_over = (
            HandOver(self.counting.client, "test", run.run_id, run.successor_expected, run.max_overtime_seconds)
            if run is not None
            else None
        )
        try:
            self.report = watch(
                self.counting.client,
                notifier.sender(),
                config,
                window,
                watch_name="test",
                deploy_run_url=notifier.flow_run_url,
                on_alerts=self.alerts.extend,
                stop=self._stop,
                max_wait_seconds=0.5,
                hand_over=hand_over,
            )
        except BaseException as exc:  # noqa: BLE001  # surfaced by join()
            self.error = exc

    def start(self) -> WatchThread:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> WatchThread:
        """Ask the watch to end after its current round (at most ``max_wait_seconds`` away)."""
        self._stop.set()
        return self

    def join(self) -> WatchReport:
        self._thread.join(timeout=30)
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def wait_for_rounds(watcher: WatchThread, rounds: int, timeout: float = 10.0) -> None:
    wait_until(
        lambda: watcher.counting.count("/v1/health/state/any") >= rounds,
        timeout=timeout,
        message="the watch never started its blocking query",
    )


def test_flip_critical_alerts_once_and_recovers_once_the_recovery_held(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    check = register_ttl(client, "web-1")
    config = WatchConfig(recovery_hold=timedelta(seconds=1))
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=20, config=config).start()
    wait_for_rounds(watcher, 1)  # the baseline is read; any later flip moves the index
    client.agent.check.ttl_fail(check, "connection refused")
    [message] = slack_standin.wait_for_messages(1, timeout=5.0)
    assert "web is critical" in message.text
    assert "connection refused" in message.text
    client.agent.check.ttl_pass(check)
    wait_until(lambda: len(watcher.alerts) >= 2, timeout=5, message="the recovery was not seen")
    assert len(slack_standin.messages) == 1  # seen and recorded, but held until it has lasted
    messages = slack_standin.wait_for_messages(2, timeout=10.0)
    assert "recovered" in messages[1].text
    assert "held for" in messages[1].text
    assert watcher.alive(), "woken by the due hold, not by the end of the window"
    report = watcher.stop().join()
    assert len(slack_standin.messages) == 2
    assert report.alerts_sent == 2
    assert "run-v1" in str(messages[0].blocks)  # the deploy run from the Service Meta


def flip_check(client: consul.Consul, check: str, n: int) -> None:
    """The ``n``-th flip of a check that starts passing: critical first."""
    if n % 2:
        client.agent.check.ttl_pass(check, f"flip {n}: ok")
    else:
        client.agent.check.ttl_fail(check, f"flip {n}: connection refused")


def test_twenty_flips_with_the_shipped_settings_are_all_recorded_and_told_in_three_messages_one_paging(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    check = register_ttl(client, "web-1")
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=60).start()  # WatchConfig()
    wait_for_rounds(watcher, 1)

    def seen(flips: int) -> Callable[[], bool]:
        return lambda: len([a for a in watcher.alerts if a.kind == "status"]) >= flips

    for n in range(20):
        flip_check(client, check, n)
        wait_until(seen(n + 1), timeout=5, message=f"flip {n} was not seen")
    watcher.stop().join()
    transitions = [a for a in watcher.alerts if a.kind == "status"]
    assert [a.status for a in transitions] == ["critical", "passing"] * 10
    assert [a for a in watcher.alerts if a.page] == [transitions[0]]
    told = slack_standin.messages
    assert len(told) == 2
    assert "web is critical" in told[0].text
    assert "web is flapping on standin-node" in told[1].text
    assert "5 status changes in" in told[1].text

    # The next run (here with a shorter quiet time) finds the flap in the state and says when it is over.
    calm = WatchConfig(stable_after=timedelta(seconds=1))
    after = WatchThread(consul_standin.http_addr, slack_notifier, window=20, config=calm).start()
    told = slack_standin.wait_for_messages(3, timeout=10)
    after.stop().join()
    assert len(told) == 3
    assert "web is stable again on standin-node: passing" in told[2].text
    assert "after 20 changes over" in told[2].text
    assert [a.kind for a in after.alerts] == ["settled"]
    assert not after.alerts[0].page


def test_the_flows_defaults_are_the_shipped_damping() -> None:
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(consul_health.fn).parameters.items()
        if name in inspect.signature(build_watch_config).parameters
    }
    assert build_watch_config(**defaults) == WatchConfig()
    assert WatchConfig().recovery_hold > timedelta(0), "damping is on"
    assert WatchConfig().flap_changes > 0, "damping is on"


def test_transition_between_runs_is_reported_by_the_next_and_restart_is_quiet(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    check = register_ttl(client, "web-1")
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.3).start().join()
    assert slack_standin.messages == []
    client.agent.check.ttl_fail(check, "down while nobody watched")
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.3).start().join()
    [message] = slack_standin.messages
    assert "web is critical" in message.text
    # A restart with nothing changed: nothing is said again (a run sends before it returns).
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.3).start().join()
    assert len(slack_standin.messages) == 1


def test_quiet_round_makes_exactly_one_request(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    for n in range(20):
        register_ttl(client, f"web-{n}")
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.2).start().join()  # persist a baseline
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=1.0)
    watcher.start().join()
    # One state read and one silences read at start, then only blocking health queries: no KV writes, no
    # per-service fetches.
    paths = watcher.counting.paths
    assert paths[:2] == ["/v1/kv/icd/health-watch/test/state", "/v1/kv/icd/silences"]
    assert set(paths[2:]) == {"/v1/health/state/any"}
    assert watcher.report is not None
    assert watcher.report.rounds == len(paths) - 2 <= 3  # a blocking query holds the whole window


def announced(client: consul.Consul, run_id: str) -> bool:
    _, item = client.kv.get("icd/health-watch/test/watcher")
    return item is not None and json.loads(item["Value"])["run"] == run_id


def test_a_scheduled_run_watches_past_its_window_until_the_next_run_does(
    consul_standin: ConsulStandIn,
    slack_standin: SlackStandIn,
    slack_notifier: SlackNotifier,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="icd.health.watch")
    client = CountingClient(consul_standin.http_addr).client
    check = register_ttl(client, "web-1")
    first = WatchThread(consul_standin.http_addr, slack_notifier, window=0.3, scheduled=Scheduled("run-1")).start()
    wait_until(lambda: "watching on until one is" in caplog.text, message="the run stopped at its window's end")
    # The next run is late: a change now is still seen, by the run in overtime.
    client.agent.check.ttl_fail(check, "failed while the next run was starting")
    [message] = slack_standin.wait_for_messages(1, timeout=5.0)
    assert "web is critical" in message.text
    assert first.alive()
    second = WatchThread(consul_standin.http_addr, slack_notifier, window=30, scheduled=Scheduled("run-2")).start()
    wait_until(lambda: announced(client, "run-2"), message="the next run never announced itself")
    report = first.join()  # ... and the first one hands over
    assert report.overtime_seconds > 0
    assert "Run run-2 is watching now" in caplog.text
    assert second.alive()
    second.stop().join()


@pytest.mark.parametrize(
    ("scheduled", "told"),
    [
        pytest.param(Scheduled("run-1", successor_expected=lambda: False), "No next run is expected", id="paused"),
        pytest.param(Scheduled("run-1", max_overtime_seconds=0.5), "No newer run took over within", id="capped"),
    ],
)
def test_a_run_in_overtime_stops_when_no_next_run_will_come(
    consul_standin: ConsulStandIn,
    slack_standin: SlackStandIn,
    slack_notifier: SlackNotifier,
    caplog: pytest.LogCaptureFixture,
    scheduled: Scheduled,
    told: str,
) -> None:
    caplog.set_level(logging.INFO, logger="icd.health.watch")
    client = CountingClient(consul_standin.http_addr).client
    register_ttl(client, "web-1")
    report = WatchThread(consul_standin.http_addr, slack_notifier, window=0.3, scheduled=scheduled).start().join()
    assert told in caplog.text
    assert announced(client, "run-1")
    assert report.overtime_seconds <= scheduled.max_overtime_seconds + 1.5


def test_overlapping_runs_alert_a_transition_once(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    check = register_ttl(client, "web-1")
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.2).start().join()
    first = WatchThread(consul_standin.http_addr, slack_notifier, window=1.5).start()
    second = WatchThread(consul_standin.http_addr, slack_notifier, window=1.5).start()
    wait_for_rounds(first, 1)
    wait_for_rounds(second, 1)
    client.agent.check.ttl_fail(check, "boom")
    reports = [first.join(), second.join()]
    assert len(slack_standin.messages) == 1
    assert sorted(r.conflicts for r in reports) == [0, 1]  # the loser re-read after its failed CAS


def test_unsent_outbox_is_resent_by_the_next_run(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    register_ttl(client, "web-1", status="critical")
    store = HealthStateStore(client, "test")
    # What a run that crashed between persisting and sending leaves behind.
    state = WatchState()
    crashed_at = datetime.now(UTC) - timedelta(minutes=1)
    alerts, state = evaluate(state, fetch_snapshot(client), crashed_at, WatchConfig(), NO_WINDOWS)
    outbox = [alert_notification(a) for a in alerts]
    assert store.save(state, cas=0, outbox=outbox, outbox_since=crashed_at).written
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.3).start().join()
    [message] = slack_standin.messages
    assert message.dedup_key == outbox[0].dedup_key
    assert store.load().outbox == ()


def fetch_snapshot(client: consul.Consul) -> HealthSnapshot:
    index, entries = client.health.state("any")
    return parse_health_state(int(index), entries)


def test_deploy_window_helpers_round_trip_and_only_the_owner_closes(consul_standin: ConsulStandIn) -> None:
    client = CountingClient(consul_standin.http_addr).client
    window = open_deploy_window(
        client,
        "web",
        deploy_run_id="run-7",
        from_version="v3",
        to_version="v4",
        duration=timedelta(minutes=5),
    )
    assert read_deploy_windows(client) == {"web": window}
    assert close_deploy_window(client, "web", deploy_run_id="run-8") is False
    assert close_deploy_window(client, "web", deploy_run_id="run-7") is True
    assert read_deploy_windows(client) == {}


def test_a_deploy_is_recorded_not_paged(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    old_check = register_ttl(client, "web-1", version="v3")
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.2).start().join()
    open_deploy_window(
        client,
        "web",
        deploy_run_id="run-v4",
        from_version="v3",
        to_version="v4",
        duration=timedelta(minutes=5),
    )
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=10).start()
    wait_for_rounds(watcher, 1)
    # The incoming instance starts critical, as Consul's checks do; the outgoing one drains and leaves.
    new_check = register_ttl(client, "web-2", version="v4", status="critical")
    wait_until(lambda: len(watcher.alerts) >= 1, timeout=5, message="the new instance was not seen")
    client.agent.check.ttl_fail(old_check, "draining")
    wait_until(lambda: len(watcher.alerts) >= 2, timeout=5, message="the draining instance was not seen")
    client.agent.service.deregister("web-1")
    wait_until(lambda: len(watcher.alerts) >= 3, timeout=5, message="the departure was not seen")
    client.agent.check.ttl_pass(new_check)
    wait_until(lambda: len(watcher.alerts) >= 4, timeout=5, message="the recovery was not seen")

    kinds = [(a.kind, a.service_id, a.status) for a in watcher.alerts]
    assert kinds == [
        ("appeared", "web-2", "critical"),
        ("status", "web-1", "critical"),
        ("disappeared", "web-1", "absent"),
        ("status", "web-2", "passing"),
    ]
    assert all(a.expected_by is not None and a.severity == "info" for a in watcher.alerts)
    report = watcher.stop().join()
    assert slack_standin.messages == []
    assert (report.alerts_sent, report.alerts_recorded) == (0, 4)
    note = alert_notification(watcher.alerts[1])
    assert "Expected during deploy of v3 -> v4" in note.text


def test_a_deploy_whose_new_instance_lacks_its_run_id_is_recorded_not_paged(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    register_ttl(client, "web-1", version="v3")
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.2).start().join()
    open_deploy_window(
        client, "web", deploy_run_id="run-v4", from_version="v3", to_version="v4", duration=timedelta(minutes=5)
    )
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=10).start()
    wait_for_rounds(watcher, 1)
    new_check = register_ttl(client, "web-2", version="v4", status="critical", run_meta=False)
    wait_until(lambda: len(watcher.alerts) >= 1, timeout=5, message="the new instance was not seen")
    client.agent.service.deregister("web-1")
    # Seen before the next change: both in one round would be told in snapshot order, the departure last.
    wait_until(lambda: len(watcher.alerts) >= 2, timeout=5, message="the old instance's departure was not seen")
    client.agent.check.ttl_pass(new_check)
    wait_until(lambda: len(watcher.alerts) >= 3, timeout=5, message="the hand-over was not seen")
    report = watcher.stop().join()

    assert [(a.kind, a.service_id) for a in watcher.alerts] == [
        ("appeared", "web-2"),
        ("disappeared", "web-1"),
        ("status", "web-2"),
    ]
    assert all(a.expected_by is not None and not a.page for a in watcher.alerts)
    assert slack_standin.messages == []
    assert report.alerts_sent == 0


def test_a_teardown_is_recorded_not_told_though_the_instance_left_before_its_meta_was_read(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    register_ttl(client, "web-1", version="v3")
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.2).start().join()
    window = open_deploy_window(
        client, "web", deploy_run_id="run-down", from_version="v3", to_version="", duration=timedelta(minutes=5)
    )
    assert window.leaving == (f"{consul_standin.node_name}/web-1",)
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=10).start()
    wait_for_rounds(watcher, 1)
    client.agent.service.deregister("web-1")  # as bin/stop does: deregister first, then stop the process
    wait_until(lambda: watcher.alerts, timeout=5, message="the departure was not seen")
    report = watcher.stop().join()

    [left] = watcher.alerts
    assert (left.kind, left.service_id, left.expected_by) == ("disappeared", "web-1", window)
    assert slack_standin.messages == []
    assert (report.alerts_sent, report.alerts_recorded) == (0, 1)


def test_another_deploys_instance_failing_during_a_window_still_pages(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    WatchThread(consul_standin.http_addr, slack_notifier, window=0.2).start().join()
    open_deploy_window(
        client, "web", deploy_run_id="run-v4", from_version="v3", to_version="v4", duration=timedelta(minutes=5)
    )
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=10).start()
    wait_for_rounds(watcher, 1)
    register_ttl(client, "web-9", version="v9", status="critical")  # not this deploy's version
    [message] = slack_standin.wait_for_messages(1, timeout=5)
    watcher.stop().join()
    assert "web: new instance is critical" in message.text
    assert "severity: *critical*" in str(message.blocks)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_flow_loads_blocks_alerts_and_publishes_the_health_table(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    register_ttl(client, "web-1", status="critical")
    register_ttl(client, "web-2")
    client.agent.service.register("noisy", service_id="noisy-1", check={"TTL": "600s", "Status": "critical"})
    ConsulConnection(address=consul_standin.http_addr, timeout_seconds=5).save("health-test-consul", overwrite=True)
    slack_notifier.save("health-test-slack", overwrite=True)

    result = consul_health(
        consul_block="health-test-consul",
        notifier_block="health-test-slack",
        window_seconds=0.5,
        watch_name="Flow Test",
        ignore_services=["nois*"],
    )

    assert result["alerts_sent"] == 1
    [message] = slack_standin.messages
    assert "web: new instance is critical" in message.text

    async def read_artifact() -> Any:
        async with get_client() as prefect:
            return await prefect.read_latest_artifacts()

    artifacts = [a for a in asyncio.run(read_artifact()) if a.key == "consul-health-flow-test"]
    assert artifacts, "the health table artifact was not published"
    table = artifacts[0].data
    assert "web-1" in str(table)
    assert "noisy-1" not in str(table)


def test_threshold_alert_fires_when_due_without_another_consul_change(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    check = register_ttl(client, "web-1")
    config = WatchConfig(thresholds={"web": 1.0})
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=20, config=config).start()
    wait_for_rounds(watcher, 1)
    client.agent.check.ttl_fail(check, "still down")
    store = HealthStateStore(client, "test")

    def seen_but_held_back() -> bool:
        record = store.load().state.instances.get("standin-node/web-1")
        return record is not None and record.observed_status == "critical"

    wait_until(seen_but_held_back, timeout=5, message="the watch never saw the flip")
    assert slack_standin.messages == []  # damped: the change is recorded, not yet announced
    [message] = slack_standin.wait_for_messages(1, timeout=10)
    assert "web is critical" in message.text
    assert watcher.alive(), "woken by the due threshold, not by the end of the window"
    watcher.stop().join()


def test_unreachable_consul_raises_consul_error(slack_notifier: SlackNotifier) -> None:
    client = consul.Consul(host="127.0.0.1", port=1, connections_timeout=1)
    with pytest.raises(ConsulError):
        watch(client, slack_notifier.sender(), WatchConfig(), 1.0)


# --- the persisted state: a versioned schema, checked on read; a CAS that can't adopt another's index -------


def test_state_of_another_schema_is_refused_not_misread() -> None:
    old = json.dumps({"version": 1, "instances": {"n/w": ["web", "n", "w", None, "passing", 0, False, None, None]}})
    with pytest.raises(ConsulError, match="has schema None, but this watch reads schema 3"):
        decode_state(old.encode())
    with pytest.raises(ConsulError, match="breaks schema 2"):
        decode_state(json.dumps({"schema_version": 2, "writer": "w", "instances": {"x": {}}, "outbox": []}).encode())
    with pytest.raises(ConsulError, match="has schema 4, but this watch reads schema 3"):
        decode_state(json.dumps({"schema_version": 4, "writer": "w", "instances": {}, "outbox": []}).encode())


def test_a_state_written_before_damping_is_read_and_its_critical_instances_count_as_paged() -> None:
    row = {"service_name": "web", "node": "n", "service_id": "w", "observed_since": T0.timestamp()}
    before_damping = {
        "schema_version": 2,
        "writer": "old",
        "instances": {
            "n/w": {**row, "alerted_status": "critical", "observed_status": "critical"},
            "n/v": {**row, "service_id": "v", "alerted_status": "passing", "observed_status": "passing"},
        },
        "outbox": [],
    }
    state, _, _, _ = decode_state(json.dumps(before_damping).encode())
    assert state.instances["n/w"].paged, "the watch that wrote it paged every critical transition"
    assert not state.instances["n/v"].paged
    assert state.instances["n/w"].recent_changes == ()
    assert state.instances["n/w"].flapping_since is None
    assert json.loads(encode_state(state))["schema_version"] == 3
    # The old critical instance bounces back to critical: that incident has paged, so nothing pages again.
    config = WatchConfig()
    other = instance(sid="v", node="n")
    bounced, state = evaluate(state, snap(instance(sid="w", node="n"), other), T0 + timedelta(seconds=1), config, {})
    again, _ = evaluate(
        state, snap(instance(sid="w", node="n", status="critical"), other), T0 + timedelta(seconds=2), config, {}
    )
    assert kinds([*bounced, *again]) == [
        ("status (damped)", "critical", "passing"),
        ("status (damped)", "passing", "critical"),
    ]
    assert not any(a.page for a in [*bounced, *again])


def test_state_round_trips_with_named_fields_and_compression() -> None:
    config = WatchConfig()
    many = snap(*(instance(sid=f"web-{n}", status="critical" if n % 3 else "passing") for n in range(3000)))
    _, state = evaluate(WatchState(), many, T0, config, NO_WINDOWS)
    for step, (seconds, snapshot) in enumerate(flips(6, every=0.25)):  # web-1 flaps: its damping is kept too
        flipped = snap(*many.instances.values(), *snapshot.instances.values(), index=100 + step)
        _, state = evaluate(state, flipped, at(seconds), config, NO_WINDOWS)
    assert state.instances["node-1/web-1"].flapping_since is not None
    assert state.instances["node-1/web-1"].recent_changes
    raw = encode_state(state, writer="me")
    assert raw.startswith(b"zlib:")  # large states stay under Consul's value limit
    restored, outbox, since, writer = decode_state(raw)
    assert (restored, outbox, since, writer) == (state, (), None, "me")


def test_a_save_superseded_before_its_read_back_does_not_adopt_the_other_writers_index(
    consul_standin: ConsulStandIn,
) -> None:
    client = CountingClient(consul_standin.http_addr).client
    store = HealthStateStore(client, "race")
    other = HealthStateStore(client, "race")
    original_get = client.kv.get
    raced: list[bool] = []

    def get_after_another_writer(key: str, *args: Any, **kwargs: Any) -> Any:
        # Between our CAS put and our read-back, another writer (who read our write) writes too.
        if not raced and store.key == key:
            raced.append(True)
            mine = other.load()
            assert other.save(mine.state, cas=mine.modify_index).written
        return original_get(key, *args, **kwargs)

    first = store.save(WatchState(), cas=0)
    assert first.written
    client.kv.get = get_after_another_writer  # type: ignore[method-assign]
    second = store.save(WatchState(), cas=first.modify_index or 0)
    assert second.written
    assert second.modify_index is None, "the index read back is the other writer's, not ours"


@pytest.mark.usefixtures("prefect_server")
def test_a_blind_watch_is_told_once_and_its_recovery_too(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    from examples.local_env import free_port

    name = f"blind-{consul_standin.node_name[:4]}-{free_port()}"
    ConsulConnection(address=f"http://127.0.0.1:{free_port()}", timeout_seconds=1).save("blind-consul", overwrite=True)
    ConsulConnection(address=consul_standin.http_addr, timeout_seconds=5).save("seeing-consul", overwrite=True)
    slack_notifier.save("blind-slack", overwrite=True)

    for _ in range(2):  # Consul stays unreachable over two runs: operators are told once
        with pytest.raises(ConsulError):
            consul_health(
                consul_block="blind-consul", notifier_block="blind-slack", window_seconds=0.2, watch_name=name
            )
    blind = [m for m in slack_standin.messages if "is blind" in m.text]
    assert len(blind) == 1
    assert "severity: *critical*" in str(blind[0].blocks)

    consul_health(consul_block="seeing-consul", notifier_block="blind-slack", window_seconds=0.2, watch_name=name)
    assert [m for m in slack_standin.messages if "sees again" in m.text]
