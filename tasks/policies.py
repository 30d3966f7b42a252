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
on *any* error (``prefect/results.py``), so with S3 unreachable a committed stretch would look never done and
run again: a claim again, a plan again, a question again. :func:`once_per_run` reads the record itself
before it opens Prefect's transaction, tells a real miss (S3's 404, a missing local file) from a failure,
retries a failure for half a minute (:data:`STORE_RETRY_SECONDS`), then raises
:class:`~icd.errors.RunRecordStoreError`, which the flow ends through ``finish``. A record that can't be
written is the same fault. Prefect itself is not patched: the read comes before its transaction.

**One read.** Left to itself the transaction reads a record twice on a re-run (``exists`` reads the whole
object, then ``read`` reads it again) and asks ``exists`` once more before a first write; through prefect-aws
each read is two S3 requests (a HEAD, then a GET). The read above is the only one: the transaction is told
to overwrite, so it asks nothing before it writes (docs/benchmarks.md, "Issue 24: eleventh session").

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
from prefect._internal.result_records import ResultRecord  # the type Transaction.read returns
from prefect.cache_policies import INPUTS, RUN_ID
from prefect.client.schemas.objects import State, TaskRun
from prefect.filesystems import NullFileSystem
from prefect.results import ResultStore, get_result_store
from prefect.runtime import flow_run
from prefect.transactions import CommitMode, transaction

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
    key = f"icd-{flow_run.get_id()}-{step}"
    store = _run_store()
    record = _read_record(store, key, step)
    if record is not None:
        return cast(T, record.result)
    # overwrite: the store has just said the record is absent, and only this run writes it; without it the
    # transaction would ask the store again before it wrote.
    with transaction(key=key, store=store, commit_mode=CommitMode.EAGER, overwrite=True) as txn:
        value = compute()
        txn.stage(value)
        # Prefect logs a failed write and carries on; unrecorded, the stretch would run again on resume.
        if not txn.commit():
            raise RunRecordStoreError(
                f"the run's result store failed: the record of step {step!r} could not be written "
                f"to {_storage_name(store)} (see the run's log); nothing after it was done"
            )
    return value


def _run_store() -> ResultStore:
    """The store ``transaction(key=...)`` would take: the run's own, as Prefect's ``transaction`` picks it."""
    store = get_result_store()
    # As transaction() does: a flow's store may carry a NullFileSystem for metadata, which holds nothing.
    if isinstance(store.metadata_storage, NullFileSystem):
        store = store.model_copy(update={"metadata_storage": None})
    return store


def _read_record(store: ResultStore, key: str, step: str) -> ResultRecord[Any] | None:
    """The stretch's record, None only when the store says it was never written; a store that keeps failing
    for :data:`STORE_RETRY_SECONDS` raises :class:`RunRecordStoreError`."""
    deadline = time.monotonic() + STORE_RETRY_SECONDS
    delay, tries = 1.0, 0
    while True:
        tries += 1
        try:
            return _recorded(store, key)
        except Exception as exc:  # any failure of the store, whatever raised it, is retried
            cause, where = f"{type(exc).__name__}: {one_line(str(exc), 200)}", _storage_name(store)
            if time.monotonic() + delay > deadline:
                raise RunRecordStoreError(
                    f"the run's result store failed: the record of step {step!r} could not be read "
                    f"from {where} ({tries} tries in {STORE_RETRY_SECONDS:.0f} s; {cause}). It is "
                    "never taken as absent (that would claim, plan or ask again); nothing more was done by this run"
                ) from exc
            get_run_logger().warning(
                "could not read the record of %r from %s (%s); again in %.0f s",
                step,
                where,
                cause,
                delay,
            )
            time.sleep(delay)
            delay *= 2


def _recorded(store: ResultStore, key: str) -> ResultRecord[Any] | None:
    """The record at ``key``; None only for a miss (S3's 404, a missing file), any other failure raised."""
    try:
        return store.read(key)
    except Exception as exc:  # a miss is told apart here; anything else is the store failing
        if _is_missing(exc):
            return None
        raise


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
