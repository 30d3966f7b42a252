"""The workspace queue: latest wins, at most one holder, nothing waits in a process (icd/deploy/queue.py).

The transitions are pure and tested as tables; the same contract runs against both stores (memory, and S3
with conditional writes on moto over HTTP); then threads race on one record, and a random stream of
requests, claims, checkpoints and releases must keep the queue's promises at every step.
"""

from __future__ import annotations

import random
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from icd import events
from icd.deploy import dispatch
from icd.deploy.dispatch import submit
from icd.deploy.queue import (
    DISPATCH_STALE_SECONDS,
    Broken,
    Claimed,
    DeployRequest,
    Holder,
    InProgress,
    Kept,
    Lost,
    NothingQueued,
    Queued,
    QueueRecord,
    Released,
    RunRef,
    Superseded,
    WorkspaceQueue,
    on_checkpoint,
    on_claim,
    on_release,
    on_request,
)
from icd.deploy.queue_store import MemoryQueueStore, S3QueueStore
from icd.errors import InvalidChannelError, RegistryIntegrityError, WorkspaceLockError
from icd.registry.signing import Sealer
from tests.helpers import crowds

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
WS = "staging"
LATER = T0 + timedelta(hours=1)


def req(version: int, *, teardown: bool = False, rid: str | None = None, at: datetime = T0) -> DeployRequest:
    return DeployRequest(
        id=rid or f"r{version}-{uuid.uuid4().hex[:6]}",
        workspace=WS,
        namespace="acmeinc/web",
        version=version,
        teardown=teardown,
        by="test",
        requested_at=at,
    )


def holder(version: int, phase: str = "planning", run: str = "run-a") -> Holder:
    return Holder(
        run_id=run,
        run_name=f"name-{run}",
        request=req(version),
        phase=phase,  # type: ignore[arg-type]  # a Phase literal
        since=T0,
        expires_at=LATER,
    )


def record(
    h: Holder | None = None, desired: DeployRequest | None = None, dispatched: datetime | None = None
) -> QueueRecord:
    return QueueRecord(workspace=WS, holder=h, desired=desired, dispatched_at=dispatched)


# --- request ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "dead", "dispatches", "behind", "in_progress"),
    [
        pytest.param(record(), False, True, False, False, id="free: a run is asked for"),
        pytest.param(record(holder(1, "planning")), False, False, True, False, id="planning: queued behind it"),
        pytest.param(record(holder(1, "applying")), False, False, True, False, id="applying: queued behind it"),
        pytest.param(record(holder(1, "awaiting")), False, True, False, False, id="awaiting another: take over"),
        pytest.param(record(holder(2, "awaiting")), False, False, False, True, id="awaiting the same: nothing"),
        pytest.param(record(holder(2, "planning")), False, False, False, True, id="planning the same: nothing"),
        pytest.param(record(holder(1, "applying")), True, True, False, False, id="dead holder: reclaimed"),
        pytest.param(record(dispatched=T0), False, False, False, False, id="a run is on its way already"),
        pytest.param(
            record(dispatched=T0 - timedelta(seconds=DISPATCH_STALE_SECONDS)), False, True, False, False, id="stale ask"
        ),
    ],
)
def test_a_request_is_queued_and_a_run_is_asked_for_only_when_one_must_start(
    before: QueueRecord, dead: bool, dispatches: bool, behind: bool, in_progress: bool
) -> None:
    wanted = req(2)
    after, result = on_request(before, wanted, T0, dead)
    assert (result.dispatch is not None, result.behind is not None, result.in_progress is not None) == (
        dispatches,
        behind,
        in_progress,
    )
    assert after.desired == (None if in_progress else wanted)
    expected_ask = T0 if dispatches else None if in_progress else before.dispatched_at
    assert after.dispatched_at == expected_ask
    assert (after.holder is None) == (dead or before.holder is None)
    assert (result.reclaimed is not None) == dead


def test_a_newer_request_replaces_the_pending_one_and_says_which() -> None:
    first, second, third = req(1), req(2), req(3)
    state, _ = on_request(record(holder(9, "applying")), first, T0, False)
    state, result = on_request(state, second, T0, False)
    assert result.superseded == first
    state, result = on_request(state, third, T0, False)
    assert (state.desired, result.superseded) == (third, second)
    again, result = on_request(state, third, T0, False)
    assert again == state and result.superseded is None, "the same request twice is one request"


