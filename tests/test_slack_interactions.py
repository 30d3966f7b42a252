"""A Slack interaction, in its pure parts: whether the request is Slack's (icd/interactions/signing.py), what
it asks (icd/interactions/payloads.py), and the buttons it comes from (icd/notify/slack.py, the approval
notice of tasks/approve.py). Each table row is one behaviour; no server, no stand-in. The end-to-end test
(tests/test_slack_approvals.py) clicks the same buttons through the Slack stand-in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web import SlackResponse

from icd.config import ApprovalPolicy
from icd.deploy.approval import APPROVE_ACTION, REJECT_ACTION, ApprovalRules
from icd.deploy.plan import ChannelSeen, PlannedDeploy
from icd.deploy.plan_view import PlanView
from icd.interactions.payloads import (
    REJECT_CALLBACK,
    ButtonClick,
    ModalSubmitted,
    NotOurs,
    Person,
    read_payload,
)
from icd.interactions.signing import (
    BAD_SIGNATURE,
    STALE,
    UNSIGNED,
    WINDOW_SECONDS,
    NotVerified,
    RequestVerifier,
    Verified,
)
from icd.notify.message import Action, Confirm, Notification
from icd.notify.slack import ACTION_ID_PREFIX, ACTIONS_BLOCK_ID, LINK_ACTION_ID, SlackSender, render_slack_message
from icd.registry.models import ArtifactVersion
from tasks.approve import approval_notice

SECRET = "interactions-test-signing-secret"  # a test's fake secret
NOW = 1_764_590_400  # 2025-12-01 12:00 UTC, as Slack's X-Slack-Request-Timestamp
TEAM = "T0ACME"
PLAN = "ab" * 32
RUN_ID = "0b5c6f0e-2d7a-4cbe-9d0e-6f1a2b3c4d5e"
BODY = urlencode({"payload": json.dumps({"type": "block_actions"})}).encode()  # as Slack posts it


def _signature(body: bytes, timestamp: str, secret: str = SECRET) -> str:
    """Slack's v0 signature, computed here as Slack documents it (not with the code under test)."""
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def _headers(body: bytes = BODY, *, sent_at: int = NOW, secret: str = SECRET) -> dict[str, str]:
    return {"x-slack-request-timestamp": str(sent_at), "x-slack-signature": _signature(body, str(sent_at), secret)}


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


# --- the signature -------------------------------------------------------------------------------------------


def test_the_tests_sign_as_slack_sdk_does() -> None:
    assert _signature(BODY, str(NOW)) == SignatureVerifier(SECRET).generate_signature(timestamp=str(NOW), body=BODY)


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        pytest.param(_headers(), BODY, Verified(), id="valid"),
        pytest.param(_headers(sent_at=NOW - WINDOW_SECONDS), BODY, Verified(), id="exactly-five-minutes-old"),
        pytest.param(_headers(sent_at=NOW + WINDOW_SECONDS), BODY, Verified(), id="exactly-five-minutes-ahead"),
        pytest.param(_headers(secret="another-apps-secret"), BODY, BAD_SIGNATURE, id="signed-with-another-secret"),
        pytest.param(_headers(), BODY + b"x", BAD_SIGNATURE, id="body-changed-after-signing"),
        pytest.param(
            {**_headers(), "x-slack-request-timestamp": str(NOW - 1)}, BODY, BAD_SIGNATURE, id="timestamp-changed"
        ),
        pytest.param(
            {**_headers(), "x-slack-signature": _headers()["x-slack-signature"].upper()},
            BODY,
            BAD_SIGNATURE,
            id="signature-in-capitals",
        ),
        pytest.param(
            {**_headers(), "x-slack-signature": "v0=" + "é" * 64}, BODY, BAD_SIGNATURE, id="signature-not-ascii"
        ),
        pytest.param({**_headers(), "x-slack-signature": ""}, BODY, UNSIGNED, id="empty-signature"),
        pytest.param({"x-slack-request-timestamp": str(NOW)}, BODY, UNSIGNED, id="no-signature-header"),
        pytest.param({"x-slack-signature": _headers()["x-slack-signature"]}, BODY, UNSIGNED, id="no-timestamp-header"),
        pytest.param({}, BODY, UNSIGNED, id="no-headers"),
        pytest.param(_headers(sent_at=NOW - WINDOW_SECONDS - 1), BODY, STALE, id="301-s-old"),
        pytest.param(_headers(sent_at=NOW + WINDOW_SECONDS + 1), BODY, STALE, id="301-s-in-the-future"),
        pytest.param(
            {"x-slack-request-timestamp": "soon", "x-slack-signature": _signature(BODY, "soon")},
            BODY,
            STALE,
            id="timestamp-not-a-number",
        ),
        pytest.param(
            {"x-slack-request-timestamp": f"{NOW}.5", "x-slack-signature": _signature(BODY, f"{NOW}.5")},
            BODY,
            STALE,
            id="timestamp-with-a-fraction",
        ),
    ],
)
def test_a_request_is_verified_by_its_signature_and_age(
    headers: dict[str, str], body: bytes, expected: Verified | str
) -> None:
    verdict = RequestVerifier(SECRET, now=Clock().time).check(headers, body)
    if isinstance(expected, Verified):
        assert verdict == expected
    else:
        assert isinstance(verdict, NotVerified)
        assert verdict.reason == expected, verdict.detail


