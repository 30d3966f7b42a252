"""The per-workspace deploy lock against a real Prefect server: serialization, fail-closed, expiry, break."""

from __future__ import annotations

import contextvars
import threading
import uuid

import pytest
from prefect import flow
from prefect.states import Crashed, Running

from cli.lock import main as lock_cli
from examples.local_env import api_client
from icd.deploy import lock as workspace_lock
from icd.deploy.lock import LockHeld, WorkspaceLease
from icd.errors import InvalidNameError, WorkspaceLockError


def _acquire(workspace: str, wait: float = 2.0, lease: float = 60.0) -> WorkspaceLease | LockHeld:
    """Acquire as a live run: a lock whose holder run has ended or is gone is reclaimed by the next one."""
    return workspace_lock.acquire(
        workspace,
        holder_flow_run_id=_run_in(Running()),
        holder_name="test-run",
        lease_seconds=lease,
        wait_seconds=wait,
    )


def _ws() -> str:
    return f"ws-{uuid.uuid4().hex[:8]}"


@pytest.mark.usefixtures("prefect_server")
class TestWorkspaceLock:
    def test_a_renewal_extends_the_lease_and_its_record_and_never_shortens_it(self) -> None:
        ws = _ws()
        lease = _acquire(ws, lease=120)
        assert isinstance(lease, WorkspaceLease)
        longer = workspace_lock.renew(lease, 3000)
        assert longer.expires_at > lease.expires_at
        assert workspace_lock.current_holder(ws) == longer, "operators see the new expiry"
        assert workspace_lock.renew(longer, 60).expires_at == longer.expires_at, "a renewal never shortens"
        assert isinstance(_acquire(ws, wait=0.5), LockHeld), "still held"
        workspace_lock.release(longer)

    def test_a_lost_lease_is_taken_again_when_the_workspace_is_free_and_never_while_another_holds_it(self) -> None:
        ws = _ws()
        first = _acquire(ws, lease=120)
        assert isinstance(first, WorkspaceLease)
        workspace_lock.break_lock(ws, force=True)  # an operator breaks it while the run waits for approval
        again = workspace_lock.renew(first, 300)
        assert isinstance(again, WorkspaceLease), again
        assert again.lease_id != first.lease_id
        assert again.holder_flow_run_id == first.holder_flow_run_id
        assert workspace_lock.current_holder(ws) == again
        assert isinstance(_acquire(ws, wait=0.5), LockHeld), "the new lease guards the workspace"

        workspace_lock.break_lock(ws, force=True)
        other = _acquire(ws)
        assert isinstance(other, WorkspaceLease)
        lost = workspace_lock.renew(again, 300)
        assert isinstance(lost, LockHeld), "another run holds it now: nothing may be applied"
        assert lost.holder is not None
        assert lost.holder.lease_id == other.lease_id
        assert workspace_lock.current_holder(ws) == other, "the other holder's record is untouched"
        workspace_lock.release(other)

    def test_second_holder_waits_then_gets_it_after_release(self) -> None:
        ws = _ws()
        first = _acquire(ws)
        assert isinstance(first, WorkspaceLease)
        held = _acquire(ws, wait=1.5)
        assert isinstance(held, LockHeld)
        assert held.holder is not None
        assert held.holder.lease_id == first.lease_id

        got: list[WorkspaceLease | LockHeld] = []
        asked = threading.Event()
        # Prefect's settings (the API URL) live in a context variable; the thread must inherit it.
        context = contextvars.copy_context()

        def second_holder() -> None:
            asked.set()
            got.append(_acquire(ws, wait=30))

        waiter = threading.Thread(target=context.run, args=(second_holder,))
        waiter.start()
        asked.wait(timeout=10)
        assert isinstance(_acquire(ws, wait=0), LockHeld), "the workspace is still held by the first"
        assert not got, "the second holder must wait while the first holds the workspace"
        workspace_lock.release(first)
        waiter.join(timeout=40)
        assert got
        assert isinstance(got[0], WorkspaceLease)
        workspace_lock.release(got[0])

    def test_two_workspaces_do_not_block_each_other(self) -> None:
        a, b = _acquire(_ws()), _acquire(_ws())
        assert isinstance(a, WorkspaceLease)
        assert isinstance(b, WorkspaceLease)
        workspace_lock.release(a)
        workspace_lock.release(b)

    def test_release_is_idempotent_and_clears_the_holder_record(self) -> None:
        ws = _ws()
        lease = _acquire(ws)
        assert isinstance(lease, WorkspaceLease)
        assert workspace_lock.current_holder(ws) == lease
        workspace_lock.release(lease)
        workspace_lock.release(lease)
        assert workspace_lock.current_holder(ws) is None
        again = _acquire(ws)
        assert isinstance(again, WorkspaceLease)
        workspace_lock.release(again)

    def test_break_evicts_a_dead_holder_and_names_it(self, capsys: pytest.CaptureFixture[str]) -> None:
        ws = _ws()
        lease = _acquire(ws)
        assert isinstance(lease, WorkspaceLease)
        api_client().set_flow_run_state(lease.holder_flow_run_id, Crashed(), force=True)  # type: ignore[arg-type]
        assert lock_cli(["break", ws]) == 0
        out = capsys.readouterr().out
        assert lease.holder_flow_run_id in out
        assert lease.lease_id in out
        after = _acquire(ws)
        assert isinstance(after, WorkspaceLease)
        workspace_lock.release(after)

    def test_a_lease_longer_than_prefect_allows_is_refused_not_capped(self) -> None:
        with pytest.raises(WorkspaceLockError, match="longer than Prefect allows"):
            _acquire(_ws(), lease=25 * 3600)

    def test_bad_workspace_name_is_refused(self) -> None:
        with pytest.raises(InvalidNameError, match="invalid workspace"):
            _acquire("Prod/Main")

    def test_list_shows_held_locks(self, capsys: pytest.CaptureFixture[str]) -> None:
        ws = _ws()
        lease = _acquire(ws)
        assert isinstance(lease, WorkspaceLease)
        assert lock_cli(["list"]) == 0
        assert ws in capsys.readouterr().out
        workspace_lock.release(lease)


