"""No silent hang in a tool call: a Terraform apply held open by a provisioner's daemon is told about, then
stopped, with the daemon killed, the run ended Failed and the workspace free (issue 20).

The stuck detector and the heads-up timing are tables; the chokepoint is tried against the real Terraform
with a provisioner that backgrounds a daemon without redirecting its output; the whole loop (real Prefect
server, worker, Terraform on the S3 backend with its DynamoDB lock) runs the same daemon stack end to end.
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from prefect.states import Cancelling

from examples.local_env import api_client
from icd.deploy.record import applied_seconds, record_markdown
from icd.deploy.stuck import HEADS_UP_FLOOR_SECONDS, heads_up_seconds, heads_up_text
from icd.errors import ToolStuckError
from icd.service.preflight import breaches, check_stack
from icd.service.shell import daemons_holding_output
from icd.tools import binaries
from icd.tools.process import PipeHolder, command_label
from icd.tools.terraform import ApplyWatch, HeadsUp, InProgress, Terraform
from tests.helpers import live_pids_with
from tests.plugins.deploy_env import AWS_SECRET, ENDED, DeployEnv
from tests.waiting import wait_until

PROJECT = Path(__file__).resolve().parent.parent
LOCAL_STACK = PROJECT / "examples" / "stacks" / "local" / "main.tf"


# --- the stuck detector, as a table -------------------------------------------------------------------


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeTool:
    holders: list[PipeHolder] = field(default_factory=list)
    started: float = 0.0
    name: str = "terraform"
    pid: int = 1

    def escaped_holders(self) -> list[PipeHolder]:
        return self.holders


def _replay(script: list[tuple[float, str]], *, stuck_after: float, heads_up_after: float | None = None) -> str | None:
    """Feed ``(time, line)`` pairs (line "" = just a check at that time); the first stuck reason, or None."""
    clock = Clock()
    watch = ApplyWatch(stuck_after=stuck_after, heads_up_after=heads_up_after, clock=clock)
    tool = FakeTool()
    for at, line in script:
        clock.now = at
        if line:
            watch.saw(line)
        if reason := watch.check(tool):  # type: ignore[arg-type]  # duck-typed RunningTool
            return reason
    return None


_START = [(0.0, "null_resource.app: Creating..."), (0.1, "null_resource.app: Provisioning with 'local-exec'...")]


def _still(
    start: float, end: float, address: str = "null_resource.app", doing: str = "creating"
) -> list[tuple[float, str]]:
    return [(t, f"{address}: Still {doing}... [{int(t)}s elapsed]") for t in range(int(start), int(end) + 1, 10)]


@pytest.mark.parametrize(
    ("script", "stuck"),
    [
        pytest.param([*_START, *_still(10, 20), (28.0, "")], None, id="still-creating-within-the-limit"),
        pytest.param([*_START, *_still(10, 30)], "null_resource.app (still creating after 30s)", id="only-still-lines"),
        pytest.param(
            [*_START, *_still(10, 20), (25.0, "null_resource.app (local-exec): step 2"), *_still(30, 50)],
            None,
            id="provisioner-output-is-progress",
        ),
        pytest.param(
            [*_START, (5.0, "null_resource.app: Creation complete after 5s [id=1]"), (40.0, "")],
            "nothing printed",
            id="silence-after-the-last-resource",
        ),
        pytest.param(
            [
                (0.0, "aws_instance.web: Destroying... [id=i-0abc]"),
                *[
                    (t, f"aws_instance.web: Still destroying... [id=i-0abc, {int(t)}s elapsed]")
                    for t in (10.0, 20.0, 30.0)
                ],
            ],
            "aws_instance.web (still destroying after 30s)",
            id="destroy-lines-carry-the-id",
        ),
        pytest.param(
            [
                (0.0, "a.b: Creating..."),
                (1.0, "c.d: Creating..."),
                (2.0, "a.b: Creation complete after 2s [id=x]"),
                *_still(10, 30, "c.d"),
            ],
            "c.d (still creating after 29s), with no other progress for 28s",
            id="only-what-is-still-in-progress-is-named",
        ),
    ],
)
def test_the_stuck_detector(script: list[tuple[float, str]], stuck: str | None) -> None:
    reason = _replay(script, stuck_after=28)
    if stuck is None:
        assert reason is None
    else:
        assert reason is not None
        assert stuck in reason, reason
        assert "apply_timeout_seconds = 28" in reason, reason


def test_a_still_line_without_its_creating_line_counts_from_terraforms_own_elapsed() -> None:
    clock = Clock(now=100.0)
    watch = ApplyWatch(stuck_after=600, clock=clock)
    watch.saw("module.app.null_resource.x[0]: Still modifying... [id=42, 1m10s elapsed]")
    assert watch.in_progress() == (InProgress("module.app.null_resource.x[0]", "modifying", 70.0),)


def test_a_retried_apply_starts_its_own_clock() -> None:
    clock = Clock()
    watch = ApplyWatch(stuck_after=20, clock=clock)
    watch.saw("null_resource.app: Creating...")
    clock.now = 100.0
    assert watch.check(FakeTool(started=90.0)) is None  # type: ignore[arg-type]  # duck-typed RunningTool
    clock.now = 111.0
    assert watch.check(FakeTool(started=90.0))  # type: ignore[arg-type]  # duck-typed RunningTool


def test_the_heads_up_comes_once_with_what_is_in_progress_and_who_holds_the_output() -> None:
    clock = Clock()
    told: list[HeadsUp] = []
    watch = ApplyWatch(stuck_after=100, heads_up_after=30, on_heads_up=told.append, clock=clock)
    daemon = PipeHolder(4242, "python3 app.py", 4242)
    tool = FakeTool(holders=[daemon])
    watch.saw("null_resource.app: Creating...")
    for now in (10.0, 29.0):
        clock.now = now
        watch.check(tool)  # type: ignore[arg-type]  # duck-typed RunningTool
    assert told == []
    for now in (30.0, 31.0, 60.0):
        clock.now = now
        assert watch.check(tool) is None  # type: ignore[arg-type]  # duck-typed RunningTool
    assert len(told) == 1
    assert told[0].in_progress == (InProgress("null_resource.app", "creating", 30.0),)
    assert told[0].holders == ("pid 4242 (python3 app.py)",)
    text = heads_up_text("apply", told[0], 2.5)
    for needed in (
        "null_resource.app (still creating after 30s)",
        "pid 4242 (python3 app.py)",
        "the last apply took 2s",
        "after 100s",
        "detached-daemons",
    ):
        assert needed in text, (needed, text)


def test_a_failing_heads_up_does_not_stop_the_apply() -> None:
    def broken(_: HeadsUp) -> None:
        raise RuntimeError("slack is down")

    clock = Clock(now=50.0)
    watch = ApplyWatch(stuck_after=100, heads_up_after=30, on_heads_up=broken, clock=clock)
    watch.saw("x.y: Creating...")
    assert watch.check(FakeTool()) is None  # type: ignore[arg-type]  # duck-typed RunningTool
    assert watch.heads_up is not None


@pytest.mark.parametrize(
    ("last_apply", "stuck_after", "expected"),
    [
        pytest.param(None, 900, HEADS_UP_FLOOR_SECONDS, id="no-earlier-apply-floor"),
        pytest.param(2.0, 900, HEADS_UP_FLOOR_SECONDS, id="fast-apply-floor"),
        pytest.param(100.0, 900, 300.0, id="three-times-the-last"),
        pytest.param(400.0, 900, 450.0, id="never-after-half-the-timeout"),
        pytest.param(None, 20, 10.0, id="small-timeout"),
    ],
)
def test_when_the_heads_up_comes(last_apply: float | None, stuck_after: float, expected: float) -> None:
    assert heads_up_seconds(last_apply, stuck_after) == expected


@pytest.mark.parametrize(
    ("facts", "seconds"),
    [
        pytest.param({"outcome": "Deployed", "applied in": "12.3s", "health": "passing"}, 12.3, id="deployed"),
        pytest.param({"outcome": "TornDown", "applied in": "2s"}, None, id="a-teardown-is-no-measure"),
        pytest.param({"outcome": "RolledBack", "applied in": "7s"}, 7.0, id="rolled-back"),
        pytest.param({"outcome": "Failed", "error": "applied in 5s? no"}, None, id="nothing-applied"),
    ],
)
def test_the_last_apply_is_read_from_the_deploy_record(facts: dict[str, str], seconds: float | None) -> None:
    assert applied_seconds(record_markdown("staging", facts)) == seconds


# --- the pre-flight warning ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "held"),
    [
        pytest.param('DATA_DIR="$DIR" setsid nohup python3 "$DIR/app.py" &', 1, id="the-issue-s-start-script"),
        pytest.param("app & disown", 1, id="disown"),
        pytest.param("nohup app >/dev/null &", 1, id="stderr-still-on-the-pipe"),
        pytest.param("nohup app 2>&1 >app.log &", 1, id="2>&1-before-the-redirect-copies-the-pipe"),
        pytest.param("setsid -f app", 1, id="setsid-forks"),
        pytest.param("set -eu\nsetsid app </dev/null >app.log 2>&1 &\necho started", 0, id="redirected"),
        pytest.param("app >/dev/null 2>&1 &", 0, id="dev-null"),
        pytest.param("app &>/dev/null &", 0, id="both-at-once"),
        pytest.param("app >>app.log 2>>app.err &", 0, id="appended"),
        pytest.param("app >&- 2>&- &", 0, id="closed"),
        pytest.param('app >"${local.log}" 2>&1 &', 0, id="interpolated-target"),
        pytest.param('exec >"$dir/log" 2>&1\nsetsid app &', 0, id="exec-redirects-the-rest"),
        pytest.param('echo "a & b"; make && make install | tee out', 0, id="no-background"),
        pytest.param("# app &\necho hi", 0, id="a-comment"),
        pytest.param('"$dir/bin/start" --port 0', 0, id="the-example-start-script"),
    ],
)
def test_the_check_reads_what_a_provisioner_leaves_running(command: str, held: int) -> None:
    assert len(daemons_holding_output(command)) == held, daemons_holding_output(command)


def test_the_check_warns_on_the_daemon_stack_and_names_the_line(tmp_path: Path) -> None:
    stack = _daemon_stack(tmp_path / "stack", "marker")
    findings = [f for f in check_stack(stack) if f.kind == "provisioner-daemon-keeps-output"]
    assert len(findings) == 1, [f.message for f in findings]
    (finding,) = findings
    line = next(n for n, text in enumerate((stack / "main.tf").read_text().splitlines(), 1) if "setsid nohup" in text)
    assert finding.file.endswith(f"main.tf:{line}")
    assert finding.severity == "warning"
    assert breaches([finding]) == []
    assert "setsid app </dev/null >app.log 2>&1 &" in finding.message
    assert "docs/service-contract.md#detached-daemons" in finding.message
    assert [f.kind for f in check_stack(LOCAL_STACK.parent) if f.kind == "provisioner-daemon-keeps-output"] == []


# --- the chokepoint, with the real Terraform --------------------------------------------------------------


@pytest.fixture
def daemon_marker() -> Iterator[str]:
    marker = f"icd-test-daemon-{uuid.uuid4().hex[:10]}"
    yield marker
    for pid in live_pids_with(marker):  # only if the code under test failed to
        os.kill(pid, signal.SIGKILL)


@pytest.mark.tools
@pytest.mark.skipif(binaries.terraform_cli_config() is None, reason="run scripts/bootstrap.sh: no provider mirror")
def test_a_stuck_apply_is_stopped_and_its_daemon_killed(tmp_path: Path, daemon_marker: str) -> None:
    (tmp_path / "main.tf").write_text(
        'terraform {\n  required_providers {\n    null = { source = "hashicorp/null", version = "2.1.2" }\n  }\n}\n'
        'resource "null_resource" "app" {\n  provisioner "local-exec" {\n'
        f"    command = \"echo starting; setsid nohup python3 -c 'import time; time.sleep(600)' {daemon_marker} &\"\n"
        "  }\n}\n"
    )
    lines: list[str] = []
    terraform = Terraform(tmp_path, timeout=300, on_line=lines.append)
    terraform.init()
    plan = terraform.plan(variables={}, out=Path("p.tfplan"))
    told: list[HeadsUp] = []
    watch = ApplyWatch(stuck_after=12, heads_up_after=6, on_heads_up=told.append)

    with pytest.raises(ToolStuckError) as caught:
        terraform.apply(plan.plan_file, watch=watch)

    assert len(told) == 1, told
    assert len(told[0].holders) == 1, told
    daemon_pid = int(told[0].holders[0].split()[1])
    error = caught.value
    assert error.holders == told[0].holders
    assert error.killed == told[0].holders
    assert f"pid {daemon_pid} (python3" in str(error)
    assert "null_resource.app (still creating" in str(error)
    assert "docs/service-contract.md#detached-daemons" in str(error)
    wait_until(lambda: not live_pids_with(daemon_marker), timeout=10, message="the daemon outlived the stop")
    # Stopped gracefully (one SIGTERM to Terraform, not two): it saved its state, the resource tainted.
    assert not any("Two interrupts" in line for line in lines), lines[-10:]
    assert '"status": "tainted"' in (tmp_path / "terraform.tfstate").read_text()


@pytest.mark.tools
@pytest.mark.skipif(binaries.terraform_cli_config() is None, reason="run scripts/bootstrap.sh: no provider mirror")
def test_a_daemon_started_the_documented_way_leaves_the_apply_alone(tmp_path: Path, daemon_marker: str) -> None:
    """The contract's "right" form (own session, stdin/stdout/stderr redirected) must not hold the tool's
    output: under Terraform's panicwrap child it held our pipe through descriptors 4 and 5 all the same."""
    (tmp_path / "main.tf").write_text(
        'terraform {\n  required_providers {\n    null = { source = "hashicorp/null", version = "2.1.2" }\n  }\n}\n'
        'resource "null_resource" "app" {\n  provisioner "local-exec" {\n'
        "    command = \"setsid python3 -c 'import time; time.sleep(600)' "
        f'{daemon_marker} </dev/null >/dev/null 2>&1 &"\n'
        "  }\n}\n"
    )
    terraform = Terraform(tmp_path, timeout=120)
    terraform.init()
    plan = terraform.plan(variables={}, out=Path("p.tfplan"))
    told: list[HeadsUp] = []
    terraform.apply(plan.plan_file, watch=ApplyWatch(stuck_after=60, heads_up_after=30, on_heads_up=told.append))
    assert not told
    assert live_pids_with(daemon_marker), "the daemon was started and lives on, as a service instance would"


