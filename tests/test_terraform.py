"""The Terraform adapter against the real pinned Terraform 1.0.3 and the null provider from the mirror."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from icd.errors import (
    MissingVariableError,
    PlanFormatError,
    PlanIntegrityError,
    StalePlanError,
    StateLockedError,
    TerraformError,
    ToolTimeoutError,
)
from icd.tools import binaries
from icd.tools.process import redact_argv
from icd.tools.terraform import (
    PlanSummary,
    Terraform,
    apply_args,
    build_env,
    error_diagnostics,
    init_args,
    output_args,
    parse_plan_json,
    plan_args,
    refresh_plan_args,
    show_plan_args,
    state_pull_args,
)
from tests.helpers import pids_mentioning
from tests.waiting import wait_until

FIXTURES = Path(__file__).parent / "fixtures" / "terraform"
CLI_CONFIG = binaries.terraform_cli_config()

pytestmark = pytest.mark.skipif(CLI_CONFIG is None, reason="run scripts/bootstrap.sh: no provider mirror")


# --- pure builders ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        pytest.param(lambda: init_args(), ["init", "-input=false", "-no-color"], id="init"),
        pytest.param(
            lambda: init_args(
                backend_config={"bucket": "tf-state", "key": "web.tfstate"},
                plugin_dir=Path("/mirror"),
                reconfigure=True,
            ),
            [
                "init",
                "-input=false",
                "-no-color",
                "-backend-config=bucket=tf-state",
                "-backend-config=key=web.tfstate",
                "-plugin-dir=/mirror",
                "-reconfigure",
            ],
            id="init-all-options",
        ),
        pytest.param(
            lambda: plan_args(variables={"artifact_id": "ami-1"}, out=Path("/w/p.tfplan")),
            [
                "plan",
                "-input=false",
                "-no-color",
                "-detailed-exitcode",
                "-lock-timeout=0s",
                "-out=/w/p.tfplan",
                "-var=artifact_id=ami-1",
            ],
            id="plan",
        ),
        pytest.param(
            lambda: plan_args(variables={"a": "x=y", "b": ""}, out=Path("p"), destroy=True, lock_timeout="1m30s"),
            [
                "plan",
                "-input=false",
                "-no-color",
                "-detailed-exitcode",
                "-lock-timeout=1m30s",
                "-out=p",
                "-destroy",
                "-var=a=x=y",
                "-var=b=",
            ],
            id="plan-destroy-values-with-equals",
        ),
        pytest.param(
            lambda: refresh_plan_args(variables={"artifact_id": "ami-1"}, out=Path("/w/drift.tfplan")),
            [
                "plan",
                "-refresh-only",
                "-input=false",
                "-no-color",
                "-detailed-exitcode",
                "-lock=false",
                "-out=/w/drift.tfplan",
                "-var=artifact_id=ami-1",
            ],
            id="refresh-plan",
        ),
        pytest.param(
            lambda: show_plan_args(Path("/w/p.tfplan")),
            ["show", "-no-color", "-json", "/w/p.tfplan"],
            id="show",
        ),
        pytest.param(
            lambda: apply_args(Path("/w/p.tfplan")),
            ["apply", "-input=false", "-no-color", "-lock-timeout=0s", "/w/p.tfplan"],
            id="apply",
        ),
        pytest.param(
            lambda: apply_args(Path("/w/p.tfplan"), lock_timeout="30s"),
            ["apply", "-input=false", "-no-color", "-lock-timeout=30s", "/w/p.tfplan"],
            id="apply-lock-timeout",
        ),
        pytest.param(
            lambda: apply_args(Path("p"), lock_timeout="0"),
            ["apply", "-input=false", "-no-color", "-lock-timeout=0", "p"],
            id="apply-bare-zero-duration",
        ),
        pytest.param(lambda: output_args(), ["output", "-no-color", "-json"], id="output"),
        pytest.param(lambda: state_pull_args(), ["state", "pull"], id="state-pull"),
    ],
)
def test_argv_builders(build: Callable[[], list[str]], expected: list[str]) -> None:
    assert build() == expected


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: plan_args(variables={"a=b": "c"}, out=Path("p")), id="name-with-equals"),
        pytest.param(lambda: plan_args(variables={"-destroy": "1"}, out=Path("p")), id="name-like-flag"),
        pytest.param(lambda: plan_args(variables={}, out=Path("p"), lock_timeout="5"), id="bad-duration"),
        pytest.param(lambda: apply_args(Path("p"), lock_timeout="soon"), id="apply-bad-duration"),
        pytest.param(lambda: refresh_plan_args(variables={"-lock": "1"}, out=Path("p")), id="refresh-name-like-flag"),
    ],
)
def test_argv_builders_refuse_ambiguous_input(build: Callable[[], list[str]]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  # the message is ours; the type is the contract
        build()


def test_redact_argv_hides_variable_and_backend_values() -> None:
    argv = ["terraform", "plan", "-var=token=s3cr3t", "-backend-config=secret_key=k3y", "-out=p"]
    assert redact_argv(argv) == (
        "terraform",
        "plan",
        "-var=token=***",
        "-backend-config=secret_key=***",
        "-out=p",
    )


def test_build_env_sets_managed_keys_and_only_what_the_caller_gives() -> None:
    env = build_env(Path("/m/terraformrc"), {"TF_VAR_token": "t"})
    assert env == {
        "TF_VAR_token": "t",
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
        "TF_INPUT": "0",
        "TF_FORK": "0",
        "TF_CLI_CONFIG_FILE": "/m/terraformrc",
    }


@pytest.mark.parametrize("key", ["TF_CLI_CONFIG_FILE", "CHECKPOINT_DISABLE", "TF_CLI_ARGS", "TF_CLI_ARGS_plan"])
def test_build_env_refuses_managed_keys_from_caller(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        build_env(Path("/m/terraformrc"), {key: "x"})


# --- pure plan parser ---------------------------------------------------------------------------------


def test_plan_parser_rejects_unknown_format_major() -> None:
    document = json.dumps({"format_version": "9.0", "terraform_version": "9.9.9", "resource_changes": []})
    with pytest.raises(PlanFormatError, match=r"9\.0"):
        parse_plan_json(document, sha256="0" * 64)


def test_plan_parser_reads_format_1_from_a_newer_terraform() -> None:
    document = (FIXTURES / "plan_json" / "replace_format_1.2_terraform_1.11.4.json").read_text()
    plan = parse_plan_json(document, sha256="ab" * 32)
    assert plan.format_version == "1.2"
    [change] = plan.resource_changes
    assert change.action == "replace"
    assert change.before is not None
    assert change.before["triggers"] == {"artifact": "v1"}
    assert change.after == {"triggers": {"artifact": "v2"}}
    assert plan.summary().replace == 1
    assert plan.has_changes


def test_plan_parser_masks_values_terraform_marks_sensitive() -> None:
    change = {
        "actions": ["update"],
        "before": {"password": "old-secret", "name": "db"},
        "after": {"password": "new-secret", "name": "db"},
        "before_sensitive": {"password": True},
        "after_sensitive": {"password": True},
    }
    document = json.dumps(
        {
            "format_version": "0.2",
            "terraform_version": "1.0.3",
            "resource_changes": [
                {"address": "x.db", "type": "x", "name": "db", "change": change},
            ],
            "output_changes": {"dsn": {"actions": ["update"], "before": "a", "after": "b", "after_sensitive": True}},
        }
    )
    plan = parse_plan_json(document, sha256="0" * 64)
    assert "secret" not in repr(plan)
    assert plan.resource_changes[0].after == {"password": "(sensitive)", "name": "db"}
    assert plan.output_changes[0].after == "(sensitive)"
    assert plan.summary().change == 1


def test_refresh_plan_parser_reads_output_drift_from_the_pinned_terraform() -> None:
    # Captured from Terraform 1.0.3: the app fixture applied, then its state's trigger edited by hand. The null
    # provider reads nothing back, so the drift shows as the output that no longer matches the state.
    document = (FIXTURES / "plan_json" / "refresh_only_output_drift_terraform_1.0.3.json").read_text()
    plan = parse_plan_json(document, sha256="0" * 64)
    assert plan.resource_drift == ()
    assert plan.resource_changes == ()
    assert [(o.name, o.action, o.before, o.after) for o in plan.output_changes] == [
        ("artifact_id", "update", "v1", "hand")
    ]
    assert plan.drifted


@pytest.mark.parametrize(
    ("drift", "expected"),
    [
        pytest.param([], [], id="none"),
        pytest.param(
            [
                {
                    "address": "aws_instance.web",
                    "type": "aws_instance",
                    "name": "web",
                    "change": {
                        "actions": ["update"],
                        "before": {"instance_type": "t3.micro", "user_data": "s3cr3t", "tags": {"a": "1"}},
                        "after": {"instance_type": "t3.large", "user_data": "0th3r", "tags": {"a": "2"}},
                        "before_sensitive": {"user_data": True, "tags": {}},
                        "after_sensitive": {"user_data": True, "tags": {}},
                    },
                }
            ],
            [
                (
                    "aws_instance.web",
                    "update",
                    {"instance_type": "t3.micro", "user_data": "(sensitive)", "tags": {"a": "1"}},
                    {"instance_type": "t3.large", "user_data": "(sensitive)", "tags": {"a": "2"}},
                )
            ],
            id="changed-with-sensitive",
        ),
        pytest.param(
            [
                {
                    "address": 'aws_instance.web["b"]',
                    "type": "aws_instance",
                    "name": "web",
                    "change": {"actions": ["delete"], "before": {"id": "i-1"}, "after": None},
                }
            ],
            [('aws_instance.web["b"]', "delete", {"id": "i-1"}, None)],
            id="deleted-out-of-band",
        ),
    ],
)
def test_refresh_plan_parser_reads_resource_drift(drift: list[dict[str, object]], expected: list[object]) -> None:
    # The shape of `resource_drift` (plan JSON 0.15.4+, as resource_changes); the null provider of the local
    # stacks never reports any, so these rows are written from Terraform's JSON format documentation.
    document = json.dumps({"format_version": "0.2", "terraform_version": "1.0.3", "resource_drift": drift})
    plan = parse_plan_json(document, sha256="0" * 64)
    assert [(d.address, d.action, d.before, d.after) for d in plan.resource_drift] == expected
    assert "s3cr3t" not in repr(plan)
    assert "0th3r" not in repr(plan)
    assert plan.drifted == bool(expected)
    assert not plan.has_changes


# --- against the real binary --------------------------------------------------------------------------


def _workdir(tmp_path: Path, fixture: str) -> Path:
    workdir = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, workdir)
    return workdir


@pytest.fixture
def lines() -> list[str]:
    return []


@pytest.fixture
def app(tmp_path: Path, lines: list[str]) -> Terraform:
    terraform = Terraform(_workdir(tmp_path, "app"), timeout=60, on_line=lines.append)
    terraform.init()
    return terraform


def _unique_sleep() -> str:
    # A duration no other process uses, so the test can find its own `sleep` in /proc.
    return f"3{uuid.uuid4().int % 10}.{uuid.uuid4().int % 10**9:09d}"


@pytest.mark.tools
def test_no_call_runs_past_the_deadline_whatever_its_own_timeout(tmp_path: Path) -> None:
    """The deadline is when the step's credentials stop working: a call started near it gets what is left."""
    terraform = Terraform(tmp_path, timeout=600, deadline=time.monotonic() - 1)
    with pytest.raises(ToolTimeoutError, match="timed out after 0s"):
        terraform.init()


