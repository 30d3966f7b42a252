"""``icd-registry``: views of the artifact registry for operators.

Point it at a saved block (``--block NAME``) or straight at a bucket (``--bucket B [--endpoint-url URL]
[--prefix P]``, credentials from the usual AWS environment, the signing key from ``ICD_REGISTRY_SIGNING_KEY``:
records are verified on every read). ``show`` prints JSON; the rest print one line per item.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import boto3

from icd import events, operations
from icd.config import load_config
from icd.deploy.queue import WorkspaceQueue, prefect_run_alive
from icd.deploy.queue_store import S3QueueStore
from icd.errors import DeployError, RegistryError
from icd.registry.models import ArtifactVersion
from icd.registry.registry import Registry
from icd.registry.signing import Sealer
from icd.text import version_label

SIGNING_KEY_ENV = "ICD_REGISTRY_SIGNING_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd-registry", description="Inspect and move the artifact registry.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--block", help="name of a saved 'Artifact Registry' block")
    source.add_argument("--bucket", help="S3 bucket holding the registry")
    parser.add_argument("--endpoint-url", help="S3 endpoint (e.g. a moto server); only with --bucket")
    parser.add_argument("--region", default=None, help="AWS region; only with --bucket")
    parser.add_argument("--prefix", default="registry/", help="key prefix (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("namespaces", help="list namespaces")
    commands.add_parser("versions", help="list a namespace's versions").add_argument("namespace")
    commands.add_parser("channels", help="list a namespace's channels").add_argument("namespace")
    show = commands.add_parser("show", help="print one version as JSON")
    show.add_argument("namespace")
    show.add_argument("version", type=int)
    history = commands.add_parser("history", help="print a channel's assignment history")
    history.add_argument("namespace")
    history.add_argument("channel")
    promote = commands.add_parser("promote", help="point a channel at a version; plans the workspaces following it")
    promote.add_argument("namespace")
    promote.add_argument("version", type=int)
    promote.add_argument("channel")
    revoke = commands.add_parser("revoke", help="revoke a version; operators are told which workspaces run it")
    revoke.add_argument("namespace")
    revoke.add_argument("version", type=int)
    revoke.add_argument("--cascade", action="store_true", help="also revoke every version built on it")
    teardown = commands.add_parser(
        "teardown", help="destroy what a workspace runs: plans the destroy, which waits for approval in the UI"
    )
    teardown.add_argument("workspace")
    for command in (promote, revoke, teardown):
        command.add_argument("--by", required=True, help="who you are; recorded")
        command.add_argument("--why", required=True, help="why; recorded")
    return parser


def _open_registry(args: argparse.Namespace) -> tuple[Registry, WorkspaceQueue]:
    """The registry and the workspace queues beside it (requests from this command are queued there)."""
    if args.block:
        from blocks.registry import ArtifactRegistry  # Prefect is imported only when a block is used.

        # `load` is async-dispatched; from synchronous code it returns the block itself.
        block = ArtifactRegistry.load(args.block)
        if not isinstance(block, ArtifactRegistry):
            raise RegistryError(f"block {args.block!r} is not an Artifact Registry block")
        return block.registry(), block.workspace_queue()
    key = os.environ.get(SIGNING_KEY_ENV)
    if not key:
        raise RegistryError(f"--bucket needs the registry's signing key in ${SIGNING_KEY_ENV} (or use --block)")
    client = boto3.client("s3", endpoint_url=args.endpoint_url, region_name=args.region)
    sealer = Sealer(key.encode())
    store = S3QueueStore(client, args.bucket, args.prefix, sealer=sealer)
    return Registry(client, args.bucket, args.prefix, sealer=sealer), WorkspaceQueue(store, run_alive=prefect_run_alive)


def _version_line(record: ArtifactVersion) -> str:
    state = "revoked" if record.is_revoked() else ("revoking" if record.revocation else "ok")
    artifacts = ",".join(f"{where}={artifact}" for where, artifact in sorted(record.artifacts.items()))
    return (
        f"v{record.version}\t{record.created_at.isoformat()}\t{record.git_ref}@{record.git_commit[:12]}"
        f"\t{state}\t{artifacts}"
    )


def run(args: argparse.Namespace) -> None:
    registry, queue = _open_registry(args)
    if args.command == "namespaces":
        for namespace in registry.list_namespaces():
            print(namespace)
    elif args.command == "versions":
        for record in registry.list_versions(args.namespace):
            print(_version_line(record))
    elif args.command == "channels":
        for pointer in registry.list_channels(args.namespace):
            print(f"{pointer.channel}\tv{pointer.version}\t{pointer.updated_at.isoformat()}\t{pointer.updated_by}")
    elif args.command == "show":
        print(registry.get(args.namespace, args.version).model_dump_json(indent=2))
    elif args.command == "history":
        for move in registry.channel_history(args.namespace, args.channel):
            source, target = version_label(move.from_version), version_label(move.to_version)
            print(f"{move.assigned_at.isoformat()}\t{source} -> {target}\t{move.assigned_by}\t{move.reason}")
    elif args.command == "promote":
        done = operations.promote(
            registry, queue, load_config(), args.namespace, args.version, args.channel, by=args.by, why=args.why
        )
        events.flush()
        moved = done.assignment
        print(
            f"{args.namespace}@{args.channel}: {version_label(moved.from_version)} -> {version_label(moved.to_version)}"
        )
        print(f"plans requested for: {', '.join(done.plans_requested) or 'none'}")
    elif args.command == "revoke":
        revoked = operations.revoke(
            registry, args.namespace, args.version, by=args.by, why=args.why, cascade=args.cascade
        )
        events.flush()
        print(f"revoked: {', '.join(f'v{n}' for n in revoked) or 'nothing new (already revoked)'}")
    elif args.command == "teardown":
        asked = operations.request_teardown(registry, queue, load_config(), args.workspace, by=args.by, why=args.why)
        events.flush()
        print(
            f"teardown of {asked.workspace} ({asked.namespace}) requested: a deploy-artifact run plans the destroy "
            "and waits for approval in the Prefect UI; remove the workspace from icd.toml so no new version plans it"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DeployError as exc:
        print(f"icd-registry: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
