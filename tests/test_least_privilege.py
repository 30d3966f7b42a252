"""Least privilege that doesn't depend on the team: a provisioner that would inherit Terraform's environment is
refused by the pre-flight check, and what Terraform holds (so what a leaky stack could hand its instance) is
a short STS session good for one workspace's state and lock items only.

moto records the session policy it is sent but enforces neither it nor the expiry: the tests read the policy
moto received (its ``/moto-api/data.json``) and the expiry STS answered; AWS does the enforcing
(docs/decisions.md says what is proven where).
"""

from __future__ import annotations

import json
import os
import re
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from blocks.registry import ArtifactRegistry
from icd.deploy.credentials import lock_ids, scoped_credentials, session_policy, state_role_policy
from icd.deploy.workdir import StateBackend
from icd.errors import StateCredentialsError
from icd.paths import PROJECT_ROOT
from icd.service.preflight import check_stack
from tests.plugins.deploy_env import DeployEnv
from tests.waiting import wait_until

LEAKY_STACK = PROJECT_ROOT / "tests" / "fixtures" / "terraform" / "leaky_deploy"
BACKEND = StateBackend(bucket="reg", key_prefix="registry/", region="us-east-1", lock_table="locks")


# --- the pre-flight check -----------------------------------------------------------------------------------


def test_the_leaky_stack_is_refused_naming_the_provisioners_file_and_line_and_the_fix() -> None:
    findings = [f for f in check_stack(LEAKY_STACK) if f.kind == "provisioner-inherits-environment"]
    assert len(findings) == 1, [f.message for f in check_stack(LEAKY_STACK)]
    [finding] = findings
    file, line = finding.file.rsplit(":", 1)
    assert file == "tests/fixtures/terraform/leaky_deploy/main.tf"
    assert (PROJECT_ROOT / file).read_text().splitlines()[int(line) - 1].strip() == 'provisioner "local-exec" {'
    assert "null_resource.instance" in finding.message
    assert "AWS credentials" in finding.cause
    assert '["/usr/bin/env", "-i"' in finding.fix
    assert finding.message.endswith("See docs/service-contract.md#provisioner-environment")


_STACK = """
variable "artifact_id" {{ type = string }}
locals {{
  clean = ["/usr/bin/env", "-i", "PATH=/usr/bin:/bin"]
}}
resource "null_resource" "app" {{
  triggers = {{ artifact_id = var.artifact_id }}
  # provisioner "local-exec" {{ command = "commented out: not a block" }}
  provisioner "local-exec" {{
    command = "true"
    {body}
  }}
}}
"""


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        ('interpreter = ["/usr/bin/env", "-i", "A=${var.artifact_id}", "/bin/sh", "-c"]', False),
        ('interpreter = ["env", "--ignore-environment", "/bin/sh", "-c"]', False),
        ('interpreter = concat(local.clean, ["/bin/sh", "-c"])', False),
        ("interpreter = local.clean", False),
        ('interpreter = concat(["/usr/bin/env", "-i"], ["/bin/sh", "-c"])', False),
        ("", True),
        ("environment = { A = var.artifact_id }", True),
        ('interpreter = ["/bin/sh", "-c"]', True),
        ('interpreter = ["/usr/bin/env", "A=1", "/bin/sh", "-c"]', True),
        ('interpreter = concat(local.missing, ["/bin/sh", "-c"])', True),
        ('interpreter = ["${var.artifact_id}", "-i", "/bin/sh", "-c"]', True),
    ],
)
def test_only_an_interpreter_that_starts_with_env_i_keeps_terraforms_environment_out(
    tmp_path: Path, body: str, refused: bool
) -> None:
    (tmp_path / "main.tf").write_text(_STACK.format(body=body))
    found = [f for f in check_stack(tmp_path) if f.kind == "provisioner-inherits-environment"]
    assert bool(found) is refused, [f.message for f in found]
    if refused:
        assert found[0].file.endswith("main.tf:9")


