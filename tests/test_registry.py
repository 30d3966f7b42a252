"""The artifact registry against a real moto S3 server over HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from prefect_aws import AwsCredentials

from blocks.registry import ArtifactRegistry
from cli.registry import SIGNING_KEY_ENV
from cli.registry import main as registry_cli
from icd.errors import (
    InvalidChannelError,
    InvalidNamespaceError,
    RegistryIntegrityError,
    RegistryStorageError,
    RevokedVersionError,
    VersionNotFoundError,
)
from icd.registry import (
    ArtifactVersion,
    BuildClaimed,
    BuildHeld,
    ChannelAssignment,
    ChannelMoved,
    RegistrationResult,
    Registry,
    Sealer,
)
from icd.rules import LATEST, check_namespace
from tests.helpers import crowds, moto_s3_client

NS = "acme/web"
SIGNING_KEY = "registry-test-signing-key"
SEALER = Sealer(SIGNING_KEY.encode())


class FakeClock:
    """A settable clock, so a revocation 'in the future' needs no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def registry(s3_client: Any, s3_bucket: str) -> Registry:
    return Registry(s3_client, s3_bucket, prefix="registry/", sealer=SEALER)


def build(registry: Registry, run: str, namespace: str = NS, **overrides: Any) -> RegistrationResult:
    options: dict[str, Any] = {
        "git_commit": f"c0ffee{run}",
        "git_ref": "main",
        "packer_run_uuid": f"run-{run}",
        "builder_type": "amazon-ebs",
        "artifacts": {"us-east-1": f"ami-{run}"},
        "created_by": "flow-run/test",
    }
    options.update(overrides)
    return registry.register(namespace, **options)


# --- namespaces ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["acme/web", "a/b", "my-org/my-app-2", f"{'a' * 63}/{'b' * 63}"])
def test_valid_namespaces_are_accepted(namespace: str) -> None:
    assert check_namespace(namespace) == namespace


@pytest.mark.parametrize(
    "namespace",
    [
        "acme",
        "acme/",
        "/web",
        "acme/web/extra",
        "Acme/web",
        "acme/Web",
        "acme/we b",
        "acme/web.v2",
        "acme\\web",
        "",
        "/",
        f"{'a' * 64}/web",
        "acme/../web",
        "my-org/my_app",
        "0/9",
        "acme/web\n",
    ],
)
def test_invalid_namespaces_are_refused_with_rule_and_value(namespace: str, registry: Registry) -> None:
    with pytest.raises(InvalidNamespaceError) as caught:
        registry.list_versions(namespace)
    assert repr(namespace) in str(caught.value)
    assert "org/name" in str(caught.value)


@pytest.mark.parametrize("channel", ["Production", "prod/eu", "", "1st", "a" * 64, "prod_eu", "prod\n"])
def test_invalid_channel_names_are_refused(channel: str, registry: Registry) -> None:
    build(registry, "1")
    with pytest.raises(InvalidChannelError, match="invalid channel name"):
        registry.assign_channel(NS, channel, 1, assigned_by="alice")


# --- register, get, list ---------------------------------------------------------------------------------


def test_register_get_and_list(registry: Registry) -> None:
    first = build(registry, "1", labels={"os": "ubuntu"})
    second = build(registry, "2", artifact_sha256={"local": "ab" * 32})
    build(registry, "x", namespace="acme/api")

    assert first.created
    assert second.created
    assert (first.version.version, second.version.version) == (1, 2)
    assert first.version.parent_version is None
    assert second.version.parent_version == 1
    stored = registry.get(NS, 1)
    assert stored == first.version
    assert stored.labels == {"os": "ubuntu"}
    assert stored.created_at.tzinfo is not None
    assert ArtifactVersion.model_validate_json(stored.model_dump_json()) == stored
    assert [v.version for v in registry.list_versions(NS)] == [1, 2]
    assert registry.list_namespaces() == ["acme/api", "acme/web"]
    assert registry.find_by_artifact_id(NS, "ami-2") == second.version
    assert registry.find_by_artifact_id(NS, "ami-nope") is None
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == 2


def test_missing_version_raises_not_found(registry: Registry) -> None:
    build(registry, "1")
    with pytest.raises(VersionNotFoundError, match="no version 7"):
        registry.get(NS, 7)
    assert registry.list_versions("acme/empty") == []


def test_versions_are_immutable_in_storage(registry: Registry, s3_client: Any, s3_bucket: str) -> None:
    build(registry, "1")
    key = "registry/namespaces/acme/web/versions/00000001.json"
    before = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    registry.revoke(NS, 1, revoked_by="alice", reason="CVE-2026-1")
    after = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert before == after
    assert "revocation" not in json.loads(after)["payload"]


# --- idempotency -----------------------------------------------------------------------------------------


