"""The Terraform CLI adapter, modelled on hashicorp/terraform-exec.

Each subcommand has a pure argv builder (tested as a table) and a method on ``Terraform`` that runs it
through ``icd.tools.process.run_command``, the project's one subprocess chokepoint, then turns the exit
code and stderr into a typed result or a typed error from ``icd.errors``.

Why not python-terraform: its ``cmd()`` waits in ``Popen.communicate()`` with no timeout and no
process-group kill, so a hung provider hangs the worker; it buffers everything, so nothing streams to the
run log; it always inherits the whole worker environment (no per-call env, no control over
``TF_CLI_ARGS``); it logs stderr with the deprecated ``log.warn`` (an error under our
``filterwarnings = error``) and debug-logs the full command line including ``-var`` values; its ``apply``
takes a directory or a plan in the same argument and turns ``skip_plan=True`` into ``-auto-approve``,
and ``destroy`` sends ``-force`` by default; and failures come back as ``(code, out, err)`` tuples, not
typed errors.

Secrets: variable values travel as ``-var=name=value`` (Terraform rejects undeclared names that way, while
``TF_VAR_*`` silently ignores a typo), so they are visible in ``ps``; the chokepoint redacts them in every
result and error, errors never carry the environment, and the JSON from ``show``/``output``/``state pull``
is never streamed to ``on_line``. Pass values that must not appear in ``ps`` as ``TF_VAR_name`` through
``env``. Terraform sees only the base environment plus ``env``: the worker's own credentials never reach
it, nor the provisioners it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from icd.errors import (
    MissingVariableError,
    PlanFormatError,
    PlanIntegrityError,
    StalePlanError,
    StateLockedError,
    TerraformError,
)
from icd.tools import binaries
from icd.tools.process import CompletedCommand, LineSink, RunningTool, ToolWatch, last_lines, run_command

logger = logging.getLogger(__name__)

ActionKind = Literal["create", "update", "replace", "delete", "no-op", "read"]

# Majors of `show -json` format_version whose fields we read and have seen on real output:
# "0.2" from Terraform 1.0.3 (the pinned binary) and "1.2" from 1.11.4 (fixture in tests/fixtures).
SUPPORTED_PLAN_FORMAT_MAJORS = frozenset({0, 1})

# Set on every call; the caller's ``env`` may not override them.
MANAGED_ENV_KEYS = frozenset({"TF_IN_AUTOMATION", "CHECKPOINT_DISABLE", "TF_CLI_CONFIG_FILE", "TF_INPUT", "TF_FORK"})

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_GO_DURATION = re.compile(r"0|(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
_SENSITIVE = "(sensitive)"

_ACTION_KINDS: Mapping[tuple[str, ...], ActionKind] = {
    ("create",): "create",
    ("update",): "update",
    ("delete",): "delete",
    ("no-op",): "no-op",
    ("read",): "read",
    ("delete", "create"): "replace",
    ("create", "delete"): "replace",  # create_before_destroy
}


# --- typed results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanResult:
    has_changes: bool
    plan_file: Path


@dataclass(frozen=True)
class ResourceChange:
    """One resource instance in a plan. Values Terraform marks sensitive are replaced by "(sensitive)"."""

    address: str
    type: str
    name: str
    actions: tuple[str, ...]
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None

    @property
    def action(self) -> ActionKind:
        return _ACTION_KINDS[self.actions]


@dataclass(frozen=True)
class OutputChange:
    name: str
    actions: tuple[str, ...]
    before: Any
    after: Any

    @property
    def action(self) -> ActionKind:
        return _ACTION_KINDS[self.actions]


@dataclass(frozen=True)
class PlanSummary:
    """Counts per resource action; unlike Terraform's own line, a replace is not also an add + destroy."""

    add: int
    change: int
    replace: int
    destroy: int