# --- end to end: the daemon stack on the whole loop ------------------------------------------------------

_START_LINE = '"$dir/bin/start" --instance-dir "$dir"'


def _daemon_stack(where: Path, marker: str) -> Path:
    """examples/stacks/local, whose create step also starts a daemon the way the issue's team did: in its own
    session, without redirecting its output."""
    text = LOCAL_STACK.read_text()
    assert text.count(_START_LINE) == 1, "the example stack changed: update this test's copy"
    daemon = f"setsid nohup python3 -c 'import time; time.sleep(3600)' {marker}-$DEPLOY_RUN_ID &\n      "
    where.mkdir()
    (where / "main.tf").write_text(text.replace(_START_LINE, daemon + _START_LINE))
    return where


def _state_lock(env: DeployEnv, workspace: str) -> dict[str, object] | None:
    backend = env.registry.state_backend()
    assert backend.lock_table
    assert backend.dynamodb_endpoint
    dynamodb = boto3.client(
        "dynamodb",
        endpoint_url=backend.dynamodb_endpoint,
        region_name=backend.region,
        aws_access_key_id="testing",
        aws_secret_access_key=AWS_SECRET,
    )
    lock_id = f"{backend.bucket}/{backend.state_key(workspace)}"
    return dynamodb.get_item(TableName=backend.lock_table, Key={"LockID": {"S": lock_id}}).get("Item")


