"""Who approved a plan, and whether that is enough under the workspace's approval policy.

Pure: the policy (``icd.toml``'s ``[workspaces.<name>.approval]``), the signed Slack votes recorded on the
run (``icd/deploy/votes.py``) and an answer give a verdict. Both places that decide use it: the Slack
interactions endpoint, before it records a click (so the clicker is told at once), and the flow, when the
answer arrives (so an answer from any path, the UI's form or the API, passes the same rules).

Identities: a Slack click is ``slack:<team id>/<user id>``, proven by Slack's request signature; anything
typed in a form is taken as written (``ui``), and can't pass for a Slack identity.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from icd.config import ApprovalPolicy
from icd.text import normalize_identity

Source = Literal["slack", "ui"]
Decision = Literal["approve", "reject"]
SLACK_PREFIX = "slack:"


def slack_identity(team_id: str, user_id: str) -> str:
    return f"{SLACK_PREFIX}{team_id}/{user_id}"


@dataclass(frozen=True)
class Vote:
    """One person's signed click on a plan, as recorded on the run."""

    decision: Decision
    plan_sha256: str
    team_id: str
    user_id: str
    name: str  # their display name when they clicked, for people reading the record
    at: datetime
    comment: str = ""

    @property
    def identity(self) -> str:
        return slack_identity(self.team_id, self.user_id)

    @property
    def label(self) -> str:
        """How the record names them: the proven identity first, the display name for people."""
        return f"{self.identity} ({self.name})" if self.name else self.identity


@dataclass(frozen=True)
class Verdict:
    """What a set of approvals comes to: enough (``complete``) or how many are still missing."""

    complete: bool
    approvers: tuple[str, ...]  # labels, in the order they approved
    required: int

    @property
    def progress(self) -> str:
        return f"{len(self.approvers)} of {self.required}"


@dataclass(frozen=True)
class Refused:
    """Why an approver, a vote or an answer is not accepted; nothing changes."""

    reason: str


def may_decide(
    policy: ApprovalPolicy, workspace: str, user_id: str, members: Collection[str], decision: Decision = "approve"
) -> Refused | None:
    """Whether the Slack user ``user_id`` may approve or reject ``workspace``'s plans; ``members``: the users of
    the policy's user groups (read from Slack)."""
    if not policy.approvers or user_id in policy.approvers or user_id in members:
        return None
    return Refused(f"you may not {decision} {workspace}: its approvers are {', '.join(policy.approvers)}")


def tally(
    policy: ApprovalPolicy, workspace: str, approvals: Sequence[tuple[str, set[str]]], authors: Collection[str]
) -> Verdict | Refused:
    """The approvals of one plan under ``policy``: ``approvals`` are (label, the Slack ids that are that
    person) in order, one per person; ``authors``: the Slack ids of who wrote or pushed the commit.

    Refused when the approvals would be enough, but only the commit's author gave them (``prevent_self_review``).
    """
    labels = tuple(label for label, _ in approvals)
    complete = len(approvals) >= policy.required
    if complete and policy.prevent_self_review and authors and all(ids & set(authors) for _, ids in approvals):
        return Refused(f"the commit's author may not be the only approver of {workspace}: someone else must approve")
    return Verdict(complete, labels, policy.required)


def slack_approvals(votes: Sequence[Vote], plan_sha256: str) -> list[tuple[str, set[str]]]:
    """The distinct Slack approvals of ``plan_sha256``, oldest first, as :func:`tally` takes them."""
    seen: set[str] = set()
    approvals = []
    for vote in sorted(votes, key=lambda v: v.at):
        if vote.decision == "approve" and vote.plan_sha256 == plan_sha256 and vote.identity not in seen:
            seen.add(vote.identity)
            approvals.append((vote.label, {vote.user_id}))
    return approvals


@dataclass(frozen=True)
class Judged:
    """An answer that stands: who decided (every approver, by label), from where."""

    approver: str
    source: Source


def judge_answer(
    *,
    decision: Decision,
    approver: str,
    plan_sha256: str,
    workspace: str,
    policy: ApprovalPolicy,
    votes: Sequence[Vote],
    authors: Collection[str],
    author_names: Collection[str] = (),
) -> Judged | Refused:
    """An answer the run received (from a Slack click, the UI's form or the API), under ``policy``.

    An answer naming a Slack identity stands only if that person's signed click is recorded for this plan
    and decision; anything else is a typed name (``ui``). A rejection stands from anyone allowed to answer
    at all: it applies nothing. An approval must come from an allowed source and, counted with the recorded
    Slack approvals, make up the required number of distinct people, not only the commit's author.
    """
    name = normalize_identity(approver)
    if name is None:
        return Refused("the approver name is blank")
    proven = next(
        (
            v
            for v in votes
            if v.identity == name.split(" ", 1)[0] and v.decision == decision and v.plan_sha256 == plan_sha256
        ),
        None,
    )
    if proven is None and name.casefold().startswith(SLACK_PREFIX):
        return Refused(f"{name} names a Slack identity, but no signed Slack click of theirs is recorded for this plan")
    source: Source = "slack" if proven is not None else "ui"
    if decision == "reject":
        return Judged(proven.label if proven else name, source)
    if source not in policy.sources:
        return Refused(
            f"{workspace} takes approvals from Slack only, where Slack proves who clicked ({policy.describe()})"
        )
    approvals = slack_approvals(votes, plan_sha256)
    if source == "ui":
        typed = {name.lower()} & {n.lower() for n in author_names}
        approvals.append((name, set(authors) if typed else set()))
    verdict = tally(policy, workspace, approvals, authors)
    if isinstance(verdict, Refused):
        return verdict
    if not verdict.complete:
        return Refused(
            f"{workspace} needs {policy.required} distinct approvers; {verdict.progress} so far "
            f"({', '.join(verdict.approvers)})"
        )
    return Judged(", ".join(verdict.approvers), source)
