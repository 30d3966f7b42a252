"""Bring your own service, fast (no Prefect server, Packer or Terraform): the pre-flight check over each
mistake a team makes, with the exact message an operator reads; the scaffold, whose output passes it; and
the ``icd-service`` command around both. The end-to-end onboarding is ``tests/test_onboarding.py``."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pytest

from cli.service import main as icd_service
from icd.config import load_config, parse_config
from icd.deploy.workdir import StateBackend, fetch_state
from icd.errors import ConfigError, InvalidInputError, InvalidNameError
from icd.paths import PROJECT_ROOT, state_home
from icd.service import hcl
from icd.service.contract import PACKER_VARIABLES, STACK_VARIABLES, Section
from icd.service.preflight import (
    Finding,
    ServiceUnderCheck,
    WorkspaceTarget,
    breach_error,
    check_service,
    check_stack,
    rollout_findings,
    service_under_check,
)
from icd.service.scaffold import NewService, scaffold

NAMESPACE = "acmeinc/inventory"
WORKSPACE = "inventory-staging"
STATE_URL = f"s3://bucket/registry/state/{WORKSPACE}.tfstate"


@dataclass(frozen=True)
class Service:
    """A scaffolded service in a temporary directory, with its own icd.toml."""

    root: Path
    config: Path

    @property
    def template(self) -> Path:
        return self.root / "packer" / "inventory.pkr.hcl"

    @property
    def stack(self) -> Path:
        return self.root / "stack" / "main.tf"

    def check(self, state: bytes | None = None) -> list[Finding]:
        service = service_under_check(
            load_config(self.config), NAMESPACE, self.root, read_state=lambda workspace: (state, STATE_URL)
        )
        return check_service(service)


def new_service(directory: Path, config: Path, **overrides: Any) -> NewService:
    settings: dict[str, Any] = {
        "service_name": "inventory",
        "namespace": NAMESPACE,
        "workspace": WORKSPACE,
        "channel": "latest",
        "directory": directory,
        "stack_dir": directory / "stack",
        "repository": str(directory),
    }
    return NewService(**(settings | overrides))


@pytest.fixture
def service(tmp_path: Path) -> Service:
    config = tmp_path / "icd.toml"
    config.write_text("")
    root = tmp_path / "inventory"
    scaffold(new_service(root, config), config)
    return Service(root, config)


def edit(path: Path, old: str, new: str) -> None:
    """Replace ``old`` (a regular expression, across lines) once; the test fails if it isn't there."""
    text = path.read_text()
    edited, count = re.subn(old, new, text, count=1, flags=re.DOTALL)
    assert count == 1, f"{old!r} not found in {path}"
    path.write_text(edited)


def state_of(*resources: tuple[str, dict[str, Any]]) -> bytes:
    """A Terraform state (format 4) holding ``null_resource`` instances with these attributes."""
    return json.dumps(
        {
            "version": 4,
            "terraform_version": "1.0.3",
            "serial": 3,
            "lineage": "0a1b",
            "outputs": {},
            "resources": [
                {"mode": "managed", "type": "null_resource", "name": name, "instances": [{"attributes": attributes}]}
                for name, attributes in resources
            ],
        }
    ).encode()


WEB_STATE = state_of(("instance", {"id": "4711", "triggers": {"namespace": "acmeinc/web", "service_name": "web"}}))

