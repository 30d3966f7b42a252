"""Tests wait on conditions, never on the clock: poll a predicate until it holds or a deadline passes.

The deadline only bounds a hang; no test asserts how long something took (timing belongs in ``bench/``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout: float = 30.0, message: str = "", interval: float = 0.1) -> T:
    """The first truthy value of ``predicate()``; ``AssertionError`` with ``message`` after ``timeout``.

    Most predicates read the Prefect API, moto or ``/proc``, on the same two cores as the servers and flows
    under test: polling them 50 times a second took CPU from what the test waits for. Ten is enough.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout:.0f}s")
        time.sleep(interval)
