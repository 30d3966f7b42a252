"""The workspace queue: at most one deploy in progress and at most one pending desired version per workspace.

Latest wins, as in GitHub Actions' concurrency groups (the newest pending run replaces the older one) and in
Argo CD (reconcile to the latest desired revision). The queue lives in data, one record per workspace,
never in sleeping flow runs (HCP Terraform: a queued run occupies no agent)::

    holder    the deploy in progress: its run, the request it serves, its phase (planning, awaiting
              approval, applying) and when it expires. This is the workspace lock.
    desired   the newest request not yet taken by a run (a registration, a promotion, a teardown, a run
              started by hand). A newer request replaces it: the older one is superseded without a run.
    dispatched_at  a run was asked for ``desired`` and has not claimed it yet (a second one is asked for
              only once this is ``DISPATCH_STALE_SECONDS`` old).

Every change is one compare-and-swap of that record (``queue_store.py``: S3 conditional writes, or memory
for the fast tests), so a request, a claim and a release never interleave. The transitions below are pure
functions of (record, now, whether the holder is dead) and are tested as tables; :class:`WorkspaceQueue`
wraps them in the CAS loop. What happens, as the deploy flow sees it:

* **request** (``dispatch.py``): ``desired`` = the request. A run is asked for it (``icd.plan.dispatched``)
  when nobody holds the workspace, or when the holder only waits for approval of another target: that
  plan is out of date and the new run takes the workspace over (:func:`on_claim`). A holder that is
  planning or applying keeps the workspace; its checkpoint or its release hands on.
* **claim** (first thing a deploy run does): take ``desired`` (a run started by hand brings its own), or
  end at once, holding nothing: ``Queued`` behind a busy holder, ``InProgress`` when the holder already
  serves that target, ``NothingQueued`` when another run took it.
* **checkpoint** (after planning, once suspended, before applying): a holder whose target is no longer the
  desired one gives the workspace up and ends ``Superseded``; nothing of it is applied.
* **release** (every ending): the holder leaves and ``desired``, if any, gets its run.

A dead holder (its lease expired, or Prefect says its run has ended) is no holder: the next request or
claim reclaims the workspace. Prefect's concurrency leases were the lock before; one record that holds both
the lock and the queue is what lets "the workspace is free" and "start the next request" be one decision.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from icd.errors import ConflictError, WorkspaceLockError
from icd.rules import PLAN_AND_APPLY_MARGIN_SECONDS, check_workspace

logger = logging.getLogger(__name__)

Phase = Literal["planning", "awaiting", "applying"]
_PHASE_ORDER: dict[str, int] = {"planning": 0, "awaiting": 1, "applying": 2}
# A dispatched run that has not claimed the workspace by then (its trigger was lost, the pool was down) is
# asked for again by the next request or release; a second run that finds nothing queued ends at once.
DISPATCH_STALE_SECONDS = 120.0
# How long a planning holder may keep the workspace without a sign of life (init, plan, publish, notify).
PLANNING_LEASE_SECONDS = float(PLAN_AND_APPLY_MARGIN_SECONDS)
_MAX_ATTEMPTS = 30


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeployRequest(_Frozen):
    """One wish for a workspace: run this version (or tear down). Its id is the event's or the run's."""

    id: str
    workspace: str
    namespace: str
    version: int
    teardown: bool = False
    by: str = ""  # who or what asked: "registration of v5", "alice", "run brave-fox"
    cause: str = ""  # the event that carried it (icd.artifact.registered, ...) or "manual run"
    reason: str = ""  # why, when the asker said (a teardown's --why): recorded where the request is carried out
    requested_at: datetime

    def same_target(self, other: DeployRequest | None) -> bool:
        return other is not None and (self.version, self.teardown) == (other.version, other.teardown)

    @property
    def what(self) -> str:
        """How operators read the target: "acmeinc/web v5", or "a teardown (acmeinc/web v5)"."""
        return (
            f"a teardown ({self.namespace} v{self.version})" if self.teardown else f"{self.namespace} v{self.version}"
        )


class NoticeRef(_Frozen):
    """Where the approval notice went (a chat channel and message id), so later news replies in its thread."""

    channel: str
    ts: str


class Holder(_Frozen):
    """The deploy in progress on a workspace: the workspace lock."""

    run_id: str
    run_name: str
    request: DeployRequest
    phase: Phase
    since: datetime
    expires_at: datetime
    plan_sha256: str | None = None
    plan_artifact_id: str | None = None
    notice: NoticeRef | None = None


class QueueRecord(_Frozen):
    workspace: str
    holder: Holder | None = None
    desired: DeployRequest | None = None
    dispatched_at: datetime | None = None


@dataclass(frozen=True)
class RunRef:
    """The flow run asking (its id keys the lock; its name is what operators read)."""

    id: str
    name: str


# --- results: expected outcomes are values (Atlantis); only faults raise --------------------------------------


@dataclass(frozen=True)
class Requested:
    request: DeployRequest
    dispatch: DeployRequest | None = None  # ask for a run for this one (icd.plan.dispatched)
    superseded: DeployRequest | None = None  # the pending request this one replaced (it never had a run)
    behind: Holder | None = None  # queued behind this holder, which hands on when it ends
    in_progress: Holder | None = None  # this holder already serves the same target: nothing more to do
    reclaimed: Holder | None = None  # a dead holder that was removed


@dataclass(frozen=True)
class Claimed:
    holder: Holder
    took_over: Holder | None = None  # a holder that only waited for approval of another target: superseded
    superseded: DeployRequest | None = None  # the pending request a run started by hand replaced
    reclaimed: Holder | None = None


@dataclass(frozen=True)
class Queued:
    """The workspace is busy planning or applying: the request waits in data, the run ends at once."""

    request: DeployRequest
    behind: Holder
    superseded: DeployRequest | None = None


@dataclass(frozen=True)
class InProgress:
    """The holder already serves this very target (the same version waiting for approval, say)."""

    holder: Holder
    superseded: DeployRequest | None = None


@dataclass(frozen=True)
class NothingQueued:
    """A dispatched run found nothing to do: another run took the request, or a newer one did."""

    holder: Holder | None


ClaimResult = Claimed | Queued | InProgress | NothingQueued


@dataclass(frozen=True)
class Kept:
    holder: Holder


@dataclass(frozen=True)
class Superseded:
    """This holder's target is no longer wanted: it gave the workspace up (or another run took it over)."""

    by: DeployRequest
    taken_by: Holder | None = None  # the run that took the workspace over, when one did
    dispatch: DeployRequest | None = None  # ask for a run for ``by``


