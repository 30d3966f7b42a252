"""A drift notice's Reconcile button: the notice carries it, and a click starts the deploy the notice's
command names, for whoever may decide on the workspace's plans, once per notice."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from icd.config import PipelineConfig, parse_config
from icd.deploy.drift import RECONCILE_ACTION, Decision, DriftMemory, drift_notice
from icd.interactions.payloads import ButtonClick, Person
from icd.interactions.reconcile import ReconcileButton

CONFIG = parse_config(
    """
[namespaces."acmeinc/web"]
repository = "/srv/web"
service_name = "web"

[workspaces.prod]
follows = "acmeinc/web@production"
stack = "stacks/web"
approval = {approvers = ["S0OPS"], sources = ["slack"]}

[workspaces.staging]
follows = "acmeinc/web@latest"
stack = "stacks/web"
"""
)


@dataclass
class Started:
    name: str


def _click(user: str, value: dict[str, Any], ts: str = "1.0") -> ButtonClick:
    return ButtonClick(
        person=Person("T0", user, user.lower()),
        action=RECONCILE_ACTION,
        value=value,
        response_url="https://hooks.slack.test/actions/1",
        trigger_id="t",
        channel_id="C1",
        message_ts=ts,
    )


def _button(started: list[tuple[str, int, str]], told: list[str]) -> ReconcileButton:
    def start(workspace: str, version: int, key: str) -> Started:
        started.append((workspace, version, key))
        return Started(f"run-{len(started)}")

    def config() -> PipelineConfig:
        return CONFIG

    return ReconcileButton(
        config=config,
        members=lambda approvers, user: {"U0CAROL"} if "S0OPS" in approvers else set(),
        start=start,
        respond=lambda url, text: told.append(text),
    )


@pytest.mark.parametrize(
    ("user", "value", "starts", "said"),
    [
        pytest.param("U0CAROL", {"workspace": "prod", "version": 3}, True, "Started run-1", id="a-member-of-the-group"),
        pytest.param("U0ANYONE", {"workspace": "staging", "version": 3}, True, "Started run-1", id="anyone-no-list"),
        pytest.param(
            "U0MALLORY", {"workspace": "prod", "version": 3}, False, "you may not approve prod", id="not-listed"
        ),
        pytest.param("U0CAROL", {"workspace": "gone", "version": 3}, False, "no workspace 'gone'", id="unknown-ws"),
        pytest.param("U0CAROL", {"workspace": "prod"}, False, "names no workspace and version", id="no-version"),
    ],
)
def test_a_reconcile_click_starts_the_deploy_only_for_who_may_decide(
    user: str, value: dict[str, Any], starts: bool, said: str
) -> None:
    started: list[tuple[str, int, str]] = []
    told: list[str] = []
    reply = _button(started, told).click(_click(user, value))
    assert reply.body is None, "answered at once"
    assert reply.later is not None, "acted on after the answer"
    reply.later()
    assert bool(started) == starts
    if starts:
        assert started[0][:2] == (value["workspace"], value["version"])
    assert said in told[0]


def test_two_clicks_on_one_notice_ask_for_one_run_and_another_notice_for_another() -> None:
    started: list[tuple[str, int, str]] = []
    button = _button(started, [])
    for ts in ("1.0", "1.0", "2.0"):
        later = button.click(_click("U0CAROL", {"workspace": "prod", "version": 3}, ts)).later
        assert later is not None
        later()
    keys = [key for _, _, key in started]
    assert keys[0] == keys[1] != keys[2], "Prefect's idempotency key makes the repeat the same run"


def test_the_drift_notice_offers_reconcile_only_when_drift_is_told_and_a_version_is_known() -> None:
    memory = DriftMemory(workspace="prod", fingerprint="f")
    told = drift_notice(Decision("detected", memory), report=None, error=None, namespace="acmeinc/web", version=3)
    [action] = told.actions
    assert (action.id, json.loads(action.value)) == (RECONCILE_ACTION, {"workspace": "prod", "version": 3})
    assert action.confirm is not None
    unknown = drift_notice(Decision("detected", memory), report=None, error=None, namespace="acmeinc/web", version=None)
    assert unknown.actions == ()
    resolved = drift_notice(Decision("resolved", memory), report=None, error=None, namespace="acmeinc/web", version=3)
    assert resolved.actions == ()
