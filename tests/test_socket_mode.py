"""Interactions over Socket Mode: slack_sdk's builtin client against the Socket Mode stand-in, over real HTTP
(``apps.connections.open``) and a real WebSocket. Fast tier: no Prefect."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest

from examples.local_env import free_port
from icd.errors import NotificationError, TransientNotificationError
from icd.interactions.reply import Reply
from icd.interactions.socket_mode import run_socket_mode
from standins.slack_socket import SlackSocketStandIn
from tests.waiting import wait_until

APP_TOKEN = "xapp-1-A000TEST-1-socketmodetestsecret"
test_logger = logging.getLogger("tests.socket_mode")

APPROVE_CLICK: dict[str, Any] = {
    "type": "block_actions",
    "user": {"id": "U000OPS", "username": "ops"},
    "container": {"type": "message", "message_ts": "1700000000.000100", "channel_id": "C000OPS"},
    "actions": [{"type": "button", "action_id": "approve", "value": "run-1", "action_ts": "1700000001.000001"}],
}
REJECT_SUBMISSION: dict[str, Any] = {
    "type": "view_submission",
    "user": {"id": "U000OPS", "username": "ops"},
    "view": {
        "id": "V000REJECT",
        "type": "modal",
        "callback_id": "reject",
        "private_metadata": "run-1",
        "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": ""}}}},
    },
}


class RecordingHandler:
    """An InteractionHandler that records each payload and answers with ``decide(payload)``."""

    def __init__(self, decide: Callable[[Mapping[str, Any]], Reply]) -> None:
        self.decide = decide
        self.payloads: list[dict[str, Any]] = []

    def receive(self, payload: Mapping[str, Any]) -> Reply:
        self.payloads.append(dict(payload))
        return self.decide(payload)


@pytest.fixture
def standin() -> Iterator[SlackSocketStandIn]:
    with SlackSocketStandIn(APP_TOKEN) as socket_standin:
        yield socket_standin


@contextmanager
def socket_mode(handler: RecordingHandler, standin: SlackSocketStandIn) -> Iterator[None]:
    """``run_socket_mode`` in a thread, connected to the stand-in; stopped (and its error raised) on exit."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            run_socket_mode(handler, app_token=APP_TOKEN, api_url=standin.api_url, stop=stop, logger=test_logger)
        except BaseException as exc:  # noqa: BLE001  # handed to the test thread, which raises it
            failures.append(exc)

    thread = threading.Thread(target=run, name="socket-mode-under-test")
    thread.start()
    try:
        standin.wait_for_connection()
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "run_socket_mode did not return after stop"
    if failures:
        raise failures[0]


