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
