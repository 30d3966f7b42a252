"""End to end: approving and rejecting from Slack (icd/interactions/approvals.py).

The Slack stand-in plays Slack: it posts each click, signed with the app's signing secret, to icd-inbound's
``/slack/interactions``, opens modals, and records what the app tells each clicker through the click's
``response_url``. Real Prefect server, worker, Terraform and the Consul stand-in behind it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
import pytest
from prefect.blocks.system import Secret
from prefect.client.schemas.objects import FlowRun

from examples.local_env import start_inbound
from icd.deploy.votes import read_votes
from standins.slack import (
    TEAM_ID,
    EphemeralMessage,
    InteractionResult,
    ReceivedMessage,
    SlackStandIn,
    render_for_reading,
)
from standins.slack_socket import SlackSocketStandIn
from tests.plugins.deploy_env import ENDED, DeployEnv
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

APPROVE = "icd.approve"
REJECT = "icd.reject"


def _people(slack: SlackStandIn) -> None:
    slack.add_user("U0DEV", "dev", "Dev Eloper")
    slack.add_user("U0CAROL", "carol", "Carol")
    slack.add_user("U0MALLORY", "mallory")
    slack.set_usergroup("S0OPS", ["U0DEV", "U0CAROL"])


def _notice(env: DeployEnv, run_id: Any) -> ReceivedMessage:
    """The run's approval notice: its one top-level message."""
    key = f"deploy-run:{run_id}"
    return wait_until(
        lambda: next((m for m in env.slack.top_level() if m.thread_key == key), None),
        timeout=30,
        message="the approval notice was not posted",
    )


def _told(env: DeployEnv, user: str, containing: str, *, after: int = 0) -> EphemeralMessage:
    """The ephemeral message the app sent ``user`` (only they see it) holding ``containing``."""
    return wait_until(
        lambda: next(
            (m for m in env.slack.ephemeral_messages[after:] if m.user == user and containing in m.text), None
        ),
        timeout=30,
        message=f"{user} was not told {containing!r}; told: {[m.text for m in env.slack.ephemeral_messages]}",
    )


def _buttons(message: ReceivedMessage) -> list[str]:
    return [e.get("action_id", "") for b in message.blocks if b.get("type") == "actions" for e in b["elements"]]


def _resigned(env: DeployEnv, request: tuple[dict[str, str], bytes]) -> tuple[bytes, dict[str, str]]:
    """The same click sent again later, freshly signed (a person who clicked a button on a stale screen)."""
    _, body = request
    payload = json.loads(parse_qs(body.decode())["payload"][0])
    payload["actions"][0]["action_ts"] = f"{time.time():.6f}"
    fresh = urlencode({"payload": json.dumps(payload)}).encode()
    return fresh, env.slack.signed_headers(fresh)


def _answered_in_time(result: InteractionResult) -> None:
    """Slack shows the clicker an error unless the app answers 200 within 3 s."""
    assert result.status == 200, result
    assert result.elapsed_seconds < 3, result


def _ended_as(run: FlowRun, name: str) -> None:
    assert run.state is not None
    assert run.state.name == name, run.state