# Each mistake, what it does to the scaffold, and every message the operator then reads ({stack}: the
# stack's main.tf, which lives outside the project here and so is named by its full path).
# An edit: which file, a regular expression (across lines) to replace once, and its replacement.
Edit = tuple[Literal["template", "stack"], str, str]
MISTAKES: list[tuple[str, list[Edit], bytes | None, list[str]]] = [
    (
        "undeclared-packer-variable",
        [("template", r'variable "commit" \{.*?\n\}\n\n', "")],
        None,
        [
            "packer/inventory.pkr.hcl: build-artifact passes -var commit=<the commit being built>, but the template "
            'declares no variable "commit", and Packer refuses an undeclared variable. Fix: declare it: variable '
            '"commit" { type = string }. See docs/service-contract.md#packer-variables'
        ],
    ),
    (
        "only-matches-no-source",
        [
            ("template", r'source "null" "local_image"', 'source "null" "tarball"'),
            ("template", r'"source\.null\.local_image"', '"source.null.tarball"'),
        ],
        None,
        [
            "packer/inventory.pkr.hcl: build-artifact runs packer build -only=null.local_image, but "
            "null.local_image matches no source of the template in packer/ (it declares null.tarball), so Packer "
            'would build nothing and exit 0. Fix: name the source "null" "local_image", or set packer_only of the '
            "namespace in icd.toml to the source to build. See docs/service-contract.md#sources-built"
        ],
    ),
    (
        "only-names-a-source-no-build-lists",
        [("template", r'"source\.null\.local_image"', '"source.null.other"')],
        None,
        [
            "packer/inventory.pkr.hcl: build-artifact runs packer build -only=null.local_image, and source "
            "null.local_image is declared but no build block lists it, so Packer would build nothing and exit 0. "
            'Fix: add "source.null.local_image" to the sources of the build block. '
            "See docs/service-contract.md#sources-built"
        ],
    ),
    (
        "no-manifest",
        [("template", r'    post-processor "manifest" \{.*?\n    \}\n', "")],
        None,
        [
            'packer/inventory.pkr.hcl: the build of null.local_image has no post-processor "manifest", so '
            "build-artifact can't tell what it built and registers nothing. Fix: end the build block with "
            'post-processor "manifest" {} (add custom_data = { image_path = ... } for a local image). '
            "See docs/service-contract.md#manifest"
        ],
    ),
    (
        "manifest-elsewhere",
        [("template", r'post-processor "manifest" \{\n', 'post-processor "manifest" {\n  output = "m.json"\n')],
        None,
        [
            "packer/inventory.pkr.hcl: the manifest post-processor of null.local_image sets output, but "
            "build-artifact reads packer-manifest.json in the template directory, where Packer writes it by "
            "default. Fix: remove output from the manifest post-processor. See docs/service-contract.md#manifest"
        ],
    ),
    (
        "manifest-without-image-path",
        [("template", r"        image_path = local.image_path\n", "")],
        None,
        [
            "packer/inventory.pkr.hcl: null.local_image builds a local image (the null builder's artifact id names "
            "no file), and the manifest's custom_data has no image_path, so there is no image to register. Fix: set "
            "custom_data = { image_path = <absolute path of the image file> } in the manifest post-processor. "
            "See docs/service-contract.md#manifest"
        ],
    ),
    (
        "template-not-hcl",
        [("template", r'variable "commit" \{', 'variable "commit" {{')],
        None,
        [
            "packer/inventory.pkr.hcl:24: it is not valid HCL (unexpected text at line 24, column 20: "
            'variable "commit" {{), so Packer would refuse it and nothing else in it can be checked. Fix: correct '
            "the syntax at that line. See docs/service-contract.md#packer-variables"
        ],
    ),
    (
        "stack-without-consul-meta",
        [("stack", r'      "DEPLOY_RUN_ID=\$\{var\.deploy_run_id\}",\n', "")],
        None,
        [
            "{stack}: the stack never reads var.deploy_run_id, so the instance it registers can't carry Service Meta "
            "deploy_run_id=<the deploy run's id>, which the health gate matches the new instance on: a healthy "
            'deploy would be rolled back with "no registered instance matches". Fix: pass var.deploy_run_id to '
            "what registers the service, into its Meta as deploy_run_id (the example's stack hands it to bin/start "
            "--deploy-run-id). See docs/service-contract.md#consul-registration"
        ],
    ),
    (
        "deploy-run-id-in-triggers",
        [("stack", r"(    artifact_id += var.artifact_id\n)", r"\1    deploy_run_id = var.deploy_run_id\n")],
        None,
        [
            "{stack}: null_resource.instance has var.deploy_run_id in its triggers, so every deploy run replaces the "
            'instance and an unchanged push never plans "no changes". Fix: take deploy_run_id out of the triggers; '
            "pass it only to what registers the service. See docs/service-contract.md#consul-registration"
        ],
    ),
    (
        "missing-stack-variable",
        [("stack", r'variable "workspace" \{.*?\n\}\n\n', "")],
        None,
        [
            "{stack}: deploy-artifact passes -var workspace=<the workspace deploying>, but the stack declares no "
            'variable "workspace", and Terraform refuses an undeclared variable. Fix: declare it: variable '
            '"workspace" { type = string }. See docs/service-contract.md#stack-variables'
        ],
    ),
    (
        "stack-variable-nobody-sets",
        [("stack", r'(variable "instance_root" \{)', 'variable "zone" {\n  type = string\n}\n\n\\1')],
        None,
        [
            '{stack}: variable "zone" has no default and deploy-artifact does not pass it, so terraform plan stops '
            'with "No value for required variable". Fix: give it a default, or set it in terraform.tfvars in the '
            "stack directory. See docs/service-contract.md#stack-variables"
        ],
    ),
    (
        "no-artifact-key",
        [("stack", r"    artifact_id += var.artifact_id\n", "")],
        None,
        [
            "{stack}: no resource records the artifact under a key the plan reads (artifact_id, artifact, ami: an "
            "attribute or a trigger), so the plan shown for approval names no versions and a rollback can't tell "
            "which version ran before. Fix: add artifact_id = var.artifact_id to the triggers of the resource that "
            "runs the image. See docs/service-contract.md#artifact-keys"
        ],
    ),
    (
        "artifact-key-only-in-tags",  # the plan view reads attributes and triggers, not tags
        [
            ("stack", r"    artifact_id += var.artifact_id\n", ""),
            ("stack", r"(  triggers = \{)", r"  tags = { artifact_id = var.artifact_id }\n\1"),
        ],
        None,
        [
            "{stack}: no resource records the artifact under a key the plan reads (artifact_id, artifact, ami: an "
            "attribute or a trigger), so the plan shown for approval names no versions and a rollback can't tell "
            "which version ran before. Fix: add artifact_id = var.artifact_id to the triggers of the resource that "
            "runs the image. See docs/service-contract.md#artifact-keys"
        ],
    ),
    (
        "workspace-holds-another-service",
        [],
        WEB_STATE,
        [
            f"{STATE_URL}: workspace {WORKSPACE} already holds acmeinc/web (null_resource.instance); a workspace has "
            f"one state, so deploying {NAMESPACE} there would plan to destroy it. Fix: give {NAMESPACE} a workspace "
            f"of its own in icd.toml ([workspaces.<name>] following {NAMESPACE}@<channel>). "
            "See docs/service-contract.md#one-service-per-workspace"
        ],
    ),
    (
        "workspace-holds-unknown-resources",
        [],
        state_of(("leftover", {"id": "1"})),
        [
            f"{STATE_URL}: workspace {WORKSPACE} holds resources that record no namespace (null_resource.leftover), "
            f"so they may be another service's; a workspace has one state, so deploying {NAMESPACE} there would plan "
            f"to destroy them. Fix: give {NAMESPACE} a workspace of its own in icd.toml, or destroy what the state "
            "holds first. See docs/service-contract.md#one-service-per-workspace"
        ],
    ),
    (
        "every-breach-at-once",
        [
            ("template", r'variable "version" \{.*?\n\}\n\n', ""),
            ("stack", r'      "DEPLOY_RUN_ID=\$\{var\.deploy_run_id\}",\n', ""),
        ],
        WEB_STATE,
        [
            "packer/inventory.pkr.hcl: build-artifact passes -var version=<the build label, the version the registry "
            'will most likely assign>, but the template declares no variable "version", and Packer refuses an '
            'undeclared variable. Fix: declare it: variable "version" { type = string }. '
            "See docs/service-contract.md#packer-variables",
            "{stack}: the stack never reads var.deploy_run_id, so the instance it registers can't carry Service Meta "
            "deploy_run_id=<the deploy run's id>, which the health gate matches the new instance on: a healthy "
            'deploy would be rolled back with "no registered instance matches". Fix: pass var.deploy_run_id to '
            "what registers the service, into its Meta as deploy_run_id (the example's stack hands it to bin/start "
            "--deploy-run-id). See docs/service-contract.md#consul-registration",
            f"{STATE_URL}: workspace {WORKSPACE} already holds acmeinc/web (null_resource.instance); a workspace has "
            f"one state, so deploying {NAMESPACE} there would plan to destroy it. Fix: give {NAMESPACE} a workspace "
            f"of its own in icd.toml ([workspaces.<name>] following {NAMESPACE}@<channel>). "
            "See docs/service-contract.md#one-service-per-workspace",
        ],
    ),
]


