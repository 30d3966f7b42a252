"""The hand-over between scheduled watch runs: a run whose window is over keeps watching until the next one is.

The consul-health deployment starts a run every interval, and each watches a little longer than that, so
the next run is normally watching before the last one stops. But when a run starts is no promise: the
worker polls, a cold process start takes seconds (many more on a busy machine), and a worker restart or a
Prefect server outage takes longer still. With a fixed window, each such delay is a blind gap: a change
inside it is only seen, and alerted late, when the next run starts.

So for a scheduled run the window is a minimum. Each run announces itself under
``icd/health-watch/<watch_name>/watcher`` once its first round is done (from then on it is watching). A run
whose window is over keeps watching until a newer run has announced itself, until no next run is expected
any more (its deployment was paused or lost its schedule), or until ``max_overtime_seconds`` have passed.
Overlapping runs are safe: the CAS-written state gives every transition one owner (``state.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import consul

from icd.health.consul import consul_call

WATCHER_KEY_TEMPLATE = "icd/health-watch/{watch_name}/watcher"
# How often a run in overtime looks for its successor.
OVERTIME_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class HandOver:
    """What a scheduled run needs to hand over: who it is, and whether a next run is still expected."""

    client: consul.Consul
    watch_name: str
    run_id: str
    successor_expected: Callable[[], bool]
    max_overtime_seconds: float

    @property
    def key(self) -> str:
        return WATCHER_KEY_TEMPLATE.format(watch_name=self.watch_name)

    def announce(self, at: datetime) -> None:
        """This run is watching: a run still in overtime may stop."""
        body = json.dumps({"run": self.run_id, "since": at.isoformat()})
        consul_call("announce the health watcher", self.client.kv.put, self.key, body)

    def successor(self) -> str | None:
        """The run that announced itself after this one, if any."""
        _, item = consul_call("read the health watcher", self.client.kv.get, self.key)
        if item is None or not item.get("Value"):
            return None
        try:
            parsed: Any = json.loads(item["Value"])
        except ValueError:
            return None
        run = parsed.get("run") if isinstance(parsed, dict) else None
        return run if isinstance(run, str) and run != self.run_id else None
