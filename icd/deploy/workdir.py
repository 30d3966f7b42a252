"""Terraform working directories: a clean per-step copy of the stack, with its state in the S3 backend.

The stacks stay backend-agnostic: each plan or apply copies the stack into a fresh directory and adds a
``backend "s3" {}`` block whose settings (bucket, key per workspace, DynamoDB lock table, endpoints) come
from the registry block. So the apply after an approval needs nothing from the worker that planned, and
Terraform's own state lock (the DynamoDB table) stops two operations on one state, whoever starts them.

Terraform gets the backend credentials in its environment and nothing else of the worker's; the stacks run
their provisioners with an environment they build explicitly (``env -i``, see docs/service-contract.md), so
neither the instance nor anything it starts ever holds a registry or backend credential.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from icd.registry.s3 import S3Objects
from icd.tools.process import LineSink
from icd.tools.terraform import Terraform

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

PLAN_FILENAME = "deploy.tfplan"
BACKEND_OVERRIDE = "icd_backend_override.tf"
TERRAFORM_TIMEOUT_SECONDS = 1800.0
# Terraform waits this long for a state lock held by another operation before it reports the holder.
STATE_LOCK_TIMEOUT = "60s"


@dataclass(frozen=True)
class StateBackend:
    """Where the Terraform state of every workspace lives (no credentials: those travel by environment)."""

    bucket: str
    key_prefix: str
    region: str
    endpoint: str | None = None
    lock_table: str | None = None
    dynamodb_endpoint: str | None = None

    def state_key(self, workspace: str) -> str:
        """The S3 key of ``workspace``'s state: one state per workspace, so one service per workspace.
        Contract: docs/service-contract.md#one-service-per-workspace (the pre-flight check reads it)."""
        return f"{self.key_prefix}state/{workspace}.tfstate"

    def state_url(self, workspace: str) -> str:
        return f"s3://{self.bucket}/{self.state_key(workspace)}"

    def config(self, workspace: str) -> dict[str, str]:
        """``-backend-config`` pairs for one workspace's state."""
        config = {"bucket": self.bucket, "key": self.state_key(workspace), "region": self.region}
        if self.lock_table:
            config["dynamodb_table"] = self.lock_table
        if self.endpoint:
            # A non-AWS endpoint (moto here, MinIO elsewhere): path-style, and no AWS-only checks.
            config |= {
                "endpoint": self.endpoint,
                "force_path_style": "true",
                "skip_credentials_validation": "true",
                "skip_metadata_api_check": "true",
                "skip_region_validation": "true",
            }
        if self.dynamodb_endpoint:
            config["dynamodb_endpoint"] = self.dynamodb_endpoint
        return config


def fetch_state(s3_client: S3Client, backend: StateBackend, workspace: str) -> bytes | None:
    """The state document of ``workspace`` as the S3 backend stored it; None when it has none yet.

    Read directly, not through ``terraform state pull``: the pre-flight check reads it before anything runs,
    without a working directory or Terraform's state lock (a read needs neither).
    """
    stored = S3Objects(s3_client, backend.bucket).read(backend.state_key(workspace))
    return None if stored is None else stored.body


def prepare_workdir(stack_dir: Path, workdir: Path) -> Path:
    """A clean copy of the stack with an S3 backend block, so the stack itself stays backend-agnostic."""
    if not any(stack_dir.glob("*.tf")):
        raise FileNotFoundError(f"no Terraform configuration in {stack_dir}")
    if workdir.exists():
        shutil.rmtree(workdir)
    shutil.copytree(
        stack_dir,
        workdir,
        ignore=shutil.ignore_patterns(".terraform", "*.tfstate", "*.tfstate.backup", "*.tfplan"),
    )
    (workdir / BACKEND_OVERRIDE).write_text('terraform {\n  backend "s3" {}\n}\n')
    return workdir


def _same_setting(stored: object, wanted: str) -> bool:
    # Terraform stores each -backend-config value with its schema type: "true" comes back as true.
    if isinstance(stored, bool):
        return str(stored).lower() == wanted
    return stored is not None and str(stored) == wanted