def test_reregistering_the_same_packer_run_returns_the_existing_version(registry: Registry) -> None:
    first = build(registry, "1")
    again = build(registry, "1", created_by="someone-else", artifacts={"us-east-1": "ami-other"})
    assert again.created is False
    assert again.version == first.version
    assert len(registry.list_versions(NS)) == 1


def test_concurrent_reregistration_creates_exactly_one_version(registry: Registry) -> None:
    barrier = threading.Barrier(10)

    def register_same_run(_: int) -> RegistrationResult:
        barrier.wait()
        return build(registry, "same")

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(register_same_run, range(10)))
    assert sum(result.created for result in results) == 1
    assert {result.version.version for result in results} == {1}
    assert len(registry.list_versions(NS)) == 1


@pytest.mark.parametrize("writers", crowds(20))
def test_concurrent_registrations_get_distinct_consecutive_versions(registry: Registry, writers: int) -> None:
    barrier = threading.Barrier(writers)

    def register_run(index: int) -> RegistrationResult:
        barrier.wait()
        return build(registry, f"{index:02d}")

    with ThreadPoolExecutor(max_workers=writers) as pool:
        results = list(pool.map(register_run, range(writers)))

    assert all(result.created for result in results)
    assert sorted(result.version.version for result in results) == list(range(1, writers + 1))
    stored = registry.list_versions(NS)
    assert [v.version for v in stored] == list(range(1, writers + 1))
    assert {v.packer_run_uuid for v in stored} == {f"run-{i:02d}" for i in range(writers)}
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == writers


# --- one view per decision -------------------------------------------------------------------------------


def _reads(s3_client: Any) -> list[str]:
    """The keys this client reads from now on (GetObject), in order."""
    keys: list[str] = []
    s3_client.meta.events.register("before-call.s3.GetObject", lambda params, **_: keys.append(params["url_path"]))
    return keys


def _second_writer(s3_client: Any, s3_bucket: str, clock: FakeClock | None = None) -> Registry:
    """Another process's registry on the same bucket: its own client, so the first one's reads stay countable."""
    return Registry(
        moto_s3_client(s3_client.meta.endpoint_url), s3_bucket, prefix="registry/", sealer=SEALER, clock=clock
    )


def test_inside_one_view_each_object_a_decision_looks_up_is_read_once(registry: Registry, s3_client: Any) -> None:
    build(registry, "1")
    build(registry, "2")
    registry.assign_channel(NS, "production", 1, assigned_by="alice")
    reads = _reads(s3_client)

    with registry.one_view():
        for _ in range(3):
            assert registry.get(NS, 2).version == 2
            assert registry.find_by_artifact_id(NS, "ami-1") == registry.get(NS, 1)
            pointer = registry.get_channel(NS, "production")
            assert pointer is not None
            assert pointer.version == 1
    in_the_view = len(reads)
    registry.get(NS, 2)

    # v2, the index, v1's artifact pointer, v1, the channel: once each, however often they were looked up.
    assert in_the_view == 5, reads
    assert len(reads) == in_the_view + 2, "outside a view every look-up reads S3 again (v2 and the index)"


def test_a_write_through_the_registry_ends_what_the_view_remembers(registry: Registry) -> None:
    build(registry, "1")
    build(registry, "2")
    registry.assign_channel(NS, "production", 1, assigned_by="alice")

    with registry.one_view():
        before = registry.get_channel(NS, "production")
        registry.assign_channel(NS, "production", 2, assigned_by="bob")
        after = registry.get_channel(NS, "production")
        registry.revoke(NS, 2, revoked_by="carol", reason="broken")
        revoked = registry.get(NS, 2)

    assert before is not None
    assert after is not None
    assert (before.version, after.version) == (1, 2)
    assert revoked.revocation is not None, "the revocation written inside the view is read inside it"


def test_a_swap_inside_a_view_reads_afresh_so_another_writers_move_is_never_lost(
    registry: Registry, s3_client: Any, s3_bucket: str
) -> None:
    build(registry, "1")
    build(registry, "2")
    registry.assign_channel(NS, "production", 1, assigned_by="alice")
    other = _second_writer(s3_client, s3_bucket)
    attempts: list[str] = []

    def count_channel_writes(params: dict[str, Any], **_: Any) -> None:
        if "channels/production" in params["url_path"]:
            attempts.append(params["url_path"])

    s3_client.meta.events.register("before-call.s3.PutObject", count_channel_writes)

    with ThreadPoolExecutor(max_workers=1) as pool, registry.one_view():
        seen = registry.get_channel(NS, "production")
        # Another process (another thread: this thread's view is not told of its write) moves the channel.
        pool.submit(other.assign_channel, NS, "production", 2, assigned_by="bob").result(timeout=30)
        moved = registry.assign_channel(NS, "production", 1, assigned_by="alice", expected_version=1)

    assert seen is not None
    assert seen.version == 1
    assert moved == ChannelMoved(channel="production", expected_version=1, actual_version=2)
    assert attempts == [], "the swap read the channel afresh: it saw the move and wrote nothing"
    assert [a.to_version for a in registry.channel_history(NS, "production")] == [1, 2]


