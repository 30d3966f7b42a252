"""How the deploy's tasks cache and retry.

**Once per run.** A suspended flow re-runs from the top when it is resumed, so every side effect before
the approval wait is a task whose result is cached under the flow run id *and its inputs*: the re-run
takes the cached result instead of building, registering or planning again, while a second call with other
inputs (a rollback plan after the deploy plan) is a different step and runs.

**Replay nothing on a re-ask.** Cached tasks still make a task run (state ``Cached``) each time the flow
re-runs, and code between them logs again: a deploy with one refused answer made 26 task runs, 11 of them
replays. :func:`once_per_run` records a whole stretch of the flow (lock, plan, publish, notify; an answered
approval) as one record in the run's result store, with Prefect's transactions; a re-run reads the record
and runs none of it (15 task runs, no replay). The tasks inside keep their own cache, for a run that died
inside the stretch.

**Retry only what a retry can fix.** Retrying everything hides real faults (a broken template fails the same
way again) and wastes the operator's time; each task names the exceptions that are transient for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from prefect import Task
from prefect.cache_policies import INPUTS, RUN_ID
from prefect.client.schemas.objects import State, TaskRun
from prefect.runtime import flow_run
from prefect.transactions import CommitMode, transaction

ONCE_PER_RUN = INPUTS + RUN_ID

T = TypeVar("T")


def once_per_run(step: str, compute: Callable[[], T]) -> T:
    """What ``compute()`` returned the first time this flow run reached ``step``; computed now if it never did.

    Call it in a flow. An exception (a ``Pause`` included) records nothing, so a suspension inside
    ``compute`` asks again on the re-run. EAGER commits make each task inside commit its own cache record
    at once, as it would outside, instead of waiting for this record.
    """
    with transaction(key=f"icd-{flow_run.get_id()}-{step}", commit_mode=CommitMode.EAGER) as txn:
        if txn.is_committed():
            record = txn.read()
            if record is not None:
                return cast(T, record.result)
        value = compute()
        txn.stage(value)
    return value


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
