"""bench/cycle.py's count of AWS requests per cycle: what each request to moto is counted as, and the counter on
a real moto server over HTTP (docs/benchmarks.md records the figures it prints)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import boto3
import pytest

from examples.local_env import start_moto
from tests.helpers import load_bench


@pytest.fixture(scope="module")
def cycle() -> ModuleType:
    return load_bench("cycle.py", "bench_cycle")


@pytest.mark.parametrize(
    ("environ", "store"),
    [
        ({"PATH_INFO": "/b/registry/namespaces/acme/web/index.json"}, "registry"),
        ({"PATH_INFO": "/b/registry/namespaces/acme/web/claims/ab.json"}, "registry"),
        ({"PATH_INFO": "/b/registry/queues/prod/queue.json"}, "workspace queue"),
        ({"PATH_INFO": "/b/registry/plans/prod/run-1.tfplan"}, "plan store"),
        ({"PATH_INFO": "/b/registry/deployments/prod/run-1.dsse.json"}, "deploy records"),
        ({"PATH_INFO": "/b/registry/state/prod.tfstate"}, "terraform state"),
        ({"PATH_INFO": "/b/shell/web.tfstate"}, "terraform state"),
        ({"PATH_INFO": "/b", "QUERY_STRING": "max-keys=1000&prefix=env%3A%2F"}, "terraform state"),
        ({"PATH_INFO": "/b", "QUERY_STRING": "list-type=2&prefix=registry%2Fqueues%2F"}, "workspace queue"),
        ({"PATH_INFO": "/", "HTTP_X_AMZ_TARGET": "DynamoDB_20120810.GetItem"}, "terraform state lock"),
        ({"PATH_INFO": "/", "REQUEST_METHOD": "POST"}, "sts"),
        ({"PATH_INFO": "/", "REQUEST_METHOD": "GET"}, "other"),
        ({"PATH_INFO": "/b/registry/drift/prod.json"}, "other"),
        ({"PATH_INFO": "/b/icd-5b33505a-19ab-4797-823c-4ef497f57580-claim"}, "result store (Prefect)"),
        ({"PATH_INFO": "/b/c8fc0f269375b04ff74bc6377f9f73ab"}, "result store (Prefect)"),
    ],
)
def test_each_request_is_counted_as_the_store_it_serves(cycle: ModuleType, environ: dict[str, str], store: str) -> None:
    assert cycle.aws_store(environ) == store
    assert store in cycle.AWS_STORES


@pytest.fixture
def moto() -> Iterator[tuple[Any, str]]:
    server, endpoint = start_moto()
    try:
        yield server, endpoint
    finally:
        server.stop()


def test_the_counter_counts_what_moto_served_between_two_readings(cycle: ModuleType, moto: tuple[Any, str]) -> None:
    server, endpoint = moto
    keys = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench", "region_name": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, **keys)
    dynamodb = boto3.client("dynamodb", endpoint_url=endpoint, **keys)
    s3.create_bucket(Bucket="bench-counts")
    dynamodb.create_table(
        TableName="locks",
        KeySchema=[{"AttributeName": "LockID", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "LockID", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    counter = cycle.AwsRequests(server)
    before = counter.now()

    s3.put_object(Bucket="bench-counts", Key="registry/namespaces/a/b/index.json", Body=b"{}")
    s3.get_object(Bucket="bench-counts", Key="registry/namespaces/a/b/index.json")
    s3.put_object(Bucket="bench-counts", Key="registry/queues/prod/queue.json", Body=b"{}")
    dynamodb.get_item(TableName="locks", Key={"LockID": {"S": "bench-counts/registry/state/prod.tfstate-md5"}})

    spent = cycle.AwsRequests.spent(before, counter.now())
    assert spent == {store: 0 for store in cycle.AWS_STORES} | {
        "registry": 2,
        "workspace queue": 1,
        "terraform state lock": 1,
    }