def test_latest_moved_back_inside_a_view_goes_to_the_newest_version_as_it_is_now(
    s3_client: Any, s3_bucket: str
) -> None:
    """A scheduled revocation of latest's version falls due inside a view, after another process registered a
    newer version: latest moves to that one, not to one the view's index still called the newest."""
    clock = FakeClock()
    registry = Registry(s3_client, s3_bucket, prefix="registry/", sealer=SEALER, clock=clock)
    for run in ("1", "2"):
        build(registry, run)
    registry.revoke(NS, 2, revoked_by="alice", reason="end of support", at=clock.now + timedelta(hours=1))
    elsewhere = _second_writer(s3_client, s3_bucket, clock)

    with ThreadPoolExecutor(max_workers=1) as pool, registry.one_view():
        before = registry.get_channel(NS, LATEST)
        pool.submit(build, elsewhere, "3").result(timeout=30)
        clock.now += timedelta(hours=2)
        after = registry.get_channel(NS, LATEST)

    assert before is not None
    assert before.version == 2
    assert after is not None
    assert after.version == 3, "v3 is the newest deployable version now"
    pointer = registry.get_channel(NS, LATEST)
    assert pointer is not None
    assert pointer.version == 3
    assert 1 not in [a.to_version for a in registry.channel_history(NS, LATEST)][2:], "latest never went back to v1"


def test_another_writers_revocation_is_seen_by_the_next_view_and_a_view_is_its_threads_own(
    registry: Registry, s3_client: Any, s3_bucket: str
) -> None:
    build(registry, "1")
    other = _second_writer(s3_client, s3_bucket)

    def elsewhere() -> ArtifactVersion:
        """Another process, as far as this thread's view goes: it revokes v1, then reads it (it has no view)."""
        other.revoke(NS, 1, revoked_by="carol", reason="CVE")
        return registry.get(NS, 1)

    with ThreadPoolExecutor(max_workers=1) as pool, registry.one_view():
        assert registry.get(NS, 1).revocation is None
        read_elsewhere = pool.submit(elsewhere).result(timeout=30)
        in_this_view = registry.get(NS, 1)
    with registry.one_view():
        in_the_next_view = registry.get(NS, 1)

    assert in_this_view.revocation is None, "one view is one moment: kept to one decision"
    assert read_elsewhere.revocation is not None
    assert in_the_next_view.revocation is not None
    with pytest.raises(RevokedVersionError):
        registry.resolve_deployable(NS, 1)


# --- channels --------------------------------------------------------------------------------------------


def test_channel_assignment_keeps_history(registry: Registry) -> None:
    build(registry, "1")
    build(registry, "2")
    first = registry.assign_channel(NS, "production", 1, assigned_by="alice", reason="first release")
    second = registry.assign_channel(
        NS, "production", 2, assigned_by="bob", reason="promote", metadata={"flow_run": "abc"}
    )

    assert (first.from_version, first.to_version) == (None, 1)
    assert (second.from_version, second.to_version) == (1, 2)
    assert registry.channel_history(NS, "production") == [first, second]
    assert second.metadata == {"flow_run": "abc"}
    assert second.assigned_at >= first.assigned_at
    pointer = registry.get_channel(NS, "production")
    assert pointer is not None
    assert (pointer.version, pointer.updated_by, pointer.updated_at) == (2, "bob", second.assigned_at)
    assert [c.channel for c in registry.list_channels(NS)] == ["latest", "production"]
    assert registry.get_channel(NS, "staging") is None
    assert registry.channel_history(NS, "staging") == []


def test_an_emptied_channel_leaves_the_listing_and_keeps_who_and_why(registry: Registry) -> None:
    build(registry, "1")
    registry.assign_channel(NS, "staging", 1, assigned_by="alice", reason="deployed")

    emptied = registry.empty_channel(
        NS, "staging", assigned_by="carol", reason="staging torn down: retired", metadata={"requested_by": "ops"}
    )

    assert emptied is not None
    assert (emptied.from_version, emptied.to_version, emptied.assigned_by) == (1, None, "carol")
    assert registry.get_channel(NS, "staging") is None
    assert [c.channel for c in registry.list_channels(NS)] == ["latest"]
    assert registry.channel_history(NS, "staging")[-1] == emptied
    assert emptied.metadata == {"requested_by": "ops"}
    assert registry.empty_channel(NS, "staging", assigned_by="carol", reason="again") is None, "empty already"
    assert registry.empty_channel(NS, "never", assigned_by="carol", reason="none") is None
    with pytest.raises(InvalidChannelError, match="latest"):
        registry.empty_channel(NS, LATEST, assigned_by="carol", reason="no")
    # A deploy after it starts from the empty channel (a compare-and-swap from nothing).
    again = registry.assign_channel(NS, "staging", 1, assigned_by="dave", expected_version=None)
    assert isinstance(again, ChannelAssignment)
    assert (again.from_version, again.to_version) == (None, 1)