def test_an_interaction_is_acknowledged_with_the_handlers_body_before_its_later_work_runs(
    standin: SlackSocketStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    errors = {"response_action": "errors", "errors": {"reason": "Say why you reject it"}}
    acknowledged = threading.Event()  # set by the test once the stand-in holds the acknowledgement
    later_finished = threading.Event()
    later_saw_the_ack: list[bool] = []

    def later() -> None:
        later_saw_the_ack.append(acknowledged.wait(timeout=10))
        later_finished.set()

    handler = RecordingHandler(lambda payload: Reply(body=errors, later=later))
    with socket_mode(handler, standin):
        ack = standin.send_interactive(REJECT_SUBMISSION)
        assert not later_finished.is_set()
        acknowledged.set()
        wait_until(later_finished.is_set, timeout=10, message="later never ran")

    assert set(ack) == {"envelope_id", "payload"}
    assert ack["payload"] == errors
    assert later_saw_the_ack == [True]
    assert handler.payloads == [REJECT_SUBMISSION]
    assert APP_TOKEN not in caplog.text


def test_a_reply_without_body_is_acknowledged_without_payload(standin: SlackSocketStandIn) -> None:
    handler = RecordingHandler(lambda payload: Reply())
    with socket_mode(handler, standin):
        ack = standin.send_interactive(APPROVE_CLICK)

    assert set(ack) == {"envelope_id"}
    assert handler.payloads == [APPROVE_CLICK]


def test_envelopes_other_than_interactions_are_acknowledged_and_not_handled(standin: SlackSocketStandIn) -> None:
    handler = RecordingHandler(lambda payload: Reply(body={"text": "handled"}))
    event = {"type": "event_callback", "event": {"type": "app_mention", "text": "<@U000BOT> hi"}}
    with socket_mode(handler, standin):
        event_ack = standin.send_envelope("events_api", event, False)
        command_ack = standin.send_envelope("slash_commands", {"command": "/deploy", "text": "api"}, True)
        click_ack = standin.send_interactive(APPROVE_CLICK)

    assert set(event_ack) == {"envelope_id"}
    assert set(command_ack) == {"envelope_id"}
    assert click_ack["payload"] == {"text": "handled"}
    assert handler.payloads == [APPROVE_CLICK]


def test_later_work_that_raises_is_logged_and_the_next_interaction_is_still_handled(
    standin: SlackSocketStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    second_later_ran = threading.Event()

    def failing_later() -> None:
        raise RuntimeError("the run to resume is gone")

    def decide(payload: Mapping[str, Any]) -> Reply:
        first = len(handler.payloads) == 1
        return Reply(later=failing_later if first else second_later_ran.set)

    handler = RecordingHandler(decide)
    with socket_mode(handler, standin):
        standin.send_interactive(APPROVE_CLICK)
        wait_until(lambda: "the run to resume is gone" in caplog.text, timeout=10, message="failure not logged")
        second_ack = standin.send_interactive(APPROVE_CLICK)
        wait_until(second_later_ran.is_set, timeout=10, message="the second later never ran")

    assert set(second_ack) == {"envelope_id"}
    assert len(handler.payloads) == 2
    failures = [record for record in caplog.records if "work after envelope" in record.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None


def test_a_handler_that_raises_still_gets_the_interaction_acknowledged(standin: SlackSocketStandIn) -> None:
    def decide(payload: Mapping[str, Any]) -> Reply:
        raise KeyError("actions")

    handler = RecordingHandler(decide)
    with socket_mode(handler, standin):
        ack = standin.send_interactive(APPROVE_CLICK)

    assert set(ack) == {"envelope_id"}


def test_the_client_reconnects_when_slack_asks_and_keeps_handling(standin: SlackSocketStandIn) -> None:
    handler = RecordingHandler(lambda payload: Reply(body={"response_action": "clear"}))
    with socket_mode(handler, standin):
        standin.send_disconnect()
        standin.wait_for_connection(count=2)
        ack = standin.send_interactive(REJECT_SUBMISSION)

    assert ack["payload"] == {"response_action": "clear"}
    assert standin.open_calls == 2


def test_a_refused_app_token_is_a_clear_error_without_the_token(
    standin: SlackSocketStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_token = "xapp-1-A000TEST-1-notthesecret"
    handler = RecordingHandler(lambda payload: Reply())

    with pytest.raises(NotificationError, match="invalid_auth") as refused:
        run_socket_mode(handler, app_token=wrong_token, api_url=standin.api_url, logger=test_logger)

    assert not isinstance(refused.value, TransientNotificationError)
    assert "app-level token" in str(refused.value)
    assert wrong_token not in str(refused.value)
    assert wrong_token not in caplog.text
    assert standin.refused_open_calls == 1
    assert standin.connections_opened == 0


def test_an_unreachable_web_api_is_a_transient_error() -> None:
    api_url = f"http://127.0.0.1:{free_port()}/api/"
    handler = RecordingHandler(lambda payload: Reply())

    with pytest.raises(TransientNotificationError, match="unreachable"):
        run_socket_mode(handler, app_token=APP_TOKEN, api_url=api_url, logger=test_logger)
