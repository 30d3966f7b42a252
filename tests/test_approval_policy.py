"""Who may approve a plan, how many of them, and from where: the pure rules (icd/config.py's ApprovalPolicy and
[people], icd/deploy/approvers.py, icd/deploy/approval.py's check_approval). Each table row is one behaviour;
the end-to-end test (tests/test_slack_approvals.py) drives the same rules through Slack and Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from icd.config import ApprovalPolicy, PipelineConfig, _identity_key, parse_config
from icd.deploy.approval import (
    BLANK_APPROVER,
    ApprovalDecision,
    ApprovalRules,
    InvalidApproval,
    PlanApproval,
    check_approval,
)
from icd.deploy.approvers import Refused, Verdict, Vote, may_decide, slack_approvals, tally
from icd.errors import ConfigError

PLAN = "ab" * 32
OTHER_PLAN = "cd" * 32
TEAM = "T0ACME"
WS = "production"
# U0DEV wrote the commit; U0CAROL and U0BOB are reviewers.
DEV, CAROL, BOB = "U0DEV", "U0CAROL", "U0BOB"
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

_BASE = """
[namespaces."acmeinc/web"]
repository = "https://github.com/acmeinc/web.git"
service_name = "web"

[workspaces.production]
follows = "acmeinc/web@production"
stack = "examples/stacks/local"
"""


def _config(extra: str) -> PipelineConfig:
    return parse_config(_BASE + extra)


def _vote(user: str, minute: int, *, decision: str = "approve", plan: str = PLAN, name: str = "") -> Vote:
    return Vote(decision, plan, TEAM, user, name or user.removeprefix("U0").title(), T0 + timedelta(minutes=minute))  # type: ignore[arg-type]  # decision is a Literal


def _label(user: str) -> str:
    return f"slack:{TEAM}/{user} ({user.removeprefix('U0').title()})"


# --- the policy in icd.toml ----------------------------------------------------------------------------------


def test_a_workspace_without_an_approval_table_takes_one_approver_from_anyone_anywhere() -> None:
    policy = _config("").workspace(WS).approval
    assert policy == ApprovalPolicy(approvers=[], required=1, prevent_self_review=False, sources=["slack", "ui"])
    assert not policy.proven_only


@pytest.mark.parametrize(
    ("table", "wrong_field"),
    [
        pytest.param("required = 0", "required", id="no-approver-required"),
        pytest.param("required = 11", "required", id="more-than-ten-required"),
        pytest.param('approvers = ["carol"]', "approvers", id="a-name-not-a-slack-id"),
        pytest.param('approvers = ["C0OPS"]', "approvers", id="a-channel-id-not-a-user-or-group"),
        pytest.param("sources = []", "sources", id="no-source-at-all"),
        pytest.param('sources = ["email"]', "sources", id="an-unknown-source"),
        pytest.param("self_review = true", "self_review", id="a-misspelt-key"),
    ],
)
def test_an_approval_policy_that_makes_no_sense_is_refused_when_the_file_is_read(table: str, wrong_field: str) -> None:
    with pytest.raises(ConfigError, match=wrong_field):
        _config(f"[workspaces.production.approval]\n{table}\n")


def test_a_policy_is_read_with_users_groups_and_the_proven_path_only() -> None:
    policy = (
        _config(
            "[workspaces.production.approval]\n"
            'approvers = ["U0CAROL", "W0GRID", "S0OPS"]\nrequired = 2\n'
            'prevent_self_review = true\nsources = ["slack"]\n'
        )
        .workspace(WS)
        .approval
    )
    assert policy.approvers == [CAROL, "W0GRID", "S0OPS"]
    assert policy.proven_only
    assert policy.describe() == ("2 distinct approvers (listed approvers), not the commit's author alone, from Slack")


@pytest.mark.parametrize(
    ("policy", "line"),
    [
        pytest.param(ApprovalPolicy(), "1 distinct approver (anyone in the channel), from Slack or the Prefect UI"),
        pytest.param(
            ApprovalPolicy(approvers=["S0OPS"], sources=["ui"]),
            "1 distinct approver (listed approvers), from the Prefect UI",
        ),
    ],
)
def test_the_policy_reads_as_one_line(policy: ApprovalPolicy, line: str) -> None:
    assert policy.describe() == line


# --- [people]: a commit's author on Slack ---------------------------------------------------------------------

PEOPLE = _config(
    """