def test_latest_cannot_be_assigned_by_hand(registry: Registry) -> None:
    build(registry, "1")
    with pytest.raises(InvalidChannelError, match="latest"):
        registry.assign_channel(NS, LATEST, 1, assigned_by="alice")


def test_assigning_a_missing_version_raises_not_found(registry: Registry) -> None:
    build(registry, "1")
    with pytest.raises(VersionNotFoundError):
        registry.assign_channel(NS, "production", 5, assigned_by="alice")


def test_parent_version_follows_the_built_for_channel(registry: Registry) -> None:
    build(registry, "1")
    build(registry, "2")
    registry.assign_channel(NS, "production", 1, assigned_by="alice")
    hotfix = build(registry, "3", built_for="production")
    assert hotfix.version.parent_version == 1
    assert hotfix.version.built_for == "production"


# --- revocation ------------------------------------------------------------------------------------------


def test_latest_skips_revoked_versions(registry: Registry) -> None:
    for run in ("1", "2", "3"):
        build(registry, run)
    assert registry.revoke(NS, 3, revoked_by="alice", reason="broken boot") == [3]
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == 2
    moves = [(m.from_version, m.to_version) for m in registry.channel_history(NS, LATEST)]
    assert moves == [(None, 1), (1, 2), (2, 3), (3, 2)]

    registry.revoke(NS, 1, revoked_by="alice", reason="old")
    build(registry, "4")
    registry.revoke(NS, 4, revoked_by="alice", reason="also broken")
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == 2


def test_revoked_version_is_refused_for_assignment_and_deploy(registry: Registry) -> None:
    build(registry, "1")
    build(registry, "2")
    registry.assign_channel(NS, "production", 2, assigned_by="alice")
    registry.revoke(NS, 2, revoked_by="sec-team", reason="CVE-2026-0001")

    with pytest.raises(RevokedVersionError, match="CVE-2026-0001"):
        registry.assign_channel(NS, "staging", 2, assigned_by="alice")
    with pytest.raises(RevokedVersionError, match=r"acme/web v2 is revoked .* by sec-team: CVE-2026-0001"):
        registry.resolve_deployable(NS, 2)
    assert registry.resolve_deployable(NS, 1).version == 1
    revoked = registry.get(NS, 2)
    assert revoked.revocation is not None
    assert revoked.revocation.revoked_by == "sec-team"
    assert registry.revoke(NS, 2, revoked_by="bob", reason="again") == []
    assert registry.get(NS, 2).revocation == revoked.revocation


def test_future_revocation_takes_effect_only_from_its_time(s3_client: Any, s3_bucket: str) -> None:
    clock = FakeClock()
    registry = Registry(s3_client, s3_bucket, sealer=SEALER, clock=clock)
    build(registry, "1")
    build(registry, "2")
    when = clock.now + timedelta(hours=1)

    assert registry.revoke(NS, 2, revoked_by="alice", reason="sunset", at=when) == [2]
    assert registry.resolve_deployable(NS, 2).version == 2
    registry.assign_channel(NS, "production", 2, assigned_by="alice")
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == 2

    clock.now = when
    with pytest.raises(RevokedVersionError, match="sunset"):
        registry.resolve_deployable(NS, 2)
    with pytest.raises(RevokedVersionError):
        registry.assign_channel(NS, "staging", 2, assigned_by="alice")
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == 1


def test_cascade_revokes_descendants_only(registry: Registry) -> None:
    for run in ("1", "2", "3"):
        build(registry, run)  # 1 <- 2 <- 3 through `latest`
    registry.assign_channel(NS, "production", 1, assigned_by="alice")
    build(registry, "4", built_for="production")  # 1 <- 4
    registry.assign_channel(NS, "stable", 3, assigned_by="alice")
    build(registry, "5", built_for="stable")  # 3 <- 5
    build(registry, "6", built_for="production")  # 1 <- 6 (production still at 1)

    assert registry.revoke(NS, 2, revoked_by="alice", reason="bad base", cascade=True) == [2, 3, 5]
    states = {v.version: v.is_revoked() for v in registry.list_versions(NS)}
    assert states == {1: False, 2: True, 3: True, 4: False, 5: True, 6: False}
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == 6


def test_revocation_needs_a_reason(registry: Registry) -> None:
    build(registry, "1")
    with pytest.raises(ValueError, match="reason"):
        registry.revoke(NS, 1, revoked_by="alice", reason=" ")


# --- storage errors --------------------------------------------------------------------------------------


