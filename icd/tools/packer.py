"""The Packer CLI adapter (Packer 1.6.6, HCL2 templates), in the style of hashicorp/terraform-exec.

``build_argv`` is pure and tested as a table; ``build`` runs it
through ``icd.tools.process.run_command``, the project's one subprocess chokepoint, which streams lines,
redacts ``-var`` values and kills the whole process group (Packer forks a plugin process per
builder/provisioner) on timeout.

Conventions a template must follow:

* **Manifest.** Packer is run with the template directory as its working directory, and the build block
  must end with ``post-processor "manifest" {}`` *without* ``output``, so the manifest lands at the
  post-processor's default ``<template_dir>/packer-manifest.json``. The adapter injects nothing for it:
  an injected ``-var manifest_path=...`` would fail validation in every template that doesn't declare it.
  The manifest appends across runs, and Packer 1.6.6 offers no way to choose the run uuid (it ignores
  ``PACKER_RUN_UUID``), so ``build`` reads ``last_run_uuid`` before and after the run: an unchanged value
  means this run wrote no manifest. Two builds of the same directory at the same time would race on that
  file; the per-workspace deploy lock prevents that.
* **Artifact ids.** The manifest's ``artifact_id`` is turned into a mapping by one rule: if it is a
  comma-separated list of ``region:id`` pairs whose keys look like cloud regions (``us-east-1``,
  ``eu-west-2``, ``us-gov-west-1``), it becomes ``{region: id}`` (amazon-ebs:
  ``us-east-1:ami-0abc,us-west-2:ami-0def``). Anything else (the ``file`` builder's ``File``, the
  ``null`` builder's ``Null``, a path, a ``sha256:...`` digest) is one opaque id keyed by builder type:
  ``{"null": "Null"}``.

Variables travel as ``-var name=value`` (Packer rejects an undeclared name that way, while ``PKR_VAR_*``
would silently ignore a typo), so they are visible in ``ps``: never pass a secret as a variable. The
chokepoint redacts their values in every result and error, and errors never carry the environment.
Packer gets only the base environment plus ``env`` (credentials for a cloud builder, when it needs them).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icd.errors import PackerError
from icd.tools import binaries
from icd.tools.process import CompletedCommand, redact_argv, run_command

ProgressSink = Callable[[str], None]

MANIFEST_FILENAME = "packer-manifest.json"
_NO_ARTIFACTS = "no artifacts were created"

# CHECKPOINT_DISABLE: no phone-home (there is no network, and it would add seconds to every call).
_PACKER_ENV: Mapping[str, str] = {"CHECKPOINT_DISABLE": "1", "PACKER_NO_COLOR": "1"}
_UI_KINDS = frozenset({"say", "message", "error"})
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
_SOURCE_BLOCK = re.compile(r'^\s*source\s+"([^"]+)"\s+"([^"]+)"', re.MULTILINE)

logger = logging.getLogger(__name__)


# --- typed results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestFile:
    name: str
    size: int


@dataclass(frozen=True)
class ManifestBuild:
    """One entry of the manifest's ``builds`` list."""

    name: str
    builder_type: str
    artifact_ids: Mapping[str, str]
    packer_run_uuid: str
    files: tuple[ManifestFile, ...]
    custom_data: Mapping[str, str]
    build_time: int

    @property
    def source(self) -> str:
        """The HCL2 source address, as ``-only`` spells it: ``amazon-ebs.web``."""
        return f"{self.builder_type}.{self.name}"


@dataclass(frozen=True)
class PackerBuild:
    """What one ``packer build`` produced: the manifest entries of that run only."""

    packer_run_uuid: str
    builds: tuple[ManifestBuild, ...]


@dataclass(frozen=True)
class MachineReadableLine:
    """One ``-machine-readable`` line: ``timestamp,target,type,data...`` with the data un-escaped."""

    timestamp: int
    target: str
    type: str
    data: tuple[str, ...]

    @property
    def ui_kind(self) -> str | None:
        """``say``, ``message`` or ``error`` for a UI line, else ``None``."""
        if self.type == "ui" and self.data and self.data[0] in _UI_KINDS:
            return self.data[0]
        return None

    @property
    def text(self) -> str:
        """What a human would have seen, for UI lines; ``""`` for anything else."""
        if self.ui_kind is None:
            return ""
        return ",".join(self.data[1:]).strip("\n").rstrip()


