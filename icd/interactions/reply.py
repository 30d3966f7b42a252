"""What every way Slack delivers an interaction (HTTP or Socket Mode) hands it to, and gets back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Reply:
    """The answer to one interaction. ``body`` is what Slack gets at once (the HTTP 200 body, or the Socket
    Mode acknowledgement's payload; ``None``: empty), within Slack's 3 s; ``later`` is the work done after
    answering (resume a run, post the ephemeral refusal), never before."""

    body: dict[str, Any] | None = None
    later: Callable[[], None] | None = None


class InteractionHandler(Protocol):
    def receive(self, payload: Mapping[str, Any]) -> Reply:
        """Decide quickly what to answer; anything slow goes in ``Reply.later``. Never raises for bad input:
        a payload it does not understand gets an empty answer and a log line."""
        ...
