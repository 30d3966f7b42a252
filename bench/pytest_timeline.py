"""Where the test suite's wall time goes: which xdist worker ran which file, from when to when.

As a pytest plugin, it appends one line per test (worker, test id, start, end) to ``$TIMELINE_DIR``; run
as a script, it prints each worker's files in order with their seconds, and when each worker finished.
The ordering in ``tests/conftest.py`` (``_LONGEST_FIRST``) comes from this.

    rm -rf /tmp/timeline && TIMELINE_DIR=/tmp/timeline PYTHONPATH=bench \\
        .venv/bin/python -m pytest -p pytest_timeline -n 2 --dist loadfile --no-loadscope-reorder -q
    .venv/bin/python bench/pytest_timeline.py /tmp/timeline
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_STARTED: dict[str, float] = {}


def _record(nodeid: str, start: float, end: float) -> None:
    directory = Path(os.environ.get("TIMELINE_DIR", "timeline"))
    directory.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with (directory / f"{worker}.jsonl").open("a") as out:
        out.write(json.dumps({"test": nodeid, "start": start, "end": end}) + "\n")


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    _STARTED[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    _record(nodeid, _STARTED.pop(nodeid, time.time()), time.time())


def summarize(directory: Path) -> str:
    rows = {
        path.stem: [json.loads(line) for line in path.read_text().splitlines()] for path in directory.glob("*.jsonl")
    }
    if not rows:
        return f"no timeline in {directory}"
    origin = min(row["start"] for worker_rows in rows.values() for row in worker_rows)
    lines = []
    totals: dict[str, float] = {}
    for worker, worker_rows in sorted(rows.items()):
        files: dict[str, list[float]] = {}
        for row in worker_rows:
            name = row["test"].split("::")[0]
            span = files.setdefault(name, [row["start"], row["end"]])
            span[0], span[1] = min(span[0], row["start"]), max(span[1], row["end"])
            totals[name] = totals.get(name, 0.0) + row["end"] - row["start"]
        lines.append(f"{worker}: finished at {max(r['end'] for r in worker_rows) - origin:.0f} s")
        lines += [f"  {s - origin:6.0f} {e - origin:6.0f}  {e - s:6.1f} s  {name}" for name, (s, e) in files.items()]
    lines.append("test time per file, longest first:")
    lines += [f"  {seconds:6.1f} s  {name}" for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "timeline")))
