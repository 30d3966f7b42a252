"""Fixtures shared by the whole suite.

Each area keeps its own fixtures in ``tests/plugins/<area>.py``; this file wires them in and owns the ones
every area needs (a moto server over real HTTP and fresh buckets on it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from examples.local_env import free_port

pytest_plugins = [
    "tests.plugins.consul",
    "tests.plugins.slack",
    "tests.plugins.prefect_server",
    "tests.plugins.deploy_env",
]

AWS_REGION = "us-east-1"
# A test that uses one of these needs a Prefect server: it is `slow`, outside the fast tier.
_SERVER_FIXTURES = frozenset({"prefect_server", "deploy_env"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto server (S3, EC2, ...) over real HTTP on loopback, for the whole session."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Credentials are fake but must exist; set them for subprocesses (packer, the Prefect worker) too.
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in (
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
                ("AWS_DEFAULT_REGION", AWS_REGION),
            ):
                patch.setenv(key, value)
            yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_client(moto_endpoint: str):  # type: ignore[no-untyped-def]  # boto3 clients are untyped
    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name=AWS_REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_bucket(s3_client) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty bucket per test, so tests never see each other's objects."""
    name = f"icd-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name
