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
from prefect_patches.shared_tls import reuse_tls_context_for_plain_http

pytest_plugins = [
    "tests.plugins.consul",
    "tests.plugins.slack",
    "tests.plugins.prefect_server",
    "tests.plugins.deploy_env",
    "tests.plugins.smtp",
]

AWS_REGION = "us-east-1"
# As the worker, its runs and the inbound app do: the suite's own API clients share one TLS context.
reuse_tls_context_for_plain_http()
# A test that uses one of these needs a Prefect server: it is `slow`, outside the fast tier.
_SERVER_FIXTURES = frozenset({"prefect_server", "deploy_env"})


# The files that take longest, longest first (seconds of test time on a quiet two-core machine, 2026-11-28,
# from a per-file timeline of `make test`). `make test` hands whole files to its workers in collection order
# (`--dist loadfile --no-loadscope-reorder`): longest first, the short files fill the gaps at the end and the
# two workers end within seconds of each other (longest-processing-time first). xdist's own order (most
# tests first) put the end-to-end files last. Files not named (under 5 s each) keep their places after them.
_LONGEST_FIRST = (
    "test_rollout_e2e.py",  # ~400 (issue 23, measured alone: 83 + 114 s, and a 90 s crash wait)
    "test_faults.py",  # 285 (issue 20, measured alone on a loaded machine: a 70 s zombie wait, S3 retries)
    "test_drift.py",  # 257 (issue 22, measured alone)
    "test_deploy.py",  # 205
    "test_told_and_quiet.py",  # 196 with its set-up (issue 20, measured alone)
    "test_slack_approvals.py",  # ~150 with its set-up (issue 21, measured alone)
    "test_github_status.py",  # ~120 (issue 22, measured alone)
    "test_event_stream.py",  # 110 (issue 19, measured alone)
    "test_provenance_e2e.py",  # ~110 (issue 22, measured alone)
    "test_trust.py",  # 104
    "test_operator_walkthrough.py",  # 89
    "test_events.py",  # 89
    "test_team_server.py",  # 78
    "test_stock_worker.py",  # 73 (issue 24, measured alone: cold runs on Prefect's stock worker)
    "test_audit.py",  # 71 (issue 22, measured alone)
    "test_deliveries.py",  # 60 (issue 19, measured alone)
    "test_health_flaps.py",  # 30 (issue 19, measured alone)
    "test_tool_hangs.py",  # 54 (issue 20, measured alone)
    "test_browser.py",  # 58
    "test_terraform.py",  # 22
    "test_health_watch.py",  # 22
    "test_workdir.py",  # 21
    "test_onboarding.py",  # 16
    "test_examples.py",  # 15
    "test_consul_standin.py",  # 14
    "test_registry.py",  # 14
    "test_worker.py",  # 13
    "test_notifications.py",  # 12
    "test_packer.py",  # 9
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: position for position, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


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
