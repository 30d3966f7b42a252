"""One rule set, the same answer everywhere: every component that takes a name is asked about the same table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError as SchemaValidationError
from prefect.utilities.schema_tools import validate as validate_parameters
from pydantic import TypeAdapter, ValidationError

from icd.config import parse_config
from icd.deploy.queue import WorkspaceQueue
from icd.deploy.queue_store import MemoryQueueStore
from icd.deploy.record import record_markdown
from icd.errors import ConfigError, InvalidInputError
from icd.registry.plans import PlanStore
from icd.rules import (
    MAX_APPROVAL_TIMEOUT_SECONDS,
    NAME_RULE,
    ApprovalTimeout,
    Name,
    Namespace,
    Workspace,
    check_approval_timeout,
    check_channel,
    check_name,
    check_namespace,
    check_ref,
    check_relative_path,
    check_workspace,
)
from icd.text import hash_difference, markdown_cell, normalize_identity, one_line

from flows.build_artifact import build_artifact  # isort: skip  # the flows' signatures, as deployments get them
from flows.deploy_artifact import deploy_artifact  # isort: skip
from flows.promote import promote  # isort: skip
from flows.push_to_deploy import push_to_deploy  # isort: skip

NAMES = [
    ("staging", True),
    ("prod-eu-1", True),
    ("a", True),
    ("a" * 63, True),
    ("a" * 64, False),
    ("9prod", False),  # the old lock took it, the plan store refused it: now nobody takes it
    ("Prod", False),
    ("prod_eu", False),  # artifact keys and DNS labels refuse '_'
    ("prod\n", False),  # re.match(...$) would let the newline through
    ("", False),
    ("-prod", False),
    ("prod eu", False),
    ("prod/eu", False),
    ("'; rm -rf /", False),
]


def _config_with_workspace(name: str) -> None:
    parse_config(
        f'[namespaces."acme/web"]\nrepository = "/r"\nservice_name = "web"\n'
        f'[workspaces."{name}"]\nfollows = "acme/web@latest"\nstack = "s"\n'
    )


def _config_with_service(name: str) -> None:
    parse_config(f'[namespaces."acme/web"]\nrepository = "/r"\nservice_name = "{name}"\n')


COMPONENTS: dict[str, Callable[[str], Any]] = {
    "rules.check_name": check_name,
    "rules.check_channel": check_channel,
    "rules.check_workspace": check_workspace,
    "namespace part": lambda name: check_namespace(f"acme/{name}"),
    "workspace queue and lock": lambda name: WorkspaceQueue(MemoryQueueStore()).read(name),
    "plan store": lambda name: PlanStore(object(), "bucket").key_for(name, "run-1"),
    "flow parameter (Workspace)": lambda name: TypeAdapter(Workspace).validate_python(name),
    "flow parameter (Name)": lambda name: TypeAdapter(Name).validate_python(name),
    "flow parameter (Namespace)": lambda name: TypeAdapter(Namespace).validate_python(f"acme/{name}"),
    "icd.toml workspace": _config_with_workspace,
    "icd.toml service": _config_with_service,
    "run creation (deploy-artifact's workspace)": lambda name: _create_run(deploy_artifact, workspace=name),
    "run creation (push-to-deploy's workspace)": lambda name: _create_run(push_to_deploy, workspace=name),
    "run creation (promote's channel)": lambda name: _create_run(promote, channel=name),
    "run creation (build-artifact's namespace)": lambda name: _create_run(build_artifact, namespace=f"acme/{name}"),
}


def _create_run(flow: Any, **parameters: object) -> None:
    """What the Prefect server does before it creates a run of a deployment of ``flow`` (the UI's custom run,
    ``prefect deployment run -p``, the API): check the parameters against the schema the deployment was
    given from the flow's signature, with the server's own function (Python's ``re``). Parameters the check
    is not about get valid values."""
    valid: dict[str, object] = {
        "workspace": "staging",
        "namespace": "acme/web",
        "version": 1,
        "channel": "prod",
        "by": "al",
        "why": "ok",
    }
    schema = parameter_schema(flow).model_dump_for_openapi()
    given = {key: value for key, value in valid.items() if key in schema["properties"]} | parameters
    try:
        validate_parameters(given, schema, raise_on_error=True)
    except SchemaValidationError as exc:
        raise InvalidInputError(str(exc)) from exc


@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize(("name", "valid"), NAMES, ids=[repr(n) for n, _ in NAMES])
def test_every_component_takes_exactly_the_same_names(component: str, name: str, valid: bool) -> None:
    check = COMPONENTS[component]
    if valid:
        check(name)
    else:
        with pytest.raises((InvalidInputError, ValidationError, ConfigError)):
            check(name)


@pytest.mark.parametrize(
    ("ref", "valid"),
    [
        ("main", True),
        ("feature/x-1", True),
        ("v1.2.3", True),
        ("a" * 40, True),
        ("--upload-pack=x", False),
        ("-x", False),
        ("a..b", False),
        ("main\n", False),
        ("x y", False),
        ("main.lock", False),
        ("", False),
    ],
)
def test_git_refs(ref: str, valid: bool) -> None:
    if valid:
        assert check_ref(ref) == ref
    else:
        with pytest.raises(InvalidInputError):
            check_ref(ref)


def test_the_approval_timeout_is_bounded_so_the_lease_covers_it() -> None:
    assert check_approval_timeout(MAX_APPROVAL_TIMEOUT_SECONDS) == MAX_APPROVAL_TIMEOUT_SECONDS
    for bad in (0, MAX_APPROVAL_TIMEOUT_SECONDS + 1):
        with pytest.raises(InvalidInputError, match="between"):
            check_approval_timeout(bad)
        with pytest.raises(ValidationError):
            TypeAdapter(ApprovalTimeout).validate_python(bad)


def test_paths_stay_inside_their_root(tmp_path: Path) -> None:
    assert check_relative_path("stacks/local", within=tmp_path, what="stack") == tmp_path / "stacks" / "local"
    for bad in ("../etc", "/etc", "stacks/../../x", ""):
        with pytest.raises(InvalidInputError):
            check_relative_path(bad, within=tmp_path, what="stack")


@pytest.mark.parametrize(
    ("typed", "recorded"),
    [
        ("  Alice  Smith ", "Alice Smith"),
        ("\u200b\u200b", None),  # zero-width spaces only look non-empty
        ("\u202eecilA", "ecilA"),  # a bidi override is dropped
        ("   ", None),
        ("", None),
        ("\uff22\uff4f\uff42", "Bob"),  # fullwidth letters, folded by NFKC
        ("bob\n<!channel>", "bob <!channel>"),  # kept as typed; escaped wherever it is shown
    ],
)
def test_approver_identities_are_normalized_and_must_be_visible(typed: str, recorded: str | None) -> None:
    assert normalize_identity(typed) == recorded


def test_operator_text_cannot_break_a_markdown_record() -> None:
    comment = "ok | injected | row\n| outcome | deployed |\n<img src=x onerror=alert(1)> [link](http://evil)"
    record = record_markdown("staging", {"outcome": "rejected", "comment": comment})
    rows = [line for line in record.splitlines() if line.startswith("|")]
    assert len(rows) == 4, rows  # header, separator, outcome, comment: the comment added none
    assert "<img" not in record
    assert "\\[link](http://evil)" in record  # an escaped bracket renders as text, not as a link
    assert markdown_cell("") == "-"
    assert one_line("a\nb " * 100, 20).endswith("…")


def test_a_hash_mismatch_shows_both_full_hashes_and_where_they_differ() -> None:
    expected = "d77801f4fd97" + "a" * 52
    given = "d77801f4fd97" + "b" * 52
    message = hash_difference(given, expected)
    assert given in message
    assert expected in message
    assert "from character 13" in message


def test_a_name_with_a_trailing_newline_is_refused_at_run_creation_and_at_the_start_in_the_rules_words() -> None:
    """Python's ``$`` matches before a final newline: the server took "staging\\n" and the run failed later
    with pydantic's bare pattern message. Now the server refuses it before a run exists, and a run made
    without that check (``enforce_parameter_schema`` off) fails in the rule's words, not in a regex."""
    with pytest.raises(InvalidInputError, match="Validation failed for field 'workspace'"):
        _create_run(deploy_artifact, workspace="staging\n")
    _create_run(deploy_artifact, workspace="staging")
    with pytest.raises(ValidationError) as refused:
        TypeAdapter(Workspace).validate_python("staging\n")
    assert f"invalid workspace name 'staging\\n': {NAME_RULE}" in str(refused.value)
    assert "pattern" not in str(refused.value)
