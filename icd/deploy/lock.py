"""One deploy at a time per workspace, from plan until apply or discard, as in HCP Terraform.

The lock is a Prefect global concurrency limit (``deploy-workspace-<workspace>``, limit 1) taken with a
*lease*, not with the ``concurrency()`` context manager: a suspended run holds no process, so nothing could
keep a context manager open across the approval wait. The lease is sized to outlive the whole wait
(approval timeout + margin) and is released on every path by the flow; if the flow dies, the server's
lease repossessor frees it when it expires. Acquisition has ``strict=True`` semantics, done here with the
client (Prefect's own helper serializes a process's acquisitions and may sleep 30 s between tries): a
missing limit fails closed instead of running unguarded (we create the limit first, so a miss is a fault).

Who holds a lock is recorded in a Prefect variable ``deploy-lock-<workspace>`` (the server has no API that
lists lease holders), so an operator can see it and break it with ``icd-lock list`` / ``icd-lock break``
(``cli/lock.py``).

Run the server with ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.
filesystem`` so leases survive a server restart (the default memory storage forgets them and would leave
the slot occupied forever).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    VariableCreate,
    VariableUpdate,
)
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.variables import Variable

from icd.errors import WorkspaceLockError
from icd.rules import MAX_LEASE_SECONDS, check_workspace

LIMIT_PREFIX = "deploy-workspace-"
RECORD_PREFIX = "deploy-lock-"
# Prefect's lease API accepts 60 s to 24 h (the upper bound lives with the other bounds in icd/rules.py).
MIN_LEASE_SECONDS = 60.0
logger = logging.getLogger(__name__)
# A waiting deploy re-asks at most this often; Prefect's own helper may sleep up to 30 s between tries and
# serializes all acquisitions of one process, which is too coarse for an operator watching a queue.
_MAX_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class WorkspaceLease:
    workspace: str
    lease_id: str
    holder_flow_run_id: str
    holder_name: str
    acquired_at: str
    expires_at: str


@dataclass(frozen=True)
class LockHeld:
    """The expected outcome when another deploy kept the workspace for longer than we were willing to wait."""

    workspace: str
    holder: WorkspaceLease | None
    waited_seconds: float


# What the server answers for a lease that expired or was revoked.
_LEASE_GONE = frozenset({404, 410})


def limit_name(workspace: str) -> str:
    return LIMIT_PREFIX + check_workspace(workspace)


def _record_name(workspace: str) -> str:
    return RECORD_PREFIX + check_workspace(workspace)


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another run created it between our read and our create: same limit, fine
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 409:
                    raise WorkspaceLockError(f"could not create concurrency limit {name!r}: {exc}") from exc


def current_holder(workspace: str) -> WorkspaceLease | None:
    raw: Any = Variable.get(_record_name(workspace), default=None)
    if not raw:
        return None
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
        return WorkspaceLease(**data)
    except (TypeError, ValueError):
        return None


def acquire(
    workspace: str,
    *,
    holder_flow_run_id: str,
    holder_name: str,
    lease_seconds: float,
    wait_seconds: float,
) -> WorkspaceLease | LockHeld:
    """Take the workspace, waiting up to ``wait_seconds`` for another deploy to finish."""
    name = limit_name(workspace)
    if lease_seconds > MAX_LEASE_SECONDS:
        raise WorkspaceLockError(
            f"a lease of {lease_seconds:.0f}s is longer than Prefect allows ({MAX_LEASE_SECONDS}s); "
            "shorten the approval timeout"
        )
    lease_seconds = max(lease_seconds, MIN_LEASE_SECONDS)
    _ensure_limit(name)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(holder_flow_run_id))
    started = time.monotonic()
    deadline = started + wait_seconds
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=lease_seconds, holder=holder
                )
                break
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise WorkspaceLockError(f"could not lock workspace {workspace!r}: {exc}") from exc
                retry_after = float(exc.response.headers.get("Retry-After", _MAX_POLL_SECONDS))
                logger.info("workspace %s is locked; asking again in %.1fs at most", workspace, retry_after)
            if _reclaim_from_finished_holder(workspace, client):
                continue
            now = time.monotonic()
            if now >= deadline:
                return LockHeld(workspace=workspace, holder=current_holder(workspace), waited_seconds=now - started)
            pause = min(retry_after, _MAX_POLL_SECONDS, deadline - now) * random.uniform(0.8, 1.0)  # noqa: S311  # jitter, not crypto
            time.sleep(max(pause, 0.05))
    granted = response.json()
    if not granted.get("limits"):
        # strict: a limit that vanished between creation and acquisition would otherwise run unguarded
        raise WorkspaceLockError(f"concurrency limit {name!r} does not exist; refusing to deploy unguarded")
    lease_id = str(granted["lease_id"])
    acquired_at = datetime.now(UTC)
    lease = WorkspaceLease(
        workspace=workspace,
        lease_id=lease_id,
        holder_flow_run_id=holder_flow_run_id,
        holder_name=holder_name,
        acquired_at=acquired_at.isoformat(),
        expires_at=(acquired_at + timedelta(seconds=lease_seconds)).isoformat(),
    )
    _write_record(lease)
    return lease


def _write_record(lease: WorkspaceLease) -> None:
    """Record the holder. Create-or-update by hand: ``Variable.set(overwrite=True)`` reads, then updates,
    and a previous holder's release deleting its record in between made the update fail with a 404."""
    name = _record_name(lease.workspace)
    value = json.dumps(asdict(lease))
    with get_client(sync_client=True) as client:
        for _ in range(5):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_variable(VariableCreate(name=name, value=value))
                return
            try:
                client.update_variable(VariableUpdate(name=name, value=value))
                return
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise WorkspaceLockError(f"could not record the holder of {lease.workspace!r}: {exc}") from exc
    raise WorkspaceLockError(f"the holder record of {lease.workspace!r} kept vanishing; is someone breaking locks?")


