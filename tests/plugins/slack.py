"""Fixtures for notifications: a local Slack Web API stand-in and a notifier block pointing at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefect_slack import SlackCredentials

from blocks.notifier import SlackNotifier
from standins.slack import SlackStandIn

SLACK_TEST_TOKEN = "xoxb-test-token"


@pytest.fixture
def slack_standin() -> Iterator[SlackStandIn]:
    """A started Slack stand-in on a free loopback port; stopped after the test."""
    with SlackStandIn(token=SLACK_TEST_TOKEN, unknown_channels={"#nowhere"}) as standin:
        yield standin


@pytest.fixture
def slack_notifier(slack_standin: SlackStandIn) -> SlackNotifier:
    """An unsaved notifier block that posts to ``#ops`` on the stand-in."""
    return SlackNotifier(
        credentials=SlackCredentials(token=SLACK_TEST_TOKEN),
        channel="#ops",
        api_url=slack_standin.api_url,
        prefect_ui_url="http://127.0.0.1:4200",
    )