# --- pure functions -----------------------------------------------------------------------------------


def _option_args(variables: Mapping[str, str], only: Sequence[str] | None) -> list[str]:
    args: list[str] = []
    if only:
        args.append(f"-only={','.join(only)}")
    for name in sorted(variables):
        args += ["-var", f"{name}={variables[name]}"]
    return args


def build_argv(
    variables: Mapping[str, str],
    *,
    only: Sequence[str] | None = None,
    template: str = ".",
    binary: str = "packer",
) -> list[str]:
    # No -force: a leftover artifact is a fault to look at, not something to delete silently.
    return [binary, "build", "-machine-readable", "-color=false", *_option_args(variables, only), template]


def _unescape(field: str) -> str:
    return field.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r")


def parse_machine_readable(line: str) -> MachineReadableLine | None:
    """Parse one stdout line; ``None`` for anything that isn't machine-readable output."""
    # Packer escapes commas inside data as %!(PACKER_COMMA), so a plain split is exact.
    fields = line.rstrip("\r\n").split(",")
    if len(fields) < 3 or not fields[0].isdigit():
        return None
    return MachineReadableLine(
        timestamp=int(fields[0]),
        target=fields[1],
        type=fields[2],
        data=tuple(_unescape(field) for field in fields[3:]),
    )


def parse_artifact_id(artifact_id: str, builder_type: str) -> dict[str, str]:
    """``us-east-1:ami-0abc,us-west-2:ami-0def`` -> by region; any other id -> ``{builder_type: id}``."""
    pairs = [part.split(":", 1) for part in artifact_id.split(",")]
    if all(len(pair) == 2 and _REGION.fullmatch(pair[0]) and pair[1] for pair in pairs):
        return {region: image for region, image in pairs}
    return {builder_type: artifact_id}


def _manifest_build(entry: Mapping[str, Any]) -> ManifestBuild:
    builder_type = str(entry["builder_type"])
    return ManifestBuild(
        name=str(entry["name"]),
        builder_type=builder_type,
        artifact_ids=parse_artifact_id(str(entry["artifact_id"]), builder_type),
        packer_run_uuid=str(entry["packer_run_uuid"]),
        files=tuple(ManifestFile(name=str(file["name"]), size=int(file["size"])) for file in entry.get("files") or ()),
        custom_data={str(k): str(v) for k, v in (entry.get("custom_data") or {}).items()},
        build_time=int(entry["build_time"]),
    )


