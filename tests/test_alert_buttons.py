"""A health alert's Acknowledge and Silence buttons, clicked in Slack (icd/interactions/alerts.py).

Which alerts carry which buttons is a table over the renderer. End to end, the Slack stand-in holds an alert
posted through the real sender, and plays the people who click its buttons: each click is signed and sent to
icd-inbound's ``/slack/interactions`` (served by uvicorn), which acts on the silence book in the Consul
stand-in, tells the channel, and tells the clicker through the click's ``response_url``. No Prefect server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import consul
import pytest
import uvicorn
from slack_sdk import WebClient

from cli.inbound import SlackEndpoint, create_app
from examples.local_env import free_port
from icd.config import PipelineConfig
from icd.health.engine import Alert, InstanceRecord, WatchState
from icd.health.render import alert_notification
from icd.health.silence_store import SilenceStore
from icd.health.silences import SilenceBook
from icd.health.snapshot import FailingCheck
from icd.health.state import HealthStateStore
from icd.health.windows import DeployWindow
from icd.interactions.alerts import AlertButtons
from icd.interactions.approvals import ApprovalButtons
from icd.interactions.handler import SlackInteractions
from icd.interactions.signing import RequestVerifier
from icd.notify.slack import SlackSender, render_slack_message
from standins.slack import TEAM_ID, EphemeralMessage, ReceivedMessage, SlackStandIn
from tests.waiting import wait_until

SIGNING_SECRET = "alert-buttons-signing-secret"  # a test's fake secret
WATCH = "edge"  # not the default watch: the button must carry its name for the click to find the incident
INSTANCE = "node-1/web-1"
HTTP = FailingCheck("service:web-1", "http", "critical", "connection refused")
T0 = datetime(2026, 12, 5, 12, 0, 0, tzinfo=UTC)
CAROL = f"slack:{TEAM_ID}/U0CAROL (Carol)"
DAVE = f"slack:{TEAM_ID}/U0DAVE (Dave)"
ALL_BUTTONS = ["ack", "silence-1h", "silence-4h", "silence-recovered"]


def failing_alert(**changes: object) -> Alert:
    alert = Alert(
        kind="status",
        service_name="web",
        service_id="web-1",
        node="node-1",
        previous_status="passing",
        status="critical",
        failing_checks=(HTTP,),
        at=T0,
        index=7,
        page=True,
    )
    return replace(alert, **changes)  # type: ignore[arg-type]  # the fields of Alert


# --- which alerts carry which buttons -------------------------------------------------------------------

WINDOW = DeployWindow("run-1", "v1", "v2", T0 + timedelta(minutes=10))


@pytest.mark.parametrize(
    ("alert", "buttons"),
    [
        pytest.param(failing_alert(), ALL_BUTTONS, id="critical"),
        pytest.param(failing_alert(status="warning", page=False), ALL_BUTTONS, id="warning"),
        pytest.param(failing_alert(kind="appeared", previous_status=None), ALL_BUTTONS, id="new-and-failing"),
        pytest.param(failing_alert(kind="reminder", page=False), ALL_BUTTONS, id="reminder"),
        pytest.param(failing_alert(kind="flapping"), ALL_BUTTONS, id="flapping"),
        pytest.param(
            failing_alert(kind="reminder", acknowledged_by=CAROL), ALL_BUTTONS[1:], id="taken-has-nothing-to-take"
        ),
        pytest.param(failing_alert(previous_status="critical", status="passing", failing_checks=()), [], id="recovery"),
        pytest.param(failing_alert(kind="settled", status="passing", failing_checks=()), [], id="settled-passing"),
        pytest.param(failing_alert(kind="disappeared"), [], id="instance-left"),
        pytest.param(failing_alert(kind="maintenance_on", status="maintenance"), [], id="maintenance"),
        pytest.param(failing_alert(expected_by=WINDOW), [], id="expected-during-a-deploy"),
    ],
)
def test_a_failing_alert_carries_acknowledge_and_silence_buttons_and_a_recovery_none(
    alert: Alert, buttons: list[str]
) -> None:
    note = alert_notification(alert, watch=WATCH)
    assert [a.id for a in note.actions] == buttons
    _, blocks = render_slack_message(note)
    shown = [e["action_id"] for b in blocks if b["type"] == "actions" for e in b["elements"]]
    assert shown == [f"icd.{b}" for b in buttons]
    for action in note.actions:
        assert json.loads(action.value) == {"instance": INSTANCE, "service": "web", "node": "node-1", "watch": WATCH}
        # A silence is asked "are you sure?" first (a tap on a phone is easily made); taking the incident is not.
        assert (action.confirm is not None) is action.id.startswith("silence-"), action


def test_an_alert_of_a_watch_the_renderer_does_not_know_names_no_watch() -> None:
    [ack, *_] = alert_notification(failing_alert()).actions
    assert json.loads(ack.value) == {"instance": INSTANCE, "service": "web", "node": "node-1"}


# --- clicks, end to end -----------------------------------------------------------------------------------


@dataclass
class Console:
    """The alert as the channel shows it, and who clicks on it."""

    slack: SlackStandIn
    consul: consul.Consul
    alert: ReceivedMessage

    def click(self, action: str, user: str) -> None:
        result = self.slack.click(self.alert.ts, f"icd.{action}", user)
        assert result.status == 200, result  # Slack shows the clicker an error without a 200 within 3 s
        assert result.elapsed_seconds < 3, result

    def told(self, user: str, containing: str, *, after: int = 0) -> EphemeralMessage:
        found = wait_until(
            lambda: next(
                (m for m in self.slack.ephemeral_messages[after:] if m.user == user and containing in m.text), None
            ),
            timeout=10,
            message=f"{user} was not told {containing!r}; told: {[m.text for m in self.slack.ephemeral_messages]}",
        )
        assert found is not None  # wait_until returns only a truthy value
        return found

    def channel_told(self, title_part: str) -> ReceivedMessage:
        found = wait_until(
            lambda: next((m for m in self.slack.top_level() if title_part in m.text), None),
            timeout=10,
            message=f"the channel was not told {title_part!r}: {[m.text for m in self.slack.top_level()]}",
        )
        assert found is not None  # wait_until returns only a truthy value
        return found

    def book(self) -> SilenceBook:
        return SilenceStore(self.consul).load().book


def _no_pipeline_config() -> PipelineConfig:
    raise AssertionError("a health alert's button read the pipeline's config")


def _failing_in_the_watch(client: consul.Consul, status: str = "critical") -> None:
    """The watch's state, as the watch ``WATCH`` wrote it: web-1 on node-1 is ``status`` and was told so."""
    record = InstanceRecord("web", "node-1", "web-1", status, status, datetime.now(UTC) - timedelta(minutes=3))
    states = HealthStateStore(client, WATCH)
    assert states.save(WatchState(instances={INSTANCE: record}), cas=states.load().modify_index).written


