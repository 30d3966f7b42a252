"""Tests wait on conditions, never on the clock: poll a predicate until it holds or a deadline passes.

The deadline only bounds a hang; no test asserts how long something took (timing belongs in ``bench/``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

PATIENT_AFTER = 5.0  # seconds of waiting polled every ``interval``; after them, less often
SLOWEST_POLL = 0.3  # seconds between two polls at most (unless ``interval`` asks for more), as `wait_for_run`


def wait_until(predicate: Callable[[], T], *, timeout: float = 30.0, message: str = "", interval: float = 0.1) -> T:
    """The first truthy value of ``predicate()``; ``AssertionError`` with ``message`` after ``timeout``.

    Most predicates read the Prefect API, moto or ``/proc``, on the same two cores as the servers and flows
    under test: polling them 50 times a second took CPU from what the test waits for. Ten is enough at first;
    a wait that has lasted :data:`PATIENT_AFTER` seconds (a zombie window, a health deadline, a backoff) is
    polled less often, down to about three times a second, so minutes of waiting in four pytest workers don't
    keep their servers busy answering.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise AssertionError(message or f"condition not met within {timeout:.0f}s")
        waited = now - started
        pause = interval if waited < PATIENT_AFTER else max(interval, min(SLOWEST_POLL, waited / 20))
        time.sleep(min(pause, max(deadline - now, 0.0)))
