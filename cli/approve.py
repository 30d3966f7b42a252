"""``icd-approve``: approve or reject a waiting plan without the UI (a terminal, a script, a chat bot).

    icd-approve list                                   # plans waiting: run, workspace, what is asked, hash
    icd-approve answer RUN_ID --approve --approver NAME --plan-sha256 HASH [--comment WHY] [--wait 120]
    icd-approve answer RUN_ID --reject --approver NAME [--comment WHY]

``answer`` sends the same answer as the UI's Resume form (``POST /flow_runs/{id}/resume`` with
``run_input``), so every rule holds: the hash must be the whole SHA-256 of the plan waiting, the approver is
required, nothing is applied by a refused answer. It then waits for the run's verdict: accepted (the run goes
on) or refused, with the reason the run's state message gives.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from blocks.registry import ArtifactRegistry
from icd.deploy.approval import give_answer

DEPLOYMENT = "deploy-artifact"


# The server answers at most this many runs a call (PREFECT_API_DEFAULT_LIMIT): read page after page.
_PAGE = 200


def waiting_runs() -> list[Any]:
    found: list[Any] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                ),
                limit=_PAGE,
                offset=len(found),
            )
            found += page
            if len(page) < _PAGE:
                return found


def _read(run_id: UUID) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def list_waiting(block: str) -> int:
    plans = ArtifactRegistry.load(block).plan_store()  # type: ignore[union-attr]  # sync call returns the block
    runs = waiting_runs()
    if not runs:
        print("no plan is waiting for approval")
    for run in runs:
        workspace = str(run.parameters.get("workspace", "?"))
        sha = plans.sha256_of(workspace, str(run.id)) or "?"
        print(f"{run.id}\t{workspace}\t{run.state.message if run.state else ''}\tplan sha256 {sha}")
    return 0


def answer(args: argparse.Namespace) -> int:
    run_id = UUID(args.run_id)
    before = _read(run_id)
    if before.state is None or before.state.type != StateType.PAUSED:
        # Say why, as the run says it: a superseded plan names what replaced it and the run that plans it.
        state = before.state
        why = "-" if state is None else f"{state.name}: {state.message}" if state.message else state.name
        print(f"icd-approve: run {run_id} is not waiting for approval ({why})")
        return 1
    key = before.state.state_details.pause_key
    decision = "approve" if args.approve else "reject"
    refused = give_answer(
        run_id,
        {
            "decision": decision,
            "approver": args.approver,
            "comment": args.comment,
            "plan_sha256": args.plan_sha256,
        },
    )
    if refused is not None:  # refused by the form's schema before the run resumed: it still waits
        print(f"icd-approve: not accepted. {refused.reason}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        state = _read(run_id).state
        if state is not None and state.type == StateType.PAUSED and state.state_details.pause_key != key:
            print(f"icd-approve: not accepted. {state.message}", file=sys.stderr)
            return 1
        if state is not None and state.type not in {StateType.PAUSED, StateType.SCHEDULED, StateType.PENDING}:
            print(f"{decision} accepted; the run is {state.name}")
            return 0
        time.sleep(0.5)
    print(f"icd-approve: sent; no verdict within {args.wait:.0f}s (is a worker running?)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd-approve", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the plans waiting for approval")
    listing.add_argument("--block", default="registry", help="the Artifact Registry block (for the plan hashes)")
    reply = commands.add_parser("answer", help="approve or reject one waiting plan")
    reply.add_argument("run_id")
    choice = reply.add_mutually_exclusive_group(required=True)
    choice.add_argument("--approve", action="store_true")
    choice.add_argument("--reject", action="store_true")
    reply.add_argument("--approver", required=True, help="your name; recorded with the deploy")
    reply.add_argument("--plan-sha256", default="", help="the whole hash of the plan you reviewed (to approve)")
    reply.add_argument("--comment", default="")
    reply.add_argument("--wait", type=float, default=120, help="seconds to wait for the verdict")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return list_waiting(args.block)
    return answer(args)


if __name__ == "__main__":
    raise SystemExit(main())
