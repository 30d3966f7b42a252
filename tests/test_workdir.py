"""Terraform working directories against the S3 backend with its DynamoDB lock table, on moto over HTTP:
one state per workspace, and Terraform's own lock stops a second operation on a state while one applies."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from cli.setup import create_lock_table
from icd.deploy.workdir import StateBackend, open_terraform
from icd.errors import StateLockedError
from icd.tools.terraform import Terraform
from tests.waiting import wait_until

FIXTURES = Path(__file__).parent / "fixtures" / "terraform"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

pytestmark = pytest.mark.tools


def test_backend_config_names_the_state_and_its_lock_table() -> None:
    backend = StateBackend(bucket="b", key_prefix="registry/", region="eu-west-1", lock_table="locks")
    assert backend.config("staging") == {
        "bucket": "b",
        "key": "registry/state/staging.tfstate",
        "region": "eu-west-1",
        "dynamodb_table": "locks",
    }
    local = StateBackend(
        bucket="b", key_prefix="", region="us-east-1", endpoint="http://s3", dynamodb_endpoint="http://ddb"
    )
    assert local.config("prod")["force_path_style"] == "true"
    assert local.config("prod")["dynamodb_endpoint"] == "http://ddb"


def test_a_second_plan_during_an_apply_waits_then_names_the_holder(
    tmp_path: Path, moto_endpoint: str, s3_client: Any, s3_bucket: str
) -> None:
    from prefect_aws import AwsCredentials

    table = f"locks-{uuid.uuid4().hex[:8]}"
    create_lock_table(
        AwsCredentials(
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
            aws_client_parameters={"endpoint_url": moto_endpoint},
        ),
        table,
    )
    backend = StateBackend(
        bucket=s3_bucket,
        key_prefix="registry/",
        region="us-east-1",
        endpoint=moto_endpoint,
        lock_table=table,
        dynamodb_endpoint=moto_endpoint,
    )

    def workdir(name: str) -> Terraform:
        return open_terraform(
            FIXTURES / "slow_apply", tmp_path / name, backend=backend, workspace="ws", env=CREDENTIALS
        )

    holder = workdir("holder")
    plan = holder.plan(variables={"artifact_id": "a", "sleep_seconds": "20"}, out=Path("p"))
    applying = threading.Thread(target=holder.apply, args=(plan.plan_file,), daemon=True)
    applying.start()
    dynamodb = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1")
    wait_until(
        lambda: any("Info" in item for item in dynamodb.scan(TableName=table)["Items"]),
        timeout=60,
        message="the apply never took Terraform's state lock",
    )

    with pytest.raises(StateLockedError) as caught:
        workdir("second").plan(variables={"artifact_id": "b", "sleep_seconds": "0"}, out=Path("q"), lock_timeout="2s")
    assert caught.value.lock_id
    assert "@" in (caught.value.who or "")  # user@host of the holder
    assert "locked by" in str(caught.value)
    applying.join(timeout=60)


# --- the Terraform calls of one plan and its apply ---------------------------------------------------------


def _tool_calls(caplog: pytest.LogCaptureFixture) -> list[str]:
    """``terraform init`` ... from the chokepoint's one log line per tool call, in order; then forgets them."""
    calls = [
        f"{record.args[0]} {record.args[1]}"
        for record in caplog.records
        if record.name == "icd.tools.process" and isinstance(record.args, tuple) and record.msg.startswith("tool ")
    ]
    caplog.clear()
    return calls