# --- claim ------------------------------------------------------------------------------------------------

RUN = RunRef("run-b", "name-run-b")


@pytest.mark.parametrize(
    ("before", "own", "dead", "expected"),
    [
        pytest.param(record(desired=req(3)), None, False, Claimed, id="free: take the newest"),
        pytest.param(record(), None, False, NothingQueued, id="nothing pending: end"),
        pytest.param(record(holder(1, "planning"), req(3)), None, False, Queued, id="busy: stay queued, end"),
        pytest.param(record(holder(1, "applying"), req(3)), None, False, Queued, id="applying: stay queued, end"),
        pytest.param(record(holder(1, "awaiting"), req(3)), None, False, Claimed, id="awaiting an older: take over"),
        pytest.param(record(holder(3, "awaiting"), req(3)), None, False, InProgress, id="awaiting the same: end"),
        pytest.param(record(holder(1, "applying"), req(3)), None, True, Claimed, id="dead holder: reclaim"),
        pytest.param(record(desired=req(3)), req(4), False, Claimed, id="by hand: its own request wins"),
        pytest.param(record(holder(1, "planning")), req(4), False, Queued, id="by hand, busy: queued, end"),
    ],
)
def test_a_run_takes_the_newest_request_or_ends_at_once_holding_nothing(
    before: QueueRecord, own: DeployRequest | None, dead: bool, expected: type
) -> None:
    after, result = on_claim(before, RUN, own, T0, dead, LATER)
    assert isinstance(result, expected), result
    wanted = own or before.desired
    if isinstance(result, Claimed):
        assert after.holder == result.holder and after.holder.run_id == RUN.id
        assert after.holder.request == wanted and after.holder.phase == "planning"
        assert after.desired is None
        awaiting = before.holder is not None and before.holder.phase == "awaiting" and not dead
        assert result.took_over == (before.holder if awaiting else None)
    elif isinstance(result, Queued):
        assert after.holder == before.holder and after.desired == wanted
    else:
        assert after.holder == (None if dead else before.holder) and after.desired is None
    assert after.dispatched_at is None, "whoever holds the workspace asks for the next run"


def test_claiming_twice_is_claiming_once() -> None:
    state, first = on_claim(record(desired=req(3)), RUN, None, T0, False, LATER)
    again, second = on_claim(state, RUN, None, T0, False, LATER)
    assert again == state and isinstance(second, Claimed) and second.holder == first.holder  # type: ignore[union-attr]


@pytest.mark.parametrize("phase", ["planning", "awaiting", "applying"])
@pytest.mark.parametrize("own", [None, req(4)], ids=["dispatched", "by hand"])
@pytest.mark.parametrize("dead", [False, True], ids=["alive", "lease expired"])
def test_a_run_claiming_what_its_own_run_id_holds_adopts_it_and_never_waits_on_itself(
    phase: str, own: DeployRequest | None, dead: bool
) -> None:
    """A re-run after a resume (or a retried claim) whose record could not tell it had claimed: whatever the
    phase, whatever is pending, the workspace is its own, unchanged (issue 20: a run waited on its own lock)."""
    mine = holder(3, phase, run=RUN.id)
    before = record(mine, desired=req(5))
    after, result = on_claim(before, RUN, own, T0, dead, LATER)
    assert isinstance(result, Claimed), result
    assert result.holder == mine
    assert result.took_over is None
    assert after == before


# --- checkpoint -------------------------------------------------------------------------------------------


def test_a_holder_superseded_while_planning_gives_the_workspace_up_and_the_newest_gets_a_run() -> None:
    mine = holder(1, "planning", run="run-a")
    newer = req(5)
    after, result = on_checkpoint(record(mine, newer), "run-a", mine.request, T0, advance_to="awaiting")
    assert isinstance(result, Superseded) and result.by == newer and result.dispatch == newer
    assert after is not None and after.holder is None and after.desired == newer and after.dispatched_at == T0


