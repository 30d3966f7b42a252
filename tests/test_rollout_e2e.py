"""End to end: progressive rollout (icd/deploy/rollout.py) on the real server, worker, Packer and Terraform, with
the fleet stack (examples/stacks/local-fleet: one process and one Consul instance per slot) and the Consul
stand-in. Each test uses its own namespace, workspace and service."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import consul
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.states import Cancelling

from examples.local_env import api_client, start_worker
from icd.paths import PROJECT_ROOT
from tests.helpers import completed_task_runs as _task_runs
from tests.helpers import descendants as _descendants
from tests.helpers import told as _told
from tests.plugins.deploy_env import ENDED, POOL, DeployEnv, Names
from tests.waiting import wait_until

FLEET = "examples/stacks/local-fleet"
BAD_IN_SLOT_1 = 'healthy = instance_dir.name.split("-")[1] != "1"'  # the instance directory is <service>-<slot>-<v>


def _fleet(env: DeployEnv, names: Names) -> dict[int, dict[str, Any]]:
    """Slot -> Consul entry of the service's registered instances."""
    host, port = env.consul.address.rsplit(":", 1)
    _, entries = consul.Consul(host=host, port=int(port)).health.service(names.service_name)
    return {int(entry["Service"]["Meta"]["slot"]): entry for entry in entries}


def _passing(entry: dict[str, Any]) -> bool:
    return bool(entry["Checks"]) and all(check["Status"] == "passing" for check in entry["Checks"])


def _runs_on(env: DeployEnv, names: Names, label: str, slots: int) -> dict[int, dict[str, Any]] | None:
    """The fleet once every one of ``slots`` slots runs build ``label`` and passes (None until then)."""
    fleet = _fleet(env, names)
    on = {
        slot: entry
        for slot, entry in fleet.items()
        if entry["Service"]["ID"].endswith(f"-{slot}-{label}") and _passing(entry)
    }
    return fleet if len(fleet) == slots and len(on) == slots else None


def _label(env: DeployEnv, names: Names, version: int) -> str:
    return env.registry.registry().get(names.namespace, version).build_label


def _notice_fields(env: DeployEnv, run_id: Any) -> str:
    """Everything the approval notice of ``run_id`` says (its text and fields)."""
    found = [
        str(m.payload)
        for m in env.slack.messages
        if "Plan waiting for approval" in m.text and str(run_id) in str(m.payload)
    ]
    assert found, "no approval notice for the run"
    return found[0]


def _rollout(**policy: object) -> dict[str, object]:
    return {"instances": 4, "max_parallel": 1, **policy}


def _set_rollout(env: DeployEnv, names: Names, stack: str, **policy: object) -> None:
    env.workspace(names.workspace, follows=f"{names.namespace}@latest", stack=stack, rollout=_rollout(**policy))


def _latest_artifact(key: str) -> Any:
    [artifact] = api_client().read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
    )
    return artifact


