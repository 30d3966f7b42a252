"""The rollout path as tables: which slots each batch moves, what the stack is given, and which batch plans
stay on the approved path (icd/deploy/rollout.py). Pure, fast."""

from __future__ import annotations

import json
from typing import Any

import pytest

from icd.config import WorkspaceConfig
from icd.deploy.rollout import (
    ResourceDelta,
    RolloutPath,
    Slot,
    describe_mix,
    deviation,
    encode_instances,
    plan_path,
    resource_deltas,
    slots_of_state,
)
from icd.tools.terraform import Plan, ResourceChange

V1 = Slot("/images/v1.tar.gz", "1.0.1", 1)
V2 = Slot("/images/v2.tar.gz", "1.0.2", 2)
V3 = Slot("/images/v3.tar.gz", "1.0.3", 3)


def path(start: list[Slot | None], instances: int, max_parallel: int, target: Slot = V2) -> RolloutPath:
    return plan_path(
        workspace="prod",
        target=target,
        start=start,
        instances=instances,
        max_parallel=max_parallel,
        min_healthy_seconds=10,
        healthy_deadline_seconds=60,
        progress_deadline_seconds=600,
        auto_revert=True,
    )


@pytest.mark.parametrize(
    ("start", "instances", "max_parallel", "batches"),
    [
        ([V1] * 4, 4, 1, [(0,), (1,), (2,), (3,)]),
        ([V1] * 4, 4, 2, [(0, 1), (2, 3)]),
        ([V1] * 4, 4, 4, [(0, 1, 2, 3)]),  # max_parallel = instances: today's all-at-once deploy
        ([V1] * 5, 5, 2, [(0, 1), (2, 3), (4,)]),
        ([], 3, 1, [(0,), (1,), (2,)]),  # a first deploy creates the slots a batch at a time
        ([V2, V2, V1, V1], 4, 1, [(2,), (3,)]),  # slots on the target already are left alone
        ([V2, V1, V3, V1], 4, 2, [(1, 2), (3,)]),  # a mix left by a superseded rollout
        ([V1] * 2, 4, 2, [(0, 1), (2, 3)]),  # grow
        ([V1] * 4, 2, 1, [(0,), (1, 2, 3)]),  # shrink: the removed slots go with the last batch
        ([V2] * 4, 2, 1, [(2, 3)]),  # only a shrink
        ([V2] * 4, 4, 1, [()]),  # no slot moves: one step, for whatever else the plan changes
        ([None, V1], 2, 1, [(0,), (1,)]),
    ],
)
def test_batches_move_the_slots_not_on_the_target_in_order(
    start: list[Slot | None], instances: int, max_parallel: int, batches: list[tuple[int, ...]]
) -> None:
    assert list(path(start, instances, max_parallel).batches) == batches


@pytest.mark.parametrize(
    ("start", "instances", "max_parallel", "after"),
    [
        ([V1] * 4, 4, 1, [[V2, V1, V1, V1], [V2, V2, V1, V1], [V2, V2, V2, V1], [V2] * 4]),
        ([], 3, 2, [[V2, V2], [V2, V2, V2]]),
        ([V1] * 4, 2, 1, [[V2, V1, V1, V1], [V2, V2]]),
        ([V1] * 2, 4, 2, [[V2, V2], [V2] * 4]),
        ([V2, V1, V3, V1], 4, 2, [[V2, V2, V2, V1], [V2] * 4]),
    ],
)
def test_the_stack_is_given_every_slot_after_each_batch(
    start: list[Slot | None], instances: int, max_parallel: int, after: list[list[Slot]]
) -> None:
    rollout = path(start, instances, max_parallel)
    assert [list(rollout.slots_after(batch)) for batch in range(rollout.total)] == after


def test_only_a_uniform_start_can_be_reverted_to() -> None:
    assert path([V1] * 3, 3, 1).revert_to == (V1, V1, V1)
    assert path([V1, V3, V1], 3, 1).revert_to is None, "a mix is no version that went fully healthy"
    assert path([], 3, 1).revert_to is None, "a first deploy has nothing to go back to"
    assert path([None, V1], 2, 1).revert_to is None


def test_the_instances_variable_is_json_with_hcl_templates_escaped() -> None:
    odd = Slot("/images/${path.module}/%{ if true }x.tar.gz", "1.0", None)
    text = encode_instances([V1, odd])
    assert "$${path.module}" in text
    assert "%%{ if" in text
    # Terraform reads "$${" back as "${": unescaped, this is the JSON of what the stack gets.
    decoded = json.loads(text.replace("$${", "${").replace("%%{", "%{"))
    assert decoded == [
        {"artifact_id": "/images/v1.tar.gz", "artifact_version": "1.0.1"},
        {"artifact_id": odd.artifact_id, "artifact_version": "1.0"},
    ]


def test_a_mix_is_told_by_version_in_slot_order() -> None:
    assert describe_mix([V2, V1, V1, V1]) == "1 x v2 (slot 0), 3 x v1 (slots 1, 2, 3)"
    assert describe_mix([]) == "no instance"