def test_a_holder_still_wanted_moves_on_and_never_back() -> None:
    mine = holder(1, "planning", run="run-a")
    after, result = on_checkpoint(
        record(mine), "run-a", mine.request, T0, advance_to="awaiting", plan_sha256="ab" * 32, expires_at=LATER
    )
    assert isinstance(result, Kept) and result.holder.phase == "awaiting" and result.holder.plan_sha256 == "ab" * 32
    assert after is not None and after.holder == result.holder
    applying, result = on_checkpoint(after, "run-a", mine.request, T0, advance_to="applying")
    assert applying is not None and isinstance(result, Kept) and result.holder.phase == "applying"
    back, result = on_checkpoint(applying, "run-a", mine.request, T0, advance_to="awaiting")
    assert back is None and result.holder.phase == "applying", "a late 'awaiting' never undoes 'applying'"  # type: ignore[union-attr]


def test_a_waiting_holder_taken_over_learns_it_was_superseded_and_by_whom() -> None:
    old = holder(1, "awaiting", run="run-a")
    taker = holder(5, "planning", run="run-b")
    after, result = on_checkpoint(record(taker), "run-a", old.request, T0, advance_to="applying", retake=True)
    assert after is None
    assert isinstance(result, Superseded) and result.by == taker.request and result.taken_by == taker


def test_a_broken_lock_is_taken_again_to_apply_only_if_nothing_else_is_pending() -> None:
    mine = req(1)
    after, result = on_checkpoint(record(), "run-a", mine, T0, advance_to="applying", retake=True)
    assert isinstance(result, Kept) and after is not None and after.holder is not None
    assert (after.holder.run_id, after.holder.phase) == ("run-a", "applying")
    _, result = on_checkpoint(record(desired=req(4)), "run-a", mine, T0, advance_to="applying", retake=True)
    assert isinstance(result, Superseded)
    _, result = on_checkpoint(record(holder(1, "planning", run="run-c")), "run-a", mine, T0, advance_to="applying")
    assert isinstance(result, Lost), "the same target held by another run (forced through): lock lost"


# --- release ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "run_id", "dead", "was", "dispatches"),
    [
        pytest.param(record(holder(1)), "run-a", False, True, False, id="nothing pending"),
        pytest.param(record(holder(1), req(2)), "run-a", False, True, True, id="pending: its run is asked for"),
        pytest.param(record(holder(1), req(2), T0), "run-a", False, True, False, id="its run is on its way"),
        pytest.param(record(holder(1), req(2)), "run-z", False, False, False, id="not the holder: nothing"),
        pytest.param(record(holder(1), req(2)), "run-z", True, False, True, id="dead holder cleared by anyone"),
        pytest.param(record(None, req(2)), "run-z", False, False, True, id="stuck request gets a run"),
    ],
)
def test_a_release_is_idempotent_and_hands_the_workspace_on(
    before: QueueRecord, run_id: str, dead: bool, was: bool, dispatches: bool
) -> None:
    after, result = on_release(before, run_id, T0, dead)
    assert result == Released(was, before.desired if dispatches else None)
    assert (after.holder is None) == (was or dead or before.holder is None)


# --- the service over both stores ------------------------------------------------------------------------


