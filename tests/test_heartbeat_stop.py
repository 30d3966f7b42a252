"""A forked run's heartbeat thread (prefect_patches/heartbeat_stop.py): the flow's end does not wait for it, and it
sends nothing once the run has ended."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import prefect.flow_engine
import pytest

from prefect_patches import heartbeat_stop
from tests.waiting import wait_until


class RecordingEngine:
    """What ``_send_heartbeats`` reads of a flow run engine, recording each heartbeat it is asked to send."""

    heartbeat_seconds = 30
    logger = SimpleNamespace(debug=lambda *args, **kwargs: None)

    def __init__(self) -> None:
        self.flow_run = SimpleNamespace(state=SimpleNamespace(is_final=lambda: False))
        self.sent: list[float] = []

    def _build_heartbeat_event_template(self) -> tuple[dict[str, str], list[Any]]:
        return {"prefect.resource.id": "prefect.flow-run.test"}, []

    def _emit_flow_run_heartbeat(self, resource: dict[str, str], related: list[Any]) -> None:
        self.sent.append(0.0)


def _heartbeat_thread_of(send_heartbeats: Any, engine: RecordingEngine) -> tuple[threading.Thread, bool]:
    """Enter and leave ``send_heartbeats`` for ``engine``: its thread, and whether it was still alive as the
    context manager returned (it sleeps in 1 s steps, so only a join ends it that fast)."""
    before = set(threading.enumerate())
    with send_heartbeats(engine):
        wait_until(lambda: engine.sent, timeout=10, message="the heartbeat thread sent nothing")
        (thread,) = set(threading.enumerate()) - before
    return thread, thread.is_alive()


def test_the_run_does_not_wait_for_its_heartbeat_thread_which_then_sends_nothing() -> None:
    engine = RecordingEngine()
    patched = heartbeat_stop.without_join(prefect.flow_engine._send_heartbeats)
    thread, alive_at_exit = _heartbeat_thread_of(patched, engine)
    assert alive_at_exit, "the heartbeat thread was joined"
    assert thread.daemon  # so it never holds up the process's exit
    wait_until(lambda: not thread.is_alive(), timeout=10, message="the heartbeat thread did not stop")
    assert len(engine.sent) == 1  # the one at the start; nothing after the stop


def test_prefects_own_waits_for_it() -> None:
    """The baseline the patch changes: the same engine, Prefect's function joins the thread."""
    engine = RecordingEngine()
    assert not getattr(prefect.flow_engine._send_heartbeats, "__icd_heartbeat_without_join__", False), "installed"
    _, alive_at_exit = _heartbeat_thread_of(prefect.flow_engine._send_heartbeats, engine)
    assert not alive_at_exit
    assert len(engine.sent) == 1


def test_installing_twice_wraps_once(monkeypatch: pytest.MonkeyPatch) -> None:
    original = prefect.flow_engine._send_heartbeats
    monkeypatch.setattr(prefect.flow_engine, "_send_heartbeats", original)
    heartbeat_stop.install()
    installed = prefect.flow_engine._send_heartbeats
    heartbeat_stop.install()
    assert prefect.flow_engine._send_heartbeats is installed
    assert installed.__wrapped__ is original  # type: ignore[attr-defined]
