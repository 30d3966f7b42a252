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

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from icd.registry.s3 import S3Objects
from icd.tools.process import LineSink
from icd.tools.terraform import Terraform

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

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
    the credentials in ``env`` expire)."""
    terraform = Terraform(
        prepare_workdir(stack_dir, workdir),
        env=env,
        timeout=TERRAFORM_TIMEOUT_SECONDS,
        deadline=deadline,
        on_line=on_line,
    )
    terraform.init(backend_config=backend.config(workspace), reconfigure=True)
    return terraform
