"""tasks/policies.py's retry settings: a task is run again only for the failures a retry can mend, once per
delay; every step that names them carries them."""

from __future__ import annotations

from typing import Any, cast

import pytest

from icd.errors import ConflictError, ContractBreachError, RegistryStorageError, StateLockedError
from tasks.apply import apply_plan
from tasks.plan import plan_deploy, resolve_version
from tasks.policies import RetryCondition, registry_blip, transient
from tasks.promote import promote_channel
from tasks.queue import claim_workspace


def _locked() -> StateLockedError:
    return StateLockedError("the state is locked", lock_id="1f2e", who="run x")


def _retried(condition: RetryCondition, raised: BaseException) -> bool:
    class _Failed:  # the state a task ends in, as its retry condition reads it
        def result(self) -> Any:
            raise raised

    return condition(cast(Any, None), cast(Any, None), cast(Any, _Failed()))


@pytest.mark.parametrize(
    ("raised", "retried"),
    [
        (RegistryStorageError("s3://b/k: connection reset"), True),
        (ConflictError("the record changed meanwhile"), True),
        (ContractBreachError("the stack declares no artifact_id"), False),
        (_locked(), False),
        (ValueError("a bug"), False),
    ],
)
def test_a_registry_blip_is_retried_and_nothing_else(raised: BaseException, retried: bool) -> None:
    assert _retried(registry_blip()["retry_condition_fn"], raised) is retried


def test_no_two_steps_share_their_retry_delays() -> None:
    """Prefect keeps the list it is given: a step that changed its own must not change another's."""
    assert claim_workspace.retry_delay_seconds == resolve_version.retry_delay_seconds
    assert claim_workspace.retry_delay_seconds is not resolve_version.retry_delay_seconds


def test_one_retry_per_delay() -> None:
    policy = transient(StateLockedError, delays=(5, 15, 30))
    assert policy["retries"] == 3
    assert policy["retry_delay_seconds"] == [5, 15, 30]
    assert _retried(policy["retry_condition_fn"], _locked())
    assert not _retried(policy["retry_condition_fn"], RegistryStorageError("s3"))
    assert registry_blip()["retries"] == 3
    assert registry_blip()["retry_delay_seconds"] == [1, 3, 9]


@pytest.mark.parametrize(
    ("step", "retries", "delays", "mended"),
    [
        (claim_workspace, 3, [1, 3, 9], ConflictError("moved")),
        (resolve_version, 3, [1, 3, 9], RegistryStorageError("s3")),
        (promote_channel, 4, [1, 2, 4, 8], ConflictError("moved")),
        (plan_deploy, 3, [5, 15, 30], _locked()),
        (apply_plan, 3, [5, 15, 30], _locked()),
    ],
)
def test_each_step_carries_its_retries(step: Any, retries: int, delays: list[float], mended: Exception) -> None:
    assert step.retries == retries
    assert step.retry_delay_seconds == delays
    assert _retried(step.retry_condition_fn, mended)
    assert not _retried(step.retry_condition_fn, ValueError("a bug"))