def test_all_at_once_then_one_batch_at_a_time_then_a_failed_second_batch_reverts_every_slot(
    deploy_env: DeployEnv,
) -> None:
    env = deploy_env
    names = env.service(stack=FLEET, rollout=_rollout(max_parallel=4))
    ns, ws = names.namespace, names.workspace

    # max_parallel = instances is today's all-at-once deploy: one plan, one approval, one apply, one gate.
    run1, v1 = env.deploy_until_paused(names)
    assert "4 instances nothing → v1 in 1 batch of 4" in _notice_fields(env, run1.id)
    done1 = env.approve(run1.id, ws)
    assert done1.state is not None and done1.state.name == "Deployed", done1.state
    assert [len(_task_runs(run1.id, t)) for t in ("plan-deploy", "apply-plan", "batch-health-gate")] == [1, 1, 1]
    assert _runs_on(env, names, _label(env, names, v1), 4), _fleet(env, names)

    # A batch at a time: one approval, four plans and applies, each batch healthy before the next.
    _set_rollout(env, names, FLEET, min_healthy_time_seconds=1)
    env.repo.commit("v2", {"src/app.py": env.repo.read("src/app.py") + "\n# v2\n"})
    run2, v2 = env.deploy_until_paused(names)
    asked = _notice_fields(env, run2.id)
    assert f"4 instances v{v1} → v{v2} in 4 batches of 1 (slots 0 | 1 | 2 | 3)" in asked, asked
    done2 = env.approve(run2.id, ws)
    assert done2.state is not None and done2.state.name == "Deployed", done2.state
    assert [len(_task_runs(run2.id, t)) for t in ("plan-deploy", "apply-plan", "batch-health-gate")] == [4, 4, 4]
    label2 = _label(env, names, v2)
    fleet = _runs_on(env, names, label2, 4)
    assert fleet is not None, _fleet(env, names)
    assert {entry["Service"]["Meta"]["deploy_run_id"] for entry in fleet.values()} == {str(run2.id)}
    for batch in range(1, 5):
        [_line] = _told(env, f"batch {batch}/4: {names.service_name}-{ws}-{batch - 1}-{label2} healthy after")
    page = api_client().read_events(
        filter=EventFilter(
            event=EventNameFilter(name=["icd.rollout.batch.healthy"]),
            resource=EventResourceFilter(labels={"icd.workspace": [ws]}),  # type: ignore[arg-type]
        ),
        limit=50,
    )
    assert sorted(e.payload["batch"] for e in page.events if e.payload["version"] == v2) == [1, 2, 3, 4]
    table = _latest_artifact(f"instances-{ws}")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["version"] for row in rows] == [f"v{v2}"] * 4, rows
    assert env.registry.registry().get_channel(ns, ws).version == v2  # type: ignore[union-attr]

    # v3's instance in slot 1 never passes: batch 2 fails, and every slot goes back to v2.
    _set_rollout(env, names, FLEET, min_healthy_time_seconds=1, healthy_deadline_seconds=8)
    app = env.repo.read("src/app.py")
    bad = app.replace("healthy = not (instance_dir / UNHEALTHY_SWITCH).exists()", BAD_IN_SLOT_1)
    assert bad != app
    env.repo.commit("v3, unhealthy in slot 1", {"src/app.py": bad}, branch=f"bad-{ws}")
    run3, v3 = env.deploy_until_paused(names, ref=f"bad-{ws}")
    done3 = env.approve(run3.id, ws)
    assert done3.state is not None and done3.state.name == "RolledBack", done3.state
    label3 = _label(env, names, v3)
    message = done3.state.message or ""
    assert f"batch 2/4: {names.service_name}-{ws}-1-{label3} critical" in message, message
    # The failing check is named (its output too once Consul has run it: under load the deadline may come first).
    assert f"Service '{names.service_name}' check: critical" in message, message
    assert [len(_task_runs(run3.id, t)) for t in ("apply-plan", "batch-health-gate")] == [3, 2], "2 batches + revert"
    fleet = wait_until(lambda: _runs_on(env, names, label2, 4), timeout=60, message="the revert left a mix")
    assert len(fleet) == 4
    assert env.registry.registry().get_channel(ns, ws).version == v2  # type: ignore[union-attr]
    assert _told(env, f"batch 2/4: {names.service_name}-{ws}-1-{label3} critical")
    assert env.holder(ws) is None