def initialised_for(workdir: Path, config: Mapping[str, str]) -> bool:
    """Whether ``workdir`` is a working directory that ``terraform init`` already set up with these
    ``-backend-config`` pairs (``.terraform/terraform.tfstate`` records them), its providers locked and
    installed. Credentials are never recorded there: they travel by environment on every call."""
    if not (workdir / BACKEND_OVERRIDE).is_file() or not (workdir / ".terraform.lock.hcl").is_file():
        return False
    if not (workdir / ".terraform" / "providers").is_dir():
        return False
    try:
        recorded = json.loads((workdir / ".terraform" / "terraform.tfstate").read_text(encoding="utf-8"))
        settings = recorded["backend"]["config"]
        kind = recorded["backend"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (
        kind == "s3"
        and isinstance(settings, dict)
        and all(_same_setting(settings.get(key), value) for key, value in config.items())
    )


def open_terraform(
    stack_dir: Path,
    workdir: Path,
    *,
    backend: StateBackend,
    workspace: str,
    env: Mapping[str, str],
    on_line: LineSink | None = None,
    deadline: float | None = None,
) -> Terraform:
    """A fresh working directory for ``workspace``, initialised against its state in the backend. Each call
    runs at most :data:`TERRAFORM_TIMEOUT_SECONDS`, and none past ``deadline`` (``time.monotonic()``; set when
    the credentials in ``env`` expire).

    ``terraform init`` runs once per stack and workspace on a worker: its result is kept beside the runs'
    directories (:data:`INIT_CACHE`) and copied into the next fresh directory with the same fingerprint (the
    apply's, after its plan; the next batch's plan of a rollout; the next deploy's). A directory made where
    nothing was kept yet (another worker, a changed stack) is initialised as before.
    """
    config = backend.config(workspace)
    terraform = Terraform(
        prepare_workdir(stack_dir, workdir),
        env=env,
        timeout=TERRAFORM_TIMEOUT_SECONDS,
        deadline=deadline,
        on_line=on_line,
    )
    cached = workdir.parent / INIT_CACHE / _init_fingerprint(terraform, config)
    if initialised_for(cached, config):
        shutil.copytree(cached / ".terraform", workdir / ".terraform", symlinks=True)
        shutil.copy2(cached / ".terraform.lock.hcl", workdir / ".terraform.lock.hcl")
        return terraform
    terraform.init(backend_config=config, reconfigure=True)
    _remember_init(workdir, cached)
    return terraform


# Initialised copies of stacks, by what `terraform init` read (see _init_fingerprint), beside the runs' dirs.
INIT_CACHE = ".init-cache"


def _init_fingerprint(terraform: Terraform, config: Mapping[str, str]) -> str:
    """Everything ``terraform init`` reads: the stack's files (configuration, modules, a lock file it ships),
    the backend settings, the binary and the CLI config that names the provider mirror. Two directories with
    the same fingerprint get the same ``.terraform`` and lock file from init (providers are symlinks into
    the mirror, modules are local), so the second can take the first's instead of running init again."""
    digest = hashlib.sha256()
    root = terraform.working_dir
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(dict(config), sort_keys=True).encode())
    digest.update(f"\0{terraform.binary}\0".encode())
    digest.update(terraform.cli_config_file.read_bytes())
    return digest.hexdigest()


def _remember_init(workdir: Path, cached: Path) -> None:
    """Keep a copy of a freshly initialised directory for the next one with its fingerprint. Written aside
    and renamed into place, so a reader never sees half a copy; when another process got there first, its
    copy stands (they are the same). A failure here costs the next plan an init, nothing else."""
    staging = cached.parent / f".staging-{uuid.uuid4().hex}"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(workdir, staging, symlinks=True, ignore=shutil.ignore_patterns("*.tfplan"))
        staging.rename(cached)
    except OSError as exc:
        logger.info("did not keep the initialised directory for reuse: %s", exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
