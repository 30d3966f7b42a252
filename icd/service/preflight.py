"""The pre-flight check: every breach of the service contract (docs/service-contract.md) in a service's Packer
template, its Terraform stacks and its workspaces' states, found before anything runs.

Without it each breach surfaces one at a time, late, and often as something else: a template whose source
is misnamed builds nothing and exits 0, a stack without the gate's Service Meta gets a healthy version rolled
back, a workspace already holding another service plans to destroy it. :func:`check_service` reads the files
and the states it is given and returns typed :class:`Finding` values, each naming the file, the cause and the
fix; it runs no tool and changes nothing, so the fast tests cover it as a table. The ``icd-service check``
command and the build's ``preflight-check`` step gather the inputs (``icd.toml``, a checkout, the states in
the registry's bucket) with :func:`service_under_check` and report what it returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from icd.config import PipelineConfig
from icd.deploy.plan_view import ARTIFACT_KEYS
from icd.errors import ConfigError, ContractBreachError
from icd.paths import PROJECT_ROOT
from icd.service import hcl
from icd.service.contract import (
    CONTRACT_PAGE,
    GATE_META_KEY,
    IDENTITY_KEY,
    IDENTITY_MAPS,
    IMAGE_PATH_KEY,
    LOCAL_IMAGE_BUILDERS,
    MANIFEST_POST_PROCESSOR,
    PACKER_VARIABLES,
    ROLLOUT_SLOT_FIELDS,
    ROLLOUT_VARIABLE,
    SERVICE_IDS_OUTPUT,
    STACK_VARIABLES,
    Section,
    cite,
)
from icd.service.shell import daemons_holding_output
from icd.text import one_line
from icd.tools.packer import MANIFEST_FILENAME

FindingKind = Literal[
    "template-missing",
    "template-unparsable",
    "packer-variable-undeclared",
    "packer-variable-unset",
    "only-matches-nothing",
    "manifest-missing",
    "manifest-output-set",
    "manifest-image-path-missing",
    "stack-missing",
    "stack-unparsable",
    "stack-variable-undeclared",
    "stack-variable-unset",
    "gate-meta-missing",
    "gate-meta-in-triggers",
    "artifact-key-missing",
    "identity-missing",
    "provisioner-inherits-environment",
    "provisioner-daemon-keeps-output",
    "workspace-holds-another-service",
    "workspace-state-unreadable",
    "rollout-variable-undeclared",
    "rollout-variable-type",
    "rollout-variable-unused",
    "rollout-output-missing",
]

_PACKER_VALUE_FILES = ("*.auto.pkrvars.hcl",)
_TERRAFORM_VALUE_FILES = ("terraform.tfvars", "*.auto.tfvars")
_TERRAFORM_JSON_VALUE_FILES = ("terraform.tfvars.json", "*.auto.tfvars.json")


@dataclass(frozen=True)
class Finding:
    """One breach: where it is (a file, a directory or a state object), why it breaks a run, how to fix it."""

    kind: FindingKind
    file: str
    cause: str
    fix: str
    section: Section
    # A warning is reported and the build goes on (the check reads shell text, which it can't be sure of);
    # a breach stops the build.
    severity: Literal["breach", "warning"] = "breach"

    @property
    def message(self) -> str:
        """What an operator reads (the command prints it, the build's failure carries it)."""
        return f"{self.file}: {self.cause}. Fix: {self.fix}. See {cite(self.section)}"


@dataclass(frozen=True)
class WorkspaceTarget:
    """A workspace the service deploys to: its stack and what its state holds now.

    ``state`` is the state document's bytes as stored (None: the workspace has no state yet, or it was not
    read). ``rollout_instances`` is the instance count of its rollout (``[workspaces.<name>.rollout]``), None
    when it declares none: a workspace with a rollout gets its stack a list of instances, so that stack must
    take one (:func:`rollout_findings`)."""

    workspace: str
    stack_dir: Path
    state: bytes | None = None
    state_location: str = ""
    rollout_instances: int | None = None


@dataclass(frozen=True)
class ServiceUnderCheck:
    """A service as the pipeline will build and deploy it: a checkout of its repository plus its icd.toml
    entries. File names in findings are relative to ``root`` (templates) or the project (stacks)."""

    namespace: str
    root: Path
    template_dir: str
    packer_only: tuple[str, ...]
    workspaces: tuple[WorkspaceTarget, ...] = ()


# --- the whole check ----------------------------------------------------------------------------------


def check_service(service: ServiceUnderCheck) -> list[Finding]:
    """Every breach of the contract, templates first, then each distinct stack, then each workspace's state."""
    findings = check_template(service.root, service.template_dir, service.packer_only)
    stacks: dict[Path, list[str]] = {}
    for target in service.workspaces:
        stacks.setdefault(target.stack_dir, []).append(target.workspace)
    for stack_dir, workspaces in stacks.items():
        findings += check_stack(stack_dir, workspaces)
        rolled_out = [
            target.workspace
            for target in service.workspaces
            if target.stack_dir == stack_dir and target.rollout_instances is not None
        ]
        if rolled_out:
            findings += rollout_findings(stack_dir, rolled_out)
    for target in service.workspaces:
        findings += check_state(target, service.namespace)
    return findings


def breaches(findings: Sequence[Finding]) -> list[Finding]:
    """The findings that stop a build (the others are warnings, reported only)."""
    return [finding for finding in findings if finding.severity == "breach"]


def warnings(findings: Sequence[Finding]) -> list[str]:
    """What an operator reads for each warning."""
    return [f"warning: {finding.message}" for finding in findings if finding.severity == "warning"]


def breach_error(namespace: str, findings: Sequence[Finding]) -> ContractBreachError:
    """The error that stops a build: every finding, one per line, so the run's state message names them all."""
    count = f"{len(findings)} breach{'es' if len(findings) != 1 else ''}"
    lines = [f"{namespace} breaks the service contract ({CONTRACT_PAGE}), {count}:"]
    lines += [f"- {finding.message}" for finding in findings]
    return ContractBreachError("\n".join(lines), findings=[finding.message for finding in findings])


def service_under_check(
    config: PipelineConfig,
    namespace: str,
    root: Path,
    *,
    workspaces: Sequence[str] = (),
    read_state: Callable[[str], tuple[bytes | None, str]] | None = None,
) -> ServiceUnderCheck:
    """The service ``namespace`` of ``config``, checked out at ``root``, with the workspaces that follow it
    (or only ``workspaces``, each of which must follow it). ``read_state(workspace)`` returns the state's
    bytes (None when there is none) and where it is; without it, states are not read."""
    settings = config.namespace(namespace)
    following = [name for name, workspace in sorted(config.workspaces.items()) if workspace.namespace == namespace]
    for name in workspaces:
        followed = config.workspace(name).namespace
        if followed != namespace:
            raise ConfigError(f"workspace {name!r} follows {followed}, not {namespace} (icd.toml)")
    targets = []
    for name in workspaces or following:
        state, location = read_state(name) if read_state is not None else (None, "")
        rollout = config.workspace(name).rollout
        targets.append(
            WorkspaceTarget(
                workspace=name,
                stack_dir=config.workspace(name).stack_path,
                state=state,
                state_location=location,
                rollout_instances=rollout.instances if rollout is not None else None,
            )
        )
    return ServiceUnderCheck(
        namespace=namespace,
        root=root,
        template_dir=settings.template_dir,
        packer_only=tuple(settings.packer_only),
        workspaces=tuple(targets),
    )


def _shown(path: Path, *roots: Path) -> str:
    """``path`` relative to the first root that holds it, else as it is."""
    for root in roots:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return str(path)


def _unparsable(kind: FindingKind, problem: hcl.ParseProblem, shown: str, tool: str, section: Section) -> Finding:
    where = f"{shown}:{problem.line}" if problem.line else shown
    return Finding(
        kind,
        where,
        f"it is not valid HCL ({problem.reason}), so {tool} would refuse it and nothing else in it can be checked",
        "correct the syntax at that line" if problem.line else "correct the file's syntax",
        section,
    )


# --- the Packer template ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Build:
    block: hcl.Block
    sources: tuple[str, ...]  # "type.name", as -only spells them

    def post_processors(self) -> list[hcl.Block]:
        found = list(self.block.blocks("post-processor"))
        for chain in self.block.blocks("post-processors"):
            found += chain.blocks("post-processor")
        return found


def _build_sources(block: hcl.Block) -> tuple[str, ...]:
    names: list[str] = []
    listed = block.attributes().get("sources")
    for entry in listed if isinstance(listed, list) else ():
        if (name := hcl.literal(entry)) is not None:
            names.append(name.removeprefix("source."))
    for nested in block.blocks("source"):
        kind_name = nested.label.removeprefix("source.")
        override = hcl.literal(nested.attributes().get("name"))
        names.append(f"{kind_name.split('.', 1)[0]}.{override}" if override else kind_name)
    return tuple(names)


def _literals(value: object) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [text for item in value if (text := hcl.literal(item)) is not None]


def _applies_to(post_processor: hcl.Block, source: str) -> bool:
    attributes = post_processor.attributes()
    only, excluded = _literals(attributes.get("only")), _literals(attributes.get("except"))
    return (only is None or source in only) and (excluded is None or source not in excluded)


def check_template(root: Path, template_dir: str, packer_only: Sequence[str]) -> list[Finding]:
    """The template's breaches: variables, sources built, manifest (``docs/service-contract.md``)."""
    directory = root / template_dir
    shown_dir = f"{template_dir.rstrip('/')}/"
    templates = sorted(directory.glob("*.pkr.hcl")) if directory.is_dir() else []
    if not templates:
        state = "has no *.pkr.hcl file" if directory.is_dir() else "does not exist"
        return [
            Finding(
                "template-missing",
                shown_dir,
                f"the namespace's template_dir {shown_dir} {state}, so there is no Packer template to build",
                "put the HCL2 template (*.pkr.hcl) there, or set template_dir of the namespace in icd.toml",
                "packer-variables",
            )
        ]
    parsed = hcl.read_files(templates)
    if parsed.problems:
        return [
            _unparsable("template-unparsable", problem, _shown(problem.file, root), "Packer", "packer-variables")
            for problem in parsed.problems
        ]
    builds = [_Build(block, _build_sources(block)) for block in parsed.of_type("build")]
    home = _shown(builds[0].block.file if builds else templates[0], root)
    findings = _packer_variables(parsed, root, directory, home)
    sources = {block.label: block for block in parsed.of_type("source") if len(block.labels) == 2}
    built = [source for build in builds for source in build.sources]
    targets = list(packer_only) or built
    if not targets:
        findings.append(
            Finding(
                "only-matches-nothing",
                home,
                "no build block of the template lists a source, so Packer would build nothing and exit 0",
                'add build { sources = ["source.<type>.<name>"] } naming the source to build',
                "sources-built",
            )
        )
    for source in targets:
        if source not in built:
            findings.append(_unmatched_only(source, packer_only, sources, home, shown_dir))
            continue
        for build in builds:
            if source in build.sources:
                findings += _manifest(build, source, _shown(build.block.file, root))
    return findings


def _packer_variables(parsed: hcl.HclFiles, root: Path, directory: Path, home: str) -> list[Finding]:
    declared = {block.labels[0]: block for block in parsed.of_type("variable") if block.labels}
    # Packer 1.5's `variables { name = default }` form declares too, each with its default.
    defaulted = {name for block in parsed.of_type("variables") for name in block.attributes()}
    assigned, problems = hcl.read_assignments(
        path for pattern in _PACKER_VALUE_FILES for path in directory.glob(pattern)
    )
    findings = [
        _unparsable("template-unparsable", problem, _shown(problem.file, root), "Packer", "packer-variables")
        for problem in problems
    ]
    for name, meaning in PACKER_VARIABLES.items():
        if name not in declared and name not in defaulted:
            findings.append(
                Finding(
                    "packer-variable-undeclared",
                    home,
                    f'build-artifact passes -var {name}=<{meaning}>, but the template declares no variable "{name}", '
                    "and Packer refuses an undeclared variable",
                    f'declare it: variable "{name}" {{ type = string }}',
                    "packer-variables",
                )
            )
    for name, block in declared.items():
        if "default" not in block.attributes() and name not in PACKER_VARIABLES and name not in assigned:
            findings.append(
                Finding(
                    "packer-variable-unset",
                    _shown(block.file, root),
                    f'variable "{name}" has no default and build-artifact does not pass it, so packer build stops '
                    "asking for it",
                    "give it a default, or set it in a *.auto.pkrvars.hcl file beside the template",
                    "packer-variables",
                )
            )
    return findings


def _unmatched_only(
    source: str, packer_only: Sequence[str], sources: Mapping[str, hcl.Block], home: str, shown_dir: str
) -> Finding:
    only = f"-only={','.join(packer_only)}"
    if source in sources:
        return Finding(
            "only-matches-nothing",
            home,
            f"build-artifact runs packer build {only}, and source {source} is declared but no build block lists "
            "it, so Packer would build nothing and exit 0",
            f'add "source.{source}" to the sources of the build block',
            "sources-built",
        )
    declared = ", ".join(sources) or "none"
    kind, _, name = source.partition(".")
    return Finding(
        "only-matches-nothing",
        home,
        f"build-artifact runs packer build {only}, but {source} matches no source of the template in {shown_dir} "
        f"(it declares {declared}), so Packer would build nothing and exit 0",
        f'name the source "{kind}" "{name}", or set packer_only of the namespace in icd.toml to the source to build',
        "sources-built",
    )


def _manifest(build: _Build, source: str, shown: str) -> list[Finding]:
    manifests = [
        block
        for block in build.post_processors()
        if block.labels[:1] == (MANIFEST_POST_PROCESSOR,) and _applies_to(block, source)
    ]
    if not manifests:
        return [
            Finding(
                "manifest-missing",
                shown,
                f'the build of {source} has no post-processor "manifest", so build-artifact can\'t tell what it '
                "built and registers nothing",
                'end the build block with post-processor "manifest" {} (add custom_data = { image_path = ... } for '
                "a local image)",
                "manifest",
            )
        ]
    findings = []
    manifest = manifests[0]
    attributes = manifest.attributes()
    if "output" in attributes:
        findings.append(
            Finding(
                "manifest-output-set",
                shown,
                f"the manifest post-processor of {source} sets output, but build-artifact reads {MANIFEST_FILENAME} "
                "in the template directory, where Packer writes it by default",
                "remove output from the manifest post-processor",
                "manifest",
            )
        )
    custom_data = attributes.get("custom_data")
    builder = source.split(".", 1)[0]
    if builder in LOCAL_IMAGE_BUILDERS and not (isinstance(custom_data, Mapping) and IMAGE_PATH_KEY in custom_data):
        findings.append(
            Finding(
                "manifest-image-path-missing",
                shown,
                f"{source} builds a local image (the {builder} builder's artifact id names no file), and the "
                f"manifest's custom_data has no {IMAGE_PATH_KEY}, so there is no image to register",
                f"set custom_data = {{ {IMAGE_PATH_KEY} = <absolute path of the image file> }} in the manifest "
                "post-processor",
                "manifest",
            )
        )
    return findings


# --- the Terraform stack ------------------------------------------------------------------------------


def _value_files(stack_dir: Path) -> tuple[set[str], list[hcl.ParseProblem]]:
    assigned, problems = hcl.read_assignments(
        path for pattern in _TERRAFORM_VALUE_FILES for path in stack_dir.glob(pattern)
    )
    for pattern in _TERRAFORM_JSON_VALUE_FILES:
        for path in stack_dir.glob(pattern):
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                problems.append(hcl.ParseProblem(path, None, str(exc)))
                continue
            if isinstance(document, dict):
                assigned |= set(document)
    return assigned, problems


def _records_key(block: hcl.Block, keys: Iterable[str], maps: Iterable[str] = IDENTITY_MAPS) -> bool:
    """Whether a resource has one of ``keys`` as an attribute, or as a key of one of its ``maps``."""
    attributes = block.attributes()
    wanted = set(keys)
    if wanted & set(attributes):
        return True
    return any(isinstance(attributes.get(name), Mapping) and wanted & set(attributes[name]) for name in maps)


def check_stack(stack_dir: Path, workspaces: Sequence[str] = ()) -> list[Finding]:
    """The stack's breaches: variables, the gate's Service Meta, artifact keys, identity."""
    shown_dir = f"{_shown(stack_dir, PROJECT_ROOT)}/"
    stacks = sorted(stack_dir.glob("*.tf")) if stack_dir.is_dir() else []
    if not stacks:
        used_by = f" (used by workspace {', '.join(workspaces)})" if workspaces else ""
        state = "has no *.tf file" if stack_dir.is_dir() else "does not exist"
        return [
            Finding(
                "stack-missing",
                shown_dir,
                f"the stack directory {shown_dir}{used_by} {state}, so there is nothing to plan",
                "set stack of the workspace in icd.toml to the directory of the service's Terraform stack",
                "stack-variables",
            )
        ]
    parsed = hcl.read_files(stacks)
    assigned, problems = _value_files(stack_dir)
    findings = [
        _unparsable("stack-unparsable", problem, _shown(problem.file, PROJECT_ROOT), "Terraform", "stack-variables")
        for problem in [*parsed.problems, *problems]
    ]
    if parsed.problems:
        return findings
    variables = {block.labels[0]: block for block in parsed.of_type("variable") if block.labels}
    resources = [block for block in parsed.of_type("resource") if len(block.labels) == 2]
    home = _shown((next(iter(variables.values())).file if variables else stacks[0]), PROJECT_ROOT)
    for name, meaning in STACK_VARIABLES.items():
        if name not in variables:
            findings.append(
                Finding(
                    "stack-variable-undeclared",
                    home,
                    f'deploy-artifact passes -var {name}=<{meaning}>, but the stack declares no variable "{name}", '
                    "and Terraform refuses an undeclared variable",
                    f'declare it: variable "{name}" {{ type = string }}',
                    "stack-variables",
                )
            )
    for name, block in variables.items():
        if "default" not in block.attributes() and name not in STACK_VARIABLES and name not in assigned:
            findings.append(
                Finding(
                    "stack-variable-unset",
                    _shown(block.file, PROJECT_ROOT),
                    f'variable "{name}" has no default and deploy-artifact does not pass it, so terraform plan '
                    'stops with "No value for required variable"',
                    "give it a default, or set it in terraform.tfvars in the stack directory",
                    "stack-variables",
                )
            )
    resource_home = _shown(resources[0].file, PROJECT_ROOT) if resources else home
    findings += _gate_meta(parsed, resources, resource_home)
    # Where the plan view reads it (``plan_view.artifact_of``): an attribute or a trigger, not a tag.
    if not any(_records_key(block, ARTIFACT_KEYS, maps=("triggers",)) for block in resources):
        findings.append(
            Finding(
                "artifact-key-missing",
                resource_home,
                f"no resource records the artifact under a key the plan reads ({', '.join(ARTIFACT_KEYS)}: an "
                "attribute or a trigger), so the plan shown for approval names no versions and a rollback can't "
                "tell which version ran before",
                "add artifact_id = var.artifact_id to the triggers of the resource that runs the image",
                "artifact-keys",
            )
        )
    findings += _inherited_environments(parsed, resources)
    findings += _daemons_keeping_output(resources)
    if not any(_records_key(block, (IDENTITY_KEY,)) for block in resources):
        findings.append(
            Finding(
                "identity-missing",
                resource_home,
                "no resource records its namespace (a namespace attribute, or a namespace key in its triggers or "
                "tags), so a workspace's state can't tell which service it holds",
                "add namespace = var.namespace to the triggers (or tags) of the resource that runs the image",
                "one-service-per-workspace",
            )
        )
    return findings


# Contract: docs/service-contract.md#rollout. The types of ROLLOUT_VARIABLE that take the list the rollout
# passes (JSON text of [{"artifact_id": ..., "artifact_version": ...}, ...]); no type at all means any.
_ROLLOUT_LOOSE_TYPES = frozenset({"any", "list(any)", "list(map(string))", "list(map(any))"})
_ROLLOUT_OBJECT_TYPE = re.compile(r"^list\(object\(\{(?P<fields>.*)\}\)\)$")
ROLLOUT_TYPE = "list(object({ artifact_id = string, artifact_version = string }))"


def _takes_the_rollout_list(type_text: object) -> bool:
    """Whether a variable's ``type`` (python-hcl2's text of it) accepts the list of slots the rollout passes:
    a list of objects with exactly the slot fields as strings (an object type with more attributes refuses
    elements without them), or a looser type."""
    if type_text is None:
        return True
    if not isinstance(type_text, str):
        return False
    compact = re.sub(r"\s+", "", type_text.removeprefix("${").removesuffix("}"))
    if compact in _ROLLOUT_LOOSE_TYPES:
        return True
    match = _ROLLOUT_OBJECT_TYPE.match(compact)
    if match is None:
        return False
    fields = dict(item.split("=", 1) for item in re.split(r"[,\n]", match["fields"]) if "=" in item)
    return set(fields) == set(ROLLOUT_SLOT_FIELDS) and all(kind in {"string", "any"} for kind in fields.values())


def rollout_findings(stack_dir: Path, workspaces: Sequence[str] = ()) -> list[Finding]:
    """What a stack lacks to be rolled out in batches (docs/service-contract.md#rollout): the ``instances``
    variable (of a type that takes the list of slots, and read by something), and the ``service_ids`` output.
    ``workspaces`` are the workspaces whose rollout needs it, for the messages. A stack that is missing or
    doesn't parse gives no finding here: :func:`check_stack` reports it."""
    stacks = sorted(stack_dir.glob("*.tf")) if stack_dir.is_dir() else []
    parsed = hcl.read_files(stacks)
    if not stacks or parsed.problems:
        return []
    variables = {block.labels[0]: block for block in parsed.of_type("variable") if block.labels}
    outputs = {block.labels[0] for block in parsed.of_type("output") if block.labels}
    home = _shown(stacks[0], PROJECT_ROOT)
    if len(workspaces) > 1:
        rolled = f"workspaces {', '.join(workspaces)} have a rollout"
    else:
        rolled = f"workspace {workspaces[0]} has a rollout" if workspaces else "a workspace with a rollout"
    needs = f"{rolled}, which passes the stack its list of instances ({ROLLOUT_VARIABLE})"
    declare = (
        f'declare variable "{ROLLOUT_VARIABLE}" {{ type = {ROLLOUT_TYPE} }} and run one instance per element, '
        f"count = length(var.{ROLLOUT_VARIABLE}) (see examples/stacks/local-fleet)"
    )
    findings: list[Finding] = []
    declared = variables.get(ROLLOUT_VARIABLE)
    if declared is None:
        findings.append(
            Finding(
                "rollout-variable-undeclared",
                home,
                f'{needs}, but the stack declares no variable "{ROLLOUT_VARIABLE}", so it runs one instance and '
                "can't be told which version each instance runs",
                declare,
                "rollout",
            )
        )
    else:
        type_text = declared.attributes().get("type")
        if not _takes_the_rollout_list(type_text):
            written = str(type_text).removeprefix("${").removesuffix("}")
            findings.append(
                Finding(
                    "rollout-variable-type",
                    _shown(declared.file, PROJECT_ROOT),
                    f'{needs}, but variable "{ROLLOUT_VARIABLE}" has type {written}, '
                    f"which refuses the list the rollout passes (one {{{', '.join(ROLLOUT_SLOT_FIELDS)}}} object "
                    "per instance), so terraform plan would stop",
                    f"make its type {ROLLOUT_TYPE}",
                    "rollout",
                )
            )
        readers = [
            block
            for block in parsed.blocks
            if block.type not in {"variable", "output", "terraform"}
            and hcl.reads_variable(block.body, ROLLOUT_VARIABLE)
        ]
        if not readers:
            findings.append(
                Finding(
                    "rollout-variable-unused",
                    _shown(declared.file, PROJECT_ROOT),
                    f'{needs}, but the stack declares variable "{ROLLOUT_VARIABLE}" and never reads it, so every '
                    "batch would plan the same thing and no instance would run the version its slot is given",
                    f"run one instance per element: count = length(var.{ROLLOUT_VARIABLE}) on the resource that "
                    f"runs the image, its artifact from var.{ROLLOUT_VARIABLE}[count.index]",
                    "rollout",
                )
            )
    if SERVICE_IDS_OUTPUT not in outputs:
        findings.append(
            Finding(
                "rollout-output-missing",
                home,
                f"{needs}, but the stack has no output \"{SERVICE_IDS_OUTPUT}\", so a batch's health gate can't "
                "tell which Consul service instance each slot registered",
                f'add output "{SERVICE_IDS_OUTPUT}" {{ value = <resource>[*].<the Consul service ID of each '
                "instance> }, in slot order",
                "rollout",
            )
        )
    return findings


def _gate_meta(parsed: hcl.HclFiles, resources: Sequence[hcl.Block], home: str) -> list[Finding]:
    findings = []
    for block in resources:
        if hcl.reads_variable(block.attributes().get("triggers"), GATE_META_KEY):
            findings.append(
                Finding(
                    "gate-meta-in-triggers",
                    _shown(block.file, PROJECT_ROOT),
                    f"{block.label} has var.{GATE_META_KEY} in its triggers, so every deploy run replaces the "
                    'instance and an unchanged push never plans "no changes"',
                    f"take {GATE_META_KEY} out of the triggers; pass it only to what registers the service",
                    "consul-registration",
                )
            )
    # Anything but its declaration and outputs may carry it on: a resource, a data source, a local, a module.
    users = [
        block
        for block in parsed.blocks
        if block.type not in {"variable", "output", "terraform"}
        and hcl.reads_variable({k: v for k, v in block.body.items() if k != "triggers"}, GATE_META_KEY)
    ]
    if not users:
        findings.append(
            Finding(
                "gate-meta-missing",
                home,
                f"the stack never reads var.{GATE_META_KEY}, so the instance it registers can't carry Service Meta "
                f"{GATE_META_KEY}=<the deploy run's id>, which the health gate matches the new instance on: a "
                'healthy deploy would be rolled back with "no registered instance matches"',
                f"pass var.{GATE_META_KEY} to what registers the service, into its Meta as {GATE_META_KEY} "
                "(the example's stack hands it to bin/start --deploy-run-id)",
                "consul-registration",
            )
        )
    return findings


# Contract: docs/service-contract.md#provisioner-environment. An interpreter that starts with one of these
# (`env -i …`) runs the command with only the variables it names; anything else inherits Terraform's.
_CLEARING_ENV_FLAGS = frozenset({"-i", "--ignore-environment", "-"})
_LOCAL_REFERENCE = re.compile(r"^\$\{\s*(?:concat\(\s*)?local\.([A-Za-z_][\w-]*)\s*[,)}]")
_LITERAL_HEAD = re.compile(r'^\$\{\s*concat\(\s*\[\s*"([^"]*)"\s*,\s*"([^"]*)"')
_LOCAL_EXEC_OPENING = re.compile(r'^\s*provisioner\s+"local-exec"\s*\{')
INHERITED_ENVIRONMENT_FIX = (
    "start its interpreter with env -i and pass what the command needs as NAME=value arguments: interpreter = "
    '["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "NAME=${var.name}", "/bin/sh", "-c"] (environment = { … } '
    "adds to Terraform's environment, it removes nothing)"
)


def _interpreter_head(value: object, local_values: Mapping[str, object]) -> list[str]:
    """The first words of a local-exec ``interpreter`` as far as the HCL says them without evaluating anything:
    a literal list, ``local.NAME``, or a ``concat(...)`` whose first argument is one of those."""
    if isinstance(value, list):
        return [item if isinstance(item, str) else "" for item in value[:2]]
    if not isinstance(value, str):
        return []
    if match := _LITERAL_HEAD.match(value):
        return [match.group(1), match.group(2)]
    if (match := _LOCAL_REFERENCE.match(value)) and isinstance(local_values.get(match.group(1)), list):
        return _interpreter_head(local_values[match.group(1)], {})
    return []


def clears_environment(provisioner: hcl.Block, local_values: Mapping[str, object]) -> bool:
    """Whether a local-exec provisioner runs its command without Terraform's environment (``env -i`` first)."""
    head = _interpreter_head(provisioner.attributes().get("interpreter"), local_values)
    return (
        len(head) == 2
        and hcl.literal(head[0]) is not None
        and Path(head[0]).name == "env"
        and head[1] in _CLEARING_ENV_FLAGS
    )


def _local_exec_lines(file: Path) -> list[int]:
    """The line of each ``provisioner "local-exec" {`` of a file, in order (the blocks carry no line)."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [number for number, line in enumerate(lines, start=1) if _LOCAL_EXEC_OPENING.match(line)]


def _inherited_environments(parsed: hcl.HclFiles, resources: Sequence[hcl.Block]) -> list[Finding]:
    """Every local-exec provisioner that would inherit Terraform's environment, which holds the state backend's
    credentials: the command, and whatever it starts (the instance), would hold them too."""
    local_values: dict[str, object] = {}
    for block in parsed.of_type("locals"):
        local_values |= block.attributes()
    findings: list[Finding] = []
    seen: dict[Path, int] = {}
    for resource in resources:
        for provisioner in resource.blocks("provisioner"):
            if provisioner.labels[:1] != ("local-exec",):
                continue
            index = seen[resource.file] = seen.get(resource.file, -1) + 1
            if clears_environment(provisioner, local_values):
                continue
            lines = _local_exec_lines(resource.file)
            shown = _shown(resource.file, PROJECT_ROOT)
            when = " (destroy-time)" if provisioner.attributes().get("when") == "destroy" else ""
            findings.append(
                Finding(
                    "provisioner-inherits-environment",
                    f"{shown}:{lines[index]}" if index < len(lines) else shown,
                    f'the provisioner "local-exec"{when} of {resource.label} runs with Terraform\'s environment, '
                    "which holds the state backend's AWS credentials, so its command and everything it starts (the "
                    "instance) would hold them too",
                    INHERITED_ENVIRONMENT_FIX,
                    "provisioner-environment",
                )
            )
    return findings


def _daemons_keeping_output(resources: Sequence[hcl.Block]) -> list[Finding]:
    """A warning for each local-exec command that leaves a process running with Terraform's output pipe as its
    stdout or stderr (``app &``, ``nohup``, ``setsid``, ``disown`` without redirecting): the apply would wait
    for that pipe until the workspace's apply_timeout_seconds stops it (docs/operations.md#stuck-applies)."""
    findings: list[Finding] = []
    for resource in resources:
        try:
            lines = resource.file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for provisioner in resource.blocks("provisioner"):
            command = provisioner.attributes().get("command")
            if provisioner.labels[:1] != ("local-exec",) or not isinstance(command, str):
                continue
            for held in daemons_holding_output(command):
                first = held.splitlines()[0].strip()
                where = next((number for number, line in enumerate(lines, start=1) if first in line), None)
                shown = _shown(resource.file, PROJECT_ROOT)
                findings.append(
                    Finding(
                        "provisioner-daemon-keeps-output",
                        f"{shown}:{where}" if where else shown,
                        f"a local-exec provisioner of {resource.label} leaves `{one_line(held, 120)}` running with "
                        "Terraform's output as its own, and Terraform waits for that output to close: the apply "
                        'stays "Still creating..." until apply_timeout_seconds stops it and the run fails',
                        "redirect the daemon's input and output and give it its own session: "
                        "setsid app </dev/null >app.log 2>&1 & (or >/dev/null 2>&1)",
                        "detached-daemons",
                        severity="warning",
                    )
                )
    return findings


# --- the workspace's state ------------------------------------------------------------------------------


def _identity(attributes: Mapping[str, Any]) -> str | None:
    for holder in (attributes, *(attributes.get(name) for name in IDENTITY_MAPS)):
        value = holder.get(IDENTITY_KEY) if isinstance(holder, Mapping) else None
        if isinstance(value, str) and value:
            return value
    return None


def state_holders(document: Mapping[str, Any]) -> dict[str, str | None]:
    """The managed resources of a Terraform state (format 4) and the namespace each records (None: none)."""
    holders: dict[str, str | None] = {}
    for resource in document.get("resources") or ():
        if not isinstance(resource, Mapping) or resource.get("mode", "managed") != "managed":
            continue
        address = ".".join(
            str(part) for part in (resource.get("module"), resource.get("type"), resource.get("name")) if part
        )
        for instance in resource.get("instances") or ():
            attributes = instance.get("attributes") if isinstance(instance, Mapping) else None
            found = _identity(attributes) if isinstance(attributes, Mapping) else None
            holders[address] = holders.get(address) or found
    return holders


def check_state(target: WorkspaceTarget, namespace: str) -> list[Finding]:
    """One service per workspace: the workspace's state holds nothing of another service."""
    if target.state is None:
        return []
    where = target.state_location or f"the state of workspace {target.workspace}"
    try:
        document = json.loads(target.state)
    except ValueError as exc:
        document, error = None, str(exc)
    else:
        error = "" if isinstance(document, Mapping) else "it is not a JSON object"
    if not isinstance(document, Mapping):
        return [
            Finding(
                "workspace-state-unreadable",
                where,
                f"the state of workspace {target.workspace} is not a Terraform state ({error}), so it can't be "
                "told what it holds",
                "restore the state from the bucket's object versions, or deploy to a new workspace",
                "one-service-per-workspace",
            )
        ]
    holders = state_holders(document)
    others = {address: held for address, held in holders.items() if held is not None and held != namespace}
    unknown = [address for address, held in holders.items() if held is None]
    if others:
        held_by = ", ".join(sorted(set(others.values())))
        return [
            Finding(
                "workspace-holds-another-service",
                where,
                f"workspace {target.workspace} already holds {held_by} ({', '.join(sorted(others))}); a workspace "
                f"has one state, so deploying {namespace} there would plan to destroy it",
                f"give {namespace} a workspace of its own in icd.toml ([workspaces.<name>] following "
                f"{namespace}@<channel>)",
                "one-service-per-workspace",
            )
        ]
    if unknown and not any(held == namespace for held in holders.values()):
        return [
            Finding(
                "workspace-holds-another-service",
                where,
                f"workspace {target.workspace} holds resources that record no namespace "
                f"({', '.join(sorted(unknown))}), so they may be another service's; a workspace has one state, so "
                f"deploying {namespace} there would plan to destroy them",
                f"give {namespace} a workspace of its own in icd.toml, or destroy what the state holds first",
                "one-service-per-workspace",
            )
        ]
    return []