@pytest.mark.parametrize(("mistake", "edits", "state", "messages"), MISTAKES, ids=[row[0] for row in MISTAKES])
def test_preflight_names_each_mistake_with_its_file_cause_and_fix(
    service: Service, mistake: str, edits: list[Edit], state: bytes | None, messages: list[str]
) -> None:
    for which, old, new in edits:
        edit(service.template if which == "template" else service.stack, old, new)
    found = service.check(state)
    assert [finding.message for finding in found] == [m.replace("{stack}", str(service.stack)) for m in messages]


def test_a_breach_fails_with_every_message_in_one_error(service: Service) -> None:
    edit(service.template, r'variable "commit" \{.*?\n\}\n\n', "")
    edit(service.template, r'variable "output_dir" \{.*?\n\}\n\n', "")
    findings = service.check()
    error = breach_error(NAMESPACE, findings)
    assert str(error).splitlines() == [
        f"{NAMESPACE} breaks the service contract (docs/service-contract.md), 2 breaches:",
        *(f"- {finding.message}" for finding in findings),
    ]
    assert error.findings == tuple(finding.message for finding in findings)
    assert [finding.kind for finding in findings] == ["packer-variable-undeclared"] * 2


def test_the_scaffold_passes_the_preflight_check_and_its_own_state_is_no_breach(service: Service) -> None:
    assert service.check() == []
    own = state_of(("instance", {"id": "1", "triggers": {"namespace": NAMESPACE, "service_name": "inventory"}}))
    assert service.check(own) == []