def test_a_replay_is_answered_once_then_refused_as_stale_once_the_window_passes() -> None:
    clock = Clock()
    verifier = RequestVerifier(SECRET, now=clock.time)
    headers = _headers()
    assert verifier.check(headers, BODY) == Verified(replay=False)
    clock.now += 60
    assert verifier.check(headers, BODY) == Verified(replay=True)
    assert verifier.check(_headers(BODY + b"&other=1", sent_at=NOW + 60), BODY + b"&other=1") == Verified(), (
        "another request is no replay"
    )
    clock.now = NOW + WINDOW_SECONDS
    assert verifier.check(headers, BODY) == Verified(replay=True), "still a replay at the window's last second"
    clock.now = NOW + WINDOW_SECONDS + 1
    late = verifier.check(headers, BODY)
    assert isinstance(late, NotVerified)
    assert late.reason == STALE


def test_a_request_refused_for_its_signature_is_not_remembered_as_seen() -> None:
    verifier = RequestVerifier(SECRET, now=Clock().time)
    headers = _headers()
    refused = verifier.check(headers, BODY + b"tampered")
    assert isinstance(refused, NotVerified)
    assert refused.reason == BAD_SIGNATURE
    assert verifier.check(headers, BODY) == Verified(replay=False)


def test_an_empty_signing_secret_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="signing secret is empty"):
        RequestVerifier("")


# --- what a payload asks -------------------------------------------------------------------------------------

CAROL = {"id": "U0CAROL", "username": "carol", "name": "carol.r", "team_id": TEAM}
TARGET = {"run": RUN_ID, "plan": PLAN}


def _click(action: dict[str, Any] | None = None, **payload: Any) -> dict[str, Any]:
    button = {"action_id": "icd.approve", "block_id": ACTIONS_BLOCK_ID, "value": json.dumps(TARGET), "type": "button"}
    base: dict[str, Any] = {
        "type": "block_actions",
        "user": CAROL,
        "team": {"id": TEAM},
        "trigger_id": "1.2.3",
        "response_url": "https://hooks.slack.test/actions/1",
        "container": {"type": "message", "channel_id": "C0OPS", "message_ts": "1764590400.000100"},
        "channel": {"id": "C0OPS"},
        "message": {"ts": "1764590400.000100"},
        "actions": [{**button, **(action or {})}],
    }
    return {**base, **payload}


def _submission(view: dict[str, Any] | None = None, **payload: Any) -> dict[str, Any]:
    base_view = {
        "callback_id": REJECT_CALLBACK,
        "private_metadata": json.dumps({**TARGET, "response_url": "https://hooks.slack.test/actions/1"}),
        "state": {"values": {"reason": {"reason-input": {"type": "plain_text_input", "value": "not on a Friday"}}}},
    }
    return {"type": "view_submission", "user": CAROL, "view": {**base_view, **(view or {})}, **payload}