def test_missing_bucket_is_a_clear_storage_error(s3_client: Any) -> None:
    registry = Registry(s3_client, "no-such-bucket-here", sealer=SEALER)
    with pytest.raises(RegistryStorageError, match="'no-such-bucket-here' does not exist") as caught:
        build(registry, "1")
    assert "testing" not in str(caught.value)
    with pytest.raises(RegistryStorageError, match="no-such-bucket-here"):
        registry.list_namespaces()


def test_unreachable_endpoint_is_a_storage_error(s3_bucket: str) -> None:
    from examples.local_env import free_port

    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="secret-must-not-leak",
        config=boto3.session.Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(RegistryStorageError, match="could not be reached") as caught:
        Registry(client, s3_bucket, sealer=SEALER).get(NS, 1)
    assert "secret-must-not-leak" not in str(caught.value)


# --- block and CLI ---------------------------------------------------------------------------------------


def make_block(moto_endpoint: str, bucket: str) -> ArtifactRegistry:
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": moto_endpoint},
    )
    return ArtifactRegistry(bucket=bucket, aws_credentials=credentials, signing_key=SIGNING_KEY)


def test_block_builds_a_working_registry_and_plan_store(moto_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
    block = make_block(moto_endpoint, s3_bucket)
    registry = block.registry()
    build(registry, "1")
    block.plan_store().put("prod", "run-1", b"plan")

    keys = {item["Key"] for item in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "registry/namespaces/acme/web/versions/00000001.json" in keys
    assert "registry/plans/prod/run-1.tfplan" in keys
    assert block.registry().get(NS, 1).artifacts == {"us-east-1": "ami-1"}


def cli(moto_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    monkeypatch.setenv(SIGNING_KEY_ENV, SIGNING_KEY)

    def run(*argv: str) -> int:
        return registry_cli(["--bucket", bucket, "--endpoint-url", moto_endpoint, "--region", "us-east-1", *argv])

    return run


def test_cli_prints_versions_show_channels_and_history(
    moto_endpoint: str,
    s3_client: Any,
    s3_bucket: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = Registry(s3_client, s3_bucket, prefix="registry/", sealer=SEALER)
    build(registry, "1")
    build(registry, "2")
    registry.revoke(NS, 2, revoked_by="alice", reason="broken")
    registry.assign_channel(NS, "production", 1, assigned_by="alice", reason="go")
    run = cli(moto_endpoint, s3_bucket, monkeypatch)

    assert run("namespaces") == 0
    assert capsys.readouterr().out.splitlines() == [NS]

    assert run("versions", NS) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["v1", "v2"]
    assert "\tok\t" in lines[0]
    assert "\trevoked\t" in lines[1]
    assert "us-east-1=ami-2" in lines[1]

    assert run("show", NS, "2") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2
    assert shown["revocation"]["reason"] == "broken"

    assert run("channels", NS) == 0
    assert [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines()] == [
        ["latest", "v1"],
        ["production", "v1"],
    ]

    assert run("history", NS, "production") == 0
    assert "nothing -> v1\talice\tgo" in capsys.readouterr().out


def test_cli_reports_errors_without_a_traceback(
    moto_endpoint: str, s3_bucket: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cli(moto_endpoint, s3_bucket, monkeypatch)
    assert run("show", NS, "9") == 1
    assert "no version 9" in capsys.readouterr().err
    assert run("versions", "Not A Namespace") == 1
    assert "org/name" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_loads_a_saved_block(
    prefect_server: Any, moto_endpoint: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    block = make_block(moto_endpoint, s3_bucket)
    build(block.registry(), "1")
    block.save("registry-cli-test", overwrite=True)

    assert registry_cli(["--block", "registry-cli-test", "versions", NS]) == 0
    assert capsys.readouterr().out.startswith("v1\t")


# --- integrity: records altered outside the registry are refused ------------------------------------------


def _rewrite(s3_client: Any, bucket: str, key: str, change: Callable[[dict[str, Any]], None]) -> None:
    envelope = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    change(envelope)
    s3_client.put_object(Bucket=bucket, Key=key, Body=json.dumps(envelope).encode())


def test_a_rewritten_manifest_is_refused_naming_the_object(registry: Registry, s3_client: Any, s3_bucket: str) -> None:
    build(registry, "1", artifacts={"local": "/images/web-1.tar.gz"}, artifact_sha256={"local": "ab" * 32})
    key = "registry/namespaces/acme/web/versions/00000001.json"

    def doctor(envelope: dict[str, Any]) -> None:
        envelope["payload"]["artifact_sha256"] = {"local": "cd" * 32}

    _rewrite(s3_client, s3_bucket, key, doctor)
    with pytest.raises(RegistryIntegrityError, match=f"{key} was altered outside the registry"):
        registry.get(NS, 1)
    with pytest.raises(RegistryIntegrityError):
        registry.resolve_deployable(NS, 1)


def test_a_record_copied_over_another_key_is_refused(registry: Registry, s3_client: Any, s3_bucket: str) -> None:
    build(registry, "1")
    build(registry, "2")
    prefix = "registry/namespaces/acme/web/versions/"
    body = s3_client.get_object(Bucket=s3_bucket, Key=f"{prefix}00000001.json")["Body"].read()
    s3_client.put_object(Bucket=s3_bucket, Key=f"{prefix}00000002.json", Body=body)
    with pytest.raises(RegistryIntegrityError):
        registry.get(NS, 2)


def test_a_deleted_revocation_still_revokes(registry: Registry, s3_client: Any, s3_bucket: str) -> None:
    build(registry, "1")
    build(registry, "2")
    registry.revoke(NS, 2, revoked_by="sec", reason="CVE")
    s3_client.delete_object(Bucket=s3_bucket, Key="registry/namespaces/acme/web/revocations/00000002.json")
    with pytest.raises(RevokedVersionError, match="revocation record missing"):
        registry.resolve_deployable(NS, 2)


def test_a_forged_channel_pointer_is_refused(registry: Registry, s3_client: Any, s3_bucket: str) -> None:
    build(registry, "1")
    build(registry, "2")
    registry.assign_channel(NS, "production", 1, assigned_by="alice")
    key = "registry/namespaces/acme/web/channels/production.json"

    def forge(envelope: dict[str, Any]) -> None:
        envelope["payload"]["version"] = 2

    _rewrite(s3_client, s3_bucket, key, forge)
    with pytest.raises(RegistryIntegrityError):
        registry.get_channel(NS, "production")


def test_another_key_cannot_read_the_registry(registry: Registry, s3_client: Any, s3_bucket: str) -> None:
    build(registry, "1")
    stranger = Registry(s3_client, s3_bucket, prefix="registry/", sealer=Sealer(b"another-registry-key"))
    with pytest.raises(RegistryIntegrityError):
        stranger.get(NS, 1)


# --- look-ups a deploy makes are a fixed number of requests -------------------------------------------------


def test_find_build_and_artifact_lookups(registry: Registry) -> None:
    first = build(registry, "1", git_commit="c1", labels={"service_name": "web"})
    build(registry, "2", git_commit="c2", labels={"service_name": "web"})
    again = build(registry, "3", git_commit="c1", labels={"service_name": "web"}, rebuild_of=1)
    other = build(registry, "4", git_commit="c1", labels={"service_name": "api"}, rebuild_of=3)

    assert registry.find_build(NS, commit="c1", service_name="web", platform="us-east-1") == again.version
    assert registry.find_build(NS, commit="c1", service_name="api", platform="us-east-1") == other.version
    assert registry.find_build(NS, commit="c1", service_name="web", platform="eu-west-1") is None
    assert registry.find_build(NS, commit="nope", service_name="web", platform="us-east-1") is None
    registry.revoke(NS, 3, revoked_by="alice", reason="bad")
    assert registry.find_build(NS, commit="c1", service_name="web", platform="us-east-1") == first.version
    assert registry.find_by_artifact_id(NS, "ami-2") is not None
    assert registry.last_version(NS) == 4
    assert registry.next_build_label(NS) == "5"


def test_assignment_with_an_expected_version_does_not_undo_a_later_move(registry: Registry) -> None:
    build(registry, "1")
    build(registry, "2")
    build(registry, "3")
    registry.assign_channel(NS, "production", 1, assigned_by="alice")
    hotfix = registry.assign_channel(NS, "production", 3, assigned_by="bob", reason="hotfix", expected_version=1)
    assert isinstance(hotfix, ChannelAssignment)
    stale = registry.assign_channel(NS, "production", 2, assigned_by="carol", expected_version=1)
    assert stale == ChannelMoved(channel="production", expected_version=1, actual_version=3)
    assert [m.to_version for m in registry.channel_history(NS, "production")] == [1, 3]


def test_a_teardown_of_a_latest_follower_names_latest_not_the_last_version_number(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from icd import operations
    from icd.config import parse_config
    from icd.deploy.queue import WorkspaceQueue
    from icd.deploy.queue_store import MemoryQueueStore

    config = parse_config(
        f'[namespaces."{NS}"]\nrepository = "https://example.com/web.git"\nservice_name = "web"\n'
        f'[workspaces.staging]\nfollows = "{NS}@latest"\nstack = "examples/stacks/local"\n'
    )
    for run in ("1", "2", "3"):
        build(registry, run)
    registry.revoke(NS, 3, revoked_by="alice", reason="broken boot")
    emitted: list[Any] = []
    monkeypatch.setattr(operations.events, "emit", emitted.append)
    monkeypatch.setattr("icd.deploy.dispatch.start_deploy_run", lambda request: "run-1")

    queue = WorkspaceQueue(MemoryQueueStore())
    request = operations.request_teardown(registry, queue, config, "staging", by="ops", why="retired")

    assert request.version == 2  # v3 is revoked: a teardown naming it would be refused by the deploy
    assert [(spec.event, spec.payload["version"]) for spec in emitted] == [
        ("icd.teardown.requested", 2),
        ("icd.plan.requested", 2),
        ("icd.plan.dispatched", 2),
    ]
    queued = queue.read("staging")
    assert queued is not None
    assert queued.desired is not None
    assert (queued.desired.version, queued.desired.teardown) == (2, True)


# --- one version per commit, and one build of a commit at a time --------------------------------------------

LEASE = timedelta(hours=1)


def test_a_second_build_of_a_commit_gets_the_commits_version_and_is_not_registered(registry: Registry) -> None:
    first = build(registry, "1", git_commit="c1")
    second = build(registry, "2", git_commit="c1", artifacts={"us-east-1": "ami-2"})

    assert (first.created, second.created) == (True, False)
    assert second.version == first.version
    assert second.version.packer_run_uuid == "run-1", "the second build's facts are not recorded"
    assert [v.version for v in registry.list_versions(NS)] == [1]
    assert registry.commit_versions(NS, "c1") == [1]
    assert registry.find_by_artifact_id(NS, "ami-2") is None


def test_a_rebuild_of_the_newest_version_makes_the_next_one_and_a_stale_rebuild_gets_it(registry: Registry) -> None:
    build(registry, "1", git_commit="c1")
    rebuilt = build(registry, "2", git_commit="c1", rebuild_of=1)
    stale = build(registry, "3", git_commit="c1", rebuild_of=1)
    again = build(registry, "4", git_commit="c1", rebuild_of=2)

    assert (rebuilt.created, rebuilt.version.version) == (True, 2)
    assert (stale.created, stale.version.version) == (False, 2), "two rebuilds of v1 make one version"
    assert (again.created, again.version.version) == (True, 3)
    assert registry.commit_versions(NS, "c1") == [1, 2, 3]


@pytest.mark.parametrize("writers", crowds(20))
@pytest.mark.parametrize("rebuild_of", [None, 1], ids=["builds", "rebuilds-of-v1"])
def test_builds_of_one_commit_registering_at_once_make_one_version(
    registry: Registry, rebuild_of: int | None, writers: int
) -> None:
    """Past the build claim (a holder whose lease ran out while it still built): the registry alone decides."""
    if rebuild_of is not None:
        build(registry, "first", git_commit="c1")
    barrier = threading.Barrier(writers)

    def register_build(index: int) -> RegistrationResult:
        barrier.wait()
        return build(registry, f"{index:02d}", git_commit="c1", rebuild_of=rebuild_of)

    with ThreadPoolExecutor(max_workers=writers) as pool:
        results = list(pool.map(register_build, range(writers)))

    assert sum(result.created for result in results) == 1
    [number] = {result.version.version for result in results}
    expected = [number] if rebuild_of is None else [1, number]
    assert [v.version for v in registry.list_versions(NS)] == expected
    assert registry.commit_versions(NS, "c1") == expected
    latest = registry.get_channel(NS, LATEST)
    assert latest is not None
    assert latest.version == number


def test_a_number_left_by_a_registration_that_died_is_completed_by_the_next_build_of_the_commit(
    registry: Registry,
) -> None:
    # A registration that died after its number was given to the commit, before the version was written.
    assert registry._number_for_commit(NS, "c1", "run-dead", rebuild_of=None) == 1
    assert registry.list_versions(NS) == []

    completed = build(registry, "next", git_commit="c1")
    retried = build(registry, "dead", git_commit="c1")

    assert (completed.created, completed.version.version, completed.version.packer_run_uuid) == (True, 1, "run-next")
    assert (retried.created, retried.version) == (False, completed.version)
    assert [v.version for v in registry.list_versions(NS)] == [1]


def _claim(registry: Registry, run: str, *, alive: bool = True, asked: list[str] | None = None) -> Any:
    def run_alive(run_id: str) -> bool:
        if asked is not None:
            asked.append(run_id)
        return alive

    return registry.claim_build(NS, "c1", run_id=run, run_name=f"name-{run}", lease=LEASE, run_alive=run_alive)


@pytest.mark.parametrize(
    ("before", "alive", "wins", "takes_over", "asks"),
    [
        ("nobody", True, True, False, False),
        ("released", True, True, False, False),
        ("held by a running run", True, False, False, True),
        ("held by a run that ended", False, True, True, True),
        ("held past its lease", True, True, True, False),
        ("held by this run", True, True, False, False),
    ],
)
def test_who_gets_a_commits_build_claim(
    s3_client: Any, s3_bucket: str, before: str, alive: bool, wins: bool, takes_over: bool, asks: bool
) -> None:
    clock = FakeClock()
    registry = Registry(s3_client, s3_bucket, prefix="registry/", sealer=SEALER, clock=clock)
    if before != "nobody":
        _claim(registry, "me" if before == "held by this run" else "first")
    if before == "released":
        assert registry.release_build(NS, "c1", run_id="first", outcome="registered v1")
    if before == "held past its lease":
        clock.now += LEASE + timedelta(seconds=1)
    asked: list[str] = []

    outcome = _claim(registry, "me", alive=alive, asked=asked)

    assert isinstance(outcome, BuildClaimed if wins else BuildHeld)
    assert asked == (["first"] if asks else []), "liveness is asked only about an unexpired holder"
    stored = registry.build_claim(NS, "c1")
    assert stored is not None
    assert stored.holder_run_id == ("me" if wins else "first")
    if isinstance(outcome, BuildHeld):
        assert (outcome.holder.holder_run_id, outcome.holder.holder_run_name) == ("first", "name-first")
    else:
        assert outcome.claim == stored
        assert outcome.claim.expires_at == clock.now + LEASE
        assert (outcome.taken_over.holder_run_id if outcome.taken_over else None) == ("first" if takes_over else None)


@pytest.mark.parametrize("runs", crowds(50))
def test_runs_claiming_one_commit_at_once_one_builds_and_the_rest_name_it(registry: Registry, runs: int) -> None:
    barrier = threading.Barrier(runs)

    def claim(index: int) -> Any:
        barrier.wait()
        return _claim(registry, f"run-{index:02d}")

    with ThreadPoolExecutor(max_workers=runs) as pool:
        outcomes = list(pool.map(claim, range(runs)))

    [winner] = [outcome.claim for outcome in outcomes if isinstance(outcome, BuildClaimed)]
    assert {outcome.holder for outcome in outcomes if isinstance(outcome, BuildHeld)} == {winner}
    assert registry.build_claim(NS, "c1") == winner


def test_only_the_holder_releases_its_claim_and_a_release_records_the_outcome(s3_client: Any, s3_bucket: str) -> None:
    clock = FakeClock()
    registry = Registry(s3_client, s3_bucket, prefix="registry/", sealer=SEALER, clock=clock)
    _claim(registry, "first")
    clock.now += LEASE * 2
    took = _claim(registry, "second")
    assert isinstance(took, BuildClaimed)

    assert registry.release_build(NS, "c1", run_id="first", outcome="registered v1") is False, "its lease ran out"
    assert registry.release_build(NS, "c1", run_id="second", outcome="registered v1") is True
    assert registry.release_build(NS, "c1", run_id="second", outcome="again") is False
    stored = registry.build_claim(NS, "c1")
    assert stored is not None
    assert (stored.holder_run_id, stored.released_at, stored.outcome) == ("second", clock.now, "registered v1")
    assert registry.release_build(NS, "never", run_id="second", outcome="x") is False


def test_a_claim_needs_a_positive_lease(registry: Registry) -> None:
    with pytest.raises(ValueError, match="positive lease"):
        registry.claim_build(NS, "c1", run_id="r", run_name="n", lease=timedelta(0))


@pytest.mark.parametrize("deliveries", crowds(50))
def test_deliveries_of_one_push_at_once_build_once_and_register_one_version(
    registry: Registry, deliveries: int
) -> None:
    """The build flow's protocol (flows/build_artifact.py) run by many threads at once: claim, then reuse or
    build and register, then release. One builds; every other one is a duplicate or reuses its version."""
    barrier = threading.Barrier(deliveries)
    built: list[str] = []

    def deliver(index: int) -> tuple[str, int | None]:
        run = f"run-{index:02d}"
        barrier.wait()
        outcome = _claim(registry, run)
        if isinstance(outcome, BuildHeld):
            return "duplicate", None
        found = registry.find_build(NS, commit="c1", service_name="web", platform="us-east-1")
        if found is not None:
            result = found
        else:
            built.append(run)
            registered = build(
                registry,
                f"packer-{index:02d}",
                git_commit="c1",
                labels={"service_name": "web", "build_run_id": run},
                rebuild_of=outcome.versions[-1] if outcome.versions else None,
            )
            result = registered.version
        assert registry.release_build(NS, "c1", run_id=run, outcome=f"v{result.version}")
        return ("built" if found is None else "reused"), result.version

    with ThreadPoolExecutor(max_workers=deliveries) as pool:
        outcomes = list(pool.map(deliver, range(deliveries)))

    assert len(built) == 1
    assert [kind for kind, _ in outcomes].count("built") == 1
    assert {version for _, version in outcomes if version is not None} == {1}
    assert [v.version for v in registry.list_versions(NS)] == [1]
    assert registry.last_version(NS) == 1, "no number was given out and left unused"
    assert registry.list_versions(NS)[0].labels["build_run_id"] == built[0]