@pytest.mark.tools
def test_create_then_replace_then_no_changes(app: Terraform, lines: list[str]) -> None:
    assert app.state_pull() is None

    first = app.plan(variables={"artifact_id": "ami-v1"}, out=Path("v1.tfplan"))
    assert first.has_changes
    assert first.plan_file == app.working_dir / "v1.tfplan"
    plan_v1 = app.show_plan(first.plan_file)
    assert plan_v1.format_version.startswith("0.")
    assert plan_v1.terraform_version == "1.0.3"
    assert [(c.address, c.action) for c in plan_v1.resource_changes] == [("null_resource.app", "create")]
    assert plan_v1.summary().add == 1

    applied = app.apply(first.plan_file, expected_sha256=plan_v1.sha256)
    assert applied.plan_sha256 == plan_v1.sha256
    assert any("Apply complete!" in line for line in lines)
    after_v1 = app.state_pull()
    assert after_v1 is not None

    second = app.plan(variables={"artifact_id": "ami-v2"}, out=Path("v2.tfplan"))
    assert second.has_changes
    plan_v2 = app.show_plan(second.plan_file)
    [change] = plan_v2.resource_changes
    assert change.actions == ("delete", "create")
    assert change.action == "replace"
    assert change.before is not None
    assert change.before["triggers"] == {"artifact": "ami-v1"}
    assert change.after is not None
    assert change.after["triggers"] == {"artifact": "ami-v2"}
    assert plan_v2.summary() == PlanSummary(add=0, change=0, replace=1, destroy=0)
    assert [(o.name, o.before, o.after) for o in plan_v2.output_changes] == [("artifact_id", "ami-v1", "ami-v2")]

    app.apply(second.plan_file)
    assert app.output() == {"artifact_id": "ami-v2"}
    unchanged = app.plan(variables={"artifact_id": "ami-v2"}, out=Path("v2-again.tfplan"))
    assert not unchanged.has_changes
    plan_again = app.show_plan(unchanged.plan_file)
    assert not plan_again.has_changes
    assert [c.action for c in plan_again.resource_changes] == ["no-op"]
    after_v2 = app.state_pull()
    assert after_v2 is not None
    assert after_v2.lineage == after_v1.lineage
    assert after_v2.serial > after_v1.serial