def test_the_example_service_passes_the_preflight_check() -> None:
    config = parse_config((PROJECT_ROOT / "icd.toml").read_text())
    service = service_under_check(config, "acmeinc/web", PROJECT_ROOT / "examples" / "app")
    assert [target.stack_dir for target in service.workspaces] == [PROJECT_ROOT / "examples/stacks/local"] * 2
    assert check_service(service) == []


def test_the_aws_example_stack_needs_only_the_networks_values_and_passes_with_them(tmp_path: Path) -> None:
    """Documented, not run here: the preflight names what an operator must add before deploying it."""
    stack = PROJECT_ROOT / "examples" / "stacks" / "aws"
    findings = check_stack(stack)
    assert {finding.kind for finding in findings} == {"stack-variable-unset"}
    unset = sorted(re.findall(r'variable "(\w+)"', " ".join(finding.message for finding in findings)))
    assert unset == ["iam_instance_profile", "security_group_ids", "subnet_id"]
    assert rollout_findings(stack, ["production"]) == []  # a fleet, with count
    shutil.copytree(stack, tmp_path / "aws")
    shutil.copy(stack / "terraform.tfvars.example", tmp_path / "aws" / "terraform.tfvars")
    assert check_stack(tmp_path / "aws") == []


# --- the rollout (docs/service-contract.md#rollout) -----------------------------------------------------

FLEET_STACK = PROJECT_ROOT / "examples" / "stacks" / "local-fleet"


def with_rollout(service: Service, instances: int) -> None:
    with service.config.open("a") as config:
        config.write(f"\n[workspaces.{WORKSPACE}.rollout]\ninstances = {instances}\n")


