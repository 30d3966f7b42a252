"""Notifications: pure rendering/redaction tables, then the block and task over real HTTP to the stand-in."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import httpx
import pytest
from prefect import flow
from prefect_slack import SlackCredentials
from pydantic import SecretStr
from slack_sdk.http_retry import HttpRequest, HttpResponse, RetryState

import icd.notify.slack as slack_module
import tasks.notify as notify_tasks
from blocks.notifier import SlackNotifier
from examples.local_env import PrefectServer
from icd.errors import NotificationError, TransientNotificationError
from icd.notify.message import Notification, NotificationReceipt, Severity, redact_notification, redact_text
from icd.notify.slack import SERVER_ERROR_RETRIES, AnyServerErrorRetryHandler, render_slack_message
from standins.slack import RECEIVED_PATH, SlackStandIn
from tasks.notify import notify
from tests.plugins.slack import SLACK_TEST_TOKEN


def _blocks_of_type(blocks: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [block for block in blocks if block["type"] == kind]


# --- rendering ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("severity", "emoji", "label"),
    [
        ("info", ":information_source:", "Info"),
        ("success", ":white_check_mark:", "Success"),
        ("warning", ":warning:", "Warning"),
        ("critical", ":rotating_light:", "Critical"),
    ],
)
def test_render_marks_severity_in_header_fallback_and_context(severity: Severity, emoji: str, label: str) -> None:
    fallback, blocks = render_slack_message(Notification("Deployed web", "all *good*", severity))

    assert fallback == f"{emoji} [{label}] Deployed web: all *good*"
    assert blocks[0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": f"{emoji} Deployed web", "emoji": True},
    }
    assert blocks[1] == {"type": "section", "text": {"type": "mrkdwn", "text": "all *good*"}}
    assert blocks[-1]["elements"][0]["text"] == f"severity: *{severity}*"


@pytest.mark.parametrize(
    ("fields", "expected_sections"),
    [
        ({}, []),
        ({"workspace": "prod"}, [["*workspace*\nprod"]]),
        (
            {"workspace": "prod", "version": "1.2.0", "plan": "sha256:ab<c>&"},
            [["*workspace*\nprod", "*version*\n1.2.0", "*plan*\nsha256:ab&lt;c&gt;&amp;"]],
        ),
        (
            {f"k{i}": str(i) for i in range(12)},
            [[f"*k{i}*\n{i}" for i in range(10)], ["*k10*\n10", "*k11*\n11"]],
        ),
    ],
    ids=["none", "one", "escaped", "chunked-by-ten"],
)
def test_render_fields_as_escaped_sections_of_at_most_ten(
    fields: dict[str, str], expected_sections: list[list[str]]
) -> None:
    _, blocks = render_slack_message(Notification("t", "x", "info", fields=fields))

    field_sections = [b for b in _blocks_of_type(blocks, "section") if "fields" in b]
    assert [[f["text"] for f in section["fields"]] for section in field_sections] == expected_sections


@pytest.mark.parametrize(
    ("link_url", "link_text", "expected_button"),
    [
        (None, "ignored", None),
        ("http://ui/runs/flow-run/1", None, ("Open", "http://ui/runs/flow-run/1")),
        (
            "http://ui/runs/flow-run/1",
            "Approve in Prefect",
            ("Approve in Prefect", "http://ui/runs/flow-run/1"),
        ),
    ],
)
def test_render_link_as_a_button(
    link_url: str | None, link_text: str | None, expected_button: tuple[str, str] | None
) -> None:
    _, blocks = render_slack_message(Notification("t", "x", "warning", link_url=link_url, link_text=link_text))

    buttons = [element for b in _blocks_of_type(blocks, "actions") for element in b["elements"]]
    assert [(b["text"]["text"], b["url"]) for b in buttons] == ([expected_button] if expected_button else [])


def test_render_clips_to_block_kit_limits() -> None:
    fallback, blocks = render_slack_message(Notification("T" * 500, "x" * 5000, "info"))

    assert len(blocks[0]["text"]["text"]) == 150
    assert len(blocks[1]["text"]["text"]) == 3000
    assert blocks[1]["text"]["text"].endswith("…")
    assert len(fallback) == 3000


def test_unknown_severity_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown severity"):
        Notification("t", "x", "fatal")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("token xoxb-1 here", ["xoxb-1"], "token *** here"),
        ("abcdef and abc", ["abc", "abcdef"], "*** and ***"),
        ("nothing", ["", "  "], "nothing"),
        ("a-b-a-b", ["a-b"], "***-***"),
    ],
)
def test_redact_text(text: str, secrets: list[str], expected: str) -> None:
    assert redact_text(text, secrets) == expected


def test_redact_notification_covers_every_visible_field() -> None:
    secret = "s3cr3t-value"
    notification = Notification(
        title=f"t {secret}",
        text=f"x {secret}",
        severity="info",
        fields={f"k {secret}": f"v {secret}"},
        link_url=f"http://ui/?q={secret}",
        link_text=f"open {secret}",
    )

    redacted = redact_notification(notification, [SecretStr(secret)])

    assert secret not in repr(redacted)
    assert redacted.fields == {"k ***": "v ***"}


# --- the block over real HTTP ---------------------------------------------------------------------------


def test_send_posts_one_message_with_rendered_blocks_and_text(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    notification = Notification(
        "Deployed acmeinc/web 1.2.0",
        "Applied plan to *prod*.",
        "success",
        fields={"workspace": "prod", "version": "1.2.0"},
        link_url=slack_notifier.flow_run_url("1234"),
        link_text="Open run",
        dedup_key="deploy-1234",
    )

    receipt = slack_notifier.channel_sender().send(notification)

    [message] = slack_standin.wait_for_messages(1)
    fallback, blocks = render_slack_message(notification)
    assert (message.channel, message.text, message.blocks) == ("#ops", fallback, blocks)
    assert message.dedup_key == "deploy-1234"
    assert receipt == NotificationReceipt(channel=message.channel_id, ts=message.ts)
    assert "http://127.0.0.1:4200/runs/flow-run/1234" in str(message.blocks)
    assert slack_standin.call_count("chat.postMessage") == 1


def test_the_standin_tells_over_http_what_an_operator_reads(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    """What the demo prints: ``GET /_standin/received`` renders messages as Slack draws them."""
    slack_notifier.channel_sender().send(
        Notification(
            "Plan waiting for approval",
            "Approve *before* 20:29 <!channel>",
            "warning",
            fields={"workspace": "staging"},
            link_url=slack_notifier.flow_run_url("1234"),
            link_text="Review and approve",
        )
    )
    slack_standin.wait_for_messages(1)
    [message] = httpx.get(f"{slack_standin.base_url}{RECEIVED_PATH}", timeout=10).json()["messages"]
    assert message["rendered"].splitlines() == [
        "\u26a0\ufe0f Plan waiting for approval",
        "Approve before 20:29 <!channel>",  # shown as typed: the sender escaped it, so it never pinged
        "workspace: staging",
        "[Review and approve] http://127.0.0.1:4200/runs/flow-run/1234",
        "severity: warning",
    ]


def test_token_and_extra_secrets_are_redacted_in_what_slack_receives(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    db_password = "hunter2-db-password"
    notification = Notification(
        title=f"Leaky {SLACK_TEST_TOKEN}",
        text=f"env had TOKEN={SLACK_TEST_TOKEN} and DB={db_password}",
        severity="critical",
        fields={"db": db_password},
    )

    sender = slack_notifier.channel_sender()
    sender.send(notification, extra_secrets=[SecretStr(db_password)])
    sender.send(Notification(f"again {SLACK_TEST_TOKEN}", db_password, "info"), extra_secrets=[db_password])

    messages = slack_standin.wait_for_messages(2)
    received = str([m.payload for m in messages])
    assert len(messages) == 2
    assert SLACK_TEST_TOKEN not in received
    assert db_password not in received
    assert "env had TOKEN=*** and DB=***" in received


def test_wrong_token_raises_notification_error_without_the_token(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    wrong_token = "xoxb-wrong-token-value"
    notifier = slack_notifier.model_copy(update={"credentials": SlackCredentials(token=wrong_token)})

    with pytest.raises(NotificationError, match="invalid_auth") as raised:
        notifier.channel_sender().send(Notification("t", "x", "info"))

    assert not isinstance(raised.value, TransientNotificationError)
    assert wrong_token not in str(raised.value)
    assert slack_standin.messages == []


def test_unknown_channel_raises_notification_error(slack_standin: SlackStandIn, slack_notifier: SlackNotifier) -> None:
    notifier = slack_notifier.model_copy(update={"channel": "#nowhere"})

    with pytest.raises(NotificationError, match="channel_not_found"):
        notifier.channel_sender().send(Notification("t", "x", "info"))

    assert slack_standin.messages == []


def test_rate_limited_twice_then_delivered_exactly_once(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    slack_standin.rate_limit_next(2, retry_after_seconds=1)

    slack_notifier.channel_sender().send(Notification("t", "x", "info"))

    assert len(slack_standin.messages) == 1
    assert slack_standin.call_count("chat.postMessage") == 3


@pytest.mark.parametrize(
    ("status", "retried"),
    [(500, True), (502, True), (503, True), (504, True), (599, True), (429, False), (400, False), (404, False)],
)
def test_any_5xx_is_a_passing_server_error_and_nothing_else_is(status: int, retried: bool) -> None:
    # slack-sdk's own ServerErrorRetryHandler takes only 500 and 503; a 502 or 504 from Slack's edge passes too.
    # (A 429 is the rate-limit handler's, below.)
    handler = AnyServerErrorRetryHandler()
    request = HttpRequest(method="POST", url="https://slack.com/api/chat.postMessage", headers={}, data=b"{}")
    response = HttpResponse(status_code=status, headers={}, data=b"")

    assert handler.can_retry(state=RetryState(), request=request, response=response) is retried
    assert handler.can_retry(state=RetryState(), request=request, error=ConnectionResetError()) is False


def test_a_burst_of_server_errors_is_retried_with_backoff_within_seconds_and_delivered_once(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    # 502: a status slack-sdk's own handler would not retry. Every status, one by one, is the table above.
    slack_standin.fail_next(SERVER_ERROR_RETRIES, status=502)

    slack_notifier.channel_sender().send(Notification("Plan waiting for approval", "x", "warning"))

    [message] = slack_standin.messages
    assert slack_standin.call_count("chat.postMessage") == SERVER_ERROR_RETRIES + 1
    attempts = [call.at for call in slack_standin.faulted_calls()] + [message.received_at]
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), f"no backoff: {gaps}"
    assert attempts[-1] - attempts[0] < 5, "a burst costs seconds, not the 30 s of a redelivery"


def test_persistent_server_errors_raise_transient_error(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a burst that does not pass ends in; the shipped backoff's timing is the test above.
    monkeypatch.setattr(slack_module, "SERVER_ERROR_BACKOFF_FACTOR", 0.01)
    slack_standin.fail_next(SERVER_ERROR_RETRIES + 1, status=503)

    with pytest.raises(TransientNotificationError, match="HTTP 503"):
        slack_notifier.channel_sender().send(Notification("t", "x", "info"))

    assert slack_standin.messages == []
    assert slack_standin.call_count("chat.postMessage") == SERVER_ERROR_RETRIES + 1


def test_unreachable_slack_raises_transient_error_without_the_token(slack_notifier: SlackNotifier) -> None:
    stopped = SlackStandIn()
    dead_url = stopped.api_url
    stopped.stop()
    notifier = slack_notifier.model_copy(update={"api_url": dead_url, "timeout_seconds": 1})

    with pytest.raises(TransientNotificationError, match="unreachable") as raised:
        notifier.channel_sender().send(Notification("t", "x", "info"))

    assert SLACK_TEST_TOKEN not in str(raised.value)


# --- the stand-in's own contract ------------------------------------------------------------------------


def test_standin_accepts_form_encoded_calls_and_updates(slack_standin: SlackStandIn) -> None:
    from slack_sdk import WebClient

    client = WebClient(token=SLACK_TEST_TOKEN, base_url=slack_standin.api_url)
    assert client.auth_test()["bot_id"] == "B000STANDIN"
    # api_call with params sends application/x-www-form-urlencoded, blocks as a JSON string.
    posted = client.api_call(
        "chat.postMessage", params={"channel": "#ops", "text": "v1", "blocks": '[{"type": "divider"}]'}
    )
    updated = client.chat_update(channel=posted["channel"], ts=posted["ts"], text="v2")

    [message] = slack_standin.messages
    assert (message.text, message.blocks, updated["ts"]) == ("v2", [{"type": "divider"}], posted["ts"])


def test_standin_records_incoming_webhooks(slack_standin: SlackStandIn) -> None:
    from slack_sdk.webhook import WebhookClient

    response = WebhookClient(slack_standin.webhook_url("T1/B1/x")).send(text="hello")

    assert (response.status_code, response.body) == (200, "ok")
    assert [(d.webhook_id, d.payload) for d in slack_standin.webhook_deliveries] == [("T1/B1/x", {"text": "hello"})]


# --- the Prefect task inside a flow ---------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_the_task_posts_once_per_notification_per_run_and_never_fails_the_run(
    slack_standin: SlackStandIn,
    slack_notifier: SlackNotifier,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session's server may hold the end-to-end fixture's deployments: redelivery must find none here.
    monkeypatch.setattr(notify_tasks, "DELIVERY_DEPLOYMENT", f"deliver-notification/absent-{uuid.uuid4().hex[:8]}")
    notification = Notification("Awaiting approval", f"Plan ready {uuid.uuid4()}", "warning")
    other = Notification("Awaiting approval", "another plan", "warning")
    bad_channel = slack_notifier.model_copy(update={"channel": "#nowhere"})
    # Saved, as flows load it: a message it could not send is redelivered through the block of that name.
    bad_channel.save(f"nowhere-{uuid.uuid4().hex[:8]}")

    @flow
    def notify_twice() -> tuple[NotificationReceipt | None, ...]:
        first = notify(slack_notifier, notification)
        # The same notification again, as after a suspend/resume re-run: answered from the run's cache.
        second = notify(slack_notifier, notification)
        # Another notification in the same run is another step: it is posted.
        third = notify(slack_notifier, other)
        # Slack refusing (an unknown channel) is told in the log and handed to redelivery; the run goes on.
        refused = notify(bad_channel, Notification("t", "x", "info"))
        return first, second, third, refused

    with caplog.at_level("WARNING"):
        first, second, third, refused = notify_twice()

    assert first is not None
    assert third is not None
    assert first == second
    assert refused is None
    assert [m.ts for m in slack_standin.messages] == [first.ts, third.ts]
    # No deliver-notification deployment exists here, so redelivery can't be scheduled: that is said loudly.
    assert any("could not be scheduled" in record.getMessage() for record in caplog.records)
    assert slack_standin.call_count("chat.postMessage") == 3  # the refusal was not retried in the run


# --- operator text is escaped where it is shown ---------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "shown"),
    [
        ("<!channel> deploy now", "&lt;!channel&gt; deploy now"),
        ("<http://evil.example|innocent>", "&lt;http://evil.example|innocent&gt;"),
        ("a & b", "a &amp; b"),
        ("<@U123>", "&lt;@U123&gt;"),
    ],
)
def test_operator_text_cannot_ping_mention_or_disguise_a_link(typed: str, shown: str) -> None:
    fallback, blocks = render_slack_message(
        Notification(f"Rejected by {typed}", f"comment: {typed}", "info", fields={"approver": typed})
    )
    # plain_text (the header) is shown literally by Slack; every mrkdwn text and the fallback are escaped.
    mrkdwn = [block["text"]["text"] for block in blocks if block.get("text", {}).get("type") == "mrkdwn"]
    mrkdwn += [field["text"] for block in blocks for field in block.get("fields", [])]
    rendered = " ".join([*mrkdwn, fallback])
    assert "<!channel>" not in rendered
    assert "<http" not in rendered
    assert "<@" not in rendered
    assert shown in blocks[1]["text"]["text"]
    assert shown in fallback


# --- updating a message in place (chat.update): a deploy's one line in the channel ----------------------


def test_update_rewrites_the_message_in_place_with_new_blocks(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier
) -> None:
    sender = slack_notifier.channel_sender()
    asked = Notification("Plan waiting for approval", "approve me", "warning", link_url="http://x/1", link_text="Go")
    receipt = sender.send(asked)
    reply = sender.send(Notification("Answer refused", "stale hash", "warning"), reply_to=receipt)

    sender.update(receipt, Notification("Deployed acmeinc/web v1 → v2 to staging", "Approved by bob.", "success"))

    [root, in_thread] = slack_standin.messages
    assert (root.ts, root.thread_ts, root.edited) == (receipt.ts, None, True)
    assert root.text.startswith(":white_check_mark: [Success] Deployed acmeinc/web v1 → v2 to staging")
    assert [b["type"] for b in root.blocks] == ["header", "section", "context"], "the old link button is gone"
    assert (in_thread.ts, in_thread.thread_ts, in_thread.edited) == (reply.ts, receipt.ts, False)
    assert slack_standin.call_count("chat.update") == 1


def test_updating_a_reply_keeps_it_in_its_thread(slack_standin: SlackStandIn, slack_notifier: SlackNotifier) -> None:
    sender = slack_notifier.channel_sender()
    root = sender.send(Notification("root", "x", "info"))
    reply = sender.send(Notification("reply", "x", "info"), reply_to=root)

    sender.update(reply, Notification("reply, edited", "y", "info"))

    assert [m.ts for m in slack_standin.top_level()] == [root.ts]
    [edited] = slack_standin.thread(root.ts)
    assert (edited.ts, "reply, edited" in edited.text) == (reply.ts, True)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("unknown ts", "message_not_found"),
        ("another channel", "message_not_found"),
        ("a person's message", "cant_update_message"),
    ],
)
def test_update_refused_as_slack_refuses_it(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier, target: str, error: str
) -> None:
    sender = slack_notifier.channel_sender()
    ours = sender.send(Notification("ours", "x", "info"))
    theirs = slack_standin.post_as_user("#ops", "a person's message")
    receipt = {
        "unknown ts": NotificationReceipt(ours.channel, "1.000001"),
        "another channel": NotificationReceipt("#elsewhere", ours.ts),
        "a person's message": NotificationReceipt(ours.channel, theirs.ts),
    }[target]

    with pytest.raises(NotificationError, match=error) as raised:
        sender.update(receipt, Notification("changed", "y", "info"))

    assert not isinstance(raised.value, TransientNotificationError), "a refusal is not retried"
    assert SLACK_TEST_TOKEN not in str(raised.value)
    assert [(m.text, m.edited) for m in slack_standin.messages][1] == ("a person's message", False)
    assert not slack_standin.messages[0].edited


def test_update_needs_a_valid_token(slack_standin: SlackStandIn, slack_notifier: SlackNotifier) -> None:
    # Copied before the notifier makes (and caches) its client, so the copy makes its own with the wrong token.
    intruder = slack_notifier.model_copy(update={"credentials": SlackCredentials(token="xoxb-wrong")})
    receipt = slack_notifier.channel_sender().send(Notification("ours", "x", "info"))

    with pytest.raises(NotificationError, match="invalid_auth"):
        intruder.channel_sender().update(receipt, Notification("changed", "y", "info"))

    assert not slack_standin.messages[0].edited


def test_update_notice_task_logs_a_refusal_and_never_raises(
    prefect_server: PrefectServer,  # a flow runs here: against the session's server, not a temporary one
    slack_standin: SlackStandIn,
    slack_notifier: SlackNotifier,
) -> None:
    receipt = slack_notifier.channel_sender().send(Notification("ours", "x", "info"))
    gone = NotificationReceipt(receipt.channel, "1.000001")

    @flow
    def rewrite() -> tuple[bool, bool]:
        changed = notify_tasks.update_notice(slack_notifier, receipt, Notification("ended", "y", "success"))
        missing = notify_tasks.update_notice(slack_notifier, gone, Notification("ended", "y", "success"))
        return changed, missing

    assert rewrite() == (True, False)
    [message] = slack_standin.messages
    assert (message.edited, "ended" in message.text) == (True, True)