CAROL_PERSON = Person(TEAM, "U0CAROL", "carol")
CLICKED = ButtonClick(
    person=CAROL_PERSON,
    action="approve",
    value=TARGET,
    response_url="https://hooks.slack.test/actions/1",
    trigger_id="1.2.3",
    channel_id="C0OPS",
    message_ts="1764590400.000100",
)
SUBMITTED = ModalSubmitted(
    CAROL_PERSON,
    REJECT_CALLBACK,
    {**TARGET, "response_url": "https://hooks.slack.test/actions/1"},
    {"reason": "not on a Friday"},
)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(_click(), CLICKED, id="approve-clicked"),
        pytest.param(_click({"action_id": "icd.reject"}), replace(CLICKED, action="reject"), id="reject-clicked"),
        pytest.param(
            _click(user={"id": "U0CAROL", "name": "carol.r"}),
            replace(CLICKED, person=Person(TEAM, "U0CAROL", "carol.r")),
            id="team-from-the-payload-when-the-user-has-none",
        ),
        pytest.param(
            _click(user={"id": "U0CAROL", "team_id": "T0GUEST"}),
            replace(CLICKED, person=Person("T0GUEST", "U0CAROL", "")),
            id="the-users-own-team-first",
        ),
        pytest.param(
            _click(channel=None, message=None),
            CLICKED,
            id="channel-and-message-from-the-container",
        ),
        pytest.param(
            _click(container=None),
            CLICKED,
            id="channel-and-message-without-a-container",
        ),
        pytest.param(_submission(), SUBMITTED, id="reject-reason-submitted"),
        pytest.param(
            _submission({"private_metadata": ""}), replace(SUBMITTED, metadata={}), id="a-modal-without-metadata"
        ),
        pytest.param(
            _submission({"private_metadata": "[1, 2]"}), replace(SUBMITTED, metadata={}), id="metadata-not-an-object"
        ),
        pytest.param(
            _submission({"state": {"values": [1]}}), replace(SUBMITTED, values={}), id="state-values-not-an-object"
        ),
        pytest.param(_submission({"state": "x"}), replace(SUBMITTED, values={}), id="state-not-an-object"),
        pytest.param(
            _submission({"state": {"values": {"reason": {"reason-input": {"value": None}}, "other": 3}}}),
            replace(SUBMITTED, values={}),
            id="inputs-without-a-text-value",
        ),
    ],
)
def test_a_payload_is_read_into_what_it_asks(payload: dict[str, Any], expected: ButtonClick | ModalSubmitted) -> None:
    assert read_payload(payload) == expected


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        pytest.param({}, "no user or team", id="empty"),
        pytest.param(_click(user=None), "no user or team", id="no-user"),
        pytest.param(_click(user={"id": "U0CAROL"}, team=None), "no user or team", id="no-team"),
        pytest.param(_click(user={"id": 7, "team_id": TEAM}), "no user or team", id="user-id-not-a-string"),
        pytest.param(_click(user="U0CAROL"), "no user or team", id="user-not-an-object"),
        pytest.param(_click(type="shortcut"), "'shortcut' is not handled", id="another-interaction-type"),
        pytest.param(_click(type=None), "None is not handled", id="no-type"),
        pytest.param(_click(actions=[]), "without actions", id="no-actions"),
        pytest.param(_click(actions="icd.approve"), "without actions", id="actions-not-a-list"),
        pytest.param(_click(actions=["icd.approve"]), "without actions", id="an-action-not-an-object"),
        pytest.param(_click({"action_id": LINK_ACTION_ID, "value": None}), "not one of ours", id="our-link-button"),
        pytest.param(_click({"action_id": "deploy_button"}), "not one of ours", id="another-apps-button"),
        pytest.param(_click({"action_id": None}), "not one of ours", id="no-action-id"),
        pytest.param(_click({"value": "{run"}), "not JSON", id="value-not-json"),
        pytest.param(_click({"value": "[" * 100_000}), "not JSON", id="value-nested-too-deep"),
        pytest.param(_click({"value": '["run"]'}), "carries no target", id="value-a-list"),
        pytest.param(_click({"value": None}), "carries no target", id="no-value"),
        pytest.param(_submission(view=None) | {"view": None}, "without its view", id="no-view"),
        pytest.param(_submission({"private_metadata": "{"}), "not JSON", id="metadata-not-json"),
        pytest.param(_submission({"private_metadata": "{" * 100_000}), "not JSON", id="metadata-nested-too-deep"),
    ],
)
def test_a_payload_that_is_not_ours_is_named_and_never_raises(payload: dict[str, Any], why: str) -> None:
    read = read_payload(payload)
    assert isinstance(read, NotOurs), read
    assert why in read.why