def test_two_proven_approvers_under_the_policy_apply_the_plan_and_everyone_else_is_told_why_not(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    _people(env.slack)
    env.people["dev"] = {"slack": "U0DEV", "emails": ["dev@example.com"]}
    names = env.service(
        approval_timeout_seconds=900,
        approval={"approvers": ["S0OPS"], "required": 2, "prevent_self_review": True, "sources": ["slack"]},
    )
    ws = names.workspace
    run, _ = env.deploy_until_paused(names)
    sha = env.plan_sha(ws, run.id)
    notice = _notice(env, run.id)
    assert _buttons(notice)[:2] == [APPROVE, REJECT]
    shown = render_for_reading(notice)
    for fact in ("commit", "dev <dev@example.com>", "1 add", sha, "2 distinct approvers"):
        assert fact in shown, (fact, shown)
    confirm = next(e for b in notice.blocks if b.get("type") == "actions" for e in b["elements"])["confirm"]
    assert confirm["title"]["text"] == "Apply this plan?"

    # Someone outside the policy: told, nothing recorded.
    refused = env.slack.click(notice.ts, APPROVE, "U0MALLORY")
    _answered_in_time(refused)
    _told(env, "U0MALLORY", f"you may not approve {ws}")
    # The UI's form: the workspace takes proven approvals only. The run asks again.
    assert env.answer(run.id, sha, approver="alice") is None
    env.wait_for_pause(run.id, "approval-1")
    # The suspension and its message are two writes: wait for the second.
    wait_until(
        lambda: "takes approvals from Slack only" in env.state_message(run.id),
        timeout=30,
        message="the run never said why it asks again",
    )

    # The commit's author may approve, but not alone: 1 of 2, in place and in the thread.
    first = env.slack.click(notice.ts, APPROVE, "U0DEV")
    _answered_in_time(first)
    _told(env, "U0DEV", "recorded (1 of 2)")
    updated = wait_until(
        lambda: next((m for m in env.slack.messages if m.ts == notice.ts and "1 of 2" in str(m.blocks)), None),
        timeout=30,
        message="the notice does not show 1 of 2",
    )
    assert _buttons(updated)[:2] == [APPROVE, REJECT], "still waiting: the buttons stay"
    assert [m for m in env.slack.thread(notice.ts) if "Approved by Dev Eloper (1 of 2)" in m.text]
    # The very same signed request again (a replay): answered, not acted on twice.
    told_before = len(env.slack.ephemeral_messages)
    replay = env.slack.send_signed(first.request[1], first.request[0])
    assert replay.status == 200
    # A second click of the same person: told, not counted twice.
    env.slack.click(notice.ts, APPROVE, "U0DEV")
    _told(env, "U0DEV", "approved this plan already (1 of 2)", after=told_before)
    assert len(read_votes(run.id, sha)) == 1
    assert len([m for m in env.slack.ephemeral_messages[told_before:] if m.user == "U0DEV"]) == 1, "replay acted"

    # A second member of the group: 2 of 2, the run resumes and applies exactly that plan.
    last = env.slack.click(notice.ts, APPROVE, "U0CAROL")
    _answered_in_time(last)
    done = env.wait_for(run.id, states=ENDED)
    _ended_as(done, "Deployed")
    final = wait_until(
        lambda: next(
            (m for m in env.slack.messages if m.ts == notice.ts and m.text.startswith(":white_check_mark:")), None
        ),
        timeout=30,
        message="the notice was not rewritten with the outcome",
    )
    assert not {APPROVE, REJECT} & set(_buttons(final)), "decided: the buttons go"
    rewritten = str(final.blocks)
    assert f"slack:{TEAM_ID}/U0DEV (Dev Eloper)" in rewritten
    assert f"slack:{TEAM_ID}/U0CAROL (Carol)" in rewritten
    assert "in Slack" in rewritten

    # A click on the finished run (a screen that had not refreshed): told why, nothing changes.
    body, headers = _resigned(env, last.request)
    late = env.slack.send_signed(body, headers)
    assert late.status == 200
    _told(env, "U0CAROL", "no longer waiting for approval")


def test_a_rejection_asks_why_applies_nothing_and_a_ui_decision_updates_the_slack_message(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    _people(env.slack)
    names = env.service(approval_timeout_seconds=900)
    ws = names.workspace

    run, version = env.deploy_until_paused(names)
    notice = _notice(env, run.id)
    clicked = env.slack.click(notice.ts, REJECT, "U0CAROL")
    _answered_in_time(clicked)
    view = wait_until(
        lambda: next((v for v in env.slack.views if v.user == "U0CAROL" and v.callback_id == "icd.reject"), None),
        timeout=30,
        message="the reason modal did not open",
    )
    submitted = env.slack.submit_view(view.id, "U0CAROL", {"reason": {"reason-input": "not during the freeze <!here>"}})
    assert submitted.status == 200
    done = env.wait_for(run.id, states=ENDED)
    _ended_as(done, "Rejected")
    assert env.holder(ws) is None
    rejected = wait_until(
        lambda: next((m for m in env.slack.messages if m.ts == notice.ts and "Plan rejected" in m.text), None),
        timeout=30,
        message="the notice does not say it was rejected",
    )
    assert not {APPROVE, REJECT} & set(_buttons(rejected))
    assert f"slack:{TEAM_ID}/U0CAROL (Carol)" in str(rejected.blocks)
    assert "<!here>" not in json.dumps(rejected.blocks), "a typed reason can't ping the channel"
    assert "not during the freeze" in str(rejected.blocks)

    # The same workspace again, decided in the Prefect UI: the Slack message says so, in place.
    again = env.deploy(ws, version)
    env.wait_for(again.id, states={"PAUSED"})
    env.wait_for_question(again.id)
    second = _notice(env, again.id)
    assert APPROVE in _buttons(second)
    done = env.approve(again.id, ws, approver="alice")
    _ended_as(done, "Deployed")
    ui = next(m for m in env.slack.messages if m.ts == second.ts)
    assert ui.edited
    assert not {APPROVE, REJECT} & set(_buttons(ui))
    assert "alice" in str(ui.blocks)
    assert "the Prefect UI" in str(ui.blocks)


def test_forged_and_stale_requests_are_refused_and_act_on_nothing(deploy_env: DeployEnv) -> None:
    env = deploy_env
    url = f"{env.inbound_url}/slack/interactions"
    payload = {"type": "block_actions", "user": {"id": "U0CAROL", "team_id": TEAM_ID}, "actions": []}
    body = urlencode({"payload": json.dumps(payload)}).encode()
    form = {"content-type": "application/x-www-form-urlencoded"}
    unsigned = httpx.post(url, content=body, headers=form)
    assert unsigned.status_code == 401
    assert unsigned.json() == {"error": "unsigned"}
    forged = httpx.post(url, content=body, headers={**form, **env.slack.signed_headers(body, secret="not-the-secret")})
    assert forged.status_code == 401
    assert forged.json() == {"error": "bad-signature"}
    old = httpx.post(
        url, content=body, headers={**form, **env.slack.signed_headers(body, timestamp=int(time.time()) - 301)}
    )
    assert old.status_code == 401
    assert old.json() == {"error": "stale-timestamp"}
    health = httpx.get(f"{env.inbound_url}/health").json()["slack_refused"]
    assert health["unsigned"] >= 1
    assert health["bad-signature"] >= 1
    assert health["stale-timestamp"] >= 1


def test_socket_mode_carries_the_same_clicks_without_a_public_url(deploy_env: DeployEnv) -> None:
    env = deploy_env
    _people(env.slack)
    app_token = f"xapp-socket-{uuid.uuid4().hex[:8]}"
    Secret(value=app_token).save("slack-app-token-e2e", overwrite=True)
    socket = SlackSocketStandIn(app_token=app_token).start()
    # From here on the Slack stand-in answers apps.connections.open and delivers clicks over the WebSocket.
    env.slack.attach_socket_mode(socket)
    # A second icd-inbound with Socket Mode and no Slack route: clicks can reach it only over the WebSocket.
    process, _ = start_inbound(
        env.server,
        config=env.config_path,
        extra_args=[
            "--slack-socket-mode",
            "--slack-app-token-block",
            "slack-app-token-e2e",
            "--slack-signing-secret-block",
            "no-such-block",
        ],
        name="inbound-socket-mode",
    )
    try:
        socket.wait_for_connection(timeout=30)
        names = env.service(approval_timeout_seconds=900)
        run, _ = env.deploy_until_paused(names)
        notice = _notice(env, run.id)
        clicked = env.slack.click(notice.ts, APPROVE, "U0CAROL")
        _answered_in_time(clicked)
        done = env.wait_for(run.id, states=ENDED)
        _ended_as(done, "Deployed")
        assert done.state is not None
        assert f"slack:{TEAM_ID}/U0CAROL" in (done.state.message or "")
        assert app_token not in process.log_tail(400), "the app token is never logged"
    finally:
        env.slack.attach_socket_mode(None)
        process.stop()
        socket.stop()