@flow(name="lock-holder")
def _holder_flow() -> None:
    """Never called: a flow to create runs of, in any state, for the lock to look at."""


def _run_in(state: object) -> str:
    run = api_client().create_flow_run(_holder_flow, state=state)  # type: ignore[arg-type]
    return str(run.id)


@pytest.mark.usefixtures("prefect_server")
class TestLocksThatCantLeakOrLie:
    def test_break_refuses_while_the_holder_run_is_alive_unless_forced(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        ws = _ws()
        run_id = _run_in(Running())
        lease = workspace_lock.acquire(
            ws, holder_flow_run_id=run_id, holder_name="busy-run", lease_seconds=600, wait_seconds=1
        )
        assert isinstance(lease, WorkspaceLease)

        assert lock_cli(["break", ws]) == 2
        assert "still RUNNING" in capsys.readouterr().out
        assert workspace_lock.current_holder(ws) == lease

        assert lock_cli(["break", ws, "--force"]) == 0
        assert run_id in capsys.readouterr().out
        assert workspace_lock.current_holder(ws) is None

    def test_a_lock_whose_run_crashed_is_reclaimed_by_the_next_deploy(self) -> None:
        ws = _ws()
        run_id = _run_in(Running())
        leaked = workspace_lock.acquire(
            ws, holder_flow_run_id=run_id, holder_name="doomed", lease_seconds=3600, wait_seconds=1
        )
        assert isinstance(leaked, WorkspaceLease)
        api_client().set_flow_run_state(run_id, Crashed(message="worker killed"), force=True)  # type: ignore[arg-type]

        # The next deploy does not wait out the hour-long lease of a run that is gone.
        taken = _acquire(ws, wait=5)
        assert isinstance(taken, WorkspaceLease)
        assert taken.lease_id != leaked.lease_id
        workspace_lock.release(taken)
