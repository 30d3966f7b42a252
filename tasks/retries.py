"""Which task failures a Prefect retry may fix.

Retrying everything hides real faults (a broken template fails the same way again) and wastes the
operator's time; each task names the exceptions that are transient for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun

RetryCondition = Callable[[Task[..., Any], TaskRun, State[Any]], bool]


def retry_on(*transient: type[BaseException]) -> RetryCondition:
    """A ``retry_condition_fn`` that retries only when the task raised one of ``transient``."""

    def should_retry(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
        try:
            state.result()
        except transient:
            return True
        except Exception:  # noqa: BLE001  # any other failure is final, whatever it is
            return False
        return False

    return should_retry