def test_a_batch_plan_off_the_approved_path_stops_and_asks_again_and_a_newer_version_wins_between_batches(
    deploy_env: DeployEnv, tmp_path: Path
) -> None:
    env = deploy_env
    stack = tmp_path / "fleet"
    shutil.copytree(PROJECT_ROOT / FLEET, stack)
    names = env.service(stack=str(stack), rollout=_rollout(instances=2, max_parallel=2))
    ws = names.workspace
    run1, v1 = env.deploy_until_paused(names)
    assert env.approve(run1.id, ws).state.name == "Deployed"  # type: ignore[union-attr]

    # Batch 1 applies; then the stack grows a resource nobody approved: batch 2's plan deviates.
    _set_rollout(env, names, str(stack), instances=2, min_healthy_time_seconds=10, healthy_deadline_seconds=30)
    env.repo.commit("v2", {"src/app.py": env.repo.read("src/app.py") + "\n# v2\n"})
    run2, v2 = env.deploy_until_paused(names)
    env.answer(run2.id, env.plan_sha(ws, run2.id))
    label1, label2 = _label(env, names, v1), _label(env, names, v2)
    wait_until(
        lambda: (slot := _fleet(env, names).get(0)) and slot["Service"]["Meta"]["deploy_run_id"] == str(run2.id),
        timeout=120,
        message="batch 1 never applied",
    )
    (stack / "extra.tf").write_text('resource "null_resource" "extra" {}\n')
    done2 = env.wait_for(run2.id, states=ENDED)
    assert done2.state is not None and done2.state.name == "Deviated", done2.state
    assert "null_resource.extra (create) is not an instance the approved rollout changes" in (done2.state.message or "")
    # What batch 1 left is said, and signed with the run's deployment record.
    assert f"Batches 1-1 of 2 were applied before it: {ws} runs 1 x v{v2} (slot 0), 1 x v{v1} (slot 1)" in (
        done2.state.message or ""
    )
    records = env.registry.registry().deployment_records(ws)
    [signed] = [r.verified for r in records if r.verified is not None and r.where.endswith(f"{run2.id}.dsse.json")]
    assert signed.statement["verdict"]["outcome"] == "Deviated"
    assert "batch 1/2" in signed.statement["verdict"]["gate"]
    assert [len(_task_runs(run2.id, t)) for t in ("plan-deploy", "apply-plan")] == [2, 1], "nothing more applied"
    fleet = _fleet(env, names)
    assert fleet[0]["Service"]["ID"].endswith(f"-0-{label2}")
    assert fleet[1]["Service"]["ID"].endswith(f"-1-{label1}")
    # Asked again: a new run plans from what runs now (slot 1 and the new resource) and names the deviation.
    again = wait_until(
        lambda: [r for r in env.runs_of("deploy-artifact", workspace=ws) if r.parameters.get("request_id")],
        timeout=60,
        message="the rollout was not asked again",
    )[-1]
    env.wait_for(again.id, states={"PAUSED"})
    env.wait_for_question(again.id)
    asked = _notice_fields(env, again.id)
    assert "deviated from the approved path" in asked and "null_resource.extra" in asked, asked
    assert "1 batch of 1 (slots 1)" in asked, asked
    assert env.approve(again.id, ws).state.name == "Deployed"  # type: ignore[union-attr]
    assert _runs_on(env, names, label2, 2), _fleet(env, names)

    # A newer version while batch 1 of v3 waits out its healthy time: latest wins between batches.
    _set_rollout(env, names, str(stack), instances=2, min_healthy_time_seconds=25, healthy_deadline_seconds=60)
    env.repo.commit("v3", {"src/app.py": env.repo.read("src/app.py") + "\n# v3\n"})
    run3, v3 = env.deploy_until_paused(names)
    env.answer(run3.id, env.plan_sha(ws, run3.id))
    wait_until(
        lambda: (slot := _fleet(env, names).get(0)) and slot["Service"]["Meta"]["deploy_run_id"] == str(run3.id),
        timeout=120,
        message="batch 1 of v3 never applied",
    )
    env.repo.commit("v4", {"src/app.py": env.repo.read("src/app.py") + "\n# v4\n"})
    env.build(names, plan=True)  # registers v4, which requests a plan of the workspace following latest
    _set_rollout(env, names, str(stack), instances=2, min_healthy_time_seconds=1)  # for v4's run, not v3's
    v4 = env.registry.registry().last_version(names.namespace)
    done3 = env.wait_for(run3.id, states=ENDED)
    assert done3.state is not None and done3.state.name == "Superseded", done3.state
    label3 = _label(env, names, v3)
    message = done3.state.message or ""
    assert f"v{v4}" in message and f"1 x v{v3} (slot 0), 1 x v{v2} (slot 1)" in message, message
    assert len(_task_runs(run3.id, "apply-plan")) == 1, "nothing after batch 1"
    assert _fleet(env, names)[0]["Service"]["ID"].endswith(f"-0-{label3}")
    run4 = wait_until(
        lambda: [r for r in env.runs_of("deploy-artifact", workspace=ws) if r.parameters.get("version") == v4],
        timeout=60,
        message="v4 got no run",
    )[-1]
    env.wait_for(run4.id, states={"PAUSED"})
    env.wait_for_question(run4.id)
    assert f"2 instances v{v2} + v{v3} → v{v4}" in _notice_fields(env, run4.id)
    assert env.approve(run4.id, ws).state.name == "Deployed"  # type: ignore[union-attr]
    assert _runs_on(env, names, _label(env, names, v4), 2), _fleet(env, names)


def _v1_everywhere_and_v2_waiting(
    env: DeployEnv, *, instances: int, min_healthy_time_seconds: int, healthy_deadline_seconds: int
) -> tuple[Names, int, Any, int]:
    """A fleet of ``instances`` on v1 (one batch), then v2 built and its rollout (a batch per slot, each healthy
    for ``min_healthy_time_seconds``) waiting for approval: the names, v1, v2's run and v2."""
    names = env.service(stack=FLEET, rollout=_rollout(instances=instances, max_parallel=instances))
    run1, v1 = env.deploy_until_paused(names)
    assert env.approve(run1.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]
    _set_rollout(
        env,
        names,
        FLEET,
        instances=instances,
        min_healthy_time_seconds=min_healthy_time_seconds,
        healthy_deadline_seconds=healthy_deadline_seconds,
    )
    env.repo.commit(
        f"v2 of {names.namespace}", {"src/app.py": env.repo.read("src/app.py") + f"\n# v2 {names.namespace}\n"}
    )
    run2, v2 = env.deploy_until_paused(names)
    return names, v1, run2, v2


