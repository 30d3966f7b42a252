"""Terraform's credentials: short-lived, and good for one workspace's state object and lock items only.

Terraform needs AWS credentials for its S3 backend, and everything it starts inherits its environment: a
provider, and a ``local-exec`` provisioner with whatever that starts (the deployed instance). The pre-flight
check refuses a provisioner that doesn't clear its environment (``icd/service/preflight.py``), and this
module makes what a careless stack could leak worth little: each plan or apply step gets its own STS session
of the state role (``ArtifactRegistry.state_role_arn``, a site setting), narrowed by a session policy to the
workspace's state object and its two items in the lock table, and lasting the step's
:data:`STEP_SESSION_SECONDS`. The registry's records, the saved plans, the queues and every other
workspace's state stay out of reach.

AWS enforces the session policy (the effective permissions are the role's AND the session policy's) and the
expiry. moto, which the tests run against, records the policy sent but enforces neither: see
docs/decisions.md for what is proven where.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from botocore.exceptions import BotoCoreError, ClientError

from icd.deploy.workdir import StateBackend
from icd.errors import StateCredentialsError

TerraformStep = Literal["plan", "apply"]

# How long each step's session lasts. 900 s is the least STS grants. A plan step (init, state pull, plan,
# show) takes seconds to a few minutes. The apply step's session must outlast Terraform's apply, or Terraform
# can't save the state or release its lock at the end; a longer one is a longer life for a leaked key, so it
# is a site setting (``ArtifactRegistry.apply_session_seconds``), 900 s unless a stack's applies need more.
MIN_SESSION_SECONDS: Final = 900
MAX_SESSION_SECONDS: Final = 43_200
STEP_SESSION_SECONDS: Final[Mapping[TerraformStep, int]] = {"plan": MIN_SESSION_SECONDS, "apply": MIN_SESSION_SECONDS}

# A Terraform call is stopped this long before its session expires: SIGTERM, then up to 10 s for Terraform to
# save the state and release its lock, with credentials that still work.
STOP_BEFORE_EXPIRY_SECONDS: Final = 60.0

# Terraform's S3 backend keeps the lock under "<bucket>/<key>" and the state's digest under "<bucket>/<key>-md5".
_DIGEST_SUFFIX: Final = "-md5"
# `terraform init` lists the workspaces: objects under "<workspace_key_prefix>/" ("env:" unless configured).
_WORKSPACES_PREFIX: Final = "env:/"
_S3_ACTIONS: Final[Mapping[TerraformStep, tuple[str, ...]]] = {
    "plan": ("s3:GetObject",),
    "apply": ("s3:GetObject", "s3:PutObject"),
}
_LOCK_ACTIONS: Final = ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem")
_ROLE_ARN: Final = re.compile(r"^arn:(?P<partition>aws[a-z-]*):iam::(?P<account>\d{12}):role/.+$")
_SESSION_NAME_REFUSED: Final = re.compile(r"[^\w+=,.@-]")


# Said by every step, `icd-setup blocks`, the pre-flight check and `icd-service check` when no state role is set.
UNSCOPED_WARNING: Final = (
    "no state role is set on the registry block (state_role_arn), so Terraform gets the block's own AWS "
    "credentials, which open the whole bucket to the stack and to anything its provisioners start "
    "(docs/operations.md#terraforms-credentials)"
)


def _partition(role_arn: str) -> str:
    match = _ROLE_ARN.match(role_arn)
    if match is None:
        raise StateCredentialsError(
            f"the state role {role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"
        )
    return match.group("partition")


def lock_ids(backend: StateBackend, workspace: str) -> tuple[str, str]:
    """The lock table items of ``workspace``'s state: its lock and its state digest."""
    lock = f"{backend.bucket}/{backend.state_key(workspace)}"
    return lock, lock + _DIGEST_SUFFIX