@dataclass(frozen=True)
class Plan:
    format_version: str
    terraform_version: str
    resource_changes: tuple[ResourceChange, ...]
    output_changes: tuple[OutputChange, ...]
    sha256: str
    # What changed outside Terraform since the last apply (``resource_drift``, plan JSON since 0.15.4): "before"
    # is the state, "after" what the provider read. Empty when nothing drifted (Terraform omits the key).
    resource_drift: tuple[ResourceChange, ...] = ()

    def summary(self) -> PlanSummary:
        kinds = [change.action for change in self.resource_changes]
        return PlanSummary(
            add=kinds.count("create"),
            change=kinds.count("update"),
            replace=kinds.count("replace"),
            destroy=kinds.count("delete"),
        )

    @property
    def drifted(self) -> bool:
        """A refresh-only plan found something: a resource read back different from its state, or an output
        whose state value differs from what the state's resources now give."""
        return bool(self.resource_drift) or any(oc.action not in {"no-op", "read"} for oc in self.output_changes)

    @property
    def has_changes(self) -> bool:
        quiet = {"no-op", "read"}
        return any(rc.action not in quiet for rc in self.resource_changes) or any(
            oc.action not in quiet for oc in self.output_changes
        )


@dataclass(frozen=True)
class ApplyResult:
    plan_file: Path
    plan_sha256: str
    duration_seconds: float


@dataclass(frozen=True)
class StateVersion:
    """Identifies one write of the state: Terraform bumps ``serial`` on every write within a ``lineage``."""

    serial: int
    lineage: str


# --- pure argv and env builders -----------------------------------------------------------------------


def _check_lock_timeout(lock_timeout: str) -> str:
    if not _GO_DURATION.fullmatch(lock_timeout):
        raise ValueError(f"lock_timeout must be a Go duration such as '0s' or '2m', got {lock_timeout!r}")
    return lock_timeout


def init_args(
    *,
    backend_config: Mapping[str, str] | None = None,
    plugin_dir: Path | None = None,
    reconfigure: bool = False,
) -> list[str]:
    args = ["init", "-input=false", "-no-color"]
    for key, value in (backend_config or {}).items():
        args.append(f"-backend-config={key}={value}")
    if plugin_dir is not None:
        args.append(f"-plugin-dir={plugin_dir}")
    if reconfigure:
        args.append("-reconfigure")
    return args


def plan_args(*, variables: Mapping[str, str], out: Path, destroy: bool = False, lock_timeout: str = "0s") -> list[str]:
    args = [
        "plan",
        "-input=false",
        "-no-color",
        "-detailed-exitcode",
        f"-lock-timeout={_check_lock_timeout(lock_timeout)}",
        f"-out={out}",
    ]
    if destroy:
        args.append("-destroy")
    for name, value in variables.items():
        # A name with "=" or a leading "-" would be parsed as something else entirely.
        if not _VARIABLE_NAME.fullmatch(name):
            raise ValueError(f"not a Terraform variable name: {name!r}")
        args.append(f"-var={name}={value}")
    return args


def refresh_plan_args(*, variables: Mapping[str, str], out: Path) -> list[str]:
    """The drift check's plan: refresh-only, so it never proposes to undo anything, and ``-lock=false``, so it
    never takes the state lock a deploy needs. A plan never writes the state (only an apply of it would, and
    this plan is never applied), so reading without the lock is safe; at worst it reads a state an apply is
    writing, and the next check sees the result.

    No ``-json``: Terraform 1.0.3's streamed ``-json`` UI prints no output changes, so the drift is read from
    the saved plan (``show -json``: ``resource_drift`` and ``output_changes``).
    """
    args = ["plan", "-refresh-only", "-input=false", "-no-color", "-detailed-exitcode", "-lock=false", f"-out={out}"]
    for name, value in variables.items():
        if not _VARIABLE_NAME.fullmatch(name):
            raise ValueError(f"not a Terraform variable name: {name!r}")
        args.append(f"-var={name}={value}")
    return args


def show_plan_args(plan_file: Path) -> list[str]:
    return ["show", "-no-color", "-json", str(plan_file)]


def apply_args(plan_file: Path, *, lock_timeout: str = "0s") -> list[str]:
    # A saved plan applies without a prompt, so -auto-approve is never needed and never sent.
    return [
        "apply",
        "-input=false",
        "-no-color",
        f"-lock-timeout={_check_lock_timeout(lock_timeout)}",
        str(plan_file),
    ]