@pytest.fixture
def console(slack_standin: SlackStandIn, consul_client: consul.Consul) -> Iterator[Console]:
    slack_standin.add_user("U0CAROL", "carol", "Carol")
    slack_standin.add_user("U0DAVE", "dave", "Dave")
    web = WebClient(token=slack_standin.token, base_url=slack_standin.api_url)
    sender = SlackSender(web, "#ops", api_url=slack_standin.api_url, buttons=True)
    handler = SlackInteractions(
        ApprovalButtons(slack=web, sender=sender, config=_no_pipeline_config),
        AlertButtons(consul_client=lambda: consul_client, sender=sender, slack=web),
    )
    app = create_app(
        secret=lambda: b"no GitHub here",
        slack=SlackEndpoint(RequestVerifier(SIGNING_SECRET), handler),
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, name="icd-inbound", daemon=True)
    serving.start()
    try:
        wait_until(lambda: server.started, timeout=10, message="icd-inbound did not start")
        slack_standin.set_interactivity(f"http://127.0.0.1:{port}/slack/interactions", SIGNING_SECRET)
        sender.send(alert_notification(failing_alert(at=datetime.now(UTC)), watch=WATCH))
        [alert] = slack_standin.wait_for_messages(1)
        yield Console(slack_standin, consul_client, alert)
    finally:
        server.should_exit = True
        serving.join(timeout=10)


