"""``icd-lock``: see who holds each workspace, and break a dead holder's lock."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from icd.deploy import lock
from icd.errors import DeployError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icd-lock", description="Inspect or break per-workspace deploy locks.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every workspace lock and its holder")
    breaker = sub.add_parser("break", help="evict the holder of a workspace lock whose run has ended")
    breaker.add_argument("workspace")
    breaker.add_argument("--force", action="store_true", help="evict even a run that is still alive")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(json.dumps(lock.list_locks(), indent=2))
            return 0
        evicted = lock.break_lock(args.workspace, force=args.force)
    except DeployError as exc:
        print(f"error: {exc}")
        return 2
    if evicted is None:
        print(f"workspace {args.workspace!r}: no recorded holder; slot reset")
    else:
        print(
            f"workspace {args.workspace!r}: evicted flow run {evicted.holder_name} "
            f"({evicted.holder_flow_run_id}), lease {evicted.lease_id}, acquired {evicted.acquired_at}"
        )
        print(json.dumps(asdict(evicted)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