def test_the_project_stacks_run_their_provisioners_without_terraforms_environment() -> None:
    for stack in (
        PROJECT_ROOT / "examples" / "stacks" / "local",
        PROJECT_ROOT / "tests/fixtures/terraform/slow_deploy",
    ):
        assert [f.message for f in check_stack(stack) if f.kind == "provisioner-inherits-environment"] == []


# --- the session policy ---------------------------------------------------------------------------------------


def _resources(policy: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            found.setdefault(action, set()).add(statement["Resource"])
    return found


def test_a_steps_session_opens_its_workspaces_state_object_and_lock_items_and_nothing_else() -> None:
    plan, apply = session_policy(BACKEND, "web-staging", "plan"), session_policy(BACKEND, "web-staging", "apply")
    state = "arn:aws:s3:::reg/registry/state/web-staging.tfstate"
    table = "arn:aws:dynamodb:us-east-1:*:table/locks"
    assert _resources(plan) == {
        "s3:ListBucket": {"arn:aws:s3:::reg"},
        "s3:GetObject": {state},
        "dynamodb:GetItem": {table},
        "dynamodb:PutItem": {table},
        "dynamodb:DeleteItem": {table},
    }
    assert _resources(apply) == {**_resources(plan), "s3:PutObject": {state}}
    for policy in (plan, apply):
        listing, _, locks = policy["Statement"]
        assert listing["Condition"] == {"StringEquals": {"s3:prefix": ["env:/", "registry/state/web-staging.tfstate"]}}
        assert locks["Condition"] == {
            "ForAllValues:StringEquals": {
                "dynamodb:LeadingKeys": [
                    "reg/registry/state/web-staging.tfstate",
                    "reg/registry/state/web-staging.tfstate-md5",
                ]
            }
        }
    # The role the sessions narrow: every workspace's state, the lock table, no other object of the bucket.
    assert _resources(state_role_policy(BACKEND))["s3:GetObject"] == {"arn:aws:s3:::reg/registry/state/*.tfstate"}


def _moto_session(endpoint: str, access_key_id: str) -> dict[str, Any]:
    """The STS session moto issued for ``access_key_id``, as moto recorded it (its model data over HTTP)."""
    roles = httpx.get(f"{endpoint}/moto-api/data.json", timeout=10).json()["sts"]["AssumedRole"]
    [session] = [role for role in roles if role["access_key_id"] == access_key_id]
    return dict(session)


def test_the_session_moto_issues_carries_the_policy_and_lasts_the_steps_minutes(moto_endpoint: str) -> None:
    sts = boto3.client(
        "sts", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    role = "arn:aws:iam::123456789012:role/icd-state"
    asked = datetime.now(UTC)
    scoped = scoped_credentials(
        sts, role_arn=role, backend=BACKEND, workspace="web-prod", step="apply", duration_seconds=900, run_label="r1"
    )
    assert scoped.access_key_id.startswith("ASIA"), "a temporary key, not a long-lived one"
    assert timedelta(seconds=890) <= scoped.expires - asked <= timedelta(seconds=910)
    assert scoped.secret_access_key not in repr(scoped)
    assert scoped.session_token not in repr(scoped)
    session = _moto_session(moto_endpoint, scoped.access_key_id)
    assert session["role_arn"] == role
    assert session["session_name"] == "icd-apply-web-prod-r1"
    assert json.loads(session["policy"]) == session_policy(BACKEND, "web-prod", "apply")
    assert scoped.env("us-east-1")["AWS_SESSION_TOKEN"] == session["session_token"]
    # Terraform is stopped a minute before its session expires, so it can still save the state and unlock.
    assert scoped.seconds_left_for_tools(scoped.expires - timedelta(seconds=900)) == 840
    assert scoped.seconds_left_for_tools(scoped.expires - timedelta(seconds=30)) == 0

    with pytest.raises(StateCredentialsError, match="900 to 43200"):
        scoped_credentials(sts, role_arn=role, backend=BACKEND, workspace="w", step="plan", duration_seconds=600)
    with pytest.raises(StateCredentialsError, match="not an IAM role ARN"):
        scoped_credentials(sts, role_arn="icd-state", backend=BACKEND, workspace="w", step="plan", duration_seconds=900)


def test_without_a_state_role_terraform_gets_the_blocks_own_keys_as_before(moto_endpoint: str) -> None:
    from prefect_aws import AwsClientParameters, AwsCredentials
    from pydantic import SecretStr

    credentials = AwsCredentials(
        aws_access_key_id="AKIAOWN",
        aws_secret_access_key=SecretStr("own-secret"),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint),
    )
    block = ArtifactRegistry(bucket="reg", aws_credentials=credentials, signing_key=SecretStr("k" * 32))
    env, scoped = block.terraform_env("web", "plan")
    assert scoped is None
    assert env["AWS_ACCESS_KEY_ID"] == "AKIAOWN"
    block.state_role_arn = "arn:aws:iam::123456789012:role/icd-state"
    env, scoped = block.terraform_env("web", "plan")
    assert scoped is not None
    assert env["AWS_ACCESS_KEY_ID"] == scoped.access_key_id
    assert "own-secret" not in json.dumps(env)


# --- end to end: the leaky stack forced through ----------------------------------------------------------------

_DESCRIBED = re.compile(r"Terraform's apply of (\S+) runs with STS session (\S+), good for (.+) only, until (\S+)$")


def test_a_leaky_stack_forced_through_leaves_its_instance_nothing_that_opens_the_registry(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service()  # the build's pre-flight check reads the clean example stack...
    env.build(names)
    version = env.registry.registry().last_version(names.namespace)
    # ...then the workspace is pointed at the leaky one: the deploy runs no check, so it is forced through.
    env.workspace(names.workspace, follows=f"{names.namespace}@latest", stack=str(LEAKY_STACK))
    run = env.deploy(names.workspace, version)
    env.wait_for(run.id, states={"PAUSED"})
    env.wait_for_question(run.id)
    done = env.approve(run.id, names.workspace)
    assert done.state is not None
    assert done.state.name == "Deployed", done.state
    assert done.end_time is not None

    instance = next((env.icd_home / "instances" / names.workspace).glob(f"{names.service_name}-*"))
    sidecar = int((instance / "sidecar.pid").read_text())
    try:
        raw = Path(f"/proc/{sidecar}/environ").read_bytes()
    finally:
        os.kill(sidecar, signal.SIGTERM)
    environ = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)

    # The stack leaked Terraform's environment into what it started (that is what makes it leaky)...
    key = environ.get("AWS_ACCESS_KEY_ID", "")
    assert key, "the leaky provisioner's sidecar should hold Terraform's environment"
    # ...and what it holds is no long-lived key and no secret of any block.
    assert key.startswith("ASIA"), f"{key} is not a temporary (STS) key"
    assert key != env.registry.aws_credentials.aws_access_key_id
    assert environ.get("AWS_SESSION_TOKEN")
    assert [name for name, value in env.secrets().items() if value in raw.decode(errors="replace")] == []

    # The run log says which session Terraform's apply ran with, what it opens and until when. A run's last
    # log lines reach the server after it has ended (Prefect sends them in batches): wait for the line.
    def described_lines() -> list[re.Match[str]]:
        return [m for log in env.logs(run.id) if (m := _DESCRIBED.search(log.message))]

    described = wait_until(described_lines, timeout=30, message="the apply's session line never reached the run log")
    assert [m.group(1) for m in described] == [names.workspace]
    [line] = described
    assert line.group(2) == key
    expires = datetime.fromisoformat(line.group(4))
    assert expires <= done.end_time + timedelta(minutes=15), (expires, done.end_time)

    # The session moto issued for that key carries the policy of this workspace's apply, and nothing else.
    endpoint = str(env.registry.aws_credentials.aws_client_parameters.endpoint_url)
    session = _moto_session(endpoint, key)
    backend = env.registry.state_backend()
    assert session["role_arn"] == env.registry.state_role_arn
    assert json.loads(session["policy"]) == session_policy(backend, names.workspace, "apply")
    assert backend.state_url(names.workspace) in line.group(3)
    assert all(item in line.group(3) for item in lock_ids(backend, names.workspace))