@pytest.mark.slow
def test_a_daemon_holding_the_apply_is_told_then_stopped_and_the_run_fails_cleanly(
    deploy_env: DeployEnv, tmp_path: Path, daemon_marker: str
) -> None:
    env = deploy_env
    names = env.service(stack=str(_daemon_stack(tmp_path / "stack", daemon_marker)), apply_timeout_seconds=24)
    ws = names.workspace
    run, _ = env.deploy_until_paused(names)
    env.answer(run.id, env.plan_sha(ws, run.id))

    def said(pattern: str) -> list[str]:
        return [str(m.payload) for m in env.slack.messages if re.search(pattern, str(m.payload))]

    # The heads-up, while the apply still runs: which resource, for how long, who holds the output.
    heads_up = wait_until(lambda: said(f"Slow apply on {ws}"), timeout=180, message="no heads-up")[0]
    assert "null_resource.instance (still creating after" in heads_up, heads_up
    assert "holds the output of a provisioner open" in heads_up, heads_up
    assert env.read(run.id).state.type.value == "RUNNING"  # type: ignore[union-attr]  # a run has a state
    daemons = live_pids_with(f"{daemon_marker}-{run.id}")
    assert len(daemons) == 1, "the stack's daemon runs while the apply waits for it"
    assert f"pid {daemons[0]} (python3" in heads_up, heads_up

    ended = env.wait_for(run.id, states=ENDED, timeout=180)
    assert ended.state is not None
    assert ended.state.type.value == "FAILED", ended.state
    message = ended.state.message or ""
    assert "terraform apply is stuck: null_resource.instance (still creating" in message, message
    assert f"pid {daemons[0]} (python3" in message, message
    assert "apply_timeout_seconds = 24" in message, message
    assert env.holder(ws) is None, "the workspace is free"
    assert _state_lock(env, ws) is None, "Terraform released its state lock"
    failed = wait_until(lambda: said(f"Deploy failed on {ws}"), timeout=60, message="operators were not told")
    assert "detached-daemons" in failed[0], failed[0]
    assert not live_pids_with(f"{daemon_marker}-{run.id}"), "no daemon of the run outlives it"


