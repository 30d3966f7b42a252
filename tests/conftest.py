"""Fixtures shared by the whole suite.

Each area keeps its own fixtures in ``tests/plugins/<area>.py``; this file wires them in and owns the ones
every area needs (a moto server over real HTTP and fresh buckets on it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.local_env import start_moto
from icd.service import hcl
from prefect_patches.shared_tls import reuse_tls_context_for_plain_http
from tests.helpers import AWS_REGION, moto_s3_client

pytest_plugins = [
    "tests.plugins.consul",
    "tests.plugins.slack",
    "tests.plugins.prefect_server",
    "tests.plugins.deploy_env",
    "tests.plugins.smtp",
]

# As the worker, its runs and the inbound app do: the suite's own API clients share one TLS context.
reuse_tls_context_for_plain_http()
# A test that uses one of these needs a Prefect server: it is `slow`, outside the fast tier.
_SERVER_FIXTURES = frozenset({"prefect_server", "deploy_env"})


# The files that take longest, longest first (seconds of test time, setup included, from `--durations=0` of
# `make test` on a fresh clone with four pytest workers on two cores, 2026-12-05: the machine was busy, so each
# figure is about twice its time alone). `make test` hands whole files to its workers in collection order
# (`--dist loadfile --no-loadscope-reorder`): longest first, the short files fill the gaps at the end and the
# workers end within seconds of each other (longest-processing-time first). xdist's own order (most tests
# first) put the end-to-end files last. Files not named (under 5 s each) keep their places after them.
_LONGEST_FIRST = (
    "test_rollout_e2e.py",  # 390
    "test_faults.py",  # 293
    "test_deploy.py",  # 249
    "test_trust.py",  # 222
    "test_operator_walkthrough.py",  # 196
    "test_tool_hangs.py",  # 144
    "test_events.py",  # 128
    "test_drift.py",  # 121
    "test_team_server.py",  # 104
    "test_event_stream.py",  # 82
    "test_browser.py",  # 73
    "test_provenance_e2e.py",  # 71
    "test_github_status.py",  # 69
    "test_slack_approvals.py",  # 63
    "test_stock_worker.py",  # 61
    "test_audit.py",  # 57
    "test_told_and_quiet.py",  # 51
    "test_workdir.py",  # 48
    "test_deliveries.py",  # 42
    "test_onboarding.py",  # 38
    "test_registry.py",  # 33
    "test_health_watch.py",  # 28
    "test_notifications.py",  # 27
    "test_worker.py",  # 23
    "test_terraform.py",  # 20
    "test_sqlite_load.py",  # 18
    "test_notification_routes.py",  # 18
    "test_socket_mode.py",  # 18
    "test_examples.py",  # 16
    "test_deploy_thread.py",  # 15
    "test_consul_standin.py",  # 14
    "test_silences.py",  # 14
    "test_health_flaps.py",  # 14
    "test_packer.py",  # 11
    "test_health_gate.py",  # 9
    "test_fleet_stack.py",  # 9
    "test_least_privilege.py",  # 8
    "test_suspension.py",  # 6
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: position for position, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def hcl_parse_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The pre-flight check's parse cache (``icd/service/hcl.py``) of this test process, empty at its start: the
    tests' parses never land in the work tree's ``.state`` nor come from an earlier run's. (The flow runs of the
    end-to-end tests are other processes, with their own ``ICD_HOME``.)"""
    home = tmp_path_factory.mktemp("hcl-parse-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hcl, "state_home", lambda: home)
        yield hcl.parse_cache()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto server (S3, EC2, ...) over real HTTP on loopback, for the whole session."""
    server, endpoint = start_moto()
    # Credentials are fake but must exist; set them for subprocesses (packer, the Prefect worker) too.
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in (
                ("AWS_ACCESS_KEY_ID", "testing"),
                ("AWS_SECRET_ACCESS_KEY", "testing"),
                ("AWS_DEFAULT_REGION", AWS_REGION),
            ):
                patch.setenv(key, value)
            yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_client(moto_endpoint: str):  # type: ignore[no-untyped-def]  # boto3 clients are untyped
    return moto_s3_client(moto_endpoint)


@pytest.fixture
def s3_bucket(s3_client) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty bucket per test, so tests never see each other's objects."""
    name = f"icd-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name
