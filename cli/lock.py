"""``icd-lock``: see each workspace's queue (who holds it, what waits), and break a dead holder's lock.

    icd-lock [--block registry] list                 # one JSON object per workspace: holder, desired, dispatch
    icd-lock [--block registry] break WORKSPACE [--force]

``break`` refuses while the holder's run is alive (it may be applying) unless ``--force``; the newest queued
request, if any, then gets its run. The rules are ``icd/deploy/queue.py``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from icd import events
from icd.deploy.dispatch import dispatch_next
from icd.deploy.queue import QueueRecord, WorkspaceQueue
from icd.errors import DeployError


def _queue(block: str) -> WorkspaceQueue:
    from blocks.registry import ArtifactRegistry  # Prefect is imported only when a command runs

    loaded = ArtifactRegistry.load(block)
    if not isinstance(loaded, ArtifactRegistry):
        raise DeployError(f"block {block!r} is not an Artifact Registry block")
    return loaded.workspace_queue()


def describe(record: QueueRecord) -> dict[str, Any]:
    holder, desired = record.holder, record.desired
    return {
        "workspace": record.workspace,
        "held": holder is not None,
        "holder": None
        if holder is None
        else {
            "run": holder.run_name,
            "run_id": holder.run_id,
            "phase": holder.phase,
            "deploying": holder.request.what,
            "since": holder.since.isoformat(),
            "expires_at": holder.expires_at.isoformat(),
        },
        "desired": None
        if desired is None
        else {"what": desired.what, "by": desired.by, "requested_at": desired.requested_at.isoformat()},
        "run_asked_for_at": record.dispatched_at.isoformat() if record.dispatched_at else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icd-lock", description="Inspect or break per-workspace deploy locks.")
    parser.add_argument("--block", default="registry", help="the Artifact Registry block (where the queues live)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every workspace's holder and pending request")
    breaker = sub.add_parser("break", help="evict the holder of a workspace whose run has ended")
    breaker.add_argument("workspace")
    breaker.add_argument("--force", action="store_true", help="evict even a run that is still alive")
    args = parser.parse_args(argv)
    try:
        queue = _queue(args.block)
        if args.command == "list":
            print(json.dumps([describe(record) for record in queue.records()], indent=2))
            return 0
        broken = queue.break_lock(args.workspace, force=args.force)
    except DeployError as exc:
        print(f"error: {exc}")
        return 2
    dispatch_next(broken.dispatch)
    events.flush()
    if broken.holder is None:
        print(f"workspace {args.workspace!r}: nobody held it")
    else:
        gone = broken.holder
        print(
            f"workspace {args.workspace!r}: evicted run {gone.run_name} ({gone.run_id}), {gone.phase} "
            f"since {gone.since}"
        )
    if broken.dispatch is not None:
        print(f"next: {broken.dispatch.what} gets its run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
