"""Reconcile, clicked on a drift notice: start the deploy of what the workspace should run.

The button does what the notice's command does, nothing more: a deploy-artifact run of that workspace and
version, which plans, asks for approval (under the workspace's policy) and applies as usual. So the click
itself is allowed to whoever may decide on the workspace's plans; the clicker is told, ephemerally, which run
was started. Two clicks on the same notice start one run (an idempotency key per notice and version).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect.deployments import run_deployment

from icd.config import PipelineConfig
from icd.deploy.approvers import may_decide
from icd.errors import ConfigError
from icd.interactions.approvals import tell_clicker
from icd.interactions.payloads import ButtonClick
from icd.interactions.reply import Reply
from icd.text import one_line

log = logging.getLogger("icd.interactions")
DEPLOYMENT = "deploy-artifact/deploy-artifact"


def start_deploy(workspace: str, version: int, key: str) -> Any:
    """A deploy-artifact run of ``workspace`` at ``version``; the same ``key`` returns the same run."""
    return run_deployment(
        DEPLOYMENT, parameters={"workspace": workspace, "version": version}, timeout=0, idempotency_key=key
    )


class ReconcileButton:
    def __init__(
        self,
        *,
        config: Callable[[], PipelineConfig],
        members: Callable[[list[str], str], set[str]],
        start: Callable[[str, int, str], Any] = start_deploy,
        respond: Callable[[str, str], None] = tell_clicker,
    ) -> None:
        self.config = config
        self.members = members  # the users of the policy's user groups (read from Slack)
        self.start = start
        self.respond = respond

    def click(self, click: ButtonClick) -> Reply:
        return Reply(later=lambda: self.reconcile(click))

    def reconcile(self, click: ButtonClick) -> None:
        workspace, version = click.value.get("workspace"), click.value.get("version")
        if not isinstance(workspace, str) or not isinstance(version, int):
            self.respond(click.response_url, "Nothing started: the button names no workspace and version.")
            return
        try:
            policy = self.config().workspace(workspace).approval
        except ConfigError as exc:
            self.respond(click.response_url, f"Nothing started: {exc}.")
            return
        person = click.person
        refused = may_decide(policy, workspace, person.user_id, self.members(policy.approvers, person.user_id))
        if refused is not None:
            self.respond(click.response_url, f"Nothing started: {refused.reason}.")
            return
        key = f"reconcile-{workspace}-v{version}-{click.channel_id}-{click.message_ts}"
        try:
            run = self.start(workspace, version, key)
        except Exception as exc:
            log.exception("could not start the reconcile deploy of %s", workspace)
            self.respond(click.response_url, f"Nothing started: {type(exc).__name__} ({one_line(str(exc), 200)}).")
            return
        log.info(
            "slack:%s/%s started reconcile run %s of %s v%d",
            person.team_id,
            person.user_id,
            run.name,
            workspace,
            version,
        )
        self.respond(
            click.response_url,
            f"Started {run.name}: it plans v{version} into {workspace} and asks for approval as usual.",
        )