class _Deploys:
    """Plans and applies versions of the app fixture with the library's own make_plan and apply_approved, on
    the S3 backend; each version of ``acmeinc/web`` deploys its AMI id as ``artifact_id``."""

    def __init__(self, tmp_path: Path, moto_endpoint: str, s3_client: Any, s3_bucket: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from icd.registry.plans import PlanStore
        from icd.registry.registry import Registry
        from icd.registry.signing import Sealer

        self.tmp_path, self.s3_client = tmp_path, s3_client
        self.registry = Registry(
            s3_client,
            s3_bucket,
            prefix="registry/",
            sealer=Sealer(b"k" * 32),
            provenance_key=Ed25519PrivateKey.from_private_bytes(bytes(range(32))),
        )
        self.plans = PlanStore(s3_client, s3_bucket, prefix="registry/")
        self.backend = StateBackend(bucket=s3_bucket, key_prefix="tf/", region="us-east-1", endpoint=moto_endpoint)

    def register(self, run: int) -> Any:
        from datetime import UTC, datetime

        from icd.registry import provenance as prov

        commit = f"{run:040x}"
        version = self.registry.register(
            "acmeinc/web",
            git_commit=commit,
            git_ref="main",
            packer_run_uuid=f"run-{run}",
            builder_type="amazon-ebs",
            artifacts={"us-east-1": f"ami-{run}"},
            created_by="test",
        ).version
        at = datetime(2026, 1, 1, tzinfo=UTC)
        facts = prov.BuildFacts(
            repository="https://github.com/acme/web.git",
            ref="main",
            commit=commit,
            template_digest="cd" * 32,
            packer_only=(),
            build_run_id=f"run-{run}",
            started_on=at,
            finished_on=at,
        )
        self.registry.write_provenance(version, facts)
        return version

    def open_workdir(self, root: str = "runs") -> Any:
        def open_workdir(name: str) -> Terraform:
            return open_terraform(
                FIXTURES / "app",
                self.tmp_path / root / name,
                backend=self.backend,
                workspace="ws",
                env=CREDENTIALS,
            )

        return open_workdir

    def read_state(self) -> bytes | None:
        from icd.deploy.workdir import fetch_state

        return fetch_state(self.s3_client, self.backend, "ws")

    def plan(self, version: Any, plan_id: str) -> Any:
        from icd.deploy.plan import PlanRequest, make_plan

        request = PlanRequest(
            workspace="ws",
            stack_dir=str(FIXTURES / "app"),
            version=version,
            platform="us-east-1",
            follows="latest",
            promotes=None,
            variables={"artifact_id": version.artifacts["us-east-1"]},
            plan_id=plan_id,
        )
        return make_plan(request, registry=self.registry, plans=self.plans, open_workdir=self.open_workdir())

    def apply(self, planned: Any, *, root: str = "runs") -> Any:
        from icd.deploy.apply import apply_approved

        return apply_approved(
            registry=self.registry,
            plans=self.plans,
            open_workdir=self.open_workdir(root),
            read_state=self.read_state,
            planned=planned,
            approved_sha256=planned.plan_sha256,
            platform="us-east-1",
        )


@pytest.fixture
def deploys(tmp_path: Path, moto_endpoint: str, s3_client: Any, s3_bucket: str) -> _Deploys:
    return _Deploys(tmp_path, moto_endpoint, s3_client, s3_bucket)


@pytest.mark.parametrize(
    ("earlier_deploys", "apply_where", "plan_calls", "apply_calls"),
    [
        # The plan's init is kept: the apply's fresh directory takes it (icd/deploy/workdir.py, INIT_CACHE).
        pytest.param(0, "runs", ["init", "plan", "show"], ["apply"], id="first deploy on this worker"),
        pytest.param(1, "runs", ["plan", "show"], ["apply"], id="next deploy on this worker"),
        # Another worker keeps its own: the apply's directory there is initialised once.
        pytest.param(1, "elsewhere", ["plan", "show"], ["init", "apply"], id="apply on another worker"),
    ],
)
def test_a_plan_and_its_apply_make_only_the_terraform_calls_the_work_needs(
    deploys: _Deploys,
    caplog: pytest.LogCaptureFixture,
    earlier_deploys: int,
    apply_where: str,
    plan_calls: list[str],
    apply_calls: list[str],
) -> None:
    """No `state pull` (the plan file records its state; the apply reads the stored state), no `output` (the
    outputs are in the state the apply wrote), one `init` per stack and workspace on a worker."""
    from icd.deploy.apply import AppliedDeploy

    caplog.set_level("INFO", logger="icd.tools.process")
    for run in range(1, earlier_deploys + 1):
        assert isinstance(deploys.apply(deploys.plan(deploys.register(run), f"earlier-{run}")), AppliedDeploy)
    version = deploys.register(earlier_deploys + 1)
    _tool_calls(caplog)

    planned = deploys.plan(version, "this")
    assert _tool_calls(caplog) == [f"terraform {call}" for call in plan_calls]
    assert (planned.state_before is None) == (earlier_deploys == 0)
    applied = deploys.apply(planned, root=apply_where)

    assert _tool_calls(caplog) == [f"terraform {call}" for call in apply_calls]
    assert isinstance(applied, AppliedDeploy), applied
    assert applied.outputs == {"artifact_id": f"ami-{earlier_deploys + 1}"}


@pytest.mark.parametrize("state_at_plan", ["none", "some"])
def test_a_state_written_after_the_plan_is_refused_before_terraform_starts(
    deploys: _Deploys, caplog: pytest.LogCaptureFixture, state_at_plan: str
) -> None:
    """The check the second `state pull` made, now from the stored state: Terraform 1.0.3 itself would apply a
    plan made against no state over a state written since, duplicating the resource."""
    from icd.deploy.apply import AppliedDeploy, StalePlan

    caplog.set_level("INFO", logger="icd.tools.process")
    if state_at_plan == "some":
        deploys.apply(deploys.plan(deploys.register(1), "base"))
    version = deploys.register(2)
    stale = deploys.plan(version, "stale")
    # The same version planned and applied again meanwhile: only the state moved, no channel.
    assert isinstance(deploys.apply(deploys.plan(version, "meanwhile")), AppliedDeploy)
    before = deploys.read_state()
    _tool_calls(caplog)

    result = deploys.apply(stale)

    assert isinstance(result, StalePlan), result
    assert "moved since planning" in result.reason
    assert _tool_calls(caplog) == []
    assert deploys.read_state() == before


def test_terraform_refuses_a_stale_saved_plan_on_the_s3_backend(deploys: _Deploys) -> None:
    """The guard under the state lock, between the apply's own check and Terraform's write: Terraform 1.0.3
    compares the plan's recorded serial and lineage with the S3 backend's state and applies nothing."""
    from icd.errors import StalePlanError
    from icd.tools.terraform import plan_state_version

    base = deploys.open_workdir()("base")
    base.apply(base.plan(variables={"artifact_id": "base"}, out=Path("p")).plan_file)
    stale = deploys.open_workdir()("stale")
    plan = stale.plan(variables={"artifact_id": "a"}, out=Path("p"))
    recorded = plan_state_version(plan.plan_file)
    assert recorded is not None
    assert recorded == base.state_pull(), "the plan file records the state it was made against"
    other = deploys.open_workdir()("other")
    other.apply(other.plan(variables={"artifact_id": "b"}, out=Path("p")).plan_file)
    before = deploys.read_state()

    with pytest.raises(StalePlanError):
        stale.apply(plan.plan_file)
    assert deploys.read_state() == before
