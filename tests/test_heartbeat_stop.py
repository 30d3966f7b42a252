"""A forked run's heartbeat thread (prefect_patches/heartbeat_stop.py): the flow's end does not wait for it, and it
sends nothing more once the run has ended."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, ClassVar

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
        self.sent = 0

    def _build_heartbeat_event_template(self) -> tuple[dict[str, str], list[Any]]:
        return {"prefect.resource.id": "prefect.flow-run.test"}, []

    def _emit_flow_run_heartbeat(self, resource: dict[str, str], related: list[Any]) -> None:
        self.sent += 1


class RecordingThread(threading.Thread):
    """The heartbeat thread, as Prefect makes it, with the joins asked of it counted."""

    made: ClassVar[list[RecordingThread]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.joins = 0
        RecordingThread.made.append(self)

    def join(self, timeout: float | None = None) -> None:
        self.joins += 1
        super().join(timeout)


@pytest.fixture
def heartbeat_thread(monkeypatch: pytest.MonkeyPatch) -> list[RecordingThread]:
    """The threads ``_send_heartbeats`` makes from now on (it takes ``threading`` from its module)."""
    RecordingThread.made = []
    threads = SimpleNamespace(Thread=RecordingThread, Event=threading.Event)
    monkeypatch.setattr(prefect.flow_engine, "threading", threads)
    return RecordingThread.made


def _run_a_flow(send_heartbeats: Any, engine: RecordingEngine) -> None:
    with send_heartbeats(engine):
        wait_until(lambda: engine.sent, timeout=10, message="the heartbeat thread sent nothing")


def test_the_run_does_not_wait_for_its_heartbeat_thread_which_then_sends_nothing_more(
    heartbeat_thread: list[RecordingThread],
) -> None:
    engine = RecordingEngine()
    _run_a_flow(heartbeat_stop.without_join(prefect.flow_engine._send_heartbeats), engine)
    (thread,) = heartbeat_thread
    assert thread.joins == 0
    assert thread.daemon  # so it never holds up the process's exit
    wait_until(lambda: not thread.is_alive(), timeout=10, message="the heartbeat thread did not stop")
    assert engine.sent == 1  # the one at the start; nothing after the stop


def test_prefects_own_waits_for_it(heartbeat_thread: list[RecordingThread]) -> None:
    """The baseline the patch changes: the same engine, Prefect's function joins the thread."""
    assert not getattr(prefect.flow_engine._send_heartbeats, heartbeat_stop._PATCHED, False), "installed here"
    engine = RecordingEngine()
    _run_a_flow(prefect.flow_engine._send_heartbeats, engine)
    (thread,) = heartbeat_thread
    assert thread.joins == 1
    assert engine.sent == 1


def test_installing_twice_wraps_once(monkeypatch: pytest.MonkeyPatch) -> None:
    original = prefect.flow_engine._send_heartbeats
    monkeypatch.setattr(prefect.flow_engine, "_send_heartbeats", original)
    heartbeat_stop.install()
    installed = prefect.flow_engine._send_heartbeats
    heartbeat_stop.install()
    assert prefect.flow_engine._send_heartbeats is installed
    assert installed.__wrapped__ is original  # type: ignore[attr-defined]