@dataclass(frozen=True)
class Lost:
    """The workspace is not this run's any more (broken by an operator, or expired and reclaimed)."""

    holder: Holder | None


CheckpointResult = Kept | Superseded | Lost


@dataclass(frozen=True)
class Released:
    was_holder: bool
    dispatch: DeployRequest | None = None


@dataclass(frozen=True)
class Broken:
    holder: Holder | None
    dispatch: DeployRequest | None = None


# --- pure transitions ----------------------------------------------------------------------------------------

R = TypeVar("R")


def _dispatch_due(record: QueueRecord, now: datetime) -> bool:
    sent = record.dispatched_at
    return sent is None or (now - sent).total_seconds() >= DISPATCH_STALE_SECONDS


def _hand_on(record: QueueRecord, now: datetime) -> tuple[QueueRecord, DeployRequest | None]:
    """With no holder left, ask for a run for ``desired`` unless one was asked for recently."""
    if record.holder is None and record.desired is not None and _dispatch_due(record, now):
        return record.model_copy(update={"dispatched_at": now}), record.desired
    if record.desired is None and record.dispatched_at is not None:
        return record.model_copy(update={"dispatched_at": None}), None
    return record, None


def on_request(
    record: QueueRecord, request: DeployRequest, now: datetime, holder_dead: bool
) -> tuple[QueueRecord, Requested]:
    if record.desired is not None and record.desired.id == request.id:
        return record, Requested(request)  # the same request again (a retried task): already queued
    reclaimed = record.holder if holder_dead else None
    holder = None if holder_dead else record.holder
    superseded = record.desired
    base = record.model_copy(update={"holder": holder})
    if holder is not None and holder.request.same_target(request):
        # Latest wins, and the latest is what the holder serves already: an older pending one is dropped.
        done = base.model_copy(update={"desired": None, "dispatched_at": None})
        return done, Requested(request, superseded=superseded, in_progress=holder, reclaimed=reclaimed)
    queued = base.model_copy(update={"desired": request})
    dispatch = None
    if (holder is None or holder.phase == "awaiting") and _dispatch_due(record, now):
        queued, dispatch = queued.model_copy(update={"dispatched_at": now}), request
    behind = holder if holder is not None and holder.phase != "awaiting" else None
    return queued, Requested(request, dispatch, superseded, behind, reclaimed=reclaimed)


