"""``icd-approve list`` reads every waiting run, page after page: the server answers at most 200 a call."""

from __future__ import annotations

from typing import Any

import pytest

from cli import approve


class _Server:
    """Flow runs as the Prefect API pages them: at most ``limit`` from ``offset``."""

    def __init__(self, runs: int) -> None:
        self.runs = [f"run-{n}" for n in range(runs)]
        self.calls: list[tuple[int, int]] = []

    def read_flow_runs(self, *, limit: int, offset: int = 0, **_filters: Any) -> list[str]:
        self.calls.append((limit, offset))
        return self.runs[offset : offset + min(limit, 200)]

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None


@pytest.mark.parametrize("count", [0, 199, 200, 201, 450])
def test_every_waiting_run_is_listed_however_many_there_are(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    server = _Server(count)
    monkeypatch.setattr(approve, "get_client", lambda **_: server)
    assert approve.waiting_runs() == server.runs
    assert [offset for _, offset in server.calls] == list(range(0, count + 1, 200))