def test_acknowledge_takes_the_incident_once_tells_the_channel_and_the_next_person_who_has_it(
    console: Console,
) -> None:
    _failing_in_the_watch(console.consul)

    console.click("ack", "U0CAROL")
    console.told("U0CAROL", "Taken: web on node-1 is yours")
    ack = console.book().acknowledgements[INSTANCE]
    # The watch that alerted ends it with the incident; the record names the proven identity and the person.
    assert (ack.by, ack.service, ack.watch) == (CAROL, "web", WATCH)
    console.channel_told(f"web on node-1: taken by {CAROL}")

    told = len(console.slack.ephemeral_messages)
    console.click("ack", "U0DAVE")
    console.told("U0DAVE", f"Already taken by {CAROL}", after=told)
    console.click("ack", "U0CAROL")
    console.told("U0CAROL", "You took web on node-1 already", after=told)
    assert console.book().acknowledged_by(INSTANCE) == CAROL
    assert len([m for m in console.slack.top_level() if "taken by" in m.text]) == 1, "the channel was told twice"


def test_silence_one_hour_silences_the_instance_for_an_hour_once_and_until_recovered_until_it_passes(
    console: Console,
) -> None:
    _failing_in_the_watch(console.consul)

    clicked = datetime.now(UTC)
    console.click("silence-1h", "U0CAROL")
    told = console.told("U0CAROL", "Silenced until ")
    [hour] = console.book().current(datetime.now(UTC))
    assert (hour.service, hour.node, hour.check, hour.created_by, hour.reason) == (
        "web",
        "node-1",
        "*",
        CAROL,
        "silenced from Slack",
    )
    assert hour.ends_at is not None
    assert clicked + timedelta(minutes=59) < hour.ends_at < datetime.now(UTC) + timedelta(hours=1)
    assert hour.id in told.text
    # What the watch asks of every alert: this instance's failures page no one now; another node's still do.
    assert console.book().silencing("web", "node-1", (HTTP,), datetime.now(UTC)) == hour.id
    assert console.book().silencing("web", "node-2", (HTTP,), datetime.now(UTC)) is None
    console.channel_told(f"Silence {hour.id} on web starts now")

    # A second person on the same button a moment later: the silence is there already, nothing is added.
    before = len(console.slack.ephemeral_messages)
    console.click("silence-1h", "U0DAVE")
    console.told("U0DAVE", "Already silenced until", after=before)
    assert [s.id for s in console.book().silences] == [hour.id]

    console.click("silence-recovered", "U0DAVE")
    console.told("U0DAVE", "Silenced until it recovers", after=before)
    recovered = next(s for s in console.book().silences if s.id != hour.id)
    assert (recovered.until_recovered, recovered.watch, recovered.created_by) == (True, WATCH, DAVE)
    console.channel_told(f"Silence {recovered.id} on web starts now")


def test_on_an_instance_that_passes_again_nothing_is_taken_or_silenced_until_it_recovers(console: Console) -> None:
    _failing_in_the_watch(console.consul, status="passing")

    console.click("ack", "U0CAROL")
    console.told("U0CAROL", "not in an incident")
    console.click("silence-recovered", "U0CAROL")
    console.told("U0CAROL", "Nothing silenced: web on node-1 is passing now")
    assert console.book() == SilenceBook()
    assert console.slack.top_level() == [console.alert], "the channel was told of a change that was not made"
