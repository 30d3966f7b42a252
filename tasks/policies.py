"""How the deploy's tasks cache and retry.

**Once per run.** A suspended flow re-runs from the top when it is resumed, so every side effect before
the approval wait is a task whose result is cached under the flow run id *and its inputs*: the re-run
takes the cached result instead of building, registering or planning again, while a second call with other
inputs (a rollback plan after the deploy plan) is a different step and runs.

**Retry only what a retry can fix.** Retrying everything hides real faults (a broken template fails the same
way again) and wastes the operator's time; each task names the exceptions that are transient for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task
from prefect.cache_policies import INPUTS, RUN_ID
from prefect.client.schemas.objects import State, TaskRun

ONCE_PER_RUN = INPUTS + RUN_ID

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