def parse_manifest(document: Mapping[str, Any]) -> PackerBuild:
    """The builds of the manifest's last run (``packer_run_uuid == last_run_uuid``), oldest first."""
    try:
        run_uuid = str(document["last_run_uuid"])
        builds = tuple(
            _manifest_build(entry) for entry in document.get("builds") or () if entry.get("packer_run_uuid") == run_uuid
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PackerError(f"the Packer manifest has an unexpected shape: {exc!r}") from exc
    if not builds:
        raise PackerError(f"the Packer manifest has no builds for its last run {run_uuid}")
    return PackerBuild(packer_run_uuid=run_uuid, builds=builds)


# --- running packer -----------------------------------------------------------------------------------


def _read_manifest_document(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PackerError(f"could not read the Packer manifest {path}: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PackerError(f"the Packer manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PackerError(f"the Packer manifest {path} is not a JSON object")
    return document


def template_sources(template_dir: Path) -> list[str]:
    """The source addresses (``null.local_image``) the HCL2 templates in ``template_dir`` declare."""
    found: list[str] = []
    for template in sorted(Path(template_dir).glob("*.pkr.hcl")):
        text = template.read_text(encoding="utf-8", errors="replace")
        found += [f"{kind}.{name}" for kind, name in _SOURCE_BLOCK.findall(text)]
    return found


def _run(
    argv: Sequence[str],
    template_dir: Path,
    timeout: float | None,
    env: Mapping[str, str] | None,
    on_stdout: ProgressSink | None = None,
) -> CompletedCommand:
    return run_command(argv, cwd=template_dir, env={**(env or {}), **_PACKER_ENV}, timeout=timeout, on_stdout=on_stdout)


def _ui_errors(stdout: str) -> list[str]:
    errors = []
    for line in stdout.splitlines():
        parsed = parse_machine_readable(line)
        if parsed is not None and parsed.ui_kind == "error" and parsed.text:
            errors.append(parsed.text)
    return errors


def _check_only(template_dir: Path, only: Sequence[str] | None, argv: Sequence[str]) -> None:
    """Refuse an ``-only`` that names no declared source: Packer itself says nothing then, and builds nothing.
    Read from the template files, so it costs no Packer call."""
    if not only:
        return
    declared = template_sources(template_dir)
    unmatched = [source for source in only if source not in declared]
    if declared and unmatched:
        raise PackerError(
            f"-only={','.join(only)}: {', '.join(unmatched)} matches no source of the template in "
            f"{template_dir.name}/ (it declares {', '.join(declared)}); Packer would build nothing",
            argv=argv,
        )


def build(
    template_dir: Path,
    variables: Mapping[str, str],
    *,
    only: Sequence[str] | None = None,
    timeout: float | None = None,
    on_progress: ProgressSink | None = None,
    env: Mapping[str, str] | None = None,
) -> PackerBuild:
    """Build the HCL2 template in ``template_dir`` and return this run's manifest builds.

    No ``packer validate`` first: ``packer build`` parses and prepares the whole template before any builder
    starts, and refuses an invalid one with the same diagnostics (file and line at fault, exit code 1), so a
    separate validate only doubled Packer's start-up on every build. What validate added beyond that, the
    check that ``-only`` names a declared source, is made here from the template files before Packer starts.

    ``on_progress`` receives each UI line (say/message/error) as readable text while the build runs;
    a Prefect flow passes ``get_run_logger().info``. ``timeout`` bounds the build.

    Raises ``PackerError`` for an invalid template (nothing is built), a failed build (Packer's error lines
    and the exit code) or a run that wrote no manifest; ``ToolTimeoutError`` after killing the process group.
    """
    template_dir = Path(template_dir).resolve()
    argv = build_argv(variables, only=only, binary=binaries.packer_binary())
    _check_only(template_dir, only, redact_argv(argv))

    manifest_path = template_dir / MANIFEST_FILENAME
    before = _read_manifest_document(manifest_path)
    previous_run_uuid = before.get("last_run_uuid") if before else None

    forward = on_progress

    def on_stdout(line: str) -> None:
        nonlocal forward
        parsed = parse_machine_readable(line)
        if forward is None or parsed is None or not parsed.text:
            return
        try:
            forward(parsed.text)
        except Exception:
            # A broken sink must not kill the pipe reader: Packer would block on a full pipe and hang.
            logger.exception("on_progress failed; no further Packer progress will be forwarded")
            forward = None

    completed = _run(argv, template_dir, timeout, env, on_stdout)
    if completed.returncode != 0:
        errors = "\n\n".join(_ui_errors(completed.stdout)) or completed.stderr_tail()
        raise PackerError(
            f"packer build failed with exit code {completed.returncode}:\n{errors}".rstrip(),
            argv=completed.argv,
            exit_code=completed.returncode,
            stderr_tail=completed.stderr_tail(),
        )
    if _NO_ARTIFACTS in completed.stdout:
        raise PackerError(
            f"packer build finished but created no artifacts: no build of -only={','.join(only or ['(all)'])} "
            f"ran in {template_dir.name}/ (it declares {', '.join(template_sources(template_dir)) or 'no sources'})",
            argv=completed.argv,
            exit_code=completed.returncode,
        )

    after = _read_manifest_document(manifest_path)
    if after is None or after.get("last_run_uuid") == previous_run_uuid:
        raise PackerError(
            f"packer build succeeded but wrote no manifest to {manifest_path}: the build block has no "
            f'`post-processor "manifest" {{}}`, or it sets `output` (leave it out so the manifest lands at '
            f"{MANIFEST_FILENAME}); see docs/service-contract.md#manifest",
            argv=completed.argv,
            exit_code=completed.returncode,
        )
    return parse_manifest(after)