# --- the buttons ---------------------------------------------------------------------------------------------

APPROVE = Action(
    "approve",
    "Approve",
    json.dumps(TARGET),
    style="primary",
    confirm=Confirm("Apply this plan?", "Apply <!channel> *now*", "Approve"),
)
REJECT = Action("reject", "Reject", json.dumps(TARGET), style="danger", confirm=Confirm("Reject?", "Sure?", "Reject"))
ACK = Action("ack", "Acknowledge", "{}")
NOTICE = Notification(
    "Plan waiting", "Approve or reject", "warning", link_url="https://prefect.test/runs/1", actions=(APPROVE, REJECT)
)


def _buttons(notification: Notification) -> list[dict[str, Any]]:
    _, blocks = render_slack_message(notification)
    actions = [block for block in blocks if block["type"] == "actions"]
    assert len(actions) <= 1, "one actions block"
    if not actions:
        return []
    assert actions[0]["block_id"] == ACTIONS_BLOCK_ID
    elements: list[dict[str, Any]] = actions[0]["elements"]
    return elements


def test_actions_are_buttons_before_the_link_each_named_for_the_endpoint() -> None:
    approve, reject, link = _buttons(NOTICE)
    assert approve == {
        "type": "button",
        "action_id": f"{ACTION_ID_PREFIX}approve",
        "text": {"type": "plain_text", "text": "Approve"},
        "value": json.dumps(TARGET),
        "style": "primary",
        "confirm": {
            "title": {"type": "plain_text", "text": "Apply this plan?"},
            "text": {"type": "mrkdwn", "text": "Apply &lt;!channel&gt; *now*"},
            "confirm": {"type": "plain_text", "text": "Approve"},
            "deny": {"type": "plain_text", "text": "Cancel"},
        },
    }
    assert (reject["action_id"], reject["style"], reject["confirm"]["style"]) == ("icd.reject", "danger", "danger")
    assert link["action_id"] == LINK_ACTION_ID
    assert link["url"] == "https://prefect.test/runs/1"
    assert "value" not in link
    assert "confirm" not in link


@pytest.mark.parametrize(
    ("notification", "action_ids"),
    [
        pytest.param(NOTICE, ["icd.approve", "icd.reject", LINK_ACTION_ID], id="actions-and-a-link"),
        pytest.param(replace(NOTICE, link_url=None), ["icd.approve", "icd.reject"], id="actions-alone"),
        pytest.param(replace(NOTICE, actions=()), [LINK_ACTION_ID], id="a-link-alone"),
        pytest.param(replace(NOTICE, actions=(), link_url=None), [], id="nothing-to-click-no-actions-block"),
        pytest.param(replace(NOTICE, actions=(ACK,), link_url=None), ["icd.ack"], id="an-action-without-a-dialog"),
    ],
)
def test_which_buttons_a_message_has(notification: Notification, action_ids: list[str]) -> None:
    assert [button["action_id"] for button in _buttons(notification)] == action_ids


def test_a_button_without_a_dialog_or_style_has_neither() -> None:
    (ack,) = _buttons(replace(NOTICE, actions=(ACK,), link_url=None))
    assert "confirm" not in ack
    assert "style" not in ack


@pytest.mark.parametrize(
    ("confirm", "limits"),
    [
        pytest.param(
            Confirm("t" * 200, "x" * 500, "c" * 40, "d" * 40),
            {"title": 100, "text": 300, "confirm": 30, "deny": 30},
            id="every-part-clipped-to-slacks-limit",
        ),
    ],
)
def test_a_long_dialog_is_clipped_not_refused_by_slack(confirm: Confirm, limits: dict[str, int]) -> None:
    (button,) = _buttons(Notification("t", "x", "info", actions=(Action("approve", "L" * 100, "{}", confirm=confirm),)))
    assert {part: len(button["confirm"][part]["text"]) for part in limits} == limits
    assert button["confirm"]["text"]["text"].endswith("…")
    assert len(button["text"]["text"]) == 75


