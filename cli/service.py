"""``icd-service``: bring your own service (docs/service-contract.md).

``new`` writes a service's repository skeleton (a tiny HTTP service, its Packer template and Terraform stack)
and its icd.toml entries; ``check`` runs the pre-flight check, the same one build-artifact runs before it
builds, and prints every breach with its file, cause and fix. Exit codes: 0 fine, 1 breaches, 2 an error
(a bad name, an unknown namespace, an unreadable bucket).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import boto3

from icd.config import config_path, load_config
from icd.deploy.credentials import UNSCOPED_WARNING
from icd.deploy.source import check_repo, checkout_source
from icd.deploy.workdir import StateBackend, fetch_state
from icd.errors import DeployError, RegistryError
from icd.rules import LATEST
from icd.service.contract import CONTRACT_PAGE
from icd.service.preflight import breach_error, breaches, check_service, service_under_check, warnings
from icd.service.scaffold import NewService, scaffold

StateReader = Callable[[str], tuple[bytes | None, str]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd-service", description="Onboard a service: scaffold it, check it.")
    parser.add_argument("--config", type=Path, default=None, help="icd.toml to read and write (default: $ICD_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    new = commands.add_parser("new", help="write a service's skeleton and its icd.toml entries")
    new.add_argument("service_name", help="the Consul service name, e.g. inventory")
    new.add_argument("--namespace", required=True, help="registry namespace, org/name")
    new.add_argument("--workspace", required=True, help="the workspace it deploys to (a new one: one service each)")
    new.add_argument("--channel", default=LATEST, help="the channel the workspace follows (default: %(default)s)")
    new.add_argument("--dir", type=Path, default=None, help="the service's repository (default: ./SERVICE_NAME)")
    new.add_argument("--stack-dir", type=Path, default=None, help="where the stack goes (default: DIR/stack)")
    new.add_argument("--repository", default=None, help="what build-artifact clones (default: DIR's absolute path)")
    new.add_argument("--branch", default="main", help="the branch whose pushes build (default: %(default)s)")

    check = commands.add_parser("check", help="the pre-flight check: every breach of the service contract")
    check.add_argument("service", help="the service's directory (its working tree is checked) or repository URL")
    check.add_argument("--namespace", required=True, help="its namespace in icd.toml")
    check.add_argument(
        "--workspace", action="append", default=[], help="check this workspace only (repeatable; default: all)"
    )
    check.add_argument("--ref", default=None, help="for a repository URL: the ref to check (default: its branch)")
    state = check.add_mutually_exclusive_group()
    state.add_argument("--block", help="read the workspaces' states through this saved 'Artifact Registry' block")
    state.add_argument("--bucket", help="read the workspaces' states from this bucket (AWS credentials from env)")
    check.add_argument("--endpoint-url", help="S3 endpoint (e.g. a moto server); only with --bucket")
    check.add_argument("--region", default="us-east-1", help="only with --bucket (default: %(default)s)")
    check.add_argument("--prefix", default="registry/", help="the registry's key prefix (default: %(default)s)")
    return parser


def _state_reader(args: argparse.Namespace) -> StateReader | None:
    if args.block:
        from blocks.registry import ArtifactRegistry  # Prefect is imported only when a block is used.

        block = ArtifactRegistry.load(args.block)
        if not isinstance(block, ArtifactRegistry):
            raise RegistryError(f"block {args.block!r} is not an Artifact Registry block")
        if not block.state_role_arn:
            print(f"warning: {UNSCOPED_WARNING}", file=sys.stderr)
        return block.workspace_state
    if args.bucket:
        client = boto3.client("s3", endpoint_url=args.endpoint_url, region_name=args.region)
        backend = StateBackend(bucket=args.bucket, key_prefix=args.prefix, region=args.region)
        return lambda workspace: (fetch_state(client, backend, workspace), backend.state_url(workspace))
    return None


def _new(args: argparse.Namespace, config: Path) -> int:
    directory = (args.dir or Path(args.service_name)).resolve()
    stack_dir = (args.stack_dir or directory / "stack").resolve()
    done = scaffold(
        NewService(
            service_name=args.service_name,
            namespace=args.namespace,
            workspace=args.workspace,
            channel=args.channel,
            directory=directory,
            stack_dir=stack_dir,
            repository=args.repository or str(directory),
            branch=args.branch,
        ),
        config,
    )
    print(f"wrote {len(done.files)} files under {directory}:")
    for path in done.files:
        print(f"  {path}")
    print(f"added to {done.config_path}:\n")
    print(done.config_entry)
    print("next:")
    print(f"  cd {directory} && git init -q -b {args.branch} && git add -A && git commit -q -m v1")
    print(f"  icd-service check {directory} --namespace {args.namespace} --block registry")
    return 0


def _check(args: argparse.Namespace, config_file: Path) -> int:
    config = load_config(config_file)
    read_state = _state_reader(args)
    with tempfile.TemporaryDirectory(prefix="icd-service-check-") as scratch:
        if Path(args.service).is_dir():
            root = Path(args.service).resolve()
        else:
            repository = check_repo(args.service)
            ref = args.ref or config.namespace(args.namespace).branches[0]
            root = checkout_source(repository, ref, Path(scratch) / "src").path
        service = service_under_check(config, args.namespace, root, workspaces=args.workspace, read_state=read_state)
        findings = check_service(service)
    for warning in warnings(findings):
        print(warning)
    if breaches(findings):
        print(breach_error(args.namespace, breaches(findings)))
        return 1
    workspaces = ", ".join(target.workspace for target in service.workspaces) or "none follows it yet"
    print(
        f"{args.namespace} honours the service contract ({CONTRACT_PAGE}): template {service.template_dir}/ "
        f"(-only={','.join(service.packer_only) or 'every source'}); workspaces: {workspaces}"
    )
    if read_state is None and service.workspaces:
        print("note: the workspaces' states were not read (pass --block or --bucket), so whether one already")
        print("holds another service was not checked")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = args.config or config_path()
    try:
        if args.command == "new":
            return _new(args, config)
        return _check(args, config)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