def session_policy(
    backend: StateBackend, workspace: str, step: TerraformStep, *, partition: str = "aws"
) -> dict[str, Any]:
    """The session policy of one step: ``workspace``'s state object (read, and written by an apply), the listing
    ``terraform init`` makes, and the workspace's two lock items. Nothing else of the bucket or the table."""
    key = backend.state_key(workspace)
    statements: list[dict[str, Any]] = [
        {
            "Sid": "ListOnlyThisWorkspacesState",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:{partition}:s3:::{backend.bucket}",
            "Condition": {"StringEquals": {"s3:prefix": [_WORKSPACES_PREFIX, key]}},
        },
        {
            "Sid": "ThisWorkspacesState",
            "Effect": "Allow",
            "Action": list(_S3_ACTIONS[step]),
            "Resource": f"arn:{partition}:s3:::{backend.bucket}/{key}",
        },
    ]
    if backend.lock_table:
        statements.append(
            {
                "Sid": "ThisWorkspacesLockItems",
                "Effect": "Allow",
                "Action": list(_LOCK_ACTIONS),
                "Resource": f"arn:{partition}:dynamodb:{backend.region}:*:table/{backend.lock_table}",
                "Condition": {
                    "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": list(lock_ids(backend, workspace))}
                },
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def state_role_policy(backend: StateBackend, *, partition: str = "aws") -> dict[str, Any]:
    """What the state role itself may do (docs/operations.md): every workspace's state and the lock table,
    nothing else of the bucket. Each session narrows it to one workspace with :func:`session_policy`."""
    statements: list[dict[str, Any]] = [
        {
            "Sid": "ListTheBucket",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:{partition}:s3:::{backend.bucket}",
        },
        {
            "Sid": "WorkspaceStates",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": f"arn:{partition}:s3:::{backend.bucket}/{backend.state_key('*')}",
        },
    ]
    if backend.lock_table:
        statements.append(
            {
                "Sid": "LockTable",
                "Effect": "Allow",
                "Action": list(_LOCK_ACTIONS),
                "Resource": f"arn:{partition}:dynamodb:{backend.region}:*:table/{backend.lock_table}",
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def session_name(step: TerraformStep, workspace: str, run_label: str = "") -> str:
    """The STS session name: shows in CloudTrail beside every call Terraform makes (2 to 64 of [\\w+=,.@-])."""
    name = _SESSION_NAME_REFUSED.sub("-", "-".join(filter(None, ("icd", step, workspace, run_label))))
    return name[:64]


@dataclass(frozen=True)
class ScopedCredentials:
    """One step's STS session. The secret and token never show in a repr, a log or a result."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expires: datetime
    step: TerraformStep
    workspace: str
    scope: tuple[str, ...]  # what the session opens, for the run log

    def env(self, region: str) -> dict[str, str]:
        """Terraform's AWS variables (the S3 backend reads them)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_DEFAULT_REGION": region,
        }

    def seconds_left_for_tools(self, now: datetime) -> float:
        """How long a Terraform call under this session may run: until shortly before the session expires, so
        a call that overruns is stopped while it can still save the state and release its lock."""
        return max(0.0, (self.expires - now).total_seconds() - STOP_BEFORE_EXPIRY_SECONDS)

    def describe(self) -> str:
        return (
            f"Terraform's {self.step} of {self.workspace} runs with STS session {self.access_key_id}, good for "
            f"{', '.join(self.scope)} only, until {self.expires.isoformat(timespec='seconds')}"
        )


def scoped_credentials(
    sts_client: Any,
    *,
    role_arn: str,
    backend: StateBackend,
    workspace: str,
    step: TerraformStep,
    duration_seconds: int,
    run_label: str = "",
) -> ScopedCredentials:
    """AssumeRole of ``role_arn`` with :func:`session_policy`, for ``duration_seconds`` (900 to 43200)."""
    if not MIN_SESSION_SECONDS <= duration_seconds <= MAX_SESSION_SECONDS:
        raise StateCredentialsError(
            f"a session lasts {MIN_SESSION_SECONDS} to {MAX_SESSION_SECONDS} s (STS), not {duration_seconds}"
        )
    partition = _partition(role_arn)
    policy = session_policy(backend, workspace, step, partition=partition)
    try:
        answer = sts_client.assume_role(
            RoleArn=role_arn,
            RoleSessionName=session_name(step, workspace, run_label),
            Policy=json.dumps(policy, separators=(",", ":")),
            DurationSeconds=duration_seconds,
        )
        issued = answer["Credentials"]
        credentials = ScopedCredentials(
            access_key_id=str(issued["AccessKeyId"]),
            secret_access_key=str(issued["SecretAccessKey"]),
            session_token=str(issued["SessionToken"]),
            expires=issued["Expiration"],
            step=step,
            workspace=workspace,
            scope=(
                backend.state_url(workspace),
                *(
                    f"lock item {item} of {backend.lock_table}"
                    for item in (lock_ids(backend, workspace) if backend.lock_table else ())
                ),
            ),
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise StateCredentialsError(f"STS refused to assume the state role {role_arn} ({code}): {exc}") from exc
    except (BotoCoreError, KeyError, TypeError) as exc:
        raise StateCredentialsError(
            f"STS could not be asked for the state role {role_arn}'s credentials: {exc}"
        ) from exc
    return credentials