def on_claim(
    record: QueueRecord,
    run: RunRef,
    own: DeployRequest | None,
    now: datetime,
    holder_dead: bool,
    expires_at: datetime,
) -> tuple[QueueRecord, ClaimResult]:
    """A deploy run asks for the workspace. ``own`` is its own request when it was started by hand (it
    replaces whatever is pending: it is the newest); a dispatched run takes what is pending."""
    if record.holder is not None and record.holder.run_id == run.id:
        return record, Claimed(record.holder)  # asked again (a retried task): it is ours already
    superseded = record.desired if own is not None and record.desired is not None else None
    desired = own if own is not None else record.desired
    reclaimed = record.holder if holder_dead else None
    holder = None if holder_dead else record.holder
    if desired is None:
        return record.model_copy(update={"holder": holder, "dispatched_at": None}), NothingQueued(holder)
    if holder is not None and holder.request.same_target(desired):
        done = record.model_copy(update={"holder": holder, "desired": None, "dispatched_at": None})
        return done, InProgress(holder, superseded)
    if holder is not None and holder.phase != "awaiting":
        # The holder hands on when it ends (its release dispatches what is pending then).
        waiting = record.model_copy(update={"holder": holder, "desired": desired, "dispatched_at": None})
        return waiting, Queued(desired, holder, superseded)
    mine = Holder(run_id=run.id, run_name=run.name, request=desired, phase="planning", since=now, expires_at=expires_at)
    taken = record.model_copy(update={"holder": mine, "desired": None, "dispatched_at": None})
    return taken, Claimed(mine, took_over=holder, superseded=superseded, reclaimed=reclaimed)


def on_checkpoint(
    record: QueueRecord,
    run_id: str,
    mine: DeployRequest,
    now: datetime,
    *,
    advance_to: Phase | None = None,
    retake: bool = False,
    **details: object,
) -> tuple[QueueRecord | None, CheckpointResult]:
    """The holder asks whether it is still wanted, and moves on to ``advance_to`` (with ``details``: a new
    ``expires_at``, the plan's hash, ...) if it is.

    Superseded when a newer, different target is pending: the holder gives the workspace up at once and the
    pending one gets its run; or when another run took the workspace over for another target. ``retake``:
    a run about to apply whose record was removed meanwhile (an operator broke a dead-looking lock) takes
    the workspace again if nothing is pending; what it applies must still match the state and the channel,
    which the apply checks right before Terraform starts.
    """
    holder = record.holder
    if holder is None:
        if record.desired is not None and not record.desired.same_target(mine):
            handed, dispatch = _hand_on(record, now)
            return handed, Superseded(record.desired, dispatch=dispatch)
        if not retake:
            return None, Lost(None)
        holder = Holder(run_id=run_id, run_name=mine.by, request=mine, phase="planning", since=now, expires_at=now)
        record = record.model_copy(update={"desired": None, "dispatched_at": None})
    elif holder.run_id != run_id:
        if holder.request.same_target(mine):
            return None, Lost(holder)
        return None, Superseded(holder.request, taken_by=holder)
    if record.desired is not None and not record.desired.same_target(holder.request):
        handed, dispatch = _hand_on(record.model_copy(update={"holder": None}), now)
        return handed, Superseded(record.desired, dispatch=dispatch)
    if advance_to is not None and _PHASE_ORDER[advance_to] >= _PHASE_ORDER[holder.phase]:
        holder = holder.model_copy(update={"phase": advance_to, **details})
    if holder == record.holder:
        return None, Kept(holder)
    return record.model_copy(update={"holder": holder}), Kept(holder)


def on_release(record: QueueRecord, run_id: str, now: datetime, holder_dead: bool) -> tuple[QueueRecord, Released]:
    """``run_id`` gives the workspace back (idempotent); the pending request, if any, gets its run."""
    was = record.holder is not None and record.holder.run_id == run_id
    cleared = record.model_copy(update={"holder": None}) if was or holder_dead else record
    handed, dispatch = _hand_on(cleared, now)
    return handed, Released(was, dispatch)


def on_break(record: QueueRecord, now: datetime, holder_alive: bool, force: bool) -> tuple[QueueRecord, Broken]:
    holder = record.holder
    if holder is not None and holder_alive and not force:
        raise WorkspaceLockError(
            f"workspace {record.workspace!r} is held by run {holder.run_name} ({holder.run_id}), which is still "
            f"alive ({holder.phase}): it may be applying. Wait for it, cancel it in the UI, or break the lock "
            "with --force if you know its process is gone (Terraform's own state lock still guards the state)"
        )
    handed, dispatch = _hand_on(record.model_copy(update={"holder": None}), now)
    return handed, Broken(holder, dispatch)


# --- the CAS loop ------------------------------------------------------------------------------------------