[people.dev]
slack = "U0DEV"
github = ["Dev-Eloper"]
emails = ["Dev@Acme.example"]

[people.carol]
slack = "U0CAROL"
github = ["carol"]
"""
)


@pytest.mark.parametrize(
    ("names", "slack_ids"),
    [
        pytest.param(("dev-eloper",), {DEV}, id="a-github-login-any-case"),
        pytest.param(("Dev Eloper <dev@acme.example>",), {DEV}, id="git-author-name-and-email"),
        pytest.param(("DEV@ACME.EXAMPLE",), {DEV}, id="a-bare-email-any-case"),
        pytest.param(("  carol  ",), {CAROL}, id="spaces-around"),
        pytest.param(("Dev Eloper <dev@acme.example>", "carol"), {DEV, CAROL}, id="author-and-another-pusher"),
        pytest.param(("Dev Eloper <dev@acme.example>", "dev-eloper"), {DEV}, id="author-who-pushed-once"),
        pytest.param(("mallory", "Mallory <mallory@evil.example>"), set(), id="unknown-people-map-to-nothing"),
        pytest.param(("", "   "), set(), id="blank-names"),
        pytest.param(("Dev Eloper",), set(), id="a-display-name-alone-is-not-an-identity"),
    ],
)
def test_slack_ids_of_finds_people_by_login_or_email(names: tuple[str, ...], slack_ids: set[str]) -> None:
    assert PEOPLE.slack_ids_of(*names) == slack_ids


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Dev-Eloper", "dev-eloper"),
        ("Dev Eloper <Dev@Acme.example>", "dev@acme.example"),
        ("  dev@acme.example ", "dev@acme.example"),
        ("a <b> <c@x.example>", "c@x.example"),  # git puts the e-mail last
        ("no-email>", "no-email>"),
    ],
)
def test_identity_key(name: str, key: str) -> None:
    assert _identity_key(name) == key


def test_a_person_needs_a_slack_user_id_not_a_group() -> None:
    with pytest.raises(ConfigError, match="slack"):
        _config('[people.ops]\nslack = "S0OPS"\n')


# --- may_decide: who may click at all ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("approvers", "user", "group_members", "allowed"),
    [
        pytest.param([], "U0ANYONE", set(), True, id="empty-approvers-means-anyone"),
        pytest.param([CAROL], CAROL, set(), True, id="a-listed-user"),
        pytest.param([CAROL], BOB, set(), False, id="a-user-not-listed"),
        pytest.param(["S0OPS"], BOB, {BOB, CAROL}, True, id="a-member-of-a-listed-group"),
        pytest.param(["S0OPS"], DEV, {BOB, CAROL}, False, id="not-a-member-of-the-group"),
        pytest.param(["S0OPS"], BOB, set(), False, id="a-group-slack-would-not-list"),
        pytest.param([CAROL, "S0OPS"], CAROL, set(), True, id="listed-by-id-beside-a-group"),
    ],
)
def test_may_decide(approvers: list[str], user: str, group_members: set[str], allowed: bool) -> None:
    refused = may_decide(ApprovalPolicy(approvers=approvers), WS, user, group_members)
    if allowed:
        assert refused is None
    else:
        assert refused == Refused(f"you may not approve {WS}: its approvers are {', '.join(approvers)}")


# --- tally and slack_approvals: how many distinct people ---------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "approvals", "authors", "expected"),
    [
        pytest.param(ApprovalPolicy(), [("a", {CAROL})], (), Verdict(True, ("a",), 1), id="one-of-one"),
        pytest.param(
            ApprovalPolicy(required=2, sources=["slack"]),
            [("a", {CAROL})],
            (),
            Verdict(False, ("a",), 2),
            id="one-of-two-waits",
        ),
        pytest.param(
            ApprovalPolicy(required=2, sources=["slack"]),
            [("a", {CAROL}), ("b", {BOB})],
            (),
            Verdict(True, ("a", "b"), 2),
            id="two-distinct-of-two",
        ),
        pytest.param(
            ApprovalPolicy(prevent_self_review=True, sources=["slack"]),
            [("dev", {DEV})],
            (DEV,),
            Refused(f"the commit's author may not be the only approver of {WS}: someone else must approve"),
            id="the-author-alone",
        ),
        pytest.param(
            ApprovalPolicy(prevent_self_review=True, required=2, sources=["slack"]),
            [("dev", {DEV})],
            (DEV,),
            Verdict(False, ("dev",), 2),
            id="the-author-first-of-two-is-counted-not-refused",
        ),
        pytest.param(
            ApprovalPolicy(prevent_self_review=True, required=2, sources=["slack"]),
            [("dev", {DEV}), ("carol", {CAROL})],
            (DEV,),
            Verdict(True, ("dev", "carol"), 2),
            id="the-author-and-another",
        ),
        pytest.param(
            ApprovalPolicy(prevent_self_review=True, required=2, sources=["slack"]),
            [("dev", {DEV}), ("pusher", {BOB})],
            (DEV, BOB),
            Refused(f"the commit's author may not be the only approver of {WS}: someone else must approve"),
            id="author-and-pusher-are-both-the-commits-people",
        ),
        pytest.param(
            ApprovalPolicy(prevent_self_review=False),
            [("dev", {DEV})],
            (DEV,),
            Verdict(True, ("dev",), 1),
            id="self-review-allowed-when-not-prevented",
        ),
        pytest.param(
            ApprovalPolicy(prevent_self_review=True, sources=["slack"]),
            [("dev", {DEV})],
            (),
            Verdict(True, ("dev",), 1),
            id="an-author-unknown-to-people-is-not-checked",
        ),
    ],
)
def test_tally(
    policy: ApprovalPolicy, approvals: list[tuple[str, set[str]]], authors: tuple[str, ...], expected: object
) -> None:
    assert tally(policy, WS, approvals, authors) == expected


def test_verdict_progress() -> None:
    assert Verdict(False, ("a",), 2).progress == "1 of 2"


@pytest.mark.parametrize(
    ("votes", "approvals"),
    [
        pytest.param([], [], id="none"),
        pytest.param([_vote(CAROL, 1)], [(_label(CAROL), {CAROL})], id="one"),
        pytest.param(
            [_vote(CAROL, 1), _vote(CAROL, 2)], [(_label(CAROL), {CAROL})], id="a-second-vote-of-the-same-person"
        ),
        pytest.param(
            [_vote(BOB, 2), _vote(CAROL, 1)],
            [(_label(CAROL), {CAROL}), (_label(BOB), {BOB})],
            id="oldest-first-whatever-the-order-read",
        ),
        pytest.param([_vote(CAROL, 1, plan=OTHER_PLAN)], [], id="a-vote-on-another-plan"),
        pytest.param([_vote(CAROL, 1, decision="reject")], [], id="a-rejection-is-no-approval"),
    ],
)
def test_slack_approvals(votes: list[Vote], approvals: list[tuple[str, set[str]]]) -> None:
    assert slack_approvals(votes, PLAN) == approvals


# --- check_approval: an answer the run received, judged under the policy and the recorded votes ----------------


@dataclass(frozen=True)
class Answer:
    decision: str = "approve"
    approver: str = "Carol Reviewer"
    plan: str = PLAN
    comment: str = ""


@dataclass(frozen=True)
class Accepted:
    approved: bool
    source: str
    approver: str


@dataclass(frozen=True)
class Case:
    answer: Answer
    expected: Accepted | str  # a str: the answer is refused, and the reason holds it
    policy: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    votes: tuple[Vote, ...] = ()
    authors: tuple[str, ...] = (DEV,)
    author_names: tuple[str, ...] = ("dev-eloper", "dev@acme.example", "Dev Eloper")


SLACK_ONLY = ApprovalPolicy(sources=["slack"])
TWO = ApprovalPolicy(required=2, sources=["slack"])
NO_SELF = ApprovalPolicy(prevent_self_review=True, sources=["slack"])
TWO_NO_SELF = ApprovalPolicy(required=2, prevent_self_review=True, sources=["slack"])
CAROL_ID = f"slack:{TEAM}/{CAROL}"
BOB_ID = f"slack:{TEAM}/{BOB}"
DEV_ID = f"slack:{TEAM}/{DEV}"
# How the record names an approval typed in the UI: the name as typed (its source is recorded beside it).
TYPED = ""

CASES = [
    pytest.param(
        Case(Answer(), Accepted(True, "ui", f"Carol Reviewer{TYPED}")), id="a-typed-name-under-the-default-policy"
    ),
    pytest.param(
        Case(Answer(approver=CAROL_ID), Accepted(True, "slack", _label(CAROL)), votes=(_vote(CAROL, 1),)),
        id="a-slack-click-recorded-as-a-vote",
    ),
    pytest.param(
        Case(
            Answer(approver=BOB_ID),
            Accepted(True, "slack", f"{_label(CAROL)}, {_label(BOB)}"),
            TWO,
            (_vote(CAROL, 1), _vote(BOB, 2)),
        ),
        id="two-distinct-people-of-two",
    ),
    pytest.param(
        Case(Answer(approver=CAROL_ID), "needs 2 distinct approvers; 1 of 2 so far", TWO, (_vote(CAROL, 1),)),
        id="one-of-two-is-not-enough",
    ),
    pytest.param(
        Case(
            Answer(approver=CAROL_ID),
            "needs 2 distinct approvers; 1 of 2 so far",
            TWO,
            (_vote(CAROL, 1), _vote(CAROL, 2)),
        ),
        id="a-second-vote-of-the-same-person-counts-once",
    ),
    pytest.param(
        Case(Answer(approver="Bob"), "takes approvals from Slack only", TWO),
        id="a-typed-name-cannot-be-one-of-two",
    ),
    pytest.param(
        Case(Answer(approver="Bob"), "takes approvals from Slack only", TWO, (_vote(CAROL, 1),)),
        id="a-slack-vote-and-a-typed-name-do-not-make-two",
    ),
    pytest.param(
        Case(Answer(approver=DEV_ID), "the commit's author may not be the only approver", NO_SELF, (_vote(DEV, 1),)),
        id="the-author-alone-from-slack",
    ),
    pytest.param(
        Case(Answer(approver="Dev-Eloper"), "takes approvals from Slack only", NO_SELF),
        id="the-author-typing-their-login-is-refused-as-unproven",
    ),
    pytest.param(
        Case(Answer(approver="dev@acme.example"), "takes approvals from Slack only", NO_SELF),
        id="the-author-typing-their-email-is-refused-as-unproven",
    ),
    pytest.param(
        Case(
            Answer(approver=CAROL_ID),
            Accepted(True, "slack", f"{_label(DEV)}, {_label(CAROL)}"),
            TWO_NO_SELF,
            (_vote(DEV, 1), _vote(CAROL, 2)),
        ),
        id="the-author-first-of-two-and-another",
    ),
    pytest.param(
        Case(
            Answer(approver=DEV_ID),
            Accepted(True, "slack", f"{_label(CAROL)}, {_label(DEV)}"),
            TWO_NO_SELF,
            (_vote(CAROL, 1), _vote(DEV, 2)),
        ),
        id="another-and-the-author-second",
    ),
    pytest.param(
        Case(Answer(approver=DEV_ID), Accepted(True, "slack", _label(DEV)), NO_SELF, (_vote(DEV, 1),), authors=()),
        id="self-review-is-not-checked-for-an-author-unknown-to-people",
    ),
    pytest.param(
        Case(Answer(), "takes approvals from Slack only", SLACK_ONLY),
        id="slack-only-refuses-a-ui-approval",
    ),
    pytest.param(
        Case(
            Answer(decision="reject", approver="Carol Reviewer", comment="not now"),
            Accepted(False, "ui", "Carol Reviewer"),
            SLACK_ONLY,
        ),
        id="slack-only-takes-a-ui-rejection",
    ),
    pytest.param(
        Case(Answer(approver=CAROL_ID), Accepted(True, "slack", _label(CAROL)), SLACK_ONLY, (_vote(CAROL, 1),)),
        id="slack-only-takes-a-recorded-click",
    ),
    pytest.param(
        Case(Answer(approver=CAROL_ID), "names a Slack identity, but no signed Slack click", SLACK_ONLY),
        id="a-typed-slack-identity-with-no-vote",
    ),
    pytest.param(
        Case(Answer(approver=CAROL_ID), "names a Slack identity, but no signed Slack click"),
        id="a-typed-slack-identity-with-no-vote-where-the-ui-is-allowed",
    ),
    pytest.param(
        Case(
            Answer(approver=CAROL_ID),
            "names a Slack identity, but no signed Slack click",
            votes=(_vote(CAROL, 1, decision="reject"),),
        ),
        id="a-slack-identity-whose-vote-was-the-other-decision",
    ),
    pytest.param(
        Case(
            Answer(approver=CAROL_ID),
            "names a Slack identity, but no signed Slack click",
            votes=(_vote(CAROL, 1, plan=OTHER_PLAN),),
        ),
        id="a-slack-identity-whose-vote-was-on-another-plan",
    ),
    pytest.param(
        Case(
            Answer(decision="reject", approver=CAROL_ID, comment="too big"),
            Accepted(False, "slack", _label(CAROL)),
            votes=(_vote(CAROL, 1, decision="reject"),),
        ),
        id="a-slack-rejection-recorded-as-a-vote",
    ),
    pytest.param(
        Case(Answer(plan=OTHER_PLAN), "a stale or mistyped plan hash is never applied"),
        id="an-approval-of-another-plan",
    ),
    pytest.param(
        Case(Answer(plan=PLAN.upper()), Accepted(True, "ui", f"Carol Reviewer{TYPED}")),
        id="the-plan-hash-in-capitals",
    ),
    pytest.param(
        Case(Answer(decision="reject", plan=OTHER_PLAN), Accepted(False, "ui", "Carol Reviewer")),
        id="a-rejection-of-a-stale-plan-stands",
    ),
    pytest.param(Case(Answer(approver=" \u200b "), BLANK_APPROVER), id="an-approver-of-invisible-characters"),
]


@pytest.mark.parametrize("case", CASES)
def test_check_approval(case: Case) -> None:
    answer = PlanApproval(
        decision=case.answer.decision,  # type: ignore[arg-type]  # a Literal, as the form gives it
        approver=case.answer.approver,
        comment=case.answer.comment,
        plan_sha256=case.answer.plan,
    )
    rules = ApprovalRules(WS, case.policy, case.authors, case.author_names)
    checked = check_approval(answer, expected_sha256=PLAN, rules=rules, votes=case.votes)
    if isinstance(case.expected, str):
        assert isinstance(checked, InvalidApproval), checked
        assert case.expected in checked.reason
        return
    assert isinstance(checked, ApprovalDecision), checked
    assert (checked.approved, checked.source, checked.approver) == (
        case.expected.approved,
        case.expected.source,
        case.expected.approver,
    )
    assert checked.comment == case.answer.comment
    assert checked.plan_sha256 == case.answer.plan.lower()


def test_check_approval_without_rules_takes_one_typed_name_from_anywhere() -> None:
    answer: dict[str, Any] = {"decision": "approve", "approver": "Carol", "plan_sha256": PLAN}
    assert check_approval(PlanApproval(**answer), expected_sha256=PLAN) == ApprovalDecision(
        True, f"Carol{TYPED}", "", PLAN, "ui"
    )


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"required": 2}, id="two-approvers-with-the-ui"),
        pytest.param({"prevent_self_review": True}, id="self-review-with-the-ui"),
        pytest.param({"required": 2, "sources": ["slack", "ui"]}, id="two-approvers-with-both-sources"),
    ],
)
def test_rules_about_people_need_proven_approvers(settings: dict[str, object]) -> None:
    """A typed name proves nobody: it can't be a second person or be told apart from the commit's author."""
    with pytest.raises(ValueError, match=r'need proven approvers: set sources = \["slack"\]'):
        ApprovalPolicy.model_validate(settings)