TERMINAL_STATES = frozenset({StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED})


def holder_state(holder: WorkspaceLease, client: SyncPrefectClient) -> StateType | None:
    """The state type of the run that holds the lock; None when the run no longer exists."""
    try:
        run = client.read_flow_run(UUID(holder.holder_flow_run_id))
    except ObjectNotFound:
        return None
    return run.state.type if run.state is not None else None


def _reclaim_from_finished_holder(workspace: str, client: SyncPrefectClient) -> bool:
    """Free a lock whose holder run has ended (crashed, failed, timed out) without releasing it.

    The lease would expire on its own, but only after the approval timeout plus a margin: a lock must not
    outlive its run. True when the lock was reclaimed (try again at once).
    """
    holder = current_holder(workspace)
    if holder is None:
        return False
    state = holder_state(holder, client)
    if state is not None and state not in TERMINAL_STATES:
        return False
    logger.warning(
        "workspace %s was still locked by run %s, which is %s; reclaiming its lock",
        workspace,
        holder.holder_name,
        state.value if state else "gone",
    )
    release(holder)
    return True


def renew(lease: WorkspaceLease, seconds: float) -> WorkspaceLease | LockHeld:
    """Extend the lease to ``seconds`` from now (never shorter than it is), and record the new expiry.

    A lease that is gone (it lapsed, or an operator broke the lock) is taken again if the workspace is free,
    as a new lease the caller must release too; held by another run, the answer is ``LockHeld``. Taking it
    again is safe because an apply only runs a saved plan that still matches the state (``StalePlan``).
    """
    now = datetime.now(UTC)
    expires = max(datetime.fromisoformat(lease.expires_at), now + timedelta(seconds=max(seconds, MIN_LEASE_SECONDS)))
    if expires - now > timedelta(seconds=MAX_LEASE_SECONDS):
        raise WorkspaceLockError(f"a lease of {seconds:.0f}s is longer than Prefect allows ({MAX_LEASE_SECONDS}s)")
    with get_client(sync_client=True) as client:
        try:
            client.renew_concurrency_lease(UUID(lease.lease_id), lease_duration=(expires - now).total_seconds())
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in _LEASE_GONE:
                raise WorkspaceLockError(
                    f"could not renew the lock on {lease.workspace!r} (lease {lease.lease_id}): {exc}"
                ) from exc
            logger.warning(
                "the lease %s on workspace %s is gone (it lapsed or the lock was broken); taking the workspace again",
                lease.lease_id,
                lease.workspace,
            )
            return acquire(
                lease.workspace,
                holder_flow_run_id=lease.holder_flow_run_id,
                holder_name=lease.holder_name,
                lease_seconds=(expires - now).total_seconds(),
                wait_seconds=0,
            )
    renewed = replace(lease, expires_at=expires.isoformat())
    _write_record(renewed)
    return renewed


def _release_lease(lease_id: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.release_concurrency_slots_with_lease(UUID(lease_id))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise WorkspaceLockError(f"could not release lease {lease_id}: {exc}") from exc


def release(lease: WorkspaceLease) -> None:
    """Idempotent: releasing an expired or already released lease is not an error.

    The record goes first, while the slot is still ours: once the lease is released the next holder may
    write its own record, which must not be deleted as ours.
    """
    holder = current_holder(lease.workspace)
    if holder is not None and holder.lease_id == lease.lease_id:
        Variable.unset(_record_name(lease.workspace))
    _release_lease(lease.lease_id)


def break_lock(workspace: str, *, force: bool = False) -> WorkspaceLease | None:
    """Evict whoever holds the workspace; refuses while the holder's run is alive, unless ``force``.

    A run that is running, pending or waiting for approval may be in the middle of an apply; breaking its
    lock would let a second apply run on the same state, so that takes ``force`` and an operator's judgement.
    """
    name = limit_name(workspace)
    holder = current_holder(workspace)
    if holder is not None and not force:
        with get_client(sync_client=True) as client:
            state = holder_state(holder, client)
        if state is not None and state not in TERMINAL_STATES:
            raise WorkspaceLockError(
                f"workspace {workspace!r} is held by run {holder.holder_name} ({holder.holder_flow_run_id}), "
                f"which is still {state.value}: it may be applying. Wait for it, cancel it in the UI, or break "
                "the lock with --force if you know its process is gone (Terraform's own state lock still guards "
                "the state)"
            )
    if holder is not None:
        _release_lease(holder.lease_id)
        Variable.unset(_record_name(workspace))
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    return holder


def list_locks() -> list[dict[str, Any]]:
    with get_client(sync_client=True) as client:
        limits = client.read_global_concurrency_limits(limit=200)
    rows: list[dict[str, Any]] = []
    for limit in limits:
        if not limit.name.startswith(LIMIT_PREFIX):
            continue
        workspace = limit.name.removeprefix(LIMIT_PREFIX)
        holder = current_holder(workspace) if limit.active_slots else None
        rows.append(
            {
                "workspace": workspace,
                "held": bool(limit.active_slots),
                "holder": asdict(holder) if holder else None,
            }
        )
    return rows