def output_args() -> list[str]:
    return ["output", "-no-color", "-json"]


def state_pull_args() -> list[str]:
    # `state pull` accepts neither -input nor -no-color.
    return ["state", "pull"]


def build_env(cli_config_file: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables one call adds to the chokepoint's base environment (nothing else is inherited, so a
    worker's ``TF_LOG`` or ``TF_CLI_ARGS`` never changes what a call does).

    ``TF_CLI_CONFIG_FILE`` is always set, so providers come only from the configured mirror and never from
    the network or an implicit ``~/.terraform.d/plugins``.

    ``TF_FORK=0``: Terraform 1.0 otherwise re-runs itself as a child under panicwrap, and that child hands
    the parent's stdout and stderr (our pipe) to every provisioner as extra descriptors (4 and 5, seen in
    /proc). A daemon a provisioner starts with its output redirected, as the service contract says, would
    still hold our pipe open after Terraform exits. Without the wrapper there is one process per call, and a
    SIGTERM reaches Terraform once.
    """
    env = dict(extra or {})
    refused = sorted(k for k in env if k in MANAGED_ENV_KEYS or k.startswith("TF_CLI_ARGS"))
    if refused:
        raise ValueError(f"these environment variables are managed by the Terraform adapter: {refused}")
    env.update(
        TF_IN_AUTOMATION="1",
        CHECKPOINT_DISABLE="1",
        TF_INPUT="0",
        TF_FORK="0",
        TF_CLI_CONFIG_FILE=str(cli_config_file),
    )
    return env


# --- pure parsers -------------------------------------------------------------------------------------


def _redact_sensitive(value: Any, mask: Any) -> Any:
    """Apply Terraform's ``*_sensitive`` mask (True, or a structure of the value's shape) to ``value``."""
    if mask is True:
        return _SENSITIVE
    if isinstance(mask, Mapping) and isinstance(value, Mapping):
        return {key: _redact_sensitive(item, mask.get(key)) for key, item in value.items()}
    if isinstance(mask, list) and isinstance(value, list):
        return [_redact_sensitive(item, mask[i] if i < len(mask) else None) for i, item in enumerate(value)]
    return value


def _actions(raw: Any, where: str) -> tuple[str, ...]:
    actions = tuple(raw) if isinstance(raw, list) else ()
    if actions not in _ACTION_KINDS:
        raise PlanFormatError(f"unknown actions {list(actions)!r} for {where} in the plan JSON")
    return actions


def parse_plan_json(document: str | bytes, *, sha256: str) -> Plan:
    """Parse ``terraform show -json PLANFILE``; raises ``PlanFormatError`` on a format we don't know."""
    try:
        data = json.loads(document)
        version = str(data["format_version"])
        major = int(version.split(".", 1)[0])
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanFormatError(f"not a Terraform plan JSON document: {exc}") from exc
    if major not in SUPPORTED_PLAN_FORMAT_MAJORS:
        raise PlanFormatError(
            f"plan JSON format_version {version} is not supported (supported majors: "
            f"{sorted(SUPPORTED_PLAN_FORMAT_MAJORS)})"
        )
    try:
        resources = tuple(
            ResourceChange(
                address=rc["address"],
                type=rc["type"],
                name=rc["name"],
                actions=_actions(rc["change"]["actions"], rc["address"]),
                before=_redact_sensitive(rc["change"].get("before"), rc["change"].get("before_sensitive")),
                after=_redact_sensitive(rc["change"].get("after"), rc["change"].get("after_sensitive")),
            )
            for rc in data.get("resource_changes") or ()
        )
        outputs = tuple(
            OutputChange(
                name=name,
                actions=_actions(change["actions"], f"output {name}"),
                before=_redact_sensitive(change.get("before"), change.get("before_sensitive")),
                after=_redact_sensitive(change.get("after"), change.get("after_sensitive")),
            )
            for name, change in sorted((data.get("output_changes") or {}).items())
        )
        drift = tuple(
            ResourceChange(
                address=rc["address"],
                type=rc["type"],
                name=rc["name"],
                actions=_actions(rc["change"]["actions"], f"drift of {rc['address']}"),
                before=_redact_sensitive(rc["change"].get("before"), rc["change"].get("before_sensitive")),
                after=_redact_sensitive(rc["change"].get("after"), rc["change"].get("after_sensitive")),
            )
            for rc in data.get("resource_drift") or ()
        )
    except (KeyError, TypeError) as exc:
        raise PlanFormatError(f"plan JSON is missing a field this adapter reads: {exc}") from exc
    return Plan(
        format_version=version,
        terraform_version=str(data.get("terraform_version", "")),
        resource_changes=resources,
        output_changes=outputs,
        sha256=sha256,
        resource_drift=drift,
    )