@pytest.mark.parametrize(
    ("length", "fits"),
    [pytest.param(2000, True, id="2000-characters"), pytest.param(2001, False, id="2001-characters")],
)
def test_a_button_value_longer_than_slack_takes_is_refused_before_sending(length: int, fits: bool) -> None:
    notification = Notification("t", "x", "info", actions=(Action("approve", "Approve", "v" * length),))
    if fits:
        assert _buttons(notification)[0]["value"] == "v" * length
    else:
        with pytest.raises(ValueError, match="longer than Slack's 2000"):
            render_slack_message(notification)


class RecordingClient(WebClient):
    """A WebClient that records each call instead of sending it."""

    def __init__(self) -> None:
        super().__init__(token="xoxb-test-token")  # a test's fake token
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def api_call(self, api_method: str, **kwargs: Any) -> SlackResponse:
        self.calls.append((api_method, kwargs.get("json") or {}))
        return SlackResponse(
            client=self,
            http_verb="POST",
            api_url=api_method,
            req_args={},
            data={"ok": True, "channel": "C0OPS", "ts": "1.0"},
            headers={},
            status_code=200,
        )


@pytest.mark.parametrize(
    ("buttons", "action_ids"),
    [
        pytest.param(True, ["icd.approve", "icd.reject", LINK_ACTION_ID], id="with-a-slack-app"),
        pytest.param(False, [LINK_ACTION_ID], id="without-one-only-the-link"),
    ],
)
def test_a_sender_without_a_slack_app_leaves_the_buttons_out_when_sending_and_updating(
    buttons: bool, action_ids: list[str]
) -> None:
    client = RecordingClient()
    sender = SlackSender(client, "C0OPS", api_url="https://slack.test/api/", buttons=buttons)
    receipt = sender.send(NOTICE)
    sender.update(receipt, NOTICE)
    assert [method for method, _ in client.calls] == ["chat.postMessage", "chat.update"]
    for _, sent in client.calls:
        elements = next(block["elements"] for block in sent["blocks"] if block["type"] == "actions")
        assert [element["action_id"] for element in elements] == action_ids


@pytest.mark.parametrize(
    "notification",
    [
        pytest.param(NOTICE, id="with-actions"),
        pytest.param(replace(NOTICE, actions=(ACK, REJECT), thread_key="deploy-run:1", dedup_key="d"), id="keys"),
        pytest.param(Notification("t", "x", "info", fields={"a": "b"}), id="no-actions"),
    ],
)
def test_a_notification_read_back_from_json_is_the_one_stored(notification: Notification) -> None:
    assert Notification.from_dict(json.loads(json.dumps(notification.to_dict()))) == notification


# --- the approval notice ---------------------------------------------------------------------------------------


def _planned() -> PlannedDeploy:
    view = PlanView("acmeinc/web", "production", 1, 2, 0, 0, 1, 0, (), PLAN)
    return PlannedDeploy(
        workspace="production",
        plan_id="plan-1",
        namespace="acmeinc/web",
        version=2,
        followed=ChannelSeen("production", 2),
        promoted=None,
        artifact_id="ami-2",
        has_changes=True,
        plan_sha256=PLAN,
        state_before=None,
        view=view,
    )


def _version(**labels: str) -> ArtifactVersion:
    return ArtifactVersion(
        namespace="acmeinc/web",
        version=2,
        git_commit="c0ffee00" * 5,
        git_ref="main",
        packer_run_uuid="uuid",
        builder_type="null",
        artifacts={"local": "/images/web-2.tar.gz"},
        artifact_sha256={"local": "0" * 64},
        created_at=datetime(2026, 12, 1, tzinfo=UTC),
        created_by="ci",
        labels=labels,
    )


DEADLINE = datetime(2026, 12, 1, 13, 0, tzinfo=UTC)
TWO_NO_SELF = ApprovalRules("production", ApprovalPolicy(required=2, prevent_self_review=True, sources=["slack"]))


@dataclass(frozen=True)
class NoticeCase:
    version: ArtifactVersion | None
    rules: ApprovalRules | None
    facts: dict[str, str]