def test_a_workspace_with_a_rollout_needs_a_stack_that_runs_a_list_of_instances(service: Service) -> None:
    # The scaffold's stack is the single-instance local stack: fine until the workspace declares a rollout.
    assert service.check() == []
    with_rollout(service, 3)
    assert [finding.message for finding in service.check()] == [
        f"{service.stack}: workspace {WORKSPACE} has a rollout, which passes the stack its list of instances "
        '(instances), but the stack declares no variable "instances", so it runs one instance and can\'t be told '
        'which version each instance runs. Fix: declare variable "instances" { type = list(object({ artifact_id = '
        "string, artifact_version = string })) } and run one instance per element, count = length(var.instances) "
        "(see examples/stacks/local-fleet). See docs/service-contract.md#rollout",
        f"{service.stack}: workspace {WORKSPACE} has a rollout, which passes the stack its list of instances "
        "(instances), but the stack has no output \"service_ids\", so a batch's health gate can't tell which "
        'Consul service instance each slot registered. Fix: add output "service_ids" { value = '
        "<resource>[*].<the Consul service ID of each instance> }, in slot order. "
        "See docs/service-contract.md#rollout",
    ]
    shutil.copy(FLEET_STACK / "main.tf", service.stack)
    assert service.check() == []


def test_the_fleet_example_stack_passes_every_stack_check() -> None:
    assert check_stack(FLEET_STACK) == []
    assert rollout_findings(FLEET_STACK, ["production"]) == []


def test_the_single_stack_lacks_what_a_rollout_needs() -> None:
    findings = rollout_findings(PROJECT_ROOT / "examples" / "stacks" / "local", ["production", "staging"])
    assert [(finding.kind, finding.file, finding.section) for finding in findings] == [
        ("rollout-variable-undeclared", "examples/stacks/local/main.tf", "rollout"),
        ("rollout-output-missing", "examples/stacks/local/main.tf", "rollout"),
    ]
    assert findings[0].message.startswith(
        "examples/stacks/local/main.tf: workspaces production, staging have a rollout, which passes the stack"
    )


@pytest.mark.parametrize(
    ("declared_type", "takes_the_list"),
    [
        ("list(object({ artifact_id = string, artifact_version = string }))", True),
        ("list(object({\n    artifact_version = string\n    artifact_id      = string\n  }))", True),
        ("list(map(string))", True),
        ("any", True),
        (None, True),
        ("list(string)", False),
        ("map(string)", False),
        ("object({ artifact_id = string, artifact_version = string })", False),
        ("list(object({ artifact_id = string }))", False),
        ("list(object({ artifact_id = string, artifact_version = string, zone = string }))", False),
        ("list(object({ artifact_id = number, artifact_version = string }))", False),
    ],
)
def test_the_rollout_variable_must_take_the_list_the_rollout_passes(
    tmp_path: Path, declared_type: str | None, takes_the_list: bool
) -> None:
    main = (FLEET_STACK / "main.tf").read_text()
    replacement = "" if declared_type is None else f"type = {declared_type}\n"
    edited, count = re.subn(
        r"type = list\(object\(\{\n.*?\}\)\)\n", lambda _: replacement, main, count=1, flags=re.DOTALL
    )
    assert count == 1
    (tmp_path / "main.tf").write_text(edited)
    findings = rollout_findings(tmp_path, ["production"])
    assert [finding.kind for finding in findings] == ([] if takes_the_list else ["rollout-variable-type"])
    if not takes_the_list:
        compact = re.sub(r"\s", "", findings[0].message)  # python-hcl2 rewrites a type's spacing
        assert "hastype" + re.sub(r"\s", "", declared_type or "") + "," in compact


def test_a_rollout_variable_nothing_reads_is_a_finding(tmp_path: Path) -> None:
    main = (FLEET_STACK / "main.tf").read_text()
    edited, count = re.subn(r"instances = var\.instances != null \? var\.instances : ", "instances = ", main)
    assert count == 1
    (tmp_path / "main.tf").write_text(edited)
    assert [(finding.kind, finding.section) for finding in rollout_findings(tmp_path)] == [
        ("rollout-variable-unused", "rollout")
    ]
    assert rollout_findings(tmp_path / "absent") == []  # check_stack reports a missing stack