def _mix_told_and_recorded(env: DeployEnv, ws: str, title: str, mix: str, outcome: str) -> None:
    """deploy-ended told ``mix`` under ``title``, wrote it in the deploy record as ``outcome`` and freed ``ws``."""
    try:
        wait_until(lambda: _told(env, title, mix), timeout=120)
    except AssertionError:
        raise AssertionError(f"the mix ({mix}) was not told: {_told(env, title)}") from None
    wait_until(lambda: env.holder(ws) is None, timeout=60, message="the workspace stayed held")
    record = _latest_artifact(f"deploy-{ws}")
    assert outcome in str(record.data)
    assert mix in str(record.data)


def test_a_worker_killed_mid_rollout_leaves_a_known_mix_that_the_next_plan_finishes(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names, v1, run2, v2 = _v1_everywhere_and_v2_waiting(
        env, instances=3, min_healthy_time_seconds=30, healthy_deadline_seconds=60
    )
    ws = names.workspace
    sha = env.plan_sha(ws, run2.id)
    # The run resumes on a worker of its own, killed with its flow process while batch 1 waits out its
    # healthy time; another worker then runs deploy-ended.
    env.worker.stop()
    doomed = start_worker(env.server, POOL, env=env.worker_env, name=f"doomed-{uuid.uuid4().hex[:6]}")
    env.workers.append(doomed)
    try:
        env.answer(run2.id, sha)
        # Between batches: batch 1's apply has ended (Terraform wrote the state), its gate waits out 30 s.
        wait_until(lambda: _task_runs(run2.id, "apply-plan", so_far=True), timeout=120, message="batch 1 never applied")
        for pid in [*_descendants(doomed.proc.pid), doomed.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        _set_rollout(env, names, FLEET, instances=3, min_healthy_time_seconds=1)
        env.worker = start_worker(env.server, POOL, env=env.worker_env, name=f"worker-{uuid.uuid4().hex[:6]}")
        env.workers.append(env.worker)
    crashed = env.wait_for(run2.id, states={"CRASHED", *ENDED}, timeout=240)
    assert crashed.state is not None and crashed.state.type.value == "CRASHED", crashed.state
    mix = f"1 x v{v2} (slot 0), 2 x v{v1} (slots 1, 2)"
    _mix_told_and_recorded(env, ws, f"Deploy run crashed on {ws}", mix, "crashed mid-rollout")
    fleet = _fleet(env, names)
    assert sorted(fleet) == [0, 1, 2] and all(_passing(entry) for entry in fleet.values()), "no instance was lost"

    # The next plan rolls out from the mix: only slots 1 and 2 move.
    run3 = env.deploy(ws, v2)
    env.wait_for(run3.id, states={"PAUSED"})
    env.wait_for_question(run3.id)
    assert f"3 instances v{v1} + v{v2} → v{v2} in 2 batches of 1 (slots 1 | 2)" in _notice_fields(env, run3.id)
    assert env.approve(run3.id, ws).state.name == "Deployed"  # type: ignore[union-attr]
    assert len(_task_runs(run3.id, "apply-plan")) == 2
    assert _runs_on(env, names, _label(env, names, v2), 3), _fleet(env, names)


def test_a_rollout_cancelled_between_batches_is_told_its_mix_and_records_it(deploy_env: DeployEnv) -> None:
    """The operator's Cancel in the UI while batch 1 waits out its healthy time: the run ends Cancelled, and
    deploy-ended tells (and records) what each slot runs, as after a crash."""
    env = deploy_env
    names, v1, run2, v2 = _v1_everywhere_and_v2_waiting(
        env, instances=2, min_healthy_time_seconds=60, healthy_deadline_seconds=90
    )
    ws = names.workspace
    env.answer(run2.id, env.plan_sha(ws, run2.id))
    wait_until(lambda: _task_runs(run2.id, "apply-plan", so_far=True), timeout=120, message="batch 1 never applied")
    api_client().set_flow_run_state(run2.id, Cancelling(message="stopped by an operator"))

    ended = env.wait_for(run2.id, states=ENDED, timeout=120)
    assert ended.state is not None and ended.state.type.value == "CANCELLED", ended.state
    mix = f"1 x v{v2} (slot 0), 1 x v{v1} (slot 1)"
    _mix_told_and_recorded(env, ws, f"Deploy run cancelled on {ws}", mix, "cancelled mid-rollout")
