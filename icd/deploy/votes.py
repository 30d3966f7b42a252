"""What a waiting run asks, and the signed Slack clicks on it, kept with the run itself (Prefect's flow run
input store: it lives and goes with the run, survives restarts of everything else, and needs no store of
our own).

* ``icd-approval-request``: written by the run before it first waits: what it asks (the workspace, the plan
  hash, who wrote and pushed the commit, the approval notice and where it is). The interactions endpoint
  reads it to check a click and to rewrite the notice.
* ``icd-vote-<plan>-<decision>-<team>-<user>``: one per person and decision on a plan, written by the
  interactions endpoint once the click passed the policy. Created, never overwritten: the server's unique
  key makes a second click of the same person a no-op, however many endpoints race.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client

from icd.deploy.approvers import Vote
from icd.notify.message import Notification, NotificationReceipt

REQUEST_KEY = "icd-approval-request"
_VOTE_PREFIX = "icd-vote-"
_PLAN_PREFIX_CHARS = 16  # of the plan hash in a vote's key: keys are short, a plan has one run
_MAX_VOTES = 200


@dataclass(frozen=True)
class ApprovalRequest:
    """What a waiting run asks for, as the interactions endpoint needs it."""

    workspace: str
    plan_sha256: str
    artifact: str  # "acmeinc/web v1 → v2"
    deadline: datetime
    authors: tuple[str, ...] = ()  # the Slack ids of who wrote or pushed the commit ([people] of icd.toml)
    notice: Notification | None = None  # the approval notice as sent, to rewrite it in place
    receipt: NotificationReceipt | None = None  # where it is

    def to_json(self) -> str:
        data = asdict(self)
        data["deadline"] = self.deadline.isoformat()
        data["notice"] = self.notice.to_dict() if self.notice else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ApprovalRequest:
        data: dict[str, Any] = json.loads(text)
        return cls(
            workspace=data["workspace"],
            plan_sha256=data["plan_sha256"],
            artifact=data["artifact"],
            deadline=datetime.fromisoformat(data["deadline"]),
            authors=tuple(data.get("authors") or ()),
            notice=Notification.from_dict(data["notice"]) if data.get("notice") else None,
            receipt=NotificationReceipt(**data["receipt"]) if data.get("receipt") else None,
        )


def _vote_key(vote: Vote) -> str:
    return "-".join(
        [
            _VOTE_PREFIX.rstrip("-"),
            vote.plan_sha256[:_PLAN_PREFIX_CHARS],
            vote.decision,
            vote.team_id.lower(),
            vote.user_id.lower(),
        ]
    )


def _is_conflict(exc: httpx.HTTPStatusError) -> bool:
    return exc.response.status_code == httpx.codes.CONFLICT


def record_request(flow_run_id: UUID, request: ApprovalRequest) -> None:
    """Keep what the run asks (once: a resumed run that asks again finds it there)."""
    with get_client(sync_client=True) as client:
        try:
            client.create_flow_run_input(flow_run_id, REQUEST_KEY, request.to_json(), sender="deploy-artifact")
        except httpx.HTTPStatusError as exc:
            if not _is_conflict(exc):
                raise


def read_request(flow_run_id: UUID) -> ApprovalRequest | None:
    """What the run asks; None for a run that never asked (or not a deploy run)."""
    with get_client(sync_client=True) as client:
        try:
            return ApprovalRequest.from_json(client.read_flow_run_input(flow_run_id, REQUEST_KEY))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == httpx.codes.NOT_FOUND:
                return None
            raise


def cast_vote(flow_run_id: UUID, vote: Vote) -> bool:
    """Record ``vote``; False when this person's vote on this plan and decision is recorded already."""
    value = json.dumps({**asdict(vote), "at": vote.at.isoformat()})
    with get_client(sync_client=True) as client:
        try:
            client.create_flow_run_input(flow_run_id, _vote_key(vote), value, sender="icd-inbound")
        except httpx.HTTPStatusError as exc:
            if _is_conflict(exc):
                return False
            raise
    return True


def read_votes(flow_run_id: UUID, plan_sha256: str) -> list[Vote]:
    """The votes recorded on ``plan_sha256`` of the run, oldest first."""
    prefix = f"{_VOTE_PREFIX}{plan_sha256[:_PLAN_PREFIX_CHARS]}-"
    with get_client(sync_client=True) as client:
        stored = client.filter_flow_run_input(flow_run_id, key_prefix=prefix, limit=_MAX_VOTES, exclude_keys=set())
    votes = []
    for item in stored:
        data: dict[str, Any] = json.loads(item.value)
        vote = Vote(**{**data, "at": datetime.fromisoformat(data["at"])})
        if vote.plan_sha256 == plan_sha256:  # the key holds a prefix of the hash; the vote the whole of it
            votes.append(vote)
    return sorted(votes, key=lambda v: v.at)