def test_a_missing_template_or_stack_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    service = ServiceUnderCheck(
        namespace=NAMESPACE,
        root=tmp_path,
        template_dir="packer",
        packer_only=("null.local_image",),
        workspaces=(WorkspaceTarget(WORKSPACE, tmp_path / "stack"),),
    )
    assert [(finding.kind, finding.file) for finding in check_service(service)] == [
        ("template-missing", "packer/"),
        ("stack-missing", f"{tmp_path / 'stack'}/"),
    ]


def test_variables_set_in_value_files_are_not_reported(service: Service) -> None:
    edit(service.stack, r'(variable "instance_root" \{)', 'variable "zone" {\n  type = string\n}\n\n\\1')
    edit(service.template, r'(variable "version" \{)', 'variable "region" {\n  type = string\n}\n\n\\1')
    assert {finding.kind for finding in service.check()} == {"stack-variable-unset", "packer-variable-unset"}
    (service.stack.parent / "terraform.tfvars").write_text('zone = "eu-1a"\n')
    (service.template.parent / "site.auto.pkrvars.hcl").write_text('region = "eu-1"\n')
    assert service.check() == []


def test_a_manifest_limited_to_another_source_does_not_count(service: Service) -> None:
    edit(service.template, r'post-processor "manifest" \{\n', 'post-processor "manifest" {\n  only = ["null.other"]\n')
    assert [finding.kind for finding in service.check()] == ["manifest-missing"]


def test_the_contract_names_what_the_flows_pass() -> None:
    assert list(PACKER_VARIABLES) == ["namespace", "version", "commit", "output_dir", "service_name"]
    assert list(STACK_VARIABLES) == [
        "artifact_id",
        "artifact_version",
        "namespace",
        "service_name",
        "consul_addr",
        "deploy_run_id",
        "workspace",
        "instance_root",
    ]


# --- the HCL reader -------------------------------------------------------------------------------------


def test_hcl_blocks_keep_labels_nested_blocks_and_attributes(tmp_path: Path) -> None:
    path = tmp_path / "t.pkr.hcl"
    path.write_text(
        'source "null" "a" {\n  communicator = "none"\n}\n'
        'build {\n  sources = ["source.null.a"]\n  # post-processor "commented" {}\n'
        '  post-processors {\n    post-processor "manifest" {\n'
        '      custom_data = { image_path = "/i" }\n    }\n  }\n}\n'
    )
    parsed = hcl.read_files([path])
    assert [(block.type, block.labels) for block in parsed.blocks] == [("source", ("null", "a")), ("build", ())]
    build = parsed.of_type("build")[0]
    assert build.attributes() == {"sources": ["source.null.a"]}
    [chain] = build.blocks("post-processors")
    [manifest] = chain.blocks("post-processor")
    assert (manifest.labels, manifest.attributes()) == (("manifest",), {"custom_data": {"image_path": "/i"}})


def test_hcl_reads_variables_inside_heredocs_and_interpolations() -> None:
    blocks, problem = hcl.parse_text(
        'resource "null_resource" "x" {\n  provisioner "local-exec" {\n    command = <<-EOT\n'
        "      start ${var.deploy_run_id}\n    EOT\n  }\n  triggers = { id = var.deploy_run_id_other }\n}\n",
        Path("main.tf"),
    )
    assert problem is None
    [block] = blocks
    assert hcl.reads_variable(block.body, "deploy_run_id")
    assert not hcl.reads_variable(block.attributes()["triggers"], "deploy_run_id")


# --- the scaffold ---------------------------------------------------------------------------------------