BASE_FACTS = {"workspace": "production", "artifact": "acmeinc/web v1 -> v2"}
AFTER_FACTS = {"changes": "0 to add, 0 to change, 1 to replace, 0 to destroy", "plan sha256": PLAN, "run": "brave-fox"}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(NoticeCase(None, None, BASE_FACTS | AFTER_FACTS), id="no-version-no-rules"),
        pytest.param(
            NoticeCase(
                _version(commit_author="Dev Eloper <dev@acme.example>", pushed_by="dev-eloper"),
                ApprovalRules("production"),
                BASE_FACTS
                | {"commit": "c0ffee00c0ff", "author": "Dev Eloper <dev@acme.example>, pushed by dev-eloper"}
                | AFTER_FACTS,
            ),
            id="commit-author-and-pusher-default-policy-unsaid",
        ),
        pytest.param(
            NoticeCase(
                _version(),
                TWO_NO_SELF,
                BASE_FACTS
                | {"commit": "c0ffee00c0ff", "author": "-"}
                | AFTER_FACTS
                | {
                    "approval": "2 distinct approvers (anyone in the channel), "
                    "not the commit's author alone, from Slack",
                    # Nobody is told self-review holds when it can't be checked.
                    "self-review": "not checked: the commit's author is not in icd.toml's [people]",
                },
            ),
            id="unknown-author-and-a-stricter-policy",
        ),
        pytest.param(
            NoticeCase(
                _version(pushed_by="dev-eloper"),
                None,
                BASE_FACTS | {"commit": "c0ffee00c0ff", "author": "pushed by dev-eloper"} | AFTER_FACTS,
            ),
            id="only-the-pusher-known",
        ),
    ],
)
def test_the_approval_notice_says_what_changes_who_wrote_it_and_who_may_approve(case: NoticeCase) -> None:
    notice = approval_notice(
        _planned(),
        DEADLINE,
        run_id=RUN_ID,
        run_name="brave-fox",
        run_url="https://prefect.test/runs/1",
        version=case.version,
        rules=case.rules,
    )
    assert dict(notice.fields) == case.facts
    assert list(notice.fields) == list(case.facts), "in this order"
    assert (notice.kind, notice.severity, notice.dedup_key) == ("approval", "warning", f"plan-{PLAN}")


def test_the_approval_notices_buttons_carry_the_run_and_plan_and_ask_first() -> None:
    notice = approval_notice(_planned(), DEADLINE, run_id=RUN_ID, run_name="brave-fox", run_url=None)
    approve, reject = notice.actions
    assert (approve.id, approve.style, reject.id, reject.style) == (APPROVE_ACTION, "primary", REJECT_ACTION, "danger")
    for action in notice.actions:
        assert json.loads(action.value) == {"run": RUN_ID, "plan": PLAN}
        assert action.confirm is not None
    assert approve.confirm is not None
    assert PLAN[:12] in approve.confirm.text
    assert reject.confirm is not None
    assert "reason" in reject.confirm.text


@pytest.mark.parametrize("action", [APPROVE_ACTION, REJECT_ACTION])
def test_a_click_on_a_rendered_notice_button_reads_back_as_that_run_and_plan(action: str) -> None:
    """Rendered as Slack gets it, clicked as Slack sends it: the click names the run and plan of its button."""
    notice = approval_notice(_planned(), DEADLINE, run_id=RUN_ID, run_name="brave-fox", run_url=None)
    button = next(b for b in _buttons(notice) if b["action_id"] == f"{ACTION_ID_PREFIX}{action}")
    read = read_payload(_click({"action_id": button["action_id"], "value": button["value"]}))
    assert isinstance(read, ButtonClick)
    assert (read.action, dict(read.value)) == (action, TARGET)


def test_the_notice_rendered_for_slack_escapes_what_people_typed() -> None:
    """A commit author is typed by whoever committed: it can't ping the channel or disguise a link."""
    notice = approval_notice(
        _planned(),
        DEADLINE,
        run_id=RUN_ID,
        run_name="brave-fox",
        run_url=None,
        version=_version(commit_author="<!channel> <https://evil.example|click>"),
    )
    fallback, blocks = render_slack_message(notice)
    rendered = json.dumps(blocks) + fallback
    assert "<!channel>" not in rendered
    assert "<https://evil" not in rendered
    assert "&lt;!channel&gt;" in rendered