@pytest.fixture(params=["memory", "s3"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryQueueStore()
        return
    s3_client, bucket = request.getfixturevalue("s3_client"), request.getfixturevalue("s3_bucket")
    yield S3QueueStore(s3_client, bucket, "registry/", sealer=Sealer(b"k" * 32))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_the_queue_over_a_store_keeps_the_newest_and_hands_on(store: Any) -> None:
    clock = Clock()
    ended: set[str] = set()
    queue = WorkspaceQueue(store, run_alive=lambda run_id: run_id not in ended, clock=clock)
    first = queue.request(req(1))
    assert first.dispatch is not None
    a = queue.claim(WS, RunRef("run-a", "a"))
    assert isinstance(a, Claimed) and a.holder.request.version == 1
    for version in (2, 3, 4):
        assert queue.request(req(version)).behind == a.holder, "queued behind the planning run"
    assert isinstance(queue.claim(WS, RunRef("run-x", "x")), Queued), "a second run ends, the request stays"
    superseded = queue.checkpoint("run-a", a.holder.request, advance_to="awaiting")
    assert isinstance(superseded, Superseded) and superseded.by.version == 4 and superseded.dispatch is not None
    b = queue.claim(WS, RunRef("run-b", "b"))
    assert isinstance(b, Claimed) and b.holder.request.version == 4
    assert isinstance(queue.checkpoint("run-b", b.holder.request, advance_to="awaiting"), Kept)
    takeover = queue.request(req(5))
    assert takeover.dispatch is not None, "a waiting plan of another version is taken over at once"
    c = queue.claim(WS, RunRef("run-c", "c"))
    assert isinstance(c, Claimed) and c.took_over is not None and c.took_over.run_id == "run-b"
    ended.add("run-c")  # it crashed: the next request reclaims the workspace
    after_crash = queue.request(req(6))
    assert after_crash.reclaimed is not None and after_crash.dispatch is not None
    assert [r.workspace for r in queue.records()] == [WS]
    assert queue.holder(WS) is None and queue.read(WS).desired.version == 6  # type: ignore[union-attr]


def test_breaking_a_lock_refuses_a_live_holder_unless_forced_and_then_hands_on(store: Any) -> None:
    queue = WorkspaceQueue(store, run_alive=lambda _: True)
    queue.request(req(1))
    claimed = queue.claim(WS, RunRef("run-a", "a"))
    assert isinstance(claimed, Claimed)
    queue.request(req(2))
    with pytest.raises(WorkspaceLockError, match="still alive"):
        queue.break_lock(WS)
    broken = queue.break_lock(WS, force=True)
    assert broken == Broken(claimed.holder, broken.dispatch) and broken.dispatch is not None
    assert broken.dispatch.version == 2


def test_a_record_altered_outside_the_loop_is_refused_and_a_bad_name_never_reaches_s3(
    s3_client: Any, s3_bucket: str
) -> None:
    store = S3QueueStore(s3_client, s3_bucket, "registry/", sealer=Sealer(b"k" * 32))
    queue = WorkspaceQueue(store)
    queue.request(req(1))
    key = "registry/queues/staging.json"
    body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read().replace(b'"version":1', b'"version":7')
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    with pytest.raises(RegistryIntegrityError, match="altered outside"):
        queue.read(WS)
    with pytest.raises(InvalidChannelError):
        queue.read("../etc")


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ({"workspace": WS, "holder": {"run_id": "run-a"}}, "is sealed but is not a queue record"),
        ({"workspace": "production"}, "holds the queue of workspace 'production'"),
    ],
)
def test_a_malformed_record_is_an_error_naming_it_and_is_never_read_as_a_free_workspace(
    s3_client: Any, s3_bucket: str, payload: dict[str, Any], why: str
) -> None:
    """Sealed by us yet not a queue record of this workspace: read as absent, the next claim would write a
    fresh record over it and take a workspace that someone may hold. It is refused, named, and left as found."""
    from tasks.queue import claim_workspace

    sealer = Sealer(b"k" * 32)
    key = "registry/queues/staging.json"
    where = f"s3://{s3_bucket}/{key}"
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=sealer.seal(key, payload))
    queue = WorkspaceQueue(S3QueueStore(s3_client, s3_bucket, "registry/", sealer=sealer))

    with pytest.raises(RegistryIntegrityError, match=re.escape(f"{where} {why}")):
        queue.read(WS)
    with pytest.raises(RegistryIntegrityError, match=re.escape(where)) as refused:
        queue.claim(WS, RunRef("run-b", "b"))
    with pytest.raises(RegistryIntegrityError, match=re.escape(where)):
        queue.request(req(1))
    assert s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == sealer.seal(key, payload)

    class _Failed:  # the state the claim task ends in, as its retry condition reads it
        def result(self) -> Any:
            raise refused.value

    retry = claim_workspace.retry_condition_fn
    assert retry is not None
    assert not retry(claim_workspace, cast(Any, None), cast(Any, _Failed())), "a retry cannot mend it"


@pytest.mark.parametrize("threads", crowds(20))
def test_racing_requests_and_claims_never_make_two_holders(store: Any, threads: int) -> None:
    """Many threads request and claim at once: one holder, the newest request held or pending."""
    queue = WorkspaceQueue(store, run_alive=lambda _: True)
    claims: list[Any] = []
    start = threading.Barrier(threads)

    def work(n: int) -> None:
        start.wait()
        queue.request(req(n + 1, rid=f"req-{n}"))
        claims.append(queue.claim(WS, RunRef(f"run-{n}", f"n{n}")))

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    winners = [c for c in claims if isinstance(c, Claimed)]
    assert len(winners) == 1
    assert queue.holder(WS) == winners[0].holder