def test_the_scaffold_writes_the_service_and_its_config_entry(service: Service) -> None:
    written = sorted(str(path.relative_to(service.root)) for path in service.root.rglob("*") if path.is_file())
    assert written == [
        ".gitignore",
        "README.md",
        "packer/assemble_image.py",
        "packer/inventory.pkr.hcl",
        "src/app.py",
        "src/bin/start",
        "src/bin/stop",
        "src/instance.py",
        "stack/main.tf",
    ]
    assert (service.root / "src" / "bin" / "start").stat().st_mode & 0o111
    config = load_config(service.config)
    assert config.namespace(NAMESPACE).service_name == "inventory"
    assert config.namespace(NAMESPACE).repository == str(service.root)
    assert config.workspace(WORKSPACE).follows == f"{NAMESPACE}@latest"
    assert config.workspace(WORKSPACE).stack_path == service.root / "stack"
    assert 'default = "acmeinc/inventory"' in service.template.read_text()


def test_the_scaffold_refuses_what_would_break_something(tmp_path: Path, service: Service) -> None:
    before = service.config.read_text()
    with pytest.raises(InvalidInputError, match=r"refusing to overwrite .*inventory\.pkr\.hcl"):
        scaffold(
            new_service(service.root, service.config, namespace="acmeinc/other", workspace="other"), service.config
        )
    with pytest.raises(ConfigError, match=r"already has workspace inventory-staging .*follows acmeinc/inventory"):
        scaffold(new_service(tmp_path / "two", service.config, namespace="acmeinc/two"), service.config)
    with pytest.raises(ConfigError, match="already configures namespace acmeinc/inventory"):
        scaffold(new_service(tmp_path / "three", service.config, workspace="three"), service.config)
    with pytest.raises(InvalidNameError, match="invalid service name 'Inventory'"):
        scaffold(new_service(tmp_path / "four", service.config, service_name="Inventory"), service.config)
    assert service.config.read_text() == before
    assert not any((tmp_path / name).exists() for name in ("two", "three", "four"))


def test_the_scaffold_keeps_the_operators_config_and_comments(tmp_path: Path) -> None:
    config = tmp_path / "icd.toml"
    original = (PROJECT_ROOT / "icd.toml").read_text()
    config.write_text(original)
    scaffold(new_service(tmp_path / "inventory", config), config)
    assert config.read_text().startswith(original.rstrip())
    assert sorted(load_config(config).workspaces) == [WORKSPACE, "production", "staging"]


# --- the command ----------------------------------------------------------------------------------------


def test_icd_service_new_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "icd.toml"
    config.write_text("")
    root = tmp_path / "inventory"
    argv = ["--config", str(config), "new", "inventory", "--namespace", NAMESPACE, "--workspace", WORKSPACE]
    assert icd_service([*argv, "--dir", str(root)]) == 0
    assert f"[workspaces.{WORKSPACE}]" in capsys.readouterr().out

    check = ["--config", str(config), "check", str(root), "--namespace", NAMESPACE]
    assert icd_service(check) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"{NAMESPACE} honours the service contract (docs/service-contract.md): template packer/ "
        f"(-only=null.local_image); workspaces: {WORKSPACE}"
    )
    assert "states were not read" in out

    edit(root / "packer" / "inventory.pkr.hcl", r'variable "commit" \{.*?\n\}\n\n', "")
    assert icd_service(check) == 1
    findings = check_service(service_under_check(load_config(config), NAMESPACE, root))
    assert capsys.readouterr().out == f"{breach_error(NAMESPACE, findings)}\n"

    assert icd_service([*check[:-1], "acmeinc/unknown"]) == 2
    assert "no namespace 'acmeinc/unknown'" in capsys.readouterr().err


