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

**A record that can't be read is a fault, never "absent".** Prefect's ``ResultStore.exists`` answers False
on *any* error (``prefect/results.py``), so with S3 unreachable a committed stretch looks never done and
would run again: a claim again, a plan again, a question again. :func:`once_per_run` asks the storage
itself when Prefect says "absent", tells a real miss (S3's 404, a missing local file) from a failure,
retries a failure for half a minute (:data:`STORE_RETRY_SECONDS`), then raises
:class:`~icd.errors.RunRecordStoreError`, which the flow ends through ``finish``. A record that can't be
written is the same fault. Prefect itself is not patched: the check wraps its transaction.

**Retry only what a retry can fix.** Retrying everything hides real faults (a broken template fails the same
way again) and wastes the operator's time; each task names the exceptions that are transient for it, with
:func:`transient` (``@task(..., **transient(StateLockedError, delays=(5, 15, 30)))``), most of them
:func:`registry_blip` (S3 failing for a moment, or a conditional write lost to another writer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypedDict, TypeVar, cast

from botocore.exceptions import ClientError
from prefect import Task, get_run_logger
from prefect._internal.compatibility.blocks import call_explicitly_sync_block_method  # as ResultStore.exists calls it
from prefect._internal.result_records import ResultRecord  # the type Transaction.read returns
from prefect.cache_policies import INPUTS, RUN_ID
from prefect.client.schemas.objects import State, TaskRun
from prefect.filesystems import WritableFileSystem
from prefect.results import ResultStore, get_default_result_storage
from prefect.runtime import flow_run
from prefect.transactions import CommitMode, Transaction, transaction

from icd.errors import ConflictError, RegistryStorageError, RunRecordStoreError
from icd.registry.s3 import is_not_found
from icd.text import one_line

ONCE_PER_RUN = INPUTS + RUN_ID
# How long a record the store fails to give is asked for again (waits of 1, 2, 4, 8... s) before the run ends on
# a storage fault: a blip passes, an outage ends the run instead of hanging on it or replaying what it recorded.
# The S3 client retries each read itself too (up to about 15 s), so the run ends within about 45 s.
STORE_RETRY_SECONDS = 30.0

T = TypeVar("T")


def once_per_run(step: str, compute: Callable[[], T]) -> T:
    """What ``compute()`` returned the first time this flow run reached ``step``; computed now if it never did.

    Call it in a flow. An exception (a ``Pause`` included) records nothing, so a suspension inside
    ``compute`` asks again on the re-run. EAGER commits make each task inside commit its own cache record
    at once, as it would outside, instead of waiting for this record.
    """
    with transaction(key=f"icd-{flow_run.get_id()}-{step}", commit_mode=CommitMode.EAGER) as txn:
        record = _read_record(txn, step)
        if record is not None:
            return cast(T, record.result)
        value = compute()
        txn.stage(value)
        # Prefect logs a failed write and carries on; unrecorded, the stretch would run again on resume.
        if not txn.commit() and txn.store is not None:
            raise RunRecordStoreError(
                f"the run's result store failed: the record of step {step!r} could not be written "
                f"to {_storage_name(txn.store)} (see the run's log); nothing after it was done"
            )
    return value


def _read_record(txn: Transaction, step: str) -> ResultRecord[Any] | None:
    """The stretch's record, None only when the store says it was never written; a store that keeps failing
    for :data:`STORE_RETRY_SECONDS` raises :class:`RunRecordStoreError`."""
    deadline = time.monotonic() + STORE_RETRY_SECONDS
    delay, tries = 1.0, 0
    while True:
        tries += 1
        try:
            return _recorded(txn)
        except Exception as exc:  # any failure of the store, whatever raised it, is retried
            cause = f"{type(exc).__name__}: {one_line(str(exc), 200)}"
            where = _storage_name(txn.store) if txn.store else "the result store"
            if time.monotonic() + delay > deadline:
                raise RunRecordStoreError(
                    f"the run's result store failed: the record of step {step!r} could not be read "
                    f"from {where} ({tries} tries in {STORE_RETRY_SECONDS:.0f} s; {cause}). It is never "
                    "taken as absent (that would claim, plan or ask again); nothing more was done by this run"
                ) from exc
            get_run_logger().warning(
                "could not read the record of %r from %s (%s); again in %.0f s", step, where, cause, delay
            )
            time.sleep(delay)
            delay *= 2


def _recorded(txn: Transaction) -> ResultRecord[Any] | None:
    store, key = txn.store, txn.key
    if store is None or not key:
        return None
    # begin() asked ``store.exists``, which says False on any error: ask the storage which it was.
    if not txn.is_committed() and not _stored(store, key):
        return None
    return txn.read()


def _stored(store: ResultStore, key: str) -> bool:
    """Whether ``key`` is in the store: the same read ``ResultStore.exists`` makes, with its errors kept."""
    storage = store.metadata_storage or store.result_storage
    if storage is None:  # as ResultStore does: the default storage; async_dispatch takes ``_sync``
        storage = cast(WritableFileSystem, get_default_result_storage(_sync=True))  # type: ignore[call-arg]
    try:
        call_explicitly_sync_block_method(storage, "read_path", (key,), {})
    except Exception as exc:  # a miss is told apart below; anything else is the store failing
        if _is_missing(exc):
            return False
        raise
    return True


def _is_missing(exc: Exception) -> bool:
    """A miss, as the storages Prefect ships say it; any other failure is the store failing."""
    if isinstance(exc, ClientError):  # prefect-aws S3Bucket: HeadObject's 404 (NoSuchKey for GetObject)
        return is_not_found(exc)
    if isinstance(exc, FileNotFoundError):  # fsspec-backed storages
        return True
    # LocalFileSystem.read_path (prefect/filesystems.py)
    return isinstance(exc, ValueError) and str(exc).endswith("does not exist.")


def _storage_name(store: ResultStore) -> str:
    storage = store.metadata_storage or store.result_storage
    if storage is None:
        return "the result store"
    name = getattr(storage, "_block_document_name", None)
    return f"{type(storage).__name__} {name!r}" if name else type(storage).__name__


def retried(call: Callable[[], T], *transient: type[BaseException], what: str) -> T:
    """``call()``, asked again (waits of 1, 2, 4... s) while it raises one of ``transient``, for up to
    :data:`STORE_RETRY_SECONDS`; then the failure is raised. For library calls where a task can't run (the
    process of a run that has just suspended)."""
    deadline = time.monotonic() + STORE_RETRY_SECONDS
    delay = 1.0
    while True:
        try:
            return call()
        except transient as exc:
            if time.monotonic() + delay > deadline:
                raise
            get_run_logger().warning("%s failed (%s); again in %.0f s", what, exc, delay)
            time.sleep(delay)
            delay *= 2


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


class Retries(TypedDict):
    """A task's retry settings as ``@task`` takes them: ``@task(name=..., **transient(SomeError))``."""

    retries: int
    retry_delay_seconds: list[float]
    retry_condition_fn: RetryCondition


def transient(*errors: type[BaseException], delays: Sequence[float] = (1, 3, 9)) -> Retries:
    """Run the task again after each of ``delays`` seconds while it raises one of ``errors``; any other
    failure is final at once."""
    return Retries(retries=len(delays), retry_delay_seconds=list(delays), retry_condition_fn=retry_on(*errors))


def registry_blip() -> Retries:
    """The registry's S3 blinked, or a conditional write lost to another writer: reading again and retrying fixes
    both (three tries more, after 1, 3 and 9 s). A new value each time: no two tasks share its list."""
    return transient(RegistryStorageError, ConflictError)