@pytest.mark.tools
def test_stale_saved_plan_is_refused_and_state_is_untouched(app: Terraform) -> None:
    # Terraform 1.0.3 checks staleness only against a plan made on an existing state (lineage set), so
    # the state must exist before plan A; the flow's StateVersion check covers the first deploy.
    app.apply(app.plan(variables={"artifact_id": "base"}, out=Path("base.tfplan")).plan_file)
    plan_a = app.plan(variables={"artifact_id": "a"}, out=Path("a.tfplan"))
    app.apply(app.plan(variables={"artifact_id": "b"}, out=Path("b.tfplan")).plan_file)
    state_file = app.working_dir / "terraform.tfstate"
    before_bytes = state_file.read_bytes()
    before_version = app.state_pull()

    with pytest.raises(StalePlanError) as caught:
        app.apply(plan_a.plan_file)

    assert caught.value.exit_code == 1
    assert "Saved plan is stale" in caught.value.stderr_tail
    assert state_file.read_bytes() == before_bytes
    assert app.state_pull() == before_version
    assert app.output() == {"artifact_id": "b"}


@pytest.mark.tools
def test_first_deploy_staleness_needs_the_state_version_check(app: Terraform) -> None:
    # Terraform 1.0.3 applies a plan made on an empty state even after another apply created the state,
    # duplicating the resource. Comparing state_pull() before plan and before apply is what catches it.
    at_plan_time = app.state_pull()
    plan_a = app.plan(variables={"artifact_id": "a"}, out=Path("a.tfplan"))
    app.apply(app.plan(variables={"artifact_id": "b"}, out=Path("b.tfplan")).plan_file)

    before_apply = app.state_pull()

    assert at_plan_time is None
    assert before_apply is not None
    app.apply(plan_a.plan_file)  # not refused: this is the gap the flow must close itself
    assert app.output() == {"artifact_id": "a"}


