"""Approve and Reject, clicked on a plan's approval notice in Slack.

A click is answered at once (Slack gives an app 3 s) and acted on after:

    Approve -> the run still waits, on this plan, before its deadline? the clicker may decide (the
               workspace's policy: listed users or user groups, Slack allowed as a source)? not a second
               click? not the commit's author alone? -> the vote is recorded on the run
               -> enough distinct approvers: the run resumes with the same answer the UI's form gives
                  (``approver`` = the clicker's Slack identity), and the run checks it all again
               -> not yet: the notice shows "1 of 2" in place, and the thread says who approved
    Reject  -> the same checks -> a modal asks for the reason -> submitted: the run resumes, rejected

Whatever is refused is told to the clicker alone (an ephemeral message through the click's
``response_url``) and changes nothing. The run itself rewrites the notice once it has the answer
(``tasks/context.py``), so a decision made in the UI updates the Slack message the same way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.models.blocks import InputBlock, PlainTextInputElement, PlainTextObject, SectionBlock
from slack_sdk.models.views import View
from slack_sdk.webhook import WebhookClient

from icd.config import ApprovalPolicy, PipelineConfig
from icd.deploy.approval import (
    ANSWER_PATIENCE_SECONDS,
    APPROVE_ACTION,
    REJECT_ACTION,
    InvalidApproval,
    RunNotWaiting,
    give_answer,
)
from icd.deploy.approvers import Decision, Refused, Verdict, Vote, may_decide, slack_approvals, tally
from icd.deploy.votes import ApprovalRequest, cast_vote, read_request, read_votes
from icd.errors import ConfigError, NotificationError
from icd.interactions.payloads import (
    REASON_BLOCK,
    REASON_INPUT,
    REJECT_CALLBACK,
    ButtonClick,
    ModalSubmitted,
    Person,
)
from icd.interactions.reply import Reply
from icd.notify.message import Notification, Sender
from icd.run_state import Unknown, flow_run_state
from icd.text import one_line, operator_time, slack_mrkdwn

log = logging.getLogger("icd.interactions")
# A run that asked is still RUNNING for a moment before it suspends (or PENDING/SCHEDULED when resuming).
_ON_ITS_WAY = frozenset({StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED})
_REASON_MAX = 1000


def tell_clicker(response_url: str, text: str) -> None:
    """An ephemeral message to whoever clicked: only they see it, and the message they clicked stays."""
    if not response_url:
        log.warning("no response_url to tell the clicker: %s", text)
        return
    try:
        # Escaped: the text can quote what someone typed (a reason in a run's state message).
        WebhookClient(response_url, timeout=10).send(
            text=slack_mrkdwn(text), response_type="ephemeral", replace_original=False
        )
    except (SlackClientError, OSError) as exc:
        log.warning("could not tell the clicker (%s): %s", exc, text)


@dataclass(frozen=True)
class Waiting:
    """A run that waits for an answer on the plan a button names."""

    run_id: UUID
    run_name: str
    request: ApprovalRequest
    policy: ApprovalPolicy


class ApprovalButtons:
    """Acts on Approve, Reject and the reject modal; ``slack`` reads users and groups and opens the modal,
    ``sender`` rewrites the notice and replies in its thread, ``respond`` tells the clicker alone."""

    def __init__(
        self,
        *,
        slack: WebClient,
        sender: Sender,
        config: Callable[[], PipelineConfig],
        respond: Callable[[str, str], None] = tell_clicker,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        patience: float = ANSWER_PATIENCE_SECONDS,
    ) -> None:
        self.patience = patience
        self._team_id: str | None = None
        self.slack = slack
        self.sender = sender
        self.config = config
        self.respond = respond
        self.now = now

    # --- what is answered at once -------------------------------------------------------------------------

    def click(self, click: ButtonClick) -> Reply:
        if click.action == APPROVE_ACTION:
            return Reply(later=self._answered(click.response_url, lambda: self.approve(click)))
        if click.action == REJECT_ACTION:
            return Reply(later=self._answered(click.response_url, lambda: self.ask_reason(click)))
        return Reply()

    def _answered(self, response_url: str, work: Callable[[], None]) -> Callable[[], None]:
        """``work``, and if it fails (the Prefect API down), the clicker is told nothing changed, never silence."""

        def run() -> None:
            try:
                work()
            except Exception as exc:
                log.exception("acting on a Slack click failed")
                self.respond(response_url, f"Nothing changed: {type(exc).__name__} ({one_line(str(exc), 200)}).")

        return run

    def submitted(self, modal: ModalSubmitted) -> Reply:
        reason = one_line(modal.values.get(REASON_BLOCK, ""), _REASON_MAX)
        if not reason:  # Slack's own check of a required input makes this rare: a reason of spaces
            return Reply(body={"response_action": "errors", "errors": {REASON_BLOCK: "Say why the plan is rejected."}})
        response_url = str(modal.metadata.get("response_url", ""))
        return Reply(later=self._answered(response_url, lambda: self.reject(modal, reason)))

    # --- what is done after answering --------------------------------------------------------------------

    def approve(self, click: ButtonClick) -> None:
        person = click.person
        waiting = self._waiting(click.value, person, "approve")
        if isinstance(waiting, Refused):
            self.respond(click.response_url, f"Nothing approved: {waiting.reason}.")
            return
        request = waiting.request
        votes = read_votes(waiting.run_id, request.plan_sha256)
        mine = Vote(
            "approve", request.plan_sha256, person.team_id, person.user_id, self._name(person.user_id), self.now()
        )
        if any(v.identity == mine.identity and v.decision == "approve" for v in votes):
            self.respond(click.response_url, f"You approved this plan already ({self._progress(waiting, votes)}).")
            return
        verdict = tally(
            waiting.policy, request.workspace, slack_approvals([*votes, mine], request.plan_sha256), request.authors
        )
        if isinstance(verdict, Refused):
            self.respond(click.response_url, f"Nothing approved: {verdict.reason}.")
            return
        if not cast_vote(waiting.run_id, mine):
            self.respond(click.response_url, "You approved this plan already.")
            return
        # Counted again from what is recorded: two people clicking at once each see the other's vote here,
        # so the second of them resumes the run (both may try; the run takes one answer).
        recounted = tally(
            waiting.policy,
            request.workspace,
            slack_approvals(read_votes(waiting.run_id, request.plan_sha256), request.plan_sha256),
            request.authors,
        )
        verdict = recounted if isinstance(recounted, Verdict) else verdict
        log.info("%s approved %s on %s (%s)", mine.label, request.plan_sha256[:12], request.workspace, verdict.progress)
        if not verdict.complete:
            self._show_progress(waiting, mine, verdict.progress, list(verdict.approvers))
            self.respond(
                click.response_url,
                f"Your approval is recorded ({verdict.progress}); the plan applies once "
                f"{verdict.required - len(verdict.approvers)} more approve.",
            )
            return
        answer = {"decision": "approve", "approver": mine.identity, "comment": "", "plan_sha256": request.plan_sha256}
        self._resume(
            click.response_url,
            waiting,
            answer,
            done=f"Approved ({verdict.progress}): {waiting.run_name} applies the plan now.",
        )

    def ask_reason(self, click: ButtonClick) -> None:
        """Reject asks why first, in a modal; it opens only for someone who may decide, on a run that waits."""
        waiting = self._waiting(click.value, click.person, "reject")
        if isinstance(waiting, Refused):
            self.respond(click.response_url, f"Nothing rejected: {waiting.reason}.")
            return
        metadata = {"run": str(waiting.run_id), "plan": waiting.request.plan_sha256, "response_url": click.response_url}
        view = View(
            type="modal",
            callback_id=REJECT_CALLBACK,
            title=PlainTextObject(text="Reject the plan"),
            submit=PlainTextObject(text="Reject"),
            close=PlainTextObject(text="Cancel"),
            private_metadata=json.dumps(metadata),
            blocks=[
                SectionBlock(
                    text=PlainTextObject(
                        text=f"{waiting.request.artifact} on {waiting.request.workspace}: nothing is applied."
                    )
                ),
                InputBlock(
                    block_id=REASON_BLOCK,
                    label=PlainTextObject(text="Why?"),
                    element=PlainTextInputElement(action_id=REASON_INPUT, multiline=True, max_length=_REASON_MAX),
                ),
            ],
        )
        try:
            self.slack.views_open(trigger_id=click.trigger_id, view=view)
        except (SlackApiError, SlackClientError, OSError) as exc:
            # Most often the 3 s to open a modal after a click have passed (a slow Prefect API): say so.
            self.respond(click.response_url, f"Could not ask for the reason ({_slack_error(exc)}); click Reject again.")

    def reject(self, modal: ModalSubmitted, reason: str) -> None:
        person = modal.person
        response_url = str(modal.metadata.get("response_url", ""))
        waiting = self._waiting(modal.metadata, person, "reject")
        if isinstance(waiting, Refused):
            self.respond(response_url, f"Nothing rejected: {waiting.reason}.")
            return
        request = waiting.request
        mine = Vote(
            "reject",
            request.plan_sha256,
            person.team_id,
            person.user_id,
            self._name(person.user_id),
            self.now(),
            reason,
        )
        cast_vote(waiting.run_id, mine)  # a second rejection by the same person needs no second record
        answer = {
            "decision": "reject",
            "approver": mine.identity,
            "comment": reason,
            "plan_sha256": request.plan_sha256,
        }
        self._resume(response_url, waiting, answer, done=f"Rejected: {waiting.run_name} applies nothing.")

    # --- checks and messages -------------------------------------------------------------------------------

    def _waiting(self, target: Any, person: Person, decision: Decision) -> Waiting | Refused:
        """The run the button names, if it waits on that plan, before its deadline, and the person may decide."""
        try:
            run_id = UUID(str(target.get("run")))
            plan = str(target.get("plan"))
        except (ValueError, AttributeError):
            return Refused("the button names no run")
        try:
            run = self._settled(run_id)
        except ObjectNotFound:
            return Refused("the run is gone from Prefect")
        state = run.state
        if state is None or state.type != StateType.PAUSED:
            ended = "-" if state is None else f"{state.name}: {one_line(state.message or '', 300)}".rstrip(": ")
            return Refused(f"run {run.name} is no longer waiting for approval ({ended})")
        request = read_request(run_id)
        if request is None:
            return Refused(f"run {run.name} is not waiting for a plan's approval")
        if plan != request.plan_sha256:
            return Refused(
                f"this button is for plan {plan[:12]}, and run {run.name} waits on plan {request.plan_sha256[:12]}"
            )
        if self.now() > request.deadline:
            return Refused(f"the approval deadline passed at {operator_time(request.deadline)}")
        try:
            policy = self.config().workspace(request.workspace).approval
        except ConfigError as exc:
            return Refused(str(exc))
        # A rejection is taken from anywhere (it applies nothing); an approval only from an allowed source.
        if decision == "approve" and "slack" not in policy.sources:
            return Refused(f"{request.workspace} takes approvals in the Prefect UI only")
        if not policy.approvers and person.team_id != self._own_team():
            # "Anyone in the channel" means the app's own workspace, not a guest of a shared channel.
            return Refused(f"only members of this Slack workspace may decide on {request.workspace}")
        members, unread = self._members(policy, person.user_id)
        refused = may_decide(policy, request.workspace, person.user_id, members, decision)
        if refused is not None and unread:
            return Refused(f"{refused.reason} (user group {', '.join(unread)} could not be read from Slack)")
        return refused or Waiting(run_id, run.name, request, policy)

    def _own_team(self) -> str:
        """The Slack workspace (team) the app is installed in, asked once."""
        if self._team_id is None:
            self._team_id = str(self.slack.auth_test().get("team_id") or "")
        return self._team_id

    def _settled(self, run_id: UUID) -> FlowRun:
        """The run, once it is not on its way to waiting: the notice goes out a moment before the run
        suspends, and a quick click must not be told the run isn't waiting (``give_answer`` waits alike)."""
        deadline = time.monotonic() + self.patience
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run_id)
                state = run.state
                if state is None or state.type not in _ON_ITS_WAY or time.monotonic() >= deadline:
                    return run
                time.sleep(0.2)

    def group_members(self, approvers: list[str], user_id: str) -> set[str]:
        """The users of ``approvers``' user groups (for the other buttons that follow the same policy)."""
        return self._members(ApprovalPolicy(approvers=approvers), user_id)[0]

    def _members(self, policy: ApprovalPolicy, user_id: str) -> tuple[set[str], list[str]]:
        """The members of the policy's user groups (read only when the user is not listed by id), and the
        groups Slack would not list (a missing ``usergroups:read`` scope, a deleted group)."""
        if user_id in policy.approvers:
            return set(), []
        members: set[str] = set()
        unread: list[str] = []
        for group in (g for g in policy.approvers if g.startswith("S")):
            try:
                members |= set(self.slack.usergroups_users_list(usergroup=group).get("users") or [])
            except (SlackApiError, SlackClientError, OSError) as exc:
                log.warning("could not read user group %s: %s", group, _slack_error(exc))
                unread.append(group)
        return members, unread

    def _name(self, user_id: str) -> str:
        return display_name(self.slack, user_id)

    def _progress(self, waiting: Waiting, votes: list[Vote]) -> str:
        approvals = slack_approvals(votes, waiting.request.plan_sha256)
        return f"{len(approvals)} of {waiting.policy.required}"

    def _show_progress(self, waiting: Waiting, vote: Vote, progress: str, approvers: list[str]) -> None:
        """The notice shows the approvals so far, in place, buttons kept; the thread says who approved. Not
        once the run stopped waiting: its own rewrite (who decided, the outcome) must not get buttons back."""
        request = waiting.request
        try:
            if request.notice is not None and request.receipt is not None and run_still_waiting(str(waiting.run_id)):
                facts = {**request.notice.fields, "approvals": f"{progress}: {', '.join(approvers)}"}
                self.sender.update(request.receipt, replace(request.notice, fields=facts))
            reply = Notification(
                title=f"Approved by {vote.name or vote.identity} ({progress})",
                text=(
                    f"{vote.label} approved {request.artifact} on {request.workspace}; "
                    f"{waiting.policy.required - len(approvers)} more approval needed before it applies."
                ),
                severity="info",
                fields={"workspace": request.workspace, "plan sha256": request.plan_sha256},
                kind="approval",
                thread_key=request.notice.thread_key if request.notice else None,
            )
            self.sender.send(reply, reply_to=request.receipt)
        except NotificationError as exc:
            log.warning("could not show %s on the notice: %s", progress, exc)

    def _resume(self, response_url: str, waiting: Waiting, answer: dict[str, str], *, done: str) -> None:
        try:
            refused = give_answer(waiting.run_id, answer)
        except RunNotWaiting as exc:  # the run stopped waiting meanwhile (answered, superseded, timed out)
            self.respond(
                response_url, f"Nothing changed: run {waiting.run_name} no longer waits ({one_line(str(exc), 200)})."
            )
            return
        if isinstance(refused, InvalidApproval):
            self.respond(response_url, f"Nothing changed: {refused.reason}.")
            return
        self.respond(response_url, done)


