"""End to end: every message of one deploy run in the thread of its approval notice, and the channel's one
line for the deploy (that notice) rewritten to say how it ended (docs/operations.md#what-the-channel-shows)."""

from __future__ import annotations

import pytest

from tests.plugins.deploy_env import DeployEnv

pytestmark = pytest.mark.slow


def test_a_deploy_is_one_line_in_the_channel_and_everything_else_in_its_thread(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service(approval_timeout_seconds=900)
    ws = names.workspace
    run, _ = env.deploy_until_paused(names)
    sha = env.plan_sha(ws, run.id)
    # An approver with nothing visible passes the form's schema and is refused by the flow: told, asked again.
    env.answer(run.id, sha, approver=" \u200b ")
    env.wait_for_pause(run.id, "approval-1")
    done = env.approve(run.id, ws, approver="bob")
    assert done.state is not None
    assert done.state.name == "Deployed", done.state

    key = f"deploy-run:{run.id}"
    of_the_run = [m for m in env.slack.messages if m.thread_key == key]
    [root] = [m for m in of_the_run if m.thread_ts is None]
    replies = [m for m in of_the_run if m.thread_ts is not None]
    # The one line: the approval notice, updated in place to the outcome, its approve link gone.
    assert root.edited, "the approval notice was rewritten when the run ended"
    assert root.text.startswith(":white_check_mark: [Success] Deployed "), root.text
    assert f"to {ws}" in root.text
    assert "Review and approve" not in str(root.blocks)
    assert "Open the run" in str(root.blocks), "the link to the run stays"
    # Everything else in its thread: the refusal and the outcome with its details.
    assert {m.thread_ts for m in replies} == {root.ts}
    said = [m.text for m in replies]
    assert [text for text in said if "Approval not accepted" in text], said
    assert [text for text in said if text.startswith(":white_check_mark: [Success] Deployed ")], said
    # And nothing about this run at the top of the channel but that line (every message carries the key).
    about_the_run = [m for m in env.slack.top_level() if str(run.id) in str(m.payload) or key in str(m.metadata)]
    assert [m.ts for m in about_the_run] == [root.ts]
