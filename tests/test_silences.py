"""Silences and acknowledgements: matching and expiry as tables, the engine's paging decision, the book in
Consul KV (the stand-in, over HTTP), ``icd-silence``, and the watch against the Consul and Slack stand-ins."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import consul
import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent
from prefect.states import Cancelling

from blocks.notifier import SlackNotifier
from cli.silence import main as icd_silence
from cli.silence import parse_duration
from examples.local_env import api_client
from icd.errors import ConsulError, InvalidInputError
from icd.health.config import NO_DAMPING, WatchConfig
from icd.health.engine import InstanceRecord, WatchState, evaluate, next_wakeup
from icd.health.render import alert_notification
from icd.health.silence_store import SILENCES_KEY, SilenceStore
from icd.health.silences import (
    RECOVERED,
    Silence,
    SilenceBook,
    acknowledge,
    added_notification,
    close,
    due,
    expire,
    new_silence,
)
from icd.health.snapshot import FailingCheck
from icd.health.state import HealthStateStore
from icd.notify.slack import render_slack_message
from standins.consul import ConsulStandIn
from standins.slack import SlackStandIn
from tests.plugins.deploy_env import DeployEnv
from tests.test_health_watch import WatchThread, instance, register_ttl, snap, wait_for_rounds
from tests.waiting import wait_until

T0 = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)
HTTP = FailingCheck("service:web-1", "http", "critical", "refused")
DISK = FailingCheck("disk", "disk space", "critical", "full")


def silence(
    service: str = "web",
    node: str = "*",
    check: str = "*",
    *,
    start: float = 0,
    minutes: float | None = 60,
    by: str = "alice",
) -> Silence:
    return new_silence(
        service=service,
        node=node,
        check=check,
        starts_at=T0 + timedelta(seconds=start),
        ends_at=None if minutes is None else T0 + timedelta(seconds=start, minutes=minutes),
        by=by,
        why="database migration",
        now=T0,
    )


def book(*silences: Silence) -> SilenceBook:
    return SilenceBook(silences=silences)


def record(status: str = "critical", *, alerted: str | None = None, service: str = "web") -> InstanceRecord:
    return InstanceRecord(
        service_name=service,
        node="node-1",
        service_id=f"{service}-1",
        alerted_status=alerted or status,
        observed_status=status,
        observed_since=T0,
    )


# --- matching and expiry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("made", "service", "node", "failing", "matches"),
    [
        pytest.param(dict(service="web"), "web", "node-1", (HTTP,), True, id="exact-service"),
        pytest.param(dict(service="web"), "webapp", "node-1", (HTTP,), False, id="exact-is-not-a-prefix"),
        pytest.param(dict(service="web*"), "webapp", "node-1", (HTTP,), True, id="service-glob"),
        pytest.param(dict(service="web", node="node-2"), "web", "node-1", (HTTP,), False, id="other-node"),
        pytest.param(dict(service="web", node="node-?"), "web", "node-1", (HTTP,), True, id="node-glob"),
        pytest.param(dict(service="web", check="http"), "web", "node-1", (HTTP,), True, id="check-by-name"),
        pytest.param(dict(service="web", check="service:*"), "web", "node-1", (HTTP,), True, id="check-id-glob"),
        pytest.param(dict(service="web", check="http"), "web", "node-1", (HTTP, DISK), False, id="another-check-pages"),
        pytest.param(dict(service="web", check="http"), "web", "node-1", (), True, id="a-recovery-by-instance"),
    ],
)
def test_a_silence_matches_by_service_node_and_every_failing_check(
    made: dict[str, str], service: str, node: str, failing: tuple[FailingCheck, ...], matches: bool
) -> None:
    made_silence = silence(**made)  # type: ignore[arg-type]  # the keyword arguments of silence()
    assert made_silence.covers(service, node, failing) is matches
    found = book(made_silence).silencing(service, node, failing, T0 + timedelta(minutes=1))
    assert found == (made_silence.id if matches else None)


def test_a_silence_is_pending_then_active_then_ended_and_only_active_silences() -> None:
    later = silence(start=600, minutes=30)
    assert [later.state(T0 + timedelta(seconds=s)) for s in (0, 600, 2399, 2400)] == [
        "pending",
        "active",
        "active",
        "ended",
    ]
    kept = book(later)
    assert kept.silencing("web", "n", (HTTP,), T0) is None
    assert kept.silencing("web", "n", (HTTP,), T0 + timedelta(seconds=700)) == later.id
    assert kept.silencing("web", "n", (HTTP,), T0 + timedelta(seconds=2400)) is None
    assert kept.current(T0) == [later]
    assert kept.current(T0 + timedelta(hours=1)) == []


def test_expiring_by_hand_ends_it_now_once_and_names_who() -> None:
    made = silence()
    expired, outcome = expire(book(made), made.id, by="bob", now=T0 + timedelta(minutes=5))
    assert outcome == "expired"
    ended = expired.find(made.id)
    assert ended is not None
    assert ended.ended_by == "bob"
    assert ended.end_told
    assert ended.state(T0 + timedelta(minutes=5)) == "ended"
    assert expire(expired, made.id, by="bob", now=T0 + timedelta(minutes=6))[1] == "already ended"
    assert expire(expired, "nope", by="bob", now=T0)[1] == "unknown"


def test_a_timed_silence_is_closed_once_when_its_time_is_up() -> None:
    made = silence(minutes=10)
    records = {"node-1/web-1": record()}
    assert not due(book(made), records, T0 + timedelta(minutes=9), watch="default")
    assert due(book(made), records, T0 + timedelta(minutes=10), watch="default")
    closed, endings = close(book(made), records, T0 + timedelta(minutes=10), watch="default")
    assert [(e.silence.id, e.why) for e in endings] == [(made.id, "time")]
    assert not due(closed, records, T0 + timedelta(minutes=11), watch="default"), "told once"
    assert closed.next_end() is None


def test_a_silence_until_recovered_ends_when_every_matched_instance_is_told_passing() -> None:
    made = silence(minutes=None)
    failing = {"node-1/web-1": record(), "node-1/db-1": record(service="db")}
    assert not due(book(made), failing, T0 + timedelta(hours=5), watch="default")
    held = {**failing, "node-1/web-1": record("passing", alerted="critical")}  # a recovery still in its hold
    assert not due(book(made), held, T0 + timedelta(hours=5), watch="default")
    recovered = {**failing, "node-1/web-1": record("passing")}  # db still fails: it is not matched
    assert not due(book(made), recovered, T0 + timedelta(hours=5), watch="other"), "only its own watch ends it"
    closed, endings = close(book(made), recovered, T0 + timedelta(hours=5), watch="default")
    assert [(e.silence.id, e.why) for e in endings] == [(made.id, "recovered")]
    ended = closed.find(made.id)
    assert ended is not None
    assert ended.ended_by == RECOVERED
    assert closed.silencing("web", "node-1", (HTTP,), T0 + timedelta(hours=6)) is None


def test_an_acknowledgement_takes_one_incident_and_ends_with_it() -> None:
    records = {"node-1/web-1": record(), "node-1/ok-1": record("passing", service="ok")}
    taken, outcome = acknowledge(SilenceBook(), records, "node-1/web-1", by=" alice ", why="on it", now=T0)
    assert outcome == "taken"
    assert taken.acknowledged_by("node-1/web-1") == "alice"
    assert acknowledge(taken, records, "node-1/web-1", by="alice", why="", now=T0)[1] == "already yours"
    assert acknowledge(taken, records, "node-1/web-1", by="bob", why="", now=T0)[1] == "taken by another"
    assert acknowledge(taken, records, "node-1/ok-1", by="bob", why="", now=T0)[1] == "not in an incident"
    assert acknowledge(taken, records, "node-9/x", by="bob", why="", now=T0)[1] == "unknown instance"
    assert not due(taken, records, T0, watch="default")
    assert not due(taken, {}, T0, watch="other"), "a watch that does not see the instance leaves it alone"
    assert due(taken, {}, T0, watch="default"), "the instance left: its incident is over"
    over = {**records, "node-1/web-1": record("passing")}
    closed, endings = close(taken, over, T0, watch="default")
    assert endings == []
    assert closed.acknowledgements == {}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param(dict(service="Web"), "invalid service name", id="service-breaks-the-name-rule"),
        pytest.param(dict(service="web/../x*"), "invalid service matcher", id="service-glob-with-a-slash"),
        pytest.param(dict(node="node 1"), "invalid node matcher", id="node-with-a-space"),
        pytest.param(dict(check="http\nx"), "invalid check matcher", id="check-on-two-lines"),
        pytest.param(dict(by="\u200b "), "--by must name who you are", id="invisible-name"),
        pytest.param(dict(why="   "), "--why must say why", id="blank-reason"),
        pytest.param(dict(ends_at=T0), "not in the future", id="ends-now"),
        pytest.param(dict(ends_at=T0 + timedelta(days=31)), "at most 30 days", id="too-long"),
        pytest.param(dict(ends_at=None, starts_at=T0 + timedelta(hours=1)), "starts now", id="recovery-later"),
        pytest.param(dict(ends_at=datetime(2026, 12, 6)), "time zone", id="naive-end"),
    ],
)
def test_a_bad_silence_is_refused_with_the_rule(changes: dict[str, object], message: str) -> None:
    given: dict[str, object] = dict(
        service="web", node="*", check="*", starts_at=T0, ends_at=T0 + timedelta(hours=1), by="alice", why="x"
    )
    with pytest.raises(InvalidInputError, match=message):
        new_silence(**given | changes, now=T0)  # type: ignore[arg-type]  # keyword arguments of new_silence


def test_durations_read_as_operators_write_them() -> None:
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("2d") == timedelta(days=2)
    for bad in ("1 h", "h", "-1h", "1h+", "0m"):
        with pytest.raises(InvalidInputError):
            parse_duration(bad)


# --- the engine: silenced alerts are recorded and page no one; acknowledged incidents are not reminded ---


def test_a_silenced_failure_is_recorded_not_sent_and_pages_once_the_silence_ended() -> None:
    config = NO_DAMPING
    hush = book(silence(minutes=10))
    _, state = evaluate(WatchState(), snap(instance()), T0, config, {}, hush=hush)
    [failed], state = evaluate(
        state, snap(instance(status="critical")), T0 + timedelta(minutes=1), config, {}, hush=hush
    )
    assert failed.silenced_by == hush.silences[0].id
    assert not failed.page
    assert not failed.announced
    # Still failing when the silence ends: the next transition of the incident pages, as it never paged.
    after = T0 + timedelta(minutes=11)
    [warned], state = evaluate(state, snap(instance(status="warning")), after, config, {}, hush=hush)
    assert warned.silenced_by is None
    assert warned.announced
    assert not warned.page
    [again], _ = evaluate(state, snap(instance(status="critical")), after + timedelta(seconds=1), config, {}, hush=hush)
    assert again.page
    assert again.announced


def test_an_acknowledged_incident_gets_no_reminders_and_its_alerts_name_who_took_it() -> None:
    config = WatchConfig(reminder_interval=timedelta(minutes=30), recovery_hold=timedelta(0))
    _, state = evaluate(WatchState(), snap(instance()), T0, config, {})
    [failed], state = evaluate(state, snap(instance(status="critical")), T0 + timedelta(seconds=1), config, {})
    assert failed.page
    taken, _ = acknowledge(SilenceBook(), state.instances, "node-1/web-1", by="alice", why="", now=T0)
    late = T0 + timedelta(minutes=31)
    [reminder], _ = evaluate(state, snap(instance(status="critical")), late, config, {})
    assert reminder.kind == "reminder"
    assert evaluate(state, snap(instance(status="critical")), late, config, {}, hush=taken)[0] == []
    assert next_wakeup(state, config) is not None
    assert next_wakeup(state, config, taken.acknowledgements) is None
    [recovered], _ = evaluate(state, snap(instance()), late, config, {}, hush=taken)
    assert recovered.acknowledged_by == "alice"
    assert alert_notification(recovered).fields["Taken by"] == "alice"


# --- the book in Consul KV ------------------------------------------------------------------------------


def test_the_book_is_swapped_with_cas_and_a_lost_race_is_applied_again(consul_client: consul.Consul) -> None:
    store = SilenceStore(consul_client)
    assert store.load().book == SilenceBook()
    first, second = silence(), silence(service="db")
    store.change(lambda current: (current.with_silence(first, T0), None))
    stale = store.load()
    store.change(lambda current: (current.with_silence(second, T0), None))
    assert not store.save(stale.book, cas=stale.modify_index), "a write against an old index loses"
    races = iter([True])

    def edit(current: SilenceBook) -> tuple[SilenceBook, str]:
        if next(races, False):  # another writer slips in between this read and its write
            consul_client.kv.put(SILENCES_KEY, current.model_dump_json(), cas=store.load().modify_index)
        return expire(current, first.id, by="bob", now=T0 + timedelta(minutes=1))

    _, outcome = store.change(edit)
    assert outcome == "expired"
    ids = {s.id: s.ended_by for s in store.load().book.silences}
    assert ids == {first.id: "bob", second.id: None}


def test_a_broken_book_is_refused_by_name_not_misread(consul_client: consul.Consul) -> None:
    consul_client.kv.put(SILENCES_KEY, json.dumps({"schema_version": 1, "silences": [{"id": 1}]}))
    with pytest.raises(ConsulError, match="is not a silence book"):
        SilenceStore(consul_client).load()
    consul_client.kv.put(SILENCES_KEY, json.dumps({"schema_version": 9}))
    with pytest.raises(ConsulError, match="has schema 9"):
        SilenceStore(consul_client).load()


# --- icd-silence ------------------------------------------------------------------------------------------


def test_icd_silence_adds_lists_expires_and_acknowledges(
    consul_standin: ConsulStandIn, consul_client: consul.Consul, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--consul-addr", consul_standin.http_addr, "--quiet", "--watch", "cli"]
    assert (
        icd_silence([*base, "add", "--service", "web-*", "--for", "1h", "--by", "alice", "--why", "<!channel> x"]) == 0
    )
    made_id = capsys.readouterr().out.split("\t")[0]
    assert icd_silence([*base, "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["state"], listed["service"], listed["created_by"]) == (
        made_id,
        "active",
        "web-*",
        "alice",
    )
    assert listed["reason"] == "<!channel> x"  # kept as typed; escaped where it is shown (Slack rendering)
    assert icd_silence([*base, "add", "--service", "web", "--until-recovered", "--by", "a", "--why", "x"]) == 1
    assert "nothing matching service=web node=* check=* is failing now" in capsys.readouterr().err
    assert icd_silence([*base, "add", "--service", "Web", "--for", "1h", "--by", "a", "--why", "x"]) == 1
    assert "invalid service name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        icd_silence([*base, "add", "--service", "web", "--for", "soon", "--by", "a", "--why", "x"])
    assert "like 30m, 1h" in capsys.readouterr().err

    assert icd_silence([*base, "expire", made_id, "--by", "bob"]) == 0
    assert f"{made_id}\texpired by bob" in capsys.readouterr().out
    assert icd_silence([*base, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert icd_silence([*base, "expire", "deadbeef", "--by", "bob"]) == 1

    states = HealthStateStore(consul_client, "cli")
    failing = WatchState(instances={"node-1/web-1": record()})
    assert states.save(failing, cas=states.load().modify_index).written
    assert icd_silence([*base, "ack", "node-1/web-1", "--by", "carol", "--why", "looking"]) == 0
    assert "node-1/web-1\ttaken by carol" in capsys.readouterr().out
    assert icd_silence([*base, "ack", "node-1/web-1", "--by", "dave"]) == 1
    assert "already taken by carol" in capsys.readouterr().err
    assert icd_silence([*base, "add", "--service", "web", "--until-recovered", "--by", "a", "--why", "x"]) == 0
    assert SilenceStore(consul_client).load().book.acknowledged_by("node-1/web-1") == "carol"


# --- the watch, against the Consul and Slack stand-ins ----------------------------------------------------


def test_the_watch_records_a_silenced_failure_tells_the_silences_end_and_then_pages_again(
    consul_standin: ConsulStandIn, slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    client = consul.Consul(*consul_standin.address.rsplit(":", 1))
    check = register_ttl(client, "web-1")
    now = datetime.now(UTC)
    quiet = new_silence(
        service="web", starts_at=now, ends_at=now + timedelta(seconds=4), by="alice", why="migration", now=now
    )
    SilenceStore(client).change(lambda current: (current.with_silence(quiet, now), None))
    watcher = WatchThread(consul_standin.http_addr, slack_notifier, window=30, config=NO_DAMPING).start()
    wait_for_rounds(watcher, 1)
    client.agent.check.ttl_fail(check, "connection refused")
    wait_until(lambda: watcher.alerts, timeout=10, message="the failure was not seen")
    [silenced] = watcher.alerts
    assert (silenced.status, silenced.silenced_by, silenced.page) == ("critical", quiet.id, False)
    ended = wait_until(
        lambda: [m for m in slack_standin.messages if f"Silence {quiet.id}" in m.text],
        timeout=15,
        message="the silence's end was not told",
    )
    assert "its time is up" in ended[0].text
    assert not [m for m in slack_standin.messages if "web is critical" in m.text], "a silenced failure is not sent"
    assert SilenceStore(client).load().book.next_end() is None, "its end is recorded as told"

    client.agent.check.ttl_pass(check)
    # The watch must see the recovery first: a pass and a fail inside one blocking query read as no change.
    wait_until(
        lambda: [a for a in watcher.alerts if a.status == "passing"], timeout=10, message="the recovery was not seen"
    )
    client.agent.check.ttl_fail(check, "refused again")
    paged = wait_until(
        lambda: [a for a in watcher.alerts if a.page], timeout=10, message="the next failure did not page"
    )
    assert paged[0].silenced_by is None
    wait_until(
        lambda: [m for m in slack_standin.messages if "web is critical" in m.text],
        timeout=10,
        message="the next failure was not sent",
    )
    watcher.stop().join()


# --- end to end: the deployed consul-health flow, icd-silence through the blocks, the paging automation ----


def _transition_events(service: str) -> list[ReceivedEvent]:
    page = api_client().read_events(
        filter=EventFilter(
            event=EventNameFilter(name=["icd.health.critical", "icd.health.passing"]),
            resource=EventResourceFilter(labels={"icd.service": [service]}),  # type: ignore[arg-type]
        ),
        limit=50,
    )
    return list(page.events)


def _pages_about(env: DeployEnv, service: str) -> list[dict[str, Any]]:
    return [post for post in env.receiver.posts if service in json.dumps(post)]


def _silences_table() -> str:
    artifacts = api_client().read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["icd-silences"]))
    )
    latest = max(artifacts, key=lambda artifact: artifact.created or datetime.min.replace(tzinfo=UTC))
    return str(latest.data)


@pytest.mark.slow
def test_a_silenced_failure_is_an_event_that_pages_no_one_until_the_silence_is_expired(
    deploy_env: DeployEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = deploy_env
    tag = uuid.uuid4().hex[:6]
    service, sentinel = f"quiet{tag}", f"barrier{tag}"
    host, port = env.consul.address.rsplit(":", 1)
    agent = consul.Consul(host=host, port=int(port))
    for name in (service, sentinel):
        agent.agent.service.register(name, service_id=f"{name}-1", check={"CheckID": f"ttl-{name}", "TTL": "600s"})
        agent.agent.check.ttl_pass(f"ttl-{name}")
    watch_name = f"silences-{tag}"
    parameters = {"window_seconds": 300, "watch_name": watch_name, "recovery_hold_seconds": 0, "flap_changes": 0}
    watch = cast(FlowRun, run_deployment("consul-health/consul-health", parameters=parameters, timeout=0))
    env.wait_for(watch.id, states={"RUNNING"})
    instance_key = f"{env.consul.node_name}/{service}-1"

    def observed(status: str) -> Callable[[], bool]:
        def seen() -> bool:
            record = HealthStateStore(agent, watch_name).load().state.instances.get(instance_key)
            return record is not None and record.observed_status == status

        return seen

    def slack_about(*words: str) -> list[str]:
        told = [f"{m.text} {m.blocks}" for m in env.slack.messages]
        return [text for text in told if all(word in text for word in words)]

    wait_until(observed("passing"), timeout=60, message="the watch never read its baseline")
    cli = ["--watch", watch_name]
    assert icd_silence([*cli, "add", "--service", service, "--for", "4h", "--by", "alice", "--why", "migration"]) == 0
    added = capsys.readouterr()
    assert added.err == "", "announced and shown in the UI"
    silence_id = added.out.split("\t")[0]
    wait_until(lambda: slack_about(f"Silence {silence_id}", "starts now"), timeout=30, message="the silence untold")
    assert silence_id in _silences_table()

    agent.agent.check.ttl_fail(f"ttl-{service}", "connection refused")
    [silenced] = wait_until(lambda: _transition_events(service), timeout=60, message="the silenced failure unrecorded")
    assert silenced.event == "icd.health.critical"
    assert silenced.resource["icd.silenced"] == silence_id
    assert silenced.resource["icd.page"] == "false"
    assert silenced.payload["announced"] is False
    # A later failure of another service pages: once its page is in, the automation has judged the silenced
    # event before it, so "no page" below is final.
    agent.agent.check.ttl_fail(f"ttl-{sentinel}", "the barrier")
    wait_until(lambda: _pages_about(env, sentinel), timeout=60, message="the barrier's page never came")
    assert _pages_about(env, service) == []
    assert slack_about(f"{service} is critical") == [], "a silenced failure is not sent to Slack"

    assert icd_silence([*cli, "ack", instance_key, "--by", "carol", "--why", "looking"]) == 0
    wait_until(lambda: slack_about("taken by carol"), timeout=30, message="the acknowledgement untold")
    assert icd_silence([*cli, "expire", silence_id, "--by", "bob"]) == 0
    wait_until(lambda: slack_about(f"Silence {silence_id}", "expired by bob"), timeout=30, message="expiry untold")
    assert silence_id not in _silences_table()

    agent.agent.check.ttl_pass(f"ttl-{service}")
    recovered = wait_until(
        lambda: slack_about(f"{service} is recovered"), timeout=60, message="the recovery was not told"
    )
    assert "Taken by" in recovered[0], "the incident's next message shows who took it"
    assert "carol" in recovered[0]
    agent.agent.check.ttl_fail(f"ttl-{service}", "refused again")
    wait_until(lambda: _pages_about(env, service), timeout=60, message="the failure after the expiry did not page")
    wait_until(lambda: slack_about(f"{service} is critical"), timeout=30, message="it was not sent to Slack")
    events = wait_until(
        lambda: [e for e in _transition_events(service) if e.resource["icd.page"] == "true"],
        timeout=60,
        message="the paging event is missing",
    )
    assert "icd.silenced" not in events[0].resource
    assert "acknowledged_by" not in events[0].payload, "the acknowledgement ended with its incident"

    api_client().set_flow_run_state(watch.id, Cancelling(), force=True)
    env.wait_for(watch.id, states={"CANCELLED"}, timeout=120)


def test_operator_text_in_a_silence_notice_is_escaped_for_slack() -> None:
    made = new_silence(
        service="web",
        starts_at=T0,
        ends_at=T0 + timedelta(hours=1),
        by="<!channel>",
        why="see <http://evil|docs> & <!here>",
        now=T0,
    )
    text, blocks = render_slack_message(added_notification(made, T0))
    shown = f"{text} {json.dumps(blocks)}"
    assert "<!channel>" not in shown
    assert "<!here>" not in shown
    assert "<http://evil|docs>" not in shown
    assert "&lt;!here&gt;" in shown