# --- a random stream keeps the queue's promises ------------------------------------------------------------


def test_a_random_stream_of_requests_answers_and_crashes_keeps_every_promise() -> None:
    """Invariants after every step: at most one holder; nothing pending equals the held target; whenever
    the workspace is free with a request pending, a run has been asked for; the last request is the one
    held or pending (latest wins)."""
    rng = random.Random(19)
    clock = Clock()
    ended: set[str] = set()
    queue = WorkspaceQueue(MemoryQueueStore(), run_alive=lambda run_id: run_id not in ended, clock=clock)
    asked: list[str] = []
    runs: dict[str, DeployRequest] = {}
    last: DeployRequest | None = None
    for step in range(600):
        clock.now += timedelta(seconds=rng.choice([0.1, 1, 5]))
        action = rng.random()
        current = queue.read(WS)
        held = current.holder if current else None
        if action < 0.35:
            last = req(rng.randint(1, 4), teardown=rng.random() < 0.1, at=clock.now)
            if queue.request(last).dispatch:
                asked.append(last.id)
        elif action < 0.55 and asked:
            asked.pop()
            run = RunRef(f"run-{step}", f"r{step}")
            claim = queue.claim(WS, run)
            if isinstance(claim, Claimed):
                runs[run.id] = claim.holder.request
        elif action < 0.75 and held is not None and held.run_id not in ended:
            phase = "applying" if held.phase == "awaiting" else "awaiting"
            result = queue.checkpoint(held.run_id, held.request, advance_to=phase)  # type: ignore[arg-type]
            if isinstance(result, Superseded) and result.dispatch:
                asked.append(result.dispatch.id)
        elif action < 0.92 and held is not None:
            if queue.release(WS, held.run_id).dispatch:
                asked.append("release")
        elif held is not None:
            ended.add(held.run_id)  # a crash: nobody releases it
        record_now = queue.read(WS)
        if record_now is None:
            continue
        h, d = record_now.holder, record_now.desired
        assert not (h and d and h.request.same_target(d)), "a pending request never repeats the held one"
        if h is None and d is not None:
            assert record_now.dispatched_at is not None, f"step {step}: a pending request with nobody asked to run it"
        if last is not None and h is not None and h.request.requested_at > last.requested_at:
            raise AssertionError("a holder newer than the last request")
        if last is not None:
            newest = d if d is not None else (h.request if h is not None else None)
            if newest is not None:
                assert newest.requested_at <= last.requested_at


def test_a_request_goes_into_the_queue_and_only_a_needed_run_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = WorkspaceQueue(MemoryQueueStore())
    emitted: list[events.EventSpec] = []
    started: list[DeployRequest] = []
    monkeypatch.setattr(dispatch, "start_deploy_run", lambda request: started.append(request) or "run-1")
    specs = [
        events.plan_requested(workspace=WS, namespace="acmeinc/web", version=n, by="registration", cause="test")
        for n in (1, 2, 3)
    ]
    results = [submit(queue, spec, emit=emitted.append) for spec in specs]
    names = [spec.event for spec in emitted]
    assert names == [
        "icd.plan.requested",
        "icd.plan.dispatched",
        "icd.plan.requested",
        "icd.plan.superseded",
        "icd.plan.requested",
        "icd.plan.superseded",
    ]
    assert results[0].dispatch is not None and results[1].dispatch is None
    assert [request.id for request in started] == [str(specs[0].id)], "one run, for the first request"
    dispatched = emitted[1]
    assert {
        "prefect.resource.id": "prefect.flow-run.run-1",
        "prefect.resource.role": "deploy-run",
    } in dispatched.related
    assert dispatched.payload["request_id"] == str(specs[0].id) and dispatched.payload["version"] == 1
    assert emitted[3].payload == {
        "workspace": WS,
        "namespace": "acmeinc/web",
        "version": 1,
        "by_version": 2,
        "run_id": None,
    }
    assert queue.read(WS).desired.version == 3  # type: ignore[union-attr]


# --- a superseded version is never applied: the apply asks the channel (moto over HTTP) ----------------------


