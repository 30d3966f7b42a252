"""A forked run's process ends when its flow does, not up to a second later.

Prefect's sync flow engine sends the run's heartbeats from a daemon thread that sleeps in 1 s steps
(``prefect.flow_engine._send_heartbeats``), and after the flow's final state it joins that thread (for up to
2 s): every run's process lived on for up to a second after its run ended, holding its worker's slot. Prefect's
own async engine does not join it (``join_on_exit=False``), and neither does this: the thread sees the stop at
its next wake and returns, sending nothing more (a heartbeat it is already sending still goes out), and a daemon
thread does not hold up the process's exit (``warm_worker._exit_like_the_interpreter`` joins only the others).
What the thread sends while the run is live is unchanged. A flow that returns or suspends has its state before the
join would have begun; one that raises or times out now has its Failed state proposed up to a second sooner.
Installed in the fork server (``fork_server_preload``): only the warm worker's runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

_PATCHED = "__icd_heartbeat_without_join__"


def without_join(send_heartbeats: Callable[..., AbstractContextManager[None]]) -> Callable[..., Any]:
    """``send_heartbeats`` (Prefect's ``_send_heartbeats``), always with ``join_on_exit=False``."""

    @contextmanager
    def send_heartbeats_without_join(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
        with send_heartbeats(engine, join_on_exit=False):
            yield

    setattr(send_heartbeats_without_join, _PATCHED, True)
    send_heartbeats_without_join.__wrapped__ = send_heartbeats  # type: ignore[attr-defined]  # the seam's source
    return send_heartbeats_without_join


def install() -> None:
    import prefect.flow_engine

    if not getattr(prefect.flow_engine._send_heartbeats, _PATCHED, False):
        prefect.flow_engine._send_heartbeats = without_join(prefect.flow_engine._send_heartbeats)