def run_still_waiting(run_id: str) -> bool:
    """Whether the run still waits for its answer (suspended), so its notice may show a vote's progress. False
    when the API can't say: the notice is then left as it is (the run's own rewrite must not get its buttons back)
    and the reply in its thread still tells of the vote, which is recorded either way."""
    state = flow_run_state(run_id)
    if isinstance(state, Unknown):
        log.warning("could not read run %s (%s); its notice is left as it is", run_id, state.cause)
    return state == StateType.PAUSED


def display_name(slack: WebClient, user_id: str) -> str:
    """A Slack user's display name (``users.info``), for people reading a record; "" if Slack won't say (the
    record then names them by their proven id alone)."""
    try:
        user = slack.users_info(user=user_id).get("user") or {}
    except (SlackApiError, SlackClientError, OSError) as exc:
        log.warning("could not read user %s: %s", user_id, _slack_error(exc))
        return ""
    profile = user.get("profile") or {}
    return str(
        profile.get("display_name") or profile.get("real_name") or user.get("real_name") or user.get("name") or ""
    )


def _slack_error(exc: BaseException) -> str:
    if isinstance(exc, SlackApiError):
        data = exc.response.data
        return str(data.get("error")) if isinstance(data, dict) else str(exc.response.status_code)
    return type(exc).__name__