@pytest.mark.tools
def test_missing_variable_is_named(app: Terraform) -> None:
    with pytest.raises(MissingVariableError) as caught:
        app.plan(variables={}, out=Path("p.tfplan"))
    assert caught.value.variables == ("artifact_id",)
    assert "artifact_id" in str(caught.value)
    assert not (app.working_dir / "p.tfplan").exists()


@pytest.mark.tools
def test_variable_values_never_reach_the_error(tmp_path: Path) -> None:
    terraform = Terraform(_workdir(tmp_path, "app"), timeout=60)
    terraform.init()
    with pytest.raises(TerraformError) as caught:
        terraform.plan(variables={"artifact_id": "ami-1", "undeclared": "hunter2"}, out=Path("p"))
    error = caught.value
    assert "undeclared" in error.stderr_tail  # Terraform refuses a -var it does not know
    assert "hunter2" not in f"{error} {error.argv} {error.stderr_tail}"
    assert "-var=undeclared=***" in error.argv


@pytest.mark.tools
def test_inherited_cli_args_cannot_change_the_operation(app: Terraform, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited, TF_CLI_ARGS_plan=-destroy on an empty state would plan no changes; the worker's
    # environment never reaches Terraform.
    monkeypatch.setenv("TF_CLI_ARGS_plan", "-destroy")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    result = app.plan(variables={"artifact_id": "ami-v1"}, out=Path("p.tfplan"))
    assert result.has_changes


@pytest.mark.tools
def test_apply_refuses_anything_but_an_approved_plan_file(app: Terraform) -> None:
    with pytest.raises(ValueError, match="saved plan file"):
        app.apply(app.working_dir)
    with pytest.raises(ValueError, match="saved plan file"):
        app.apply(Path("missing.tfplan"))
    with pytest.raises(ValueError, match="saved plan file"):
        app.show_plan(Path("missing.tfplan"))
    plan = app.plan(variables={"artifact_id": "ami-v1"}, out=Path("p.tfplan"))
    with pytest.raises(PlanIntegrityError):
        app.apply(plan.plan_file, expected_sha256="0" * 64)
    assert app.state_pull() is None


@pytest.mark.tools
def test_held_state_lock_is_reported_with_id_and_holder(tmp_path: Path) -> None:
    assert CLI_CONFIG is not None
    slow = Terraform(_workdir(tmp_path, "slow_apply"), timeout=60)
    slow.init()
    sleep_for = _unique_sleep()
    holder_plan = slow.plan(variables={"artifact_id": "a", "sleep_seconds": sleep_for}, out=Path("p"))
    lock_info = slow.working_dir / ".terraform.tfstate.lock.info"
    holder = subprocess.Popen(
        [slow.binary, *apply_args(holder_plan.plan_file)],
        cwd=slow.working_dir,
        env={**os.environ, **build_env(CLI_CONFIG)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: lock_info.exists() or holder.poll() is not None,
            timeout=20,
            message="the background apply never took the lock",
        )
        assert holder.poll() is None, "the lock-holding apply exited early"
        held = json.loads(lock_info.read_text())

        with pytest.raises(StateLockedError) as caught:
            slow.plan(variables={"artifact_id": "b", "sleep_seconds": "0"}, out=Path("q"), lock_timeout="0s")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()

    assert caught.value.lock_id == held["ID"]
    assert caught.value.who == held["Who"]
    assert held["ID"] in str(caught.value)


@pytest.mark.tools
def test_refresh_plan_sees_a_state_edited_by_hand_and_never_writes_or_locks_it(app: Terraform) -> None:
    app.apply(app.plan(variables={"artifact_id": "a"}, out=Path("a.tfplan")).plan_file)
    # Terraform 1.0.3 exits 2 from a refresh-only plan even when nothing drifted: the plan decides.
    assert not app.refresh_plan(variables={"artifact_id": "a"}, out=Path("clean.tfplan")).drifted

    state_file = app.working_dir / "terraform.tfstate"
    state = json.loads(state_file.read_text())
    state["resources"][0]["instances"][0]["attributes"]["triggers"]["artifact"] = "by-hand"
    state_file.write_text(json.dumps(state))
    edited = state_file.read_bytes()
    # Hold the state lock as the local backend takes it (an fcntl lock on the state file), as a deploy would.
    with state_file.open("r+b") as held:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StateLockedError):
            app.plan(variables={"artifact_id": "a"}, out=Path("locked.tfplan"))
        drift = app.refresh_plan(variables={"artifact_id": "a"}, out=Path("drift.tfplan"))
    assert state_file.read_bytes() == edited, "a refresh-only plan never writes the state"
    assert drift.drifted
    assert [(o.name, o.before, o.after) for o in drift.output_changes] == [("artifact_id", "a", "by-hand")]


@pytest.mark.tools
def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    slow = Terraform(_workdir(tmp_path, "slow_apply"), timeout=60)
    slow.init()
    sleep_for = _unique_sleep()
    plan = slow.plan(variables={"artifact_id": "a", "sleep_seconds": sleep_for}, out=Path("p"))
    sleeping_pids: list[int] = []

    def watch(line: str) -> None:
        # Proves the sleep really ran, so the check after the timeout can fail.
        if "Executing:" in line:
            sleeping_pids.extend(wait_until(lambda: pids_mentioning(sleep_for), timeout=5, message="no sleep"))

    # Long enough for a loaded 2-CPU runner to reach the provisioner, far shorter than the sleep.
    impatient = Terraform(slow.working_dir, timeout=5, on_line=watch)

    with pytest.raises(ToolTimeoutError) as caught:
        impatient.apply(plan.plan_file)

    assert sleeping_pids
    assert caught.value.argv[1] == "apply"
    wait_until(lambda: not pids_mentioning(sleep_for), timeout=5, message="the provisioner outlived the kill")


def test_constructor_requires_a_mirror_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CLI config"):
        Terraform(tmp_path, cli_config_file=tmp_path / "absent.tfrc")
    with pytest.raises(ValueError, match="TF_CLI_CONFIG_FILE"):
        Terraform(tmp_path, env={"TF_CLI_CONFIG_FILE": "/elsewhere"})


@pytest.mark.tools
def test_errors_carry_terraforms_own_diagnostics(tmp_path: Path) -> None:
    workdir = tmp_path / "broken"
    workdir.mkdir()
    (workdir / "main.tf").write_text('resource "null_resource" "x" {\n  triggers = { a = var.nope }\n}\n')
    terraform = Terraform(workdir, timeout=60)
    terraform.init()
    with pytest.raises(TerraformError) as caught:
        terraform.plan(variables={}, out=Path("p"))
    message = str(caught.value)
    assert "Reference to undeclared input variable" in message
    assert "main.tf line 2" in message


def test_error_diagnostics_fold_each_block_to_a_line() -> None:
    stderr = "\nError: Unsupported argument\n\n  on main.tf line 3:\n   3:   bogus = 1\n\nNo such thing.\n"
    assert error_diagnostics(stderr) == ["Error: Unsupported argument on main.tf line 3: 3:   bogus = 1 No such thing."]