def test_icd_service_check_reads_the_workspace_state_from_the_bucket(
    tmp_path: Path, moto_endpoint: str, s3_client: Any, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "icd.toml"
    config.write_text("")
    root = tmp_path / "inventory"
    scaffold(new_service(root, config), config)
    backend = StateBackend(bucket=s3_bucket, key_prefix="registry/", region="us-east-1")
    assert fetch_state(s3_client, backend, WORKSPACE) is None
    s3_client.put_object(Bucket=s3_bucket, Key=backend.state_key(WORKSPACE), Body=WEB_STATE)
    assert fetch_state(s3_client, backend, WORKSPACE) == WEB_STATE

    argv = ["--config", str(config), "check", str(root), "--namespace", NAMESPACE]
    assert icd_service([*argv, "--bucket", s3_bucket, "--endpoint-url", moto_endpoint]) == 1
    out = capsys.readouterr().out
    assert (
        f"- s3://{s3_bucket}/registry/state/{WORKSPACE}.tfstate: workspace {WORKSPACE} already holds acmeinc/web" in out
    )


def test_every_contract_citation_names_a_section_of_the_page() -> None:
    """The page and the code cite each other; a renamed heading must not leave a citation dangling."""
    page = (PROJECT_ROOT / "docs" / "service-contract.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in page.splitlines()
        if line.startswith("## ")
    }
    assert set(get_args(Section)) <= headings
    cited = {
        (str(path.relative_to(PROJECT_ROOT)), anchor)
        for folder in ("icd", "blocks", "tasks", "flows", "cli")
        for path in (PROJECT_ROOT / folder).rglob("*.py")
        for anchor in re.findall(r"docs/service-contract\.md#([a-z0-9-]+)", path.read_text())
    }
    assert {anchor for _, anchor in cited} >= {"packer-variables", "stack-variables", "consul-registration"}
    assert [(path, anchor) for path, anchor in sorted(cited) if anchor not in headings] == []


# --- the parse cache -------------------------------------------------------------------------------------

_TEMPLATE_TEXT = 'variable "version" {\n  type = string\n}\nsource "null" "local_image" {\n  communicator = "none"\n}\n'


def test_a_parsed_text_is_read_back_from_the_cache_with_the_same_blocks_and_a_broken_entry_is_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hcl, "parse_cache", lambda: tmp_path / "cache")
    fresh, problem = hcl.parse_text(_TEMPLATE_TEXT, Path("a.pkr.hcl"))
    [entry] = hcl.parse_cache().iterdir()
    assert problem is None
    assert [(block.type, block.labels) for block in fresh] == [
        ("variable", ("version",)),
        ("source", ("null", "local_image")),
    ]
    assert hcl.parse_text(_TEMPLATE_TEXT, Path("a.pkr.hcl")) == (fresh, None)  # read back: the same blocks

    # What is read back is the kept document, not a new parse: a doctored entry shows through.
    kept = entry.read_text()
    doctored = json.loads(kept)
    doctored["variable"][0]["version"]["type"] = "number"
    entry.write_text(json.dumps(doctored))
    [variable, _], _ = hcl.parse_text(_TEMPLATE_TEXT, Path("b.pkr.hcl"))
    assert variable.body["type"] == "number"

    entry.write_text("{not json")  # a torn or foreign file: parsed again, and the entry made whole
    assert hcl.parse_text(_TEMPLATE_TEXT, Path("a.pkr.hcl")) == (fresh, None)
    assert entry.read_text() == kept

    # Another text has its own entry and its own blocks.
    other, _ = hcl.parse_text('variable "commit" {}\n', Path("c.pkr.hcl"))
    assert [(block.type, block.labels) for block in other] == [("variable", ("commit",))]
    assert len(list(hcl.parse_cache().iterdir())) == 2


def test_the_parse_cache_is_kept_under_icd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hcl, "state_home", state_home)  # the real one, not the session's (tests/conftest.py)
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    assert hcl.parse_cache() == (tmp_path / "home" / "cache" / "hcl").resolve()


def test_a_text_that_does_not_parse_is_refused_each_time_and_never_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hcl, "parse_cache", lambda: tmp_path / "cache")
    broken = 'variable "version" {\n  type = \n'

    first = hcl.parse_text(broken, Path("t.pkr.hcl"))
    second = hcl.parse_text(broken, Path("t.pkr.hcl"))

    assert first == second
    assert first[1] is not None
    assert first[1].file == Path("t.pkr.hcl")
    assert not hcl.parse_cache().exists() or list(hcl.parse_cache().iterdir()) == []
