"""Saved Terraform plans in a real moto S3 server over HTTP."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from icd.errors import InvalidChannelError, PlanIntegrityError, RegistryStorageError, VersionNotFoundError
from icd.registry.plans import PlanStore, StoredPlan

PLAN = b"\x50\x4b\x03\x04 a terraform plan is a zip file"


@pytest.fixture
def store(s3_client: Any, s3_bucket: str) -> PlanStore:
    return PlanStore(s3_client, s3_bucket, prefix="registry/plans/")


def test_round_trip(store: PlanStore, s3_client: Any, s3_bucket: str) -> None:
    stored = store.put("prod", "flow-run-1", PLAN, metadata={"approved-by": "alice"})

    assert stored == StoredPlan(
        key="registry/plans/prod/flow-run-1.tfplan", sha256=hashlib.sha256(PLAN).hexdigest(), size=len(PLAN)
    )
    assert store.get("prod", "flow-run-1") == PLAN
    assert store.get("prod", "flow-run-1", expected_sha256=stored.sha256) == PLAN
    assert store.sha256_of("prod", "flow-run-1") == stored.sha256
    head = s3_client.head_object(Bucket=s3_bucket, Key=stored.key)
    assert head["Metadata"]["approved-by"] == "alice"


def test_put_is_idempotent_for_identical_bytes_and_refuses_others(store: PlanStore) -> None:
    first = store.put("prod", "flow-run-1", PLAN)
    assert store.put("prod", "flow-run-1", PLAN) == first
    with pytest.raises(PlanIntegrityError, match="different plan is already stored"):
        store.put("prod", "flow-run-1", PLAN + b"tampered")
    assert store.get("prod", "flow-run-1") == PLAN


def test_object_replaced_behind_our_back_is_detected(store: PlanStore, s3_client: Any, s3_bucket: str) -> None:
    stored = store.put("prod", "flow-run-1", PLAN)
    # Keep the recorded hash, swap the bytes: what a careless manual upload would do.
    s3_client.put_object(Bucket=s3_bucket, Key=stored.key, Body=b"other plan", Metadata={"sha256": stored.sha256})
    with pytest.raises(PlanIntegrityError, match="refusing to use it"):
        store.get("prod", "flow-run-1")


def test_plan_without_recorded_hash_is_refused(store: PlanStore, s3_client: Any, s3_bucket: str) -> None:
    stored = store.put("prod", "flow-run-1", PLAN)
    s3_client.put_object(Bucket=s3_bucket, Key=stored.key, Body=PLAN)
    with pytest.raises(PlanIntegrityError):
        store.get("prod", "flow-run-1")


def test_expected_hash_mismatch_is_refused(store: PlanStore) -> None:
    store.put("prod", "flow-run-1", PLAN)
    with pytest.raises(PlanIntegrityError, match="was approved"):
        store.get("prod", "flow-run-1", expected_sha256="0" * 64)


def test_missing_plan(store: PlanStore) -> None:
    assert store.sha256_of("prod", "nope") is None
    with pytest.raises(VersionNotFoundError, match="no saved plan"):
        store.get("prod", "nope")


@pytest.mark.parametrize(("workspace", "run_id"), [("Prod", "r1"), ("prod/eu", "r1"), ("prod", "../x"), ("prod", "")])
def test_names_are_validated(store: PlanStore, workspace: str, run_id: str) -> None:
    with pytest.raises((InvalidChannelError, ValueError)):
        store.put(workspace, run_id, PLAN)


def test_missing_bucket_is_a_storage_error(s3_client: Any) -> None:
    with pytest.raises(RegistryStorageError, match="'no-such-plan-bucket' does not exist"):
        PlanStore(s3_client, "no-such-plan-bucket").put("prod", "r1", PLAN)