class QueueStore(Protocol):
    """Where the records live (Atlantis' locker seam): ``queue_store.py`` has S3 and memory."""

    def load(self, workspace: str) -> tuple[QueueRecord, str] | None:
        """The record and a version token for the compare-and-swap, or None when there is none yet."""
        ...

    def save(self, record: QueueRecord, *, expected: str | None) -> bool:
        """Write ``record`` only if the stored version is still ``expected`` (None: only if absent)."""
        ...

    def workspaces(self) -> list[str]: ...


RunAlive = Callable[[str], bool | None]


def _unknown(_run_id: str) -> bool | None:
    return None


class WorkspaceQueue:
    """The transitions above, applied with compare-and-swap. Thread-safe if the store is.

    ``run_alive(run_id)``: False when the run has ended or is gone, True when it lives, None when it can't
    be told (then it counts as alive: a live holder is never evicted on a guess).
    """

    def __init__(
        self,
        store: QueueStore,
        *,
        run_alive: RunAlive = _unknown,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.run_alive = run_alive
        self.clock = clock or (lambda: datetime.now(UTC))

    def holder_dead(self, holder: Holder | None, now: datetime) -> bool:
        if holder is None:
            return False
        return holder.expires_at <= now or self.run_alive(holder.run_id) is False

    def _change(
        self,
        workspace: str,
        change: Callable[[QueueRecord, datetime, bool], tuple[QueueRecord | None, R]],
        *,
        needs_liveness: bool = True,
    ) -> R:
        check_workspace(workspace)
        for attempt in range(_MAX_ATTEMPTS):
            loaded = self.store.load(workspace)
            record, token = loaded if loaded is not None else (QueueRecord(workspace=workspace), None)
            now = self.clock()
            dead = needs_liveness and self.holder_dead(record.holder, now)
            updated, result = change(record, now, dead)
            if updated is None or updated == record:
                return result
            if self.store.save(updated, expected=token):
                return result
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311  # jitter, not crypto
        raise ConflictError(f"the queue record of workspace {workspace!r} changed under us {_MAX_ATTEMPTS} times")

    def request(self, request: DeployRequest) -> Requested:
        return self._change(request.workspace, lambda rec, now, dead: on_request(rec, request, now, dead))

    def claim(self, workspace: str, run: RunRef, *, own: DeployRequest | None = None) -> ClaimResult:
        def change(rec: QueueRecord, now: datetime, dead: bool) -> tuple[QueueRecord, ClaimResult]:
            return on_claim(rec, run, own, now, dead, now + timedelta(seconds=PLANNING_LEASE_SECONDS))

        return self._change(workspace, change)

    def checkpoint(
        self,
        run_id: str,
        mine: DeployRequest,
        *,
        advance_to: Phase | None = None,
        retake: bool = False,
        **details: object,
    ) -> CheckpointResult:
        def change(rec: QueueRecord, now: datetime, _dead: bool) -> tuple[QueueRecord | None, CheckpointResult]:
            return on_checkpoint(rec, run_id, mine, now, advance_to=advance_to, retake=retake, **details)

        # The holder asks about itself: whether it is alive is not in question.
        return self._change(mine.workspace, change, needs_liveness=False)

    def release(self, workspace: str, run_id: str) -> Released:
        return self._change(workspace, lambda rec, now, dead: on_release(rec, run_id, now, dead))

    def break_lock(self, workspace: str, *, force: bool = False) -> Broken:
        def change(rec: QueueRecord, now: datetime, dead: bool) -> tuple[QueueRecord, Broken]:
            return on_break(rec, now, rec.holder is not None and not dead, force)

        return self._change(workspace, change)

    def read(self, workspace: str) -> QueueRecord | None:
        loaded = self.store.load(check_workspace(workspace))
        return loaded[0] if loaded is not None else None

    def holder(self, workspace: str) -> Holder | None:
        record = self.read(workspace)
        return record.holder if record is not None else None

    def records(self) -> list[QueueRecord]:
        found = (self.read(workspace) for workspace in self.store.workspaces())
        return [record for record in found if record is not None]


def prefect_run_alive(run_id: str) -> bool | None:
    """Whether a Prefect flow run can still act: not ended, not deleted. None when the API can't say."""
    from icd.run_state import Unknown, flow_run_state, has_ended

    state = flow_run_state(run_id)
    if isinstance(state, Unknown):  # any API failure means "can't tell", never "dead"
        logger.warning("could not read flow run %s (%s); treating its lock as held", run_id, state.cause)
        return None
    return not has_ended(state)