def _planned(version: int, follows: str, followed_at: int | None, **overrides: Any) -> Any:
    from icd.deploy.plan import ChannelSeen, PlannedDeploy
    from icd.deploy.plan_view import PlanView

    view = PlanView("acmeinc/web", follows, None, version, 1, 0, 0, 0, (), "ab" * 32)
    fields: dict[str, Any] = {
        "workspace": WS,
        "plan_id": "run-1",
        "namespace": "acmeinc/web",
        "version": version,
        "followed": ChannelSeen(follows, followed_at),
        "promoted": None,
        "artifact_id": f"ami-{version}",
        "has_changes": True,
        "plan_sha256": "ab" * 32,
        "state_before": None,
        "view": view,
        "platform": "us-east-1",
        **overrides,
    }
    return PlannedDeploy(**fields)


@pytest.mark.parametrize(
    ("follows", "planned_version", "followed_at", "stale_says"),
    [
        pytest.param(
            "latest",
            1,
            2,
            "acmeinc/web@latest points at v2 (the newest deployable version), not v1",
            id="latest moved on",
        ),
        pytest.param("latest", 1, 1, "channel 'latest' of acmeinc/web moved from v1 to v2", id="moved since the plan"),
        pytest.param("production", 1, 1, "channel 'production' of acmeinc/web moved from v1 to v2", id="promoted on"),
    ],
)
def test_the_apply_refuses_a_version_its_channel_no_longer_points_at_before_terraform_starts(
    s3_client: Any, s3_bucket: str, follows: str, planned_version: int, followed_at: int, stale_says: str
) -> None:
    from icd.deploy.apply import StalePlan, apply_approved
    from icd.registry.plans import PlanStore
    from icd.registry.registry import Registry

    registry = Registry(s3_client, s3_bucket, prefix="registry/", sealer=Sealer(b"k" * 32))
    for run in ("1", "2"):
        registry.register(
            "acmeinc/web",
            git_commit=f"c0ffee{run}",
            git_ref="main",
            packer_run_uuid=f"run-{run}",
            builder_type="amazon-ebs",
            artifacts={"us-east-1": f"ami-{run}"},
            created_by="test",
        )
    if follows == "production":
        registry.assign_channel("acmeinc/web", "production", 1, assigned_by="ops")  # planned at v1
        registry.assign_channel("acmeinc/web", "production", 2, assigned_by="ops")  # promoted on meanwhile
    started: list[str] = []

    def open_workdir(name: str) -> Any:
        started.append(name)
        raise AssertionError("Terraform must not start for a version that is not current")

    result = apply_approved(
        registry=registry,
        plans=PlanStore(s3_client, s3_bucket),
        open_workdir=open_workdir,
        read_state=lambda: None,
        planned=_planned(planned_version, follows, followed_at),
        approved_sha256="ab" * 32,
        platform="us-east-1",
    )
    assert isinstance(result, StalePlan)
    assert stale_says in result.reason
    assert started == []


def test_superseded_outcomes_name_the_newer_version_and_tell_only_when_someone_was_asked() -> None:
    from icd.deploy import outcome

    taker = holder(5, "planning", run="run-b")
    told = outcome.superseded(WS, req(1), req(5), taken_by=taker, asked=True, record={"decided by": "ann"})
    assert (told.kind, told.name, told.tell) == ("cancelled", "Superseded", True)
    assert (
        told.message == "superseded by acmeinc/web v5, planned in run name-run-b; nothing of acmeinc/web v1 was applied"
    )
    assert told.record["decided by"] == "ann"
    quiet = outcome.superseded(WS, req(1), req(5), asked=False)
    assert (quiet.tell, dict(quiet.record)) == (False, {}), "nobody was asked: no message, no deploy record"
    assert "which gets its own run" in quiet.message
    queued = outcome.unclaimed(WS, Queued(req(3), holder(1, "applying")))
    assert (queued.kind, queued.name, queued.tell) == ("completed", "Queued", False)
    assert "run name-run-a is applying acmeinc/web v1" in queued.message
    assert outcome.unclaimed(WS, InProgress(holder(3, "awaiting"))).name == "AlreadyInProgress"
    assert outcome.unclaimed(WS, NothingQueued(None)).name == "NothingQueued"
