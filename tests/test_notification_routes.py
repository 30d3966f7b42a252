"""Every operator message, also through the notification blocks icd.toml routes its kind to: the plain-text
rendering, the routing (real Slack stand-in, real Prefect notification blocks to a local SMTP server and a
local webhook receiver), the UI URL as a site setting, and the health watch's outbox storing the message."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_UI_URL, temporary_settings
from pydantic import SecretStr

from blocks.notifier import AppriseNotification, SlackNotifier, outlet_of
from examples.local_env import free_port
from icd.config import parse_config
from icd.errors import ConfigError, NotificationError
from icd.health.engine import WatchState
from icd.health.state import decode_state, encode_state
from icd.notify.message import Notification
from icd.notify.routes import PlainOutlet, RoutedSender, plain_text, render_plain
from standins.slack import SlackStandIn
from tests.plugins.deploy_env import ENDED, DeployEnv, Receiver
from tests.plugins.slack import SLACK_TEST_TOKEN
from tests.plugins.smtp import SmtpServer

APPROVAL = Notification(
    title="Plan waiting for approval: acmeinc/web v1 → v2 on staging",
    text="*staging*: 1 to add, 0 to change, 1 to destroy. Approve or reject in the Prefect UI before 20:29.",
    severity="warning",
    fields={"workspace": "staging", "artifact": "acmeinc/web v1 → v2", "plan sha256": "ab" * 32},
    link_url="http://127.0.0.1:4200/runs/flow-run/1234",
    link_text="Review and approve",
    dedup_key="plan-abab",
    kind="approval",
)


# --- plain text -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("Applied to *prod*.", "Applied to prod."),
        ("_maybe_ and ~not~", "maybe and not"),
        ("run `icd-lock break ws`", "run `icd-lock break ws`"),  # a command to copy stays marked
        ("deploy_run_id and 2 * 3 * 4", "deploy_run_id and 2 * 3 * 4"),  # not emphasis
        ("TOKEN=*** and ***", "TOKEN=*** and ***"),  # what a redacted secret became
        ("a\u202eb\x07c\nd", "abc\nd"),  # bidi override and bell dropped, the line break kept
        ("<!channel> & <http://evil|innocent>", "<!channel> & <http://evil|innocent>"),  # no Slack escaping
    ],
)
def test_plain_text_drops_slack_emphasis_and_invisible_characters(text: str, plain: str) -> None:
    assert plain_text(text) == plain


def test_render_plain_writes_the_facts_and_the_link_out() -> None:
    subject, body = render_plain(APPROVAL)

    assert subject == "[Warning] Plan waiting for approval: acmeinc/web v1 → v2 on staging"
    assert body.splitlines() == [
        "staging: 1 to add, 0 to change, 1 to destroy. Approve or reject in the Prefect UI before 20:29.",
        "",
        "workspace: staging",
        "artifact: acmeinc/web v1 → v2",
        f"plan sha256: {'ab' * 32}",
        "",
        "Review and approve: http://127.0.0.1:4200/runs/flow-run/1234",
        "",
        "severity: warning · kind: approval",
    ]


def test_the_subject_is_one_line_whatever_the_title_holds() -> None:
    subject, _ = render_plain(Notification("Build failed\r\nBcc: everyone@example.com", "x", "critical"))
    assert subject == "[Critical] Build failed Bcc: everyone@example.com"


# --- routing --------------------------------------------------------------------------------------------


@pytest.fixture
def webhook() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.stop()


def _webhook_block(url: str) -> CustomWebhookNotificationBlock:
    return CustomWebhookNotificationBlock(
        name="ops-hook", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}, allow_private_urls=True
    )


def _routed(
    notifier: SlackNotifier, routes: dict[str, list[str]], blocks: dict[str, NotificationBlock]
) -> RoutedSender:
    def open_outlet(route: str) -> tuple[PlainOutlet, list[str]]:
        if route not in blocks:
            raise ValueError(f"Unable to find block document named {route}")
        return outlet_of(blocks[route])

    return RoutedSender(
        notifier.channel_sender(),
        routes,  # type: ignore[arg-type]  # plain strings as icd.toml's keys, checked there
        open_outlet,
        secrets=[notifier.credentials.token],
        logger=logging.getLogger("test-routes"),
    )


def test_a_message_goes_to_slack_and_to_every_route_of_its_kind(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier, smtp_server: SmtpServer, webhook: Receiver
) -> None:
    sender = _routed(
        slack_notifier,
        {"approval": ["apprise-notification/ops-mail", "custom-webhook/ops-hook"], "health": []},
        {
            "apprise-notification/ops-mail": AppriseNotification(url=SecretStr(smtp_server.mailto())),
            "custom-webhook/ops-hook": _webhook_block(webhook.url),
        },
    )

    receipt = sender.send(APPROVAL)
    sender.send(Notification("Instance web-1 is critical", "check failed", "critical", kind="health"))

    assert slack_standin.wait_for_messages(2)[0].ts == receipt.ts
    mail = smtp_server.wait_for_mail("acmeinc/web v1 → v2 on staging")
    subject, body = render_plain(APPROVAL)
    assert (mail.subject, mail.envelope_to) == (subject, ["ops@example.com"])
    assert mail.text.replace("\r\n", "\n") == body
    assert webhook.posts == [{"subject": subject, "body": body}]
    assert sender.failed_copies == 0
    assert not any("critical" in mail.subject for mail in smtp_server.mails)  # health is routed nowhere


def test_a_failing_route_never_stops_slack_and_is_counted_without_its_secret(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_password = "smtp-secret-pass-9f2"
    closed = free_port()
    sender = _routed(
        slack_notifier,
        {"approval": ["apprise-notification/closed-mail", "custom-webhook/closed-hook", "custom-webhook/missing"]},
        {
            "apprise-notification/closed-mail": AppriseNotification(
                url=SecretStr(f"mailto://icd:{smtp_password}@127.0.0.1:{closed}?to=ops@example.com&mode=insecure")
            ),
            "custom-webhook/closed-hook": _webhook_block(f"http://127.0.0.1:{closed}/hook"),
        },
    )

    with caplog.at_level(logging.WARNING, logger="test-routes"):
        receipt = sender.send(APPROVAL)
        report = sender.copy(dataclasses.replace(APPROVAL, dedup_key="plan-other"))

    assert [m.ts for m in slack_standin.wait_for_messages(1)] == [receipt.ts]
    assert sender.failed_copies == 6  # three routes, twice
    assert sorted(report.failed) == [
        "apprise-notification/closed-mail",
        "custom-webhook/closed-hook",
        "custom-webhook/missing",
    ]
    assert "Unable to find block document named custom-webhook/missing" in report.failed["custom-webhook/missing"]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged.count("not copied to") == 6
    assert smtp_password not in logged + json.dumps(report.failed)


def test_a_copy_is_made_when_slack_refuses_and_made_once(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier, webhook: Receiver
) -> None:
    nowhere = slack_notifier.model_copy(update={"channel": "#nowhere"})
    sender = _routed(
        nowhere, {"approval": ["custom-webhook/ops-hook"]}, {"custom-webhook/ops-hook": _webhook_block(webhook.url)}
    )

    with pytest.raises(NotificationError, match="channel_not_found"):
        sender.send(APPROVAL)
    # The health watch sends an outbox Slack did not take again: the copy is not made twice.
    with pytest.raises(NotificationError, match="channel_not_found"):
        sender.send(APPROVAL)

    assert [post["subject"] for post in webhook.posts] == [render_plain(APPROVAL)[0]]
    assert slack_standin.messages == []


def test_secrets_are_kept_out_of_copies(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier, smtp_server: SmtpServer
) -> None:
    mail_block = AppriseNotification(url=SecretStr(smtp_server.mailto(to="leak-check@example.com")))
    sender = _routed(slack_notifier, {"deploy": ["apprise-notification/m"]}, {"apprise-notification/m": mail_block})
    leaky = Notification(
        f"Leak check {SLACK_TEST_TOKEN}",
        f"env had TOKEN={SLACK_TEST_TOKEN} and the mail URL {smtp_server.mailto(to='leak-check@example.com')}",
        "critical",
        fields={"token": SLACK_TEST_TOKEN},
    )

    sender.send(leaky)

    mail = smtp_server.wait_for_mail("Leak check")
    assert SLACK_TEST_TOKEN not in mail.subject + mail.text
    assert "mailto://" not in mail.text
    assert "env had TOKEN=*** and the mail URL ***" in mail.text


# --- icd.toml -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[notifications]\npager = ["custom-webhook/x"]', "notifications.pager: Extra inputs are not permitted"),
        ('[notifications]\napproval = ["ops-mail"]', "notifications.approval.0: String should match pattern"),
        ('[site]\nprefect_ui_url = "ftp://ui"', "site.prefect_ui_url: String should match pattern"),
    ],
)
def test_a_bad_route_or_site_setting_is_refused_by_name(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config(text)


def test_the_ui_url_is_a_site_setting_with_the_blocks_own_as_the_last_resort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slack_notifier: SlackNotifier
) -> None:
    config = tmp_path / "icd.toml"
    monkeypatch.setenv("ICD_CONFIG", str(config))
    legacy = slack_notifier.model_copy(update={"prefect_ui_url": "http://legacy:4200"})

    config.write_text("")
    with temporary_settings(restore_defaults={PREFECT_UI_URL}):
        assert legacy.flow_run_url("r1") == "http://legacy:4200/runs/flow-run/r1"
        assert slack_notifier.model_copy(update={"prefect_ui_url": None}).flow_run_url("r1") is None
    with temporary_settings({PREFECT_UI_URL: "https://prefect.example.com/"}):
        assert legacy.flow_run_url("r1") == "https://prefect.example.com/runs/flow-run/r1"
        config.write_text('[site]\nprefect_ui_url = "https://ui.example.com/prefect"\n')
        assert legacy.flow_run_url("r1") == "https://ui.example.com/prefect/runs/flow-run/r1"


# --- the health watch's outbox stores the notification itself --------------------------------------------


def test_the_outbox_keeps_every_field_of_a_notification_and_reads_old_items_as_health() -> None:
    written = encode_state(WatchState(), [APPROVAL])
    _, outbox, _, _ = decode_state(written)
    assert outbox == (APPROVAL,)

    before_kinds = json.dumps(
        {
            "schema_version": 3,
            "writer": "w",
            "instances": {},
            "outbox": [{"title": "web-1 critical", "text": "x", "severity": "critical", "fields": {}}],
        }
    ).encode()
    _, outbox, _, _ = decode_state(before_kinds)
    assert [(n.title, n.kind) for n in outbox] == [("web-1 critical", "health")]


# --- end to end: a deploy's approval notice by e-mail, through a block icd.toml names ----------------------


def test_a_deploys_approval_notice_is_also_mailed_through_the_block_icd_toml_routes_it_to(
    deploy_env: DeployEnv, smtp_server: SmtpServer
) -> None:
    env = deploy_env
    names = env.service()
    ws = names.workspace
    to = f"ops-{ws}@example.com"
    AppriseNotification(url=SecretStr(smtp_server.mailto(to=to))).save(f"mail-{ws}", overwrite=True)
    env.build(names)
    first = env.deploy(ws, 1)
    assert _state_of(env.wait_for(first.id, states={"PAUSED", *ENDED})) == "PAUSED", _last_logs(env, first.id)
    env.wait_for_question(first.id)
    assert env.approve(first.id, ws).state.name == "Deployed"  # type: ignore[union-attr]
    env.repo.commit("v2", {"src/app.py": env.repo.read("src/app.py") + f"\n# v2 {ws}\n"}, branch=f"v2-{ws}")
    env.build(names, f"v2-{ws}")

    env.route("approval", [f"apprise-notification/mail-{ws}"])
    try:
        second = env.deploy(ws, 2)
        assert _state_of(env.wait_for(second.id, states={"PAUSED", *ENDED})) == "PAUSED", _last_logs(env, second.id)
        env.wait_for_question(second.id)
        mail = smtp_server.wait_for_mail(f"{names.namespace} v1 -> v2 on {ws}")
    finally:
        env.route("approval", [])

    title = f"Plan waiting for approval: {names.namespace} v1 -> v2 on {ws}"
    assert mail.envelope_to == [to]
    assert mail.subject == f"[Warning] {title}"
    text = mail.text.replace("\r\n", "\n")
    assert f"Deploy {names.namespace} v1 → v2 to {ws}" in text
    assert f"artifact: {names.namespace} v1 -> v2" in text
    assert f"plan sha256: {env.plan_sha(ws, second.id)}" in text
    assert f"Review and approve: {env.server.ui_url}/runs/flow-run/{second.id}" in text
    assert "severity: warning · kind: approval" in text
    assert not any(secret in mail.subject + text for secret in env.secrets().values())
    # Slack was told the same, in its own markup; only the approval kind was routed to the mailbox.
    assert any(title in str(m.blocks) for m in env.slack.messages)
    assert [m.subject for m in smtp_server.mails if m.envelope_to == [to]] == [mail.subject]
    env.answer(second.id, env.plan_sha(ws, second.id), decision="reject")
    env.wait_for(second.id, states=ENDED)


def _state_of(run: FlowRun) -> str:
    """PAUSED, or what the run became instead (with its message)."""
    if run.state is None:
        return "no state"
    kind = run.state.type.value
    return kind if kind == "PAUSED" else f"{kind} {run.state.name}: {run.state.message}"


def _last_logs(env: DeployEnv, run_id: object) -> list[str]:
    return [log.message for log in env.logs(run_id)][-20:]


def test_the_thread_key_travels_to_the_plain_copy_so_a_reader_can_group_a_deploys_messages() -> None:
    _, body = render_plain(dataclasses.replace(APPROVAL, thread_key="deploy-run:1234"))

    assert "thread: deploy-run:1234" in body.splitlines()
    assert "thread:" not in render_plain(APPROVAL)[1], "a message of no thread says none"


def test_the_outbox_keeps_a_thread_key() -> None:
    threaded = dataclasses.replace(APPROVAL, thread_key="deploy-run:1234")

    _, outbox, _, _ = decode_state(encode_state(WatchState(), [threaded]))

    assert outbox == (threaded,)


def test_an_update_rewrites_the_slack_message_and_copies_nothing(
    slack_standin: SlackStandIn, slack_notifier: SlackNotifier, webhook: Receiver
) -> None:
    sender = _routed(
        slack_notifier,
        {"approval": ["custom-webhook/ops-hook"]},
        {"custom-webhook/ops-hook": _webhook_block(webhook.url)},
    )
    receipt = sender.send(APPROVAL)

    sender.update(receipt, dataclasses.replace(APPROVAL, title="Deployed acmeinc/web v1 → v2 to staging"))

    [message] = slack_standin.messages
    assert (message.edited, "Deployed acmeinc/web" in message.text) == (True, True)
    assert [post["subject"] for post in webhook.posts] == [render_plain(APPROVAL)[0]], (
        "the copy was made once, when sent"
    )
