"""The one place an interaction from Slack is routed, whichever way it came (HTTP or Socket Mode)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from icd.deploy.drift import RECONCILE_ACTION
from icd.interactions.alerts import ALERT_ACTIONS, AlertButtons
from icd.interactions.approvals import ApprovalButtons
from icd.interactions.payloads import REJECT_CALLBACK, ButtonClick, ModalSubmitted, NotOurs, read_payload
from icd.interactions.reconcile import ReconcileButton
from icd.interactions.reply import Reply

log = logging.getLogger("icd.interactions")


class SlackInteractions:
    """Routes each interaction to what acts on it: the approval buttons and the reject modal, and a health
    alert's buttons (``alerts``; without it, they are not acted on)."""

    def __init__(self, approvals: ApprovalButtons, alerts: AlertButtons | None = None) -> None:
        self.approvals = approvals
        self.alerts = alerts
        # A drift notice's Reconcile: allowed to whoever may decide on the workspace's plans.
        self.reconcile = ReconcileButton(config=approvals.config, members=approvals.group_members)

    def receive(self, payload: Mapping[str, Any]) -> Reply:
        read = read_payload(payload)
        if isinstance(read, NotOurs):
            log.info("interaction not acted on: %s", read.why)
            return Reply()
        person = read.person
        if isinstance(read, ButtonClick):
            log.info("%s/%s clicked %s", person.team_id, person.user_id, read.action)
            if read.action in ALERT_ACTIONS:
                if self.alerts is None:
                    log.warning("a health alert's %s button was clicked, but alert buttons are off", read.action)
                    return Reply()
                return self.alerts.click(read)
            if read.action == RECONCILE_ACTION:
                return self.reconcile.click(read)
            return self.approvals.click(read)
        if isinstance(read, ModalSubmitted) and read.callback_id == REJECT_CALLBACK:
            log.info("%s/%s submitted the reject modal", person.team_id, person.user_id)
            return self.approvals.submitted(read)
        log.info("interaction not acted on: modal %r is not ours", read.callback_id)
        return Reply()