@pytest.mark.slow
def test_cancelling_a_held_apply_ends_it_tells_operators_and_leaves_no_daemon(
    deploy_env: DeployEnv, tmp_path: Path, daemon_marker: str
) -> None:
    """The operator's way out before the timeout, as the heads-up says: cancel the run in the UI."""
    env = deploy_env
    names = env.service(stack=str(_daemon_stack(tmp_path / "stack", daemon_marker)), apply_timeout_seconds=120)
    ws = names.workspace
    run, _ = env.deploy_until_paused(names)
    env.answer(run.id, env.plan_sha(ws, run.id))
    wait_until(
        lambda: [m for m in env.slack.messages if f"Slow apply on {ws}" in m.text], timeout=180, message="no heads-up"
    )
    assert live_pids_with(f"{daemon_marker}-{run.id}"), "the stack's daemon runs while the apply waits for it"

    api_client().set_flow_run_state(run.id, Cancelling(message="held by a daemon"))

    ended = env.wait_for(run.id, states=ENDED, timeout=120)
    assert ended.state is not None
    assert ended.state.type.value == "CANCELLED", ended.state
    told = wait_until(
        lambda: [m.text for m in env.slack.messages if f"Deploy run cancelled on {ws}" in m.text],
        timeout=90,
        message="nobody was told of the cancellation",
    )
    assert "its workspace lock" in told[0], told[0]
    wait_until(lambda: env.holder(ws) is None, timeout=60, message="the cancelled run kept the workspace")
    wait_until(lambda: _state_lock(env, ws) is None, timeout=60, message="Terraform kept its state lock")
    wait_until(
        lambda: not live_pids_with(f"{daemon_marker}-{run.id}"), timeout=30, message="the daemon outlived the run"
    )


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["/usr/bin/python3", "/srv/app/app.py", "--api-key=s3cr3t"], "python3 app.py …"),
        (["sh", "-c", "curl -H 'Authorization: Bearer s3cr3t' http://x"], "sh …"),
        (["/opt/bin/daemon", "s3cr3t-token"], "daemon …"),
        (["python3", "-c", "import time; time.sleep(9)"], "python3 …"),
        (["/usr/bin/sleep"], "sleep"),
        ([], "?"),
    ],
)
def test_a_holder_is_named_by_its_program_and_script_never_by_its_arguments(argv: list[str], shown: str) -> None:
    assert command_label(argv) == shown