def _replace(slot: int, target: Slot = V2, extra: dict[str, Any] | None = None) -> ResourceChange:
    before = {"id": "1", "triggers": {"artifact_id": V1.artifact_id, "artifact_version": "1.0.1", "namespace": "a/b"}}
    after = {
        "triggers": {"artifact_id": target.artifact_id, "artifact_version": target.build_label, "namespace": "a/b"}
    }
    after["triggers"] |= extra or {}
    return ResourceChange(
        f"null_resource.instance[{slot}]", "null_resource", "instance", ("create", "delete"), before, after
    )


def _deltas(*changes: ResourceChange) -> tuple[ResourceDelta, ...]:
    return resource_deltas(Plan("1.0", "1.0.3", tuple(changes), (), "0" * 64))


def test_the_deltas_name_the_changed_attributes() -> None:
    [delta] = _deltas(_replace(0))
    assert (delta.base, delta.slot, delta.action) == ("null_resource.instance", 0, "replace")
    assert delta.changed == ("id", "triggers.artifact_id", "triggers.artifact_version")
    assert delta.after_artifact == V2.artifact_id


ROLLOUT = path([V1] * 4, 4, 1)
APPROVED = _deltas(_replace(0))


@pytest.mark.parametrize(
    ("batch", "changes", "problem"),
    [
        (1, [_replace(1)], None),
        (3, [_replace(3)], None),
        (1, [_replace(2)], "null_resource.instance[2] (replace) is slot 2, not in batch 2 (slots 1)"),
        (1, [_replace(1), _replace(2)], "is slot 2, not in batch 2"),
        (1, [_replace(1, V3)], "deploys /images/v3.tar.gz, not v2"),
        (1, [_replace(1, extra={"namespace": "evil/ns"})], "changes triggers.namespace, which the approved plan"),
        (
            1,
            [_replace(1), ResourceChange("null_resource.extra", "null_resource", "extra", ("create",), None, {})],
            "null_resource.extra (create) is not an instance the approved rollout changes",
        ),
        (
            1,
            [ResourceChange("null_resource.instance[1]", "null_resource", "instance", ("update",), {"a": 1}, {"a": 2})],
            "the approved plan made no update of null_resource.instance",
        ),
        (
            1,
            [ResourceChange("null_resource.instance[1]", "null_resource", "instance", ("delete",), {"a": 1}, None)],
            "would remove slot 1, which the rollout keeps",
        ),
    ],
)
def test_a_later_batch_may_change_only_its_own_slots_as_the_approved_batch_did(
    batch: int, changes: list[ResourceChange], problem: str | None
) -> None:
    found = deviation(ROLLOUT, batch, _deltas(*changes), APPROVED)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found, found


def test_a_shrink_removes_only_the_slots_the_path_removes() -> None:
    shrink = path([V1] * 4, 2, 1)
    removal = [
        ResourceChange(f"null_resource.instance[{slot}]", "null_resource", "instance", ("delete",), {"a": 1}, None)
        for slot in (2, 3)
    ]
    assert deviation(shrink, 1, _deltas(_replace(1), *removal), APPROVED) is None


def test_slots_are_read_from_counted_resources_that_carry_an_artifact() -> None:
    state = [
        ("null_resource.instance[1]", {"triggers": {"artifact_id": "/b", "artifact_version": "2"}}),
        ("null_resource.instance[0]", {"triggers": {"artifact_id": "/a", "artifact_version": "1"}}),
        ("null_resource.single", {"triggers": {"artifact_id": "/c"}}),
        ("null_resource.other[0]", {"triggers": {"x": "y"}}),
    ]
    assert slots_of_state(state) == {0: ("/a", "1"), 1: ("/b", "2")}


@pytest.mark.parametrize(
    ("rollout", "error"),
    [
        ({"instances": 0}, "greater than or equal to 1"),
        ({"min_healthy_time_seconds": 30}, "must be shorter than the healthy deadline (30 s)"),
        ({"min_healthy_time_seconds": 5, "healthy_deadline_seconds": 5}, "must be shorter"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_a_rollout_policy_that_could_never_pass_is_refused(rollout: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match="rollout") as raised:
        WorkspaceConfig(follows="a/b@latest", stack="s", health_deadline_seconds=30, rollout=rollout)
    assert error in str(raised.value)


def test_without_a_rollout_table_a_workspace_deploys_as_before() -> None:
    settings = WorkspaceConfig(follows="a/b@latest", stack="s", rollback_on_unhealthy=False)
    assert settings.rollout is None
    assert (settings.batch_deadline_seconds, settings.auto_revert) == (60.0, False)
    rolled = WorkspaceConfig(follows="a/b@latest", stack="s", rollout={"instances": 3, "auto_revert": True})
    assert rolled.rollout is not None
    assert rolled.rollout.batch_size == 1
    assert rolled.auto_revert
