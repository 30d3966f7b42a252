"""The Slack stand-in acts as Slack does when a person clicks a button or submits a modal.

An app's interaction code is only as well tested as the Slack it is tested against: these tests hold the
stand-in to Slack's rules (signed requests, only shown buttons clickable, a trigger opens one view within 3 s,
a response_url takes five posts within 30 minutes) against a tiny receiver that checks every request's
signature with slack_sdk's own ``SignatureVerifier``, as the real app does.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.webhook import WebhookClient

from standins.slack import (
    APP_ID,
    INTERACTION_TIMEOUT_SECONDS,
    RESPONSE_URL_LIFETIME_SECONDS,
    TEAM_ID,
    TRIGGER_LIFETIME_SECONDS,
    SlackStandIn,
)
from tests.waiting import wait_until

TOKEN = "xoxb-interactions-test"
SIGNING_SECRET = "interactions-test-signing-secret"
CLICKER = "U0CLICKER"
OTHER = "U0OTHER"

APPROVAL_BLOCKS: list[dict[str, Any]] = [
    {"type": "section", "text": {"type": "mrkdwn", "text": "*Apply plan for web?*"}},
    {
        "type": "actions",
        "block_id": "decide",
        "elements": [
            {
                "type": "button",
                "action_id": "approve",
                "text": {"type": "plain_text", "text": "Approve"},
                "value": "run-1",
                "style": "primary",
            },
            {
                "type": "button",
                "action_id": "reject",
                "text": {"type": "plain_text", "text": "Reject"},
                "value": "run-1",
                "style": "danger",
            },
        ],
    },
]

REASON_MODAL: dict[str, Any] = {
    "type": "modal",
    "callback_id": "reject_reason",
    "private_metadata": "run-1",
    "title": {"type": "plain_text", "text": "Reject the plan"},
    "submit": {"type": "plain_text", "text": "Reject"},
    "blocks": [
        {
            "type": "input",
            "block_id": "reason",
            "label": {"type": "plain_text", "text": "Why?"},
            "element": {"type": "plain_text_input", "action_id": "reason_input"},
        },
        {
            "type": "input",
            "block_id": "note",
            "optional": True,
            "label": {"type": "plain_text", "text": "Anything else"},
            "element": {"type": "plain_text_input", "action_id": "note_input"},
        },
    ],
}


class FakeClock:
    """The stand-in's now for Slack's expiries, moved forward by the test instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Arrival:
    """One request the app's Request URL got, and whether its signature held."""

    headers: dict[str, str]
    body: bytes
    signature_valid: bool

    @property
    def payload(self) -> dict[str, Any]:
        fields = parse_qs(self.body.decode("utf-8"), strict_parsing=True)
        assert list(fields) == ["payload"], "Slack sends one form field, payload"
        return dict(json.loads(fields["payload"][0]))


Answer = Callable[[dict[str, Any]], tuple[int, dict[str, Any] | None]]


class Receiver:
    """The app's side, as small as it can be: verify the signature (401 if it does not hold), record the
    request, answer with ``answer(payload)``."""

    def __init__(self, signing_secret: str) -> None:
        self.verifier = SignatureVerifier(signing_secret)
        self.arrivals: list[Arrival] = []
        self.answer: Answer = lambda payload: (200, None)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/slack/interactions"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                valid = receiver.verifier.is_valid(
                    body, self.headers.get("X-Slack-Request-Timestamp"), self.headers.get("X-Slack-Signature")
                )
                arrival = Arrival(dict(self.headers.items()), body, valid)
                receiver.arrivals.append(arrival)
                status, answer = (401, None) if not valid else receiver.answer(arrival.payload)
                data = json.dumps(answer).encode("utf-8") if answer is not None else b""
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass  # the slow-answer test: the stand-in gave up after Slack's 3 s, as Slack does

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(SIGNING_SECRET) as app:
        yield app


@pytest.fixture
def standin(clock: FakeClock, receiver: Receiver) -> Iterator[SlackStandIn]:
    with SlackStandIn(token=TOKEN, clock=clock) as slack:
        slack.add_user(CLICKER, "jane.doe", display_name="Jane")
        slack.add_user(OTHER, "sam.roe")
        slack.set_interactivity(receiver.url, SIGNING_SECRET)
        yield slack


@pytest.fixture
def client(standin: SlackStandIn) -> WebClient:
    return WebClient(token=TOKEN, base_url=standin.api_url)


