"""The drift report, its ignore list and fingerprint, and what a check tells (icd/deploy/drift.py), as tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from icd.config import DriftIgnore
from icd.deploy.drift import (
    AttributeDrift,
    DriftedItem,
    DriftMemory,
    DriftReport,
    apply_ignores,
    attribute_drift,
    build_report,
    consul_drift,
    decide,
    deploy_run_of,
    drift_notice,
    due,
    fingerprint,
    table_rows,
    terraform_drift,
)
from icd.health.snapshot import InstanceHealth, ServiceEntry
from icd.tools.terraform import OutputChange, Plan, parse_plan_json

FIXTURES = Path(__file__).parent / "fixtures" / "terraform" / "plan_json"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WS = "prod"


def entry(service_id: str, **meta: str) -> ServiceEntry:
    return ServiceEntry(InstanceHealth("node-1", service_id, "web", ()), meta)


def item(address: str, *changes: tuple[str, object, object]) -> DriftedItem:
    return DriftedItem(address, "changed", tuple(AttributeDrift(*change) for change in changes))


def report(*items: DriftedItem) -> DriftReport:
    return DriftReport(WS, tuple(items))


def ignore(address: str, attribute: str | None = None) -> DriftIgnore:
    return DriftIgnore(address=address, attribute=attribute, by="alice", why="managed by hand")


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param({"a": 1}, {"a": 1}, [], id="same"),
        pytest.param({"t": {"x": "1", "y": "2"}}, {"t": {"x": "9", "y": "2"}}, [("t.x", "1", "9")], id="nested"),
        pytest.param({"l": ["a", "b"]}, {"l": ["a"]}, [("l.1", "b", None)], id="list-shrinks"),
        pytest.param({"p": "(sensitive)"}, {"p": "(sensitive)"}, [], id="redacted-stays-equal"),
    ],
)
def test_attribute_drift(before: object, after: object, expected: list[tuple[str, object, object]]) -> None:
    assert [(c.path, c.before, c.after) for c in attribute_drift(before, after)] == expected


def test_terraform_drift_from_the_pinned_terraforms_refresh_plan() -> None:
    plan = parse_plan_json((FIXTURES / "refresh_only_output_drift_terraform_1.0.3.json").read_text(), sha256="0")
    found = build_report(WS, plan=plan, state_service_ids=[], consul_entries=[], ignores=[])
    assert [(i.address, i.kind, i.describe()) for i in found.items] == [
        ("output.artifact_id", "output", "value: v1 → hand")
    ]


@pytest.mark.parametrize(
    ("state_id", "entries", "expected"),
    [
        pytest.param("web-prod-1", [entry("web-prod-1", workspace=WS)], [], id="clean"),
        pytest.param("web-prod-1", [], [("consul.web-prod-1", "missing-from-consul")], id="deregistered"),
        pytest.param(
            "web-prod-1",
            [entry("web-prod-1", workspace=WS), entry("web-prod-0", workspace=WS, deploy_run_id="r0")],
            [("consul.web-prod-0", "unknown-in-consul")],
            id="left-behind",
        ),
        pytest.param("web-prod-1", [entry("web-prod-1"), entry("web-stage-1", workspace="stage")], [], id="not-ours"),
        pytest.param(
            None, [entry("web-prod-1", workspace=WS)], [("consul.web-prod-1", "unknown-in-consul")], id="no-state"
        ),
    ],
)
def test_consul_drift(state_id: str | None, entries: list[ServiceEntry], expected: list[tuple[str, str]]) -> None:
    assert [(i.address, i.kind) for i in consul_drift(WS, [state_id] if state_id else [], entries)] == expected


FLEET = ["web-prod-0-2", "web-prod-1-2", "web-prod-2-2"]  # a fleet's service_ids output, in slot order


@pytest.mark.parametrize(
    ("expected_ids", "entries", "expected"),
    [
        pytest.param(FLEET, [entry(sid, workspace=WS) for sid in FLEET], [], id="all-registered"),
        pytest.param(
            FLEET,
            [entry(sid, workspace=WS) for sid in FLEET[:2]],
            [("consul.web-prod-2-2", "missing-from-consul")],
            id="one-deregistered",
        ),
        pytest.param(
            FLEET,
            [],
            [(f"consul.{sid}", "missing-from-consul") for sid in FLEET],
            id="all-deregistered",
        ),
        pytest.param(
            FLEET,
            [*(entry(sid, workspace=WS) for sid in FLEET), entry("web-prod-1-1", workspace=WS, deploy_run_id="r1")],
            [("consul.web-prod-1-1", "unknown-in-consul")],
            id="old-slot-left-behind",
        ),
        pytest.param(
            FLEET[:2],
            [entry(sid, workspace=WS) for sid in FLEET],
            [("consul.web-prod-2-2", "unknown-in-consul")],
            id="shrunk-but-still-registered",
        ),
        pytest.param(
            FLEET,
            [*(entry(sid, workspace=WS) for sid in FLEET), entry("web-stage-0-2", workspace="stage"), entry("x")],
            [],
            id="others-not-ours",
        ),
        pytest.param(
            [],
            [entry(sid, workspace=WS) for sid in FLEET],
            [(f"consul.{sid}", "unknown-in-consul") for sid in FLEET],
            id="no-state",
        ),
    ],
)
def test_consul_drift_of_a_fleet(
    expected_ids: list[str], entries: list[ServiceEntry], expected: list[tuple[str, str]]
) -> None:
    assert [(i.address, i.kind) for i in consul_drift(WS, expected_ids, entries)] == expected


def test_consul_drift_refuses_a_lone_service_id_string() -> None:
    with pytest.raises(TypeError, match="list of service IDs"):
        consul_drift(WS, "web-prod-1", [])


@pytest.mark.parametrize(
    ("expected_ids", "entries", "run"),
    [
        pytest.param(["web-prod-1"], [entry("web-prod-1", workspace=WS, deploy_run_id="r1")], "r1", id="single"),
        pytest.param(["web-prod-1"], [entry("web-prod-1", workspace=WS)], None, id="single-no-meta"),
        pytest.param([], [entry("web-prod-1", workspace=WS, deploy_run_id="r1")], None, id="no-state"),
        pytest.param(
            FLEET,
            [entry(FLEET[1], deploy_run_id="r2"), entry(FLEET[2], deploy_run_id="r3")],
            "r2",
            id="fleet-first-registered-slot",
        ),
        pytest.param(
            FLEET,
            [entry("web-prod-9-9", workspace=WS, deploy_run_id="other")],
            None,
            id="fleet-none-registered",
        ),
    ],
)
def test_deploy_run_of(expected_ids: list[str], entries: list[ServiceEntry], run: str | None) -> None:
    assert deploy_run_of(expected_ids, entries) == run


def test_a_fleet_report_names_the_deregistered_slot_and_the_run_of_another() -> None:
    entries = [entry(sid, workspace=WS, deploy_run_id="run-7") for sid in FLEET[:2]]
    found = build_report(WS, plan=None, state_service_ids=FLEET, consul_entries=entries, ignores=[])
    assert found.addresses == ("consul.web-prod-2-2",)
    assert found.touched_by == "run-7"
    ignored = build_report(
        WS, plan=None, state_service_ids=FLEET, consul_entries=entries, ignores=[ignore("consul.web-prod-2-*")]
    )
    assert not ignored.drifted
    assert len(ignored.ignored) == 1


def _output_plan(name: str, before: object, after: object) -> Plan:
    return Plan("1.0", "1.0.3", (), (OutputChange(name, ("update",), before, after),), sha256="0")


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param("v1", "hand", [("", "v1", "hand")], id="scalar-as-before"),
        pytest.param([True, True, True], [True, False, True], [("1", True, False)], id="one-slot-files-gone"),
        pytest.param([True, True], [True, True, True], [("2", None, True)], id="list-grows"),
        pytest.param(None, [], [("", None, [])], id="none-to-empty"),
    ],
)
def test_a_list_output_drifts_slot_by_slot(
    before: object, after: object, expected: list[tuple[str, object, object]]
) -> None:
    (drifted,) = terraform_drift(_output_plan("instance_present", before, after))
    assert (drifted.address, drifted.kind) == ("output.instance_present", "output")
    assert [(c.path, c.before, c.after) for c in drifted.changes] == expected


def test_list_outputs_fingerprint_past_a_shortened_value_and_ignore_by_slot() -> None:
    # Two long lists that differ only past show_value's 80 characters: the whole-value form would hash the
    # same shortened text; slot by slot, they don't.
    long = [f"web-production-{slot}-2-with-a-long-build-label" for slot in range(3)]
    moved = [*long[:2], "web-production-2-3-with-a-long-build-label"]
    same = terraform_drift(_output_plan("service_ids", long, [*long[:2], "x"]))
    other = terraform_drift(_output_plan("service_ids", long, moved))
    assert fingerprint(same) != fingerprint(other)
    gone = terraform_drift(_output_plan("instance_present", [True, True, True], [True, False, False]))
    left, hidden = apply_ignores(gone, [ignore("output.instance_present", "1")])
    assert [(i.address, [c.path for c in i.changes]) for i in left] == [("output.instance_present", ["2"])]
    assert len(hidden) == 1


@pytest.mark.parametrize(
    ("ignores", "kept", "hidden"),
    [
        pytest.param([], ["null_resource.instance: triggers.x, triggers.y"], 0, id="none"),
        pytest.param(
            [ignore("null_resource.instance", "triggers.x")], ["null_resource.instance: triggers.y"], 1, id="one-attr"
        ),
        pytest.param([ignore("null_resource.*", "triggers")], [], 2, id="attr-prefix-and-glob"),
        pytest.param([ignore("null_resource.instance")], [], 1, id="whole-resource"),
        pytest.param(
            [ignore("null_resource.other")], ["null_resource.instance: triggers.x, triggers.y"], 0, id="other"
        ),
        pytest.param(
            [ignore("null_resource.instance", "trig")],
            ["null_resource.instance: triggers.x, triggers.y"],
            0,
            id="not-a-path-prefix",
        ),
    ],
)
def test_ignore_list(ignores: list[DriftIgnore], kept: list[str], hidden: int) -> None:
    drifted = item("null_resource.instance", ("triggers.x", "1", "2"), ("triggers.y", "a", "b"))
    left, ignored = apply_ignores([drifted], ignores)
    assert [f"{i.address}: {', '.join(c.path for c in i.changes)}" for i in left] == kept
    assert len(ignored) == hidden
    assert all("by alice: managed by hand" in line for line in ignored)


def test_fingerprint_is_stable_and_names_the_set() -> None:
    a, b = item("x.a", ("v", 1, 2)), item("x.b", ("v", 1, 3))
    assert fingerprint([]) is None
    assert fingerprint([a, b]) == fingerprint([b, a])
    assert fingerprint([a]) != fingerprint([a, b])
    assert fingerprint([a]) != fingerprint([item("x.a", ("v", 1, 5))]), "a new value is a change of the drift"


A = report(item("x.a", ("v", 1, 2)))
AB = report(item("x.a", ("v", 1, 2)), item("x.b", ("v", 1, 3)))
CLEAN = report()


def _memory(fp_of: DriftReport | None = None, error: str | None = None) -> DriftMemory:
    fp = fp_of.fingerprint if fp_of else None
    return DriftMemory(workspace=WS, fingerprint=fp, addresses=list(fp_of.addresses) if fp_of else [], error=error)


@pytest.mark.parametrize(
    ("memory", "found", "error", "tell"),
    [
        pytest.param(None, CLEAN, None, None, id="first-check-clean"),
        pytest.param(None, A, None, "detected", id="first-detection"),
        pytest.param(_memory(A), A, None, None, id="same-drift-quiet"),
        pytest.param(_memory(A), AB, None, "changed", id="drift-changed"),
        pytest.param(_memory(A), CLEAN, None, "resolved", id="resolved"),
        pytest.param(_memory(), CLEAN, None, None, id="clean-stays-quiet"),
        pytest.param(_memory(A), None, "S3 down", "failing", id="fails"),
        pytest.param(_memory(A, error="S3 down"), None, "S3 down", None, id="fails-again-quiet"),
        pytest.param(_memory(A, error="S3 down"), A, None, "recovered", id="recovers-same-drift"),
        pytest.param(_memory(A, error="S3 down"), AB, None, "changed", id="recovers-changed"),
    ],
)
def test_decide(memory: DriftMemory | None, found: DriftReport | None, error: str | None, tell: str | None) -> None:
    decision = decide(memory, WS, report=found, error=error, now=NOW)
    assert decision.tell == tell
    assert decision.memory.checked_at == NOW
    if found is not None:
        assert decision.memory.fingerprint == found.fingerprint
        assert decision.memory.error is None
        # Told once: the same check again tells nothing.
        assert decide(decision.memory, WS, report=found, now=NOW).tell is None
    else:
        assert decision.memory.error == (memory.error if memory and memory.error else error)
    assert len(decision.memory.history) == (1 if tell else 0) + (len(memory.history) if memory else 0)


def test_due() -> None:
    assert due(None, 3600, NOW)
    checked = DriftMemory(workspace=WS, checked_at=NOW - timedelta(minutes=30))
    assert not due(checked, 3600, NOW)
    assert due(checked, 1800, NOW)


def test_notice_names_each_resource_with_before_after_run_and_the_reconcile_command() -> None:
    found = DriftReport(
        WS,
        (
            item("null_resource.instance", ("triggers.x", "1", "(sensitive)")),
            DriftedItem("consul.web-1", "missing-from-consul"),
        ),
        ignored=("x.y z (by alice: why)",),
        touched_by="run-42",
    )
    decision = decide(None, WS, report=found, now=NOW)
    notice = drift_notice(decision, report=found, error=None, namespace="acmeinc/web", version=3)
    assert notice.title == "Drift in prod: 2 resources left the state"
    assert notice.kind == "deploy"
    assert "`null_resource.instance` (last deployed by run run-42): triggers.x: 1 → (sensitive)" in notice.text
    assert "`consul.web-1` (last deployed by run run-42): in the state, but not registered in Consul" in notice.text
    assert "prefect deployment run deploy-artifact/deploy-artifact -p workspace=prod -p version=3" in notice.text
    assert "Ignored by the workspace's drift_ignore: x.y z (by alice: why)" in notice.text
    rows = table_rows(found)
    assert [(r["address"], r["attribute"], r["before"], r["after"]) for r in rows] == [
        ("null_resource.instance", "triggers.x", "1", "(sensitive)"),
        ("consul.web-1", "-", "-", "-"),
        ("x.y z (by alice: why)", "-", "-", "-"),
    ]
    resolved = decide(decision.memory, WS, report=CLEAN, now=NOW)
    told = drift_notice(
        resolved, report=CLEAN, error=None, namespace="acmeinc/web", version=3, previous=decision.memory
    )
    assert told.severity == "success"
    assert "null_resource.instance" in told.text
    json.dumps(notice.to_dict())  # it travels to the redelivery flow as JSON
