"""Whether a request really comes from Slack, once: its signature, its age, and whether it was seen before.

Slack signs every request to an app's interactivity URL: ``X-Slack-Signature`` is ``v0=`` and the hex
HMAC-SHA256, keyed with the app's signing secret, of ``v0:{X-Slack-Request-Timestamp}:{raw body}``
(https://api.slack.com/authentication/verifying-requests-from-slack). slack-sdk's ``SignatureVerifier``
checks it in constant time; requests older or newer than five minutes are refused, as Slack advises, so a
captured request can't be replayed later; within those five minutes, a request whose signature was seen
already is a replay: answered, never acted on again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from slack_sdk.signature import Clock, SignatureVerifier

WINDOW_SECONDS = 300  # Slack's advice: refuse requests more than five minutes from now

# Why a request was refused (the /health counts and the log use these words).
UNSIGNED = "unsigned"
STALE = "stale-timestamp"
BAD_SIGNATURE = "bad-signature"


@dataclass(frozen=True)
class Verified:
    """A request Slack signed. ``replay``: the same signed request was verified before (act on it once)."""

    replay: bool = False


@dataclass(frozen=True)
class NotVerified:
    """A request that is not Slack's, or too old to tell: 401, nothing acted on."""

    reason: str
    detail: str


class _CallableClock(Clock):
    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now

    def now(self) -> float:
        return self._now()


class RequestVerifier:
    """Checks Slack's signature on raw request bodies and remembers those seen within the window."""

    def __init__(
        self, signing_secret: str, *, now: Callable[[], float] = time.time, window_seconds: int = WINDOW_SECONDS
    ) -> None:
        if not signing_secret:
            raise ValueError("the Slack signing secret is empty")
        self._verifier = SignatureVerifier(signing_secret, clock=_CallableClock(now))
        self._now = now
        self._window = window_seconds
        self._seen: dict[str, float] = {}  # signature -> when it stops mattering (its timestamp + the window)
        self._lock = threading.Lock()

    def check(self, headers: Mapping[str, str], body: bytes) -> Verified | NotVerified:
        """``headers`` with lower-case names, ``body`` exactly as received."""
        timestamp = headers.get("x-slack-request-timestamp", "")
        signature = headers.get("x-slack-signature", "")
        if not timestamp or not signature:
            return NotVerified(UNSIGNED, "no X-Slack-Signature or X-Slack-Request-Timestamp")
        if not signature.isascii():  # hmac.compare_digest raises on a non-ASCII str: no 500, a refusal
            return NotVerified(BAD_SIGNATURE, "X-Slack-Signature is not ASCII")
        try:
            sent_at = int(timestamp)
        except ValueError:
            return NotVerified(STALE, "X-Slack-Request-Timestamp is not a number")
        now = self._now()
        if abs(now - sent_at) > self._window:
            return NotVerified(STALE, f"signed {now - sent_at:.0f} s from now; at most {self._window} s is accepted")
        if not self._verifier.is_valid(body=body, timestamp=timestamp, signature=signature):
            return NotVerified(BAD_SIGNATURE, "X-Slack-Signature does not match the body")
        with self._lock:
            self._seen = {sig: until for sig, until in self._seen.items() if until >= now}
            if signature in self._seen:
                return Verified(replay=True)
            self._seen[signature] = sent_at + self._window
        return Verified()