def post_approval(client: WebClient) -> str:
    """The bot's approval message with its two buttons; its ts."""
    answer = client.chat_postMessage(channel="#ops", text="Apply plan for web?", blocks=APPROVAL_BLOCKS)
    return str(answer["ts"])


def response_url_of(receiver: Receiver) -> str:
    return str(receiver.arrivals[-1].payload["response_url"])


# --- clicks --------------------------------------------------------------------------------------------


def test_a_click_arrives_signed_form_encoded_and_shaped_as_slacks_block_actions(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    ts = post_approval(client)
    posted = standin.messages[0]

    result = standin.click(ts, "approve", CLICKER)

    assert (result.status, result.timed_out, result.error) == (200, False, None)
    [arrival] = receiver.arrivals
    assert arrival.signature_valid
    assert arrival.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert result.request == (result.request[0], arrival.body)
    payload = arrival.payload
    assert payload["type"] == "block_actions"
    assert payload["team"] == {"id": TEAM_ID, "domain": "standin"}
    assert payload["user"] == {"id": CLICKER, "username": "jane.doe", "name": "jane.doe", "team_id": TEAM_ID}
    assert payload["api_app_id"] == APP_ID
    assert payload["token"]
    assert payload["container"] == {
        "type": "message",
        "message_ts": ts,
        "channel_id": posted.channel_id,
        "is_ephemeral": False,
    }
    assert payload["trigger_id"] == result.trigger_id
    assert payload["channel"] == {"id": posted.channel_id, "name": "ops"}
    assert payload["message"]["ts"] == ts
    assert payload["message"]["blocks"] == APPROVAL_BLOCKS
    assert payload["response_url"] == f"{standin.base_url}/actions/{result.interaction_id}"
    [action] = payload["actions"]
    assert float(action.pop("action_ts")) > 0
    assert action == {
        "action_id": "approve",
        "block_id": "decide",
        "text": {"type": "plain_text", "text": "Approve"},
        "value": "run-1",
        "style": "primary",
        "type": "button",
    }


def test_each_click_has_its_own_trigger_and_response_url(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    ts = post_approval(client)
    first = standin.click(ts, "approve", CLICKER)
    second = standin.click(ts, "reject", OTHER)

    assert first.trigger_id != second.trigger_id
    assert first.interaction_id != second.interaction_id
    assert [a.payload["actions"][0]["action_id"] for a in receiver.arrivals] == ["approve", "reject"]
    assert receiver.arrivals[1].payload["user"]["id"] == OTHER


def test_only_a_shown_button_can_be_clicked_by_a_known_person(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    ts = post_approval(client)
    said = standin.post_as_user("#ops", "no buttons here", user=OTHER)

    with pytest.raises(AssertionError, match=r"no button 'deploy'.*\['approve', 'reject'\]"):
        standin.click(ts, "deploy", CLICKER)
    with pytest.raises(AssertionError, match="no button 'approve'"):
        standin.click(said.ts, "approve", CLICKER)
    with pytest.raises(AssertionError, match=r"no message 9\.000000"):
        standin.click("9.000000", "approve", CLICKER)
    with pytest.raises(AssertionError, match=re.escape(f"no message {ts} in #elsewhere")):
        standin.click(ts, "approve", CLICKER, channel="#elsewhere")
    with pytest.raises(AssertionError, match="no user U0STRANGER"):
        standin.click(ts, "approve", "U0STRANGER")
    assert receiver.arrivals == []


def test_a_click_the_app_does_not_answer_within_3_s_is_slacks_operation_timeout(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    ts = post_approval(client)
    released = threading.Event()

    def too_slow(payload: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        released.wait(timeout=30)
        return 200, None

    receiver.answer = too_slow
    try:
        result = standin.click(ts, "approve", CLICKER)
    finally:
        released.set()

    assert (result.status, result.timed_out, result.error) == (None, True, "operation_timeout")
    assert result.elapsed_seconds >= INTERACTION_TIMEOUT_SECONDS


def test_requests_can_be_replayed_as_sent_or_signed_stale_or_with_another_secret(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    result = standin.click(post_approval(client), "approve", CLICKER)
    headers, body = result.request

    replay = standin.send_signed(body, headers)
    stale = standin.send_signed(body, standin.signed_headers(body, timestamp=int(time.time()) - 600))
    forged = standin.send_signed(body, standin.signed_headers(body, secret="not-the-secret"))

    assert [r.status for r in (result, replay, stale, forged)] == [200, 200, 401, 401]
    assert [a.body for a in receiver.arrivals] == [body] * 4
    assert receiver.arrivals[1].headers["X-Slack-Signature"] == headers["X-Slack-Signature"]
    assert [a.signature_valid for a in receiver.arrivals] == [True, True, False, False]


def test_sending_without_interactivity_set_says_so() -> None:
    with SlackStandIn(token=TOKEN) as slack, pytest.raises(AssertionError, match="set_interactivity"):
        slack.signed_headers(b"payload=%7B%7D")


def test_a_process_outside_clicks_over_http(standin: SlackStandIn, receiver: Receiver, client: WebClient) -> None:
    ts = post_approval(client)

    def click_over_http(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(  # noqa: S310  # the stand-in on loopback
            f"{standin.base_url}/_standin/click",
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    status, clicked = click_over_http({"message_ts": ts, "action_id": "reject", "user": CLICKER})
    refused_status, refused = click_over_http({"message_ts": ts, "action_id": "deploy", "user": CLICKER})

    assert (status, clicked["status"], clicked["timed_out"]) == (200, 200, False)
    [arrival] = receiver.arrivals
    assert arrival.signature_valid
    assert arrival.payload["actions"][0]["action_id"] == "reject"
    assert clicked["interaction_id"] in arrival.payload["response_url"]
    assert refused_status == 400
    assert "no button 'deploy'" in refused["error"]


# --- views -----------------------------------------------------------------------------------------------


def test_the_app_opens_a_modal_with_the_clicks_fresh_trigger_once(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    opened: list[Any] = []

    def open_the_modal(payload: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        opened.append(client.views_open(trigger_id=payload["trigger_id"], view=REASON_MODAL))
        return 200, None

    receiver.answer = open_the_modal

    result = standin.click(post_approval(client), "reject", CLICKER)

    [answer] = opened
    view = answer["view"]
    assert answer["ok"]
    assert view["id"].startswith("V")
    assert view["state"] == {"values": {}}
    assert (view["callback_id"], view["private_metadata"]) == ("reject_reason", "run-1")
    assert view["blocks"] == REASON_MODAL["blocks"]
    [shown] = standin.views
    assert (shown.id, shown.user, shown.closed, shown.trigger_id) == (view["id"], CLICKER, False, result.trigger_id)
    with pytest.raises(SlackApiError) as used_twice:
        client.views_open(trigger_id=str(result.trigger_id), view=REASON_MODAL)
    assert used_twice.value.response["error"] == "exchanged_trigger_id"
    assert len(standin.views) == 1


def test_a_trigger_older_than_3_s_or_not_issued_opens_nothing(
    standin: SlackStandIn, clock: FakeClock, client: WebClient
) -> None:
    result = standin.click(post_approval(client), "reject", CLICKER)
    clock.advance(TRIGGER_LIFETIME_SECONDS + 0.5)

    with pytest.raises(SlackApiError) as stale:
        client.views_open(trigger_id=str(result.trigger_id), view=REASON_MODAL)
    with pytest.raises(SlackApiError) as made_up:
        client.views_open(trigger_id="12345.98765.abcd2358fdea", view=REASON_MODAL)

    assert stale.value.response["error"] == "expired_trigger_id"
    assert made_up.value.response["error"] == "invalid_trigger_id"
    assert standin.views == []


def test_views_open_takes_the_view_as_a_json_string_and_refuses_one_slack_would(
    standin: SlackStandIn, client: WebClient
) -> None:
    ts = post_approval(client)
    no_title = {key: value for key, value in REASON_MODAL.items() if key != "title"}
    no_submit = {key: value for key, value in REASON_MODAL.items() if key != "submit"}

    refusals = []
    for view in (no_title, no_submit, {**REASON_MODAL, "type": "home"}):
        trigger = standin.click(ts, "reject", CLICKER).trigger_id
        with pytest.raises(SlackApiError) as refused:
            client.views_open(trigger_id=str(trigger), view=view)
        refusals.append(refused.value.response)
    # Form-encoded, as Slack's docs show it (slack_sdk itself always sends JSON).
    fresh = standin.click(ts, "reject", CLICKER).trigger_id
    as_text = client.api_call("views.open", data={"trigger_id": fresh, "view": json.dumps(REASON_MODAL)})

    assert {r["error"] for r in refusals} == {"invalid_arguments"}
    assert "title" in refusals[0]["response_metadata"]["messages"][0]
    assert "submit" in refusals[1]["response_metadata"]["messages"][0]
    assert "'modal'" in refusals[2]["response_metadata"]["messages"][0]
    assert as_text["ok"]
    assert [v.id for v in standin.views] == [as_text["view"]["id"]]


def open_reason_modal(standin: SlackStandIn, receiver: Receiver, client: WebClient) -> str:
    """Click Reject; the app opens the reason modal with the click's trigger. The view's ID."""

    def open_the_modal(payload: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        client.views_open(trigger_id=payload["trigger_id"], view=REASON_MODAL)
        return 200, None

    receiver.answer = open_the_modal
    before = len(standin.views)
    standin.click(post_approval(client), "reject", CLICKER)
    # Under load the receiver may answer after the click's 3 s: the view it opens is what counts.
    opened = wait_until(lambda: standin.views[before:], timeout=10, message="the reason modal did not open")
    receiver.answer = lambda payload: (200, None)
    return opened[-1].id


def test_a_submission_carries_the_views_state_and_errors_keep_it_open(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    view_id = open_reason_modal(standin, receiver, client)
    receiver.answer = lambda payload: (200, {"response_action": "errors", "errors": {"reason": "Say more"}})

    refused = standin.submit_view(view_id, CLICKER, {"reason": {"reason_input": "no"}})

    submission = receiver.arrivals[-1]
    assert submission.signature_valid
    payload = submission.payload
    assert payload["type"] == "view_submission"
    assert payload["user"]["id"] == CLICKER
    assert payload["team"]["id"] == TEAM_ID
    assert payload["api_app_id"] == APP_ID
    assert payload["trigger_id"] == refused.trigger_id
    view = payload["view"]
    assert (view["id"], view["callback_id"], view["private_metadata"]) == (view_id, "reject_reason", "run-1")
    assert view["state"] == {
        "values": {
            "reason": {"reason_input": {"type": "plain_text_input", "value": "no"}},
            "note": {"note_input": {"type": "plain_text_input", "value": None}},
        }
    }
    assert (standin.view(view_id).closed, standin.view(view_id).errors) == (False, {"reason": "Say more"})

    receiver.answer = lambda payload: (200, None)
    standin.submit_view(view_id, CLICKER, {"reason": {"reason_input": "the plan destroys the database"}})

    assert standin.view(view_id).closed
    with pytest.raises(AssertionError, match="closed"):
        standin.submit_view(view_id, CLICKER, {"reason": {"reason_input": "again"}})


def test_a_submission_no_person_could_make_is_refused(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    view_id = open_reason_modal(standin, receiver, client)
    sent_before = len(receiver.arrivals)

    with pytest.raises(AssertionError, match="'reason' is required"):
        standin.submit_view(view_id, CLICKER, {"reason": {"reason_input": ""}})
    with pytest.raises(AssertionError, match="no input blocks \\['mood'\\]"):
        standin.submit_view(view_id, CLICKER, {"reason": {"reason_input": "x"}, "mood": {"m": "x"}})
    with pytest.raises(AssertionError, match="opened for U0CLICKER"):
        standin.submit_view(view_id, OTHER, {"reason": {"reason_input": "x"}})
    with pytest.raises(AssertionError, match="no view V404"):
        standin.submit_view("V404", CLICKER, {})
    assert len(receiver.arrivals) == sent_before
    assert not standin.view(view_id).closed


# --- response_url ----------------------------------------------------------------------------------------


def test_an_ephemeral_answer_goes_to_the_clicker_only(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    result = standin.click(post_approval(client), "approve", CLICKER)

    sent = WebhookClient(response_url_of(receiver)).send(
        text="You may not approve your own change", response_type="ephemeral"
    )

    assert sent.status_code == 200
    [ephemeral] = standin.ephemeral_messages
    assert (ephemeral.user, ephemeral.text) == (CLICKER, "You may not approve your own change")
    assert ephemeral.channel_id == standin.messages[0].channel_id
    assert standin.responses == [
        (result.interaction_id, {"text": "You may not approve your own change", "response_type": "ephemeral"})
    ]
    assert [m.text for m in standin.messages] == ["Apply plan for web?"], "the channel shows nothing new"


def test_replace_original_rewrites_the_clicked_message_and_its_buttons_are_gone(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    ts = post_approval(client)
    standin.click(ts, "approve", CLICKER)
    approved = [{"type": "section", "text": {"type": "mrkdwn", "text": "Approved by <@U0CLICKER>"}}]

    sent = WebhookClient(response_url_of(receiver)).send(text="Approved", blocks=approved, replace_original=True)

    assert sent.status_code == 200
    [message] = standin.messages
    assert (message.ts, message.text, message.blocks, message.edited) == (ts, "Approved", approved, True)
    with pytest.raises(AssertionError, match="no button 'approve'"):
        standin.click(ts, "approve", CLICKER)


def test_delete_original_deletes_the_clicked_message(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    ts = post_approval(client)
    client.chat_postMessage(channel="#ops", text="another message")
    standin.click(ts, "reject", CLICKER)

    sent = WebhookClient(response_url_of(receiver)).send_dict({"delete_original": True})

    assert sent.status_code == 200
    assert [m.text for m in standin.messages] == ["another message"]


def test_a_response_url_takes_five_posts_within_30_minutes(
    standin: SlackStandIn, receiver: Receiver, clock: FakeClock, client: WebClient
) -> None:
    ts = post_approval(client)
    standin.click(ts, "approve", CLICKER)
    used = WebhookClient(response_url_of(receiver))
    standin.click(ts, "reject", CLICKER)
    aged = WebhookClient(response_url_of(receiver))

    statuses = [used.send(text=f"note {n}").status_code for n in range(1, 7)]
    sixth = used.send(text="note 7")
    clock.advance(RESPONSE_URL_LIFETIME_SECONDS + 1)
    too_late = aged.send(text="first post, but late")

    assert statuses == [200] * 5 + [404]
    assert (sixth.status_code, json.loads(sixth.body)["error"]) == (404, "used_url")
    assert (too_late.status_code, json.loads(too_late.body)["error"]) == (404, "expired_url")
    assert [body["text"] for _, body in standin.responses] == [f"note {n}" for n in range(1, 6)]


# --- people -------------------------------------------------------------------------------------------


def test_usergroups_users_list_answers_a_groups_members(standin: SlackStandIn, client: WebClient) -> None:
    standin.set_usergroup("S0APPROVERS", [CLICKER, OTHER])

    members = client.usergroups_users_list(usergroup="S0APPROVERS")
    with pytest.raises(SlackApiError) as unknown:
        client.usergroups_users_list(usergroup="S0NOBODY")
    with pytest.raises(SlackApiError) as unauthorised:
        WebClient(token="xoxb-wrong", base_url=standin.api_url).usergroups_users_list(usergroup="S0APPROVERS")

    assert members["users"] == [CLICKER, OTHER]
    assert unknown.value.response["error"] == "no_such_subteam"
    assert unauthorised.value.response["error"] == "invalid_auth"


def test_users_info_answers_who_a_person_is(standin: SlackStandIn, client: WebClient) -> None:
    jane = client.users_info(user=CLICKER)["user"]
    sam = client.users_info(user=OTHER)["user"]
    with pytest.raises(SlackApiError) as unknown:
        client.users_info(user="U0STRANGER")

    assert jane == {
        "id": CLICKER,
        "team_id": TEAM_ID,
        "name": "jane.doe",
        "real_name": "jane.doe",
        "profile": {"display_name": "Jane", "real_name": "jane.doe"},
    }
    assert sam["profile"]["display_name"] == "", "as in Slack, a display name never set is empty"
    assert unknown.value.response["error"] == "user_not_found"


# --- what an operator reads --------------------------------------------------------------------------------


def test_received_lists_views_and_responses_and_clear_forgets_them(
    standin: SlackStandIn, receiver: Receiver, client: WebClient
) -> None:
    view_id = open_reason_modal(standin, receiver, client)
    WebhookClient(response_url_of(receiver)).send(text="Tell us why")

    with urllib.request.urlopen(f"{standin.base_url}/_standin/received", timeout=10) as answer:  # noqa: S310
        received = json.loads(answer.read())
    standin.clear()

    assert [(v["id"], v["user"], v["callback_id"], v["closed"]) for v in received["views"]] == [
        (view_id, CLICKER, "reject_reason", False)
    ]
    assert [r["body"]["text"] for r in received["responses"]] == ["Tell us why"]
    assert [(e["user"], e["text"]) for e in received["ephemeral"]] == [(CLICKER, "Tell us why")]
    assert (standin.views, standin.responses, standin.ephemeral_messages) == ([], [], [])
    assert standin.received()["views"] == []