def parse_state_version(document: str) -> StateVersion | None:
    """Serial and lineage of a state document (as the backend stores it, or as ``terraform state pull``
    prints it); ``None`` when there is no state yet."""
    if not document.strip():
        return None
    try:
        data = json.loads(document)
        return StateVersion(serial=int(data["serial"]), lineage=str(data["lineage"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise TerraformError(f"the workspace's state document is not a Terraform state: {exc}") from exc


def parse_state_outputs(document: str | bytes) -> dict[str, Any]:
    """Output values by name from a state document, as ``terraform output -json`` gives them (sensitive ones
    included: never log the result); ``{}`` for no state. The apply reads the state the S3 backend stored
    instead of starting ``terraform output``, which would read that same document."""
    if not document.strip():
        return {}
    try:
        outputs = json.loads(document).get("outputs") or {}
        return {str(name): entry["value"] for name, entry in outputs.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TerraformError(f"the state's outputs are not what Terraform writes: {exc}") from exc


# The saved plan is a zip; this entry is the state the plan was made against (Terraform's planfile format).
_PLAN_PRIOR_STATE = "tfstate"


def plan_state_version(plan_file: Path) -> StateVersion | None:
    """Serial and lineage of the state a saved plan was made against, read from the plan file itself: exactly
    what Terraform compares at apply ("Saved plan is stale"), with no ``state pull``. ``None`` when the plan
    was made against no state (Terraform 1.0.3 records an empty lineage then, and checks nothing)."""
    try:
        with zipfile.ZipFile(plan_file) as archive:
            document = archive.read(_PLAN_PRIOR_STATE)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise PlanFormatError(f"{Path(plan_file).name} is not a saved plan with a prior state: {exc}") from exc
    try:
        data = json.loads(document)
        lineage, serial = str(data.get("lineage") or ""), int(data["serial"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlanFormatError(f"the prior state in {Path(plan_file).name} is not a state: {exc}") from exc
    return StateVersion(serial=serial, lineage=lineage) if lineage else None


_LOCK_ID = re.compile(r"^\s*ID:\s*(\S+)\s*$", re.MULTILINE)
_LOCK_WHO = re.compile(r"^\s*Who:\s*(\S.*?)\s*$", re.MULTILINE)
_MISSING_VARIABLE = re.compile(r'root module input variable\s+"([^"]+)"\s+is\s+not\s+set')


def error_from_failure(command: CompletedCommand) -> TerraformError:
    """The most specific error for a failed call, from Terraform's stderr. Never includes values or env."""
    argv = command.argv  # already redacted by the chokepoint
    subcommand = " ".join(arg for arg in argv[1:3] if not arg.startswith("-")) or "terraform"
    stderr = command.stderr
    common: dict[str, Any] = {
        "argv": argv,
        "exit_code": command.returncode,
        "stderr_tail": last_lines(stderr),
    }
    if "Error acquiring the state lock" in stderr:
        lock_id = match.group(1) if (match := _LOCK_ID.search(stderr)) else None
        who = match.group(1) if (match := _LOCK_WHO.search(stderr)) else None
        return StateLockedError(
            f"terraform {subcommand}: the state is locked by {who or 'someone'} (lock ID {lock_id})",
            lock_id=lock_id,
            who=who,
            **common,
        )
    if "No value for required variable" in stderr:
        names = list(dict.fromkeys(_MISSING_VARIABLE.findall(stderr)))
        return MissingVariableError(
            f"terraform {subcommand}: no value for required variable(s) {', '.join(names) or '(unknown)'}",
            variables=names,
            **common,
        )
    if "Saved plan is stale" in stderr:
        return StalePlanError(
            f"terraform {subcommand}: the saved plan is stale, the state changed after it was made; "
            "nothing was applied",
            **common,
        )
    diagnostics = error_diagnostics(stderr)
    cause = f": {'; '.join(diagnostics)}" if diagnostics else ""
    return TerraformError(f"terraform {subcommand} failed with exit code {command.returncode}{cause}", **common)


_DIAGNOSTIC_MAX = 400


def error_diagnostics(stderr: str) -> list[str]:
    """Terraform's own ``Error: ...`` diagnostics, each folded to one line (summary, location, detail)."""
    found: list[str] = []
    for block in re.split(r"(?m)^(?=\s*(?:│\s*)?Error: )", stderr):
        lines = [line.strip(" │╷╵\t") for line in block.splitlines()]
        lines = [line for line in lines if line]
        if lines and lines[0].startswith("Error: "):
            text = " ".join(lines)
            found.append(text if len(text) <= _DIAGNOSTIC_MAX else text[: _DIAGNOSTIC_MAX - 1] + "…")
    return found


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- watching an apply -----------------------------------------------------------------------------------

# `null_resource.app: Creating...`, then every 10 s `null_resource.app: Still creating... [1m10s elapsed]`;
# modify and destroy name the id: `aws_instance.web: Still destroying... [id=i-0abc, 20s elapsed]`
# (Terraform 1.0 `internal/command/views/hook_ui.go`).
_STARTING = re.compile(
    r"^(?P<address>\S.*?): (?P<doing>Creating|Modifying|Destroying|Reading)\.\.\.(?: \[id=[^\]]*\])?$"
)
_STILL = re.compile(
    r"^(?P<address>\S.*?): Still (?P<doing>creating|modifying|destroying|reading)\.\.\. "
    r"\[(?:id=[^\]]*?, )?(?P<elapsed>[0-9hms.]+) elapsed\]$"
)
_DONE = re.compile(r"^(?P<address>\S.*?): (?:Creation|Modifications|Destruction|Read) complete after ")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def _duration_seconds(text: str) -> float:
    """``1m10s`` -> 70.0 (Terraform's elapsed counts)."""
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _GO_DURATION_PART.findall(text))


@dataclass(frozen=True)
class InProgress:
    """A resource Terraform is still working on, and for how long."""

    address: str
    doing: str  # creating, modifying, destroying, reading
    seconds: float

    def __str__(self) -> str:
        return f"{self.address} (still {self.doing} after {self.seconds:.0f}s)"


@dataclass(frozen=True)
class HeadsUp:
    """An apply running longer than expected: what it is still doing and what may hold it."""

    elapsed_seconds: float
    expected_seconds: float
    stuck_after_seconds: float
    in_progress: tuple[InProgress, ...]
    holders: tuple[str, ...]  # processes holding the output of Terraform's children open (process.PipeHolder)


class ApplyWatch(ToolWatch):
    """Tells a stuck ``terraform apply`` from a slow one, from its output alone.

    Terraform prints "<address>: Still creating... [N elapsed]" every 10 s while a resource is in progress.
    Any other line (a resource done, a provisioner's output, an error) is progress. No progress for
    ``stuck_after`` seconds means stuck: ``check`` says so and the chokepoint stops Terraform. Once the
    apply has run ``heads_up_after`` seconds, ``on_heads_up`` is called once with what is still in progress
    and the processes that hold the output of Terraform's children open (the usual cause of a provisioner
    that never ends: a daemon started without redirecting its output). ``clock`` is ``time.monotonic``.
    """

    poll_seconds = 1.0

    def __init__(
        self,
        *,
        stuck_after: float,
        heads_up_after: float | None = None,
        on_heads_up: Callable[[HeadsUp], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stuck_after <= 0:
            raise ValueError(f"stuck_after must be positive, got {stuck_after}")
        self.stuck_after = stuck_after
        self.heads_up_after = heads_up_after
        self._on_heads_up = on_heads_up
        self._clock = clock
        self._lock = threading.Lock()
        self._last_progress: float | None = None
        self._in_progress: dict[str, tuple[str, float]] = {}  # address -> (doing, since)
        self.heads_up: HeadsUp | None = None  # the one given, if any

    def saw(self, line: str) -> None:
        text = line.strip()
        now = self._clock()
        with self._lock:
            if still := _STILL.match(text):
                address = still.group("address")
                if address not in self._in_progress:  # its "Creating..." line was missed: Terraform's count
                    started = now - _duration_seconds(still.group("elapsed"))
                    self._in_progress[address] = (still.group("doing"), started)
                return
            if not text:
                return
            self._last_progress = now
            if starting := _STARTING.match(text):
                self._in_progress[starting.group("address")] = (starting.group("doing").lower(), now)
            elif done := _DONE.match(text):
                self._in_progress.pop(done.group("address"), None)

    def in_progress(self) -> tuple[InProgress, ...]:
        """What Terraform is working on now, longest first."""
        now = self._clock()
        with self._lock:
            found = [InProgress(address, doing, now - since) for address, (doing, since) in self._in_progress.items()]
        return tuple(sorted(found, key=lambda item: -item.seconds))

    def check(self, tool: RunningTool) -> str | None:
        now = self._clock()
        with self._lock:
            # A retried apply is a new tool: what the earlier one printed is no progress of this one.
            quiet = now - max(self._last_progress or tool.started, tool.started)
        doing = self.in_progress()
        elapsed = now - tool.started
        if quiet >= self.stuck_after:
            what = ", ".join(map(str, doing)) if doing else "nothing printed"
            return (
                f"terraform apply is stuck: {what}, with no other progress for {quiet:.0f}s "
                f"(apply_timeout_seconds = {self.stuck_after:.0f})"
            )
        if self.heads_up is None and self.heads_up_after is not None and elapsed >= self.heads_up_after:
            holders = tuple(str(holder) for holder in tool.escaped_holders())
            self.heads_up = HeadsUp(elapsed, self.heads_up_after, self.stuck_after, doing, holders)
            if self._on_heads_up is not None:
                try:
                    self._on_heads_up(self.heads_up)
                except Exception:  # a heads-up is advice: failing to give it must not stop the apply
                    logger.exception("could not give the heads-up about a slow apply")
        return None


# --- the adapter --------------------------------------------------------------------------------------


class Terraform:
    """One Terraform working directory. Methods block until the CLI exits (or ``timeout`` kills it)."""

    def __init__(
        self,
        working_dir: Path,
        *,
        binary: str | None = None,
        cli_config_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        """``timeout`` bounds each call; ``deadline`` (a ``time.monotonic()`` value) bounds them all, e.g. when
        the credentials in ``env`` expire: a call gets what is left of it."""
        self.working_dir = Path(working_dir).resolve()
        self.binary = binary or binaries.terraform_binary()
        config = cli_config_file or binaries.terraform_cli_config()
        if config is None or not Path(config).is_file():
            # Without it Terraform would fall back to the public registry and ~/.terraform.d/plugins.
            raise ValueError(
                f"no Terraform CLI config with a provider mirror (got {config}); "
                "set ICD_TERRAFORM_CLI_CONFIG or pass cli_config_file"
            )
        self.cli_config_file = Path(config)
        self._extra_env = dict(env or {})
        build_env(self.cli_config_file, self._extra_env)  # refuse managed keys now
        self.timeout = timeout
        self.deadline = deadline
        self._on_line: LineSink | None = on_line

    def _path(self, path: Path) -> Path:
        return path if path.is_absolute() else self.working_dir / path

    def _run(self, args: list[str], *, stream_stdout: bool = True, watch: ToolWatch | None = None) -> CompletedCommand:
        argv = [self.binary, *args]
        env = build_env(self.cli_config_file, self._extra_env)
        timeout = self.timeout
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return run_command(
            argv,
            cwd=self.working_dir,
            env=env,
            timeout=timeout,
            on_stdout=self._on_line if stream_stdout else None,
            on_stderr=self._on_line,
            watch=watch,
        )

    def _run_checked(
        self, args: list[str], *, stream_stdout: bool = True, watch: ToolWatch | None = None
    ) -> CompletedCommand:
        result = self._run(args, stream_stdout=stream_stdout, watch=watch)
        if result.returncode != 0:
            raise error_from_failure(result)
        return result

    def init(
        self,
        *,
        backend_config: Mapping[str, str] | None = None,
        plugin_dir: Path | None = None,
        reconfigure: bool = False,
    ) -> None:
        self._run_checked(init_args(backend_config=backend_config, plugin_dir=plugin_dir, reconfigure=reconfigure))

    def plan(
        self, *, variables: Mapping[str, str], out: Path, destroy: bool = False, lock_timeout: str = "0s"
    ) -> PlanResult:
        """Save a plan to ``out``. No changes is a result (``has_changes=False``), not an error."""
        plan_file = self._path(out)
        args = plan_args(variables=variables, out=plan_file, destroy=destroy, lock_timeout=lock_timeout)
        result = self._run(args)
        # -detailed-exitcode: 0 = no changes, 2 = changes, anything else = error.
        if result.returncode not in (0, 2):
            raise error_from_failure(result)
        return PlanResult(has_changes=result.returncode == 2, plan_file=plan_file)

    def refresh_plan(self, *, variables: Mapping[str, str], out: Path) -> Plan:
        """What drifted since the last apply (:func:`refresh_plan_args`), read from the saved plan; nothing
        drifted is a result (``Plan.drifted`` False), a failure a typed error.

        The exit code only tells an error (1) from a plan: Terraform 1.0.3 exits 2 from every refresh-only
        ``-detailed-exitcode`` plan, with or without drift (seen on the pinned binary), so the plan decides.
        """
        plan_file = self._path(out)
        result = self._run(refresh_plan_args(variables=variables, out=plan_file))
        if result.returncode not in (0, 2):
            raise error_from_failure(result)
        return self.show_plan(plan_file)

    def show_plan(self, plan_file: Path) -> Plan:
        path = self._path(plan_file)
        if not path.is_file():
            raise ValueError(f"show_plan needs an existing saved plan file, got {path}")
        digest = file_sha256(path)
        result = self._run_checked(show_plan_args(path), stream_stdout=False)
        return parse_plan_json(result.stdout, sha256=digest)

    def apply(
        self,
        plan_file: Path,
        *,
        lock_timeout: str = "0s",
        expected_sha256: str | None = None,
        watch: ApplyWatch | None = None,
    ) -> ApplyResult:
        """Apply a saved plan file, never a directory.

        ``expected_sha256`` is checked against the bytes right before Terraform starts, so a plan swapped
        after approval raises ``PlanIntegrityError`` and nothing runs. With ``watch``, an apply that makes no
        progress for ``watch.stuck_after`` seconds is stopped (``ToolStuckError``).
        """
        path = self._path(plan_file)
        if not path.is_file():
            raise ValueError(f"apply needs an existing saved plan file, got {path}")
        digest = file_sha256(path)
        if expected_sha256 is not None and digest != expected_sha256:
            raise PlanIntegrityError(f"plan file {path.name} has sha256 {digest}, but {expected_sha256} was approved")
        result = self._run_checked(apply_args(path, lock_timeout=lock_timeout), watch=watch)
        return ApplyResult(plan_file=path, plan_sha256=digest, duration_seconds=result.duration_seconds)

    def output(self) -> dict[str, Any]:
        """Output values by name (sensitive ones included: never log the result)."""
        result = self._run_checked(output_args(), stream_stdout=False)
        try:
            outputs = json.loads(result.stdout or "{}")
            return {name: entry["value"] for name, entry in outputs.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TerraformError(f"`terraform output -json` printed something unexpected: {exc}") from exc

    def state_pull(self) -> StateVersion | None:
        # The state holds every secret of the workspace: it is parsed here and never streamed.
        result = self._run_checked(state_pull_args(), stream_stdout=False)
        return parse_state_version(result.stdout)
