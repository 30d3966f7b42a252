"""What the pipeline builds and where it deploys: ``icd.toml``, versioned with the project, read by every
flow, command and the webhook.

* ``[namespaces."org/name"]``: one per service. The repository and branches whose pushes build it, its
  Packer template (directory and ``-only`` sources), and the Consul service name its image bakes.
* ``[workspaces.<name>]``: one per place it is deployed. What the workspace *follows* (``org/name@latest``
  or ``org/name@<channel>``), its Terraform stack, the artifact platform the stack deploys, the channel a
  healthy deploy *promotes*, and the approval, health and rollback settings.
* ``[site]``: this installation: the Prefect UI's address, for the links in messages.
* ``[notifications]``: the Prefect notification blocks each kind of operator message also goes to, beside
  the Slack channel (``icd/notify/routes.py``).

A newly registered version plans every workspace that follows ``latest`` of its namespace; a channel that
moves plans every workspace that follows it (``icd/events.py``). Every value passes the one rule set of
``icd/rules.py`` when the file is read, so a bad name is refused before anything runs. The file is found at
``$ICD_CONFIG``, else ``icd.toml`` in the project.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icd.errors import ConfigError
from icd.notify.message import MESSAGE_KINDS, MessageKind
from icd.paths import PROJECT_ROOT
from icd.rules import (
    LATEST,
    ApprovalTimeout,
    Channel,
    HealthDeadline,
    LockWait,
    Name,
    Namespace,
    Workspace,
    check_channel,
    check_namespace,
    check_ref,
)
from icd.service.contract import DEFAULT_PACKER_ONLY

CONFIG_ENV = "ICD_CONFIG"
DEFAULT_CONFIG = PROJECT_ROOT / "icd.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NamespaceConfig(_Strict):
    """One service: where its code is, how its image is built, the Consul name it registers under."""

    repository: str = Field(description="Git URL (or absolute path) the build clones; also what pushes match.")
    branches: list[str] = Field(default_factory=lambda: ["main"], description="Pushes to these branches build.")
    service_name: Name
    template_dir: str = "packer"
    # Contract: docs/service-contract.md#sources-built (the pre-flight check reports an entry matching no source).
    packer_only: list[str] = Field(default_factory=lambda: list(DEFAULT_PACKER_ONLY))
    repository_aliases: list[str] = Field(
        default_factory=list, description="Other names of the repository in webhooks: 'owner/repo', HTML URL."
    )
    # Where deploys and builds are reported (icd/github/); None: nothing is reported.
    github_repository: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$",
        description="The GitHub repository ('owner/name') whose commits get deployment and build statuses.",
    )

    @field_validator("branches")
    @classmethod
    def _refs(cls, branches: list[str]) -> list[str]:
        return [check_ref(branch) for branch in branches]

    def matches(self, repository_names: set[str]) -> bool:
        return bool({self.repository, *self.repository_aliases} & repository_names)


# Slack's ids: a user (U..., W... on Enterprise Grid) or a user group (S...).
SlackUserId = Annotated[str, Field(pattern=r"^[UW][A-Z0-9]{2,20}$")]
SlackApproverId = Annotated[str, Field(pattern=r"^[UWS][A-Z0-9]{2,20}$")]
ApprovalSource = Literal["slack", "ui"]
ALL_SOURCES: tuple[ApprovalSource, ...] = ("slack", "ui")


class ApprovalPolicy(_Strict):
    """Who may approve a workspace's plans, how many of them, and from where (docs/operations.md#approvals).

    ``approvers``: Slack user ids and user group ids (a group's members are read from Slack when someone
    clicks); empty, anyone who can click in the channel. ``required``: how many distinct approvers a plan
    needs before it applies. ``prevent_self_review``: the commit's author (``[people]`` maps their GitHub
    login or e-mail to Slack) may approve, but not alone. ``sources``: where an approval may come from:
    ``slack`` (a signed click: Slack proves who it was) and ``ui`` (the Prefect UI's form or ``icd-approve``:
    a typed name that nothing proves). A rejection is accepted from either: it applies nothing."""

    approvers: list[SlackApproverId] = Field(default_factory=list)
    required: Annotated[int, Field(ge=1, le=10)] = 1
    prevent_self_review: bool = False
    sources: list[ApprovalSource] = Field(default_factory=lambda: list(ALL_SOURCES), min_length=1)

    @model_validator(mode="after")
    def _proven_for_people_rules(self) -> ApprovalPolicy:
        # Counting people and telling the author apart need identities nobody can type: Slack's.
        if "ui" in self.sources and (self.required > 1 or self.prevent_self_review):
            raise ValueError(
                'required > 1 and prevent_self_review need proven approvers: set sources = ["slack"] (a name '
                "typed in the Prefect UI proves nobody, so it can't be counted as a second person or told from "
                "the commit's author)"
            )
        return self

    @property
    def proven_only(self) -> bool:
        return "ui" not in self.sources

    def describe(self) -> str:
        """The policy in one line, for refusals and the approval notice."""
        who = "listed approvers" if self.approvers else "anyone in the channel"
        parts = [f"{self.required} distinct approver{'s' if self.required > 1 else ''} ({who})"]
        if self.prevent_self_review:
            parts.append("not the commit's author alone")
        parts.append("from " + " or ".join("Slack" if s == "slack" else "the Prefect UI" for s in self.sources))
        return ", ".join(parts)


class Person(_Strict):
    """One person under their names in each system: how a commit's author is known on Slack."""

    slack: SlackUserId
    github: list[str] = Field(default_factory=list, description="GitHub logins (a push's pusher).")
    emails: list[str] = Field(default_factory=list, description="Commit author e-mails.")


class DriftIgnore(_Strict):
    """Drift the check does not tell (``[[workspaces.<name>.drift_ignore]]``): a resource address (a glob, such
    as ``null_resource.*``; ``output.<name>`` for an output, ``consul.<service id>`` for a Consul instance), or
    one attribute path of it (``triggers.x``, and everything under it). Who decided and why are required:
    an ignored drift is a decision someone owns, not a silenced alarm."""

    address: str = Field(min_length=1, max_length=500)
    attribute: str | None = Field(default=None, min_length=1, max_length=500)
    by: str = Field(min_length=1, max_length=100)
    why: str = Field(min_length=1, max_length=500)


class RolloutPolicy(_Strict):
    """How a deploy replaces a workspace's instances (``[workspaces.<name>.rollout]``), after Nomad's ``update``
    block: ``max_parallel`` instances at a time, each batch gated on its new instances' Consul checks passing
    for ``min_healthy_time_seconds`` within ``healthy_deadline_seconds``, the whole rollout within
    ``progress_deadline_seconds``. The defaults are the single-instance deploy: one instance, one batch, the
    workspace's ``health_deadline_seconds`` and ``rollback_on_unhealthy``. More than one instance needs a stack
    that runs a list of instances (docs/service-contract.md#rollout; the pre-flight check verifies it)."""

    instances: Annotated[int, Field(ge=1, le=100)] = 1
    max_parallel: Annotated[int, Field(ge=1, le=100)] = 1
    min_healthy_time_seconds: Annotated[float, Field(ge=0, le=3600)] = 0.0
    # None: the workspace's health_deadline_seconds (one gate per batch, as per deploy).
    healthy_deadline_seconds: HealthDeadline | None = None
    progress_deadline_seconds: Annotated[float, Field(gt=0, le=6 * 3600)] = 600.0
    # None: the workspace's rollback_on_unhealthy. Revert to what ran before the rollout when a batch fails.
    auto_revert: bool | None = None

    @property
    def batch_size(self) -> int:
        return min(self.max_parallel, self.instances)


class WorkspaceConfig(_Strict):
    """One place a namespace is deployed: what it follows, how it is deployed, what a healthy deploy moves."""

    follows: str = Field(description="'org/name@latest' or 'org/name@<channel>'.")
    stack: str = Field(description="Terraform stack directory, relative to the project (or absolute).")
    platform: str = Field(default="local", description="Which artifact id the stack deploys: 'local' or a region.")
    promotes: Channel | None = Field(
        default=None, description="Channel moved after a healthy deploy; default: the workspace name."
    )
    approval_timeout_seconds: ApprovalTimeout = 3600
    health_deadline_seconds: HealthDeadline = 60.0
    rollback_on_unhealthy: bool = True
    lock_wait_seconds: LockWait = 3600.0
    # An apply (or teardown, or rollback) whose Terraform only says "Still creating..." for this long is
    # stopped as stuck (docs/operations.md#stuck-applies). At most 30 min: the workspace lease's margin for
    # the apply (PLAN_AND_APPLY_MARGIN_SECONDS), and every Terraform call's own limit.
    apply_timeout_seconds: Annotated[float, Field(gt=0, le=1800)] = 900.0
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy)
    # How often the drift check plans the workspace refresh-only (flows/drift_check.py; its schedule is 5 min).
    drift_interval_seconds: Annotated[float, Field(ge=60, le=7 * 24 * 3600)] = 3600.0
    drift_ignore: list[DriftIgnore] = Field(default_factory=list)
    # Present: the stack runs a list of instances and a deploy rolls them out in batches (icd/deploy/rollout.py).
    rollout: RolloutPolicy | None = None

    @model_validator(mode="after")
    def _rollout_fits(self) -> WorkspaceConfig:
        if self.rollout is None:
            return self
        healthy = self.rollout.healthy_deadline_seconds or self.health_deadline_seconds
        if self.rollout.min_healthy_time_seconds >= healthy:
            raise ValueError(
                f"rollout.min_healthy_time_seconds ({self.rollout.min_healthy_time_seconds:g}) must be shorter "
                f"than the healthy deadline ({healthy:g} s): no batch could ever pass"
            )
        return self

    @property
    def batch_deadline_seconds(self) -> float:
        """How long each batch's new instances have to become healthy (and stay so for min_healthy_time)."""
        return (self.rollout and self.rollout.healthy_deadline_seconds) or self.health_deadline_seconds

    @property
    def auto_revert(self) -> bool:
        if self.rollout is None or self.rollout.auto_revert is None:
            return self.rollback_on_unhealthy
        return self.rollout.auto_revert

    @field_validator("follows")
    @classmethod
    def _follows(cls, value: str) -> str:
        namespace, sep, channel = value.partition("@")
        if not sep:
            raise ValueError(f"follows {value!r} must be 'org/name@latest' or 'org/name@<channel>'")
        check_namespace(namespace)
        check_channel(channel)
        return value

    @property
    def namespace(self) -> str:
        return self.follows.partition("@")[0]

    @property
    def stack_path(self) -> Path:
        """The stack directory: relative to the project, or absolute as written."""
        return PROJECT_ROOT / self.stack

    @property
    def channel(self) -> str:
        """The channel followed (``latest`` for the newest version)."""
        return self.follows.partition("@")[2]


# A Prefect block document as ``Block.load`` takes it: "<block type slug>/<block name>".
BlockRef = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9-]*$")]


class SiteConfig(_Strict):
    """This installation of the pipeline."""

    prefect_ui_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="The Prefect UI's address, for links in messages; default: PREFECT_UI_URL, if set.",
    )


class NotificationRoutes(_Strict):
    """The Prefect notification blocks each kind of operator message is also sent to (as plain text), beside
    the Slack channel: ``approval = ["apprise-notification/ops-mail", "custom-webhook/pager"]``."""

    approval: list[BlockRef] = Field(default_factory=list, description="A plan waits for an answer.")
    refusal: list[BlockRef] = Field(default_factory=list, description="An answer was refused; asked again.")
    deploy: list[BlockRef] = Field(default_factory=list, description="How a deploy run went or ended.")
    build: list[BlockRef] = Field(default_factory=list, description="A build failed.")
    health: list[BlockRef] = Field(default_factory=list, description="Health transitions; the watch blind.")
    registry: list[BlockRef] = Field(default_factory=list, description="A revoked version still runs.")

    def by_kind(self) -> dict[MessageKind, list[str]]:
        routes: dict[MessageKind, list[str]] = {kind: list(getattr(self, kind)) for kind in MESSAGE_KINDS}
        return routes


class PipelineConfig(_Strict):
    site: SiteConfig = Field(default_factory=SiteConfig)
    notifications: NotificationRoutes = Field(default_factory=NotificationRoutes)
    namespaces: dict[Namespace, NamespaceConfig] = Field(default_factory=dict)
    workspaces: dict[Workspace, WorkspaceConfig] = Field(default_factory=dict)
    people: dict[str, Person] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        for name, workspace in self.workspaces.items():
            if workspace.namespace not in self.namespaces:
                raise ValueError(
                    f"workspace {name!r} follows {workspace.namespace!r}, which no [namespaces] entry defines"
                )
        return self

    def workspace(self, name: str) -> WorkspaceConfig:
        try:
            return self.workspaces[name]
        except KeyError:
            known = ", ".join(sorted(self.workspaces)) or "none"
            raise ConfigError(f"no workspace {name!r} in the pipeline config (workspaces: {known})") from None

    def namespace(self, name: str) -> NamespaceConfig:
        try:
            return self.namespaces[name]
        except KeyError:
            known = ", ".join(sorted(self.namespaces)) or "none"
            raise ConfigError(f"no namespace {name!r} in the pipeline config (namespaces: {known})") from None

    def promoted_channel(self, workspace: str) -> str | None:
        """The channel a healthy deploy of ``workspace`` moves: ``promotes``, else the workspace's name, unless
        that is the channel it follows (moving it would only plan itself again)."""
        config = self.workspace(workspace)
        channel = config.promotes or workspace
        return None if channel == config.channel or channel == LATEST else channel

    def followers(self, namespace: str, channel: str) -> list[str]:
        """The workspaces that follow ``namespace@channel``, sorted."""
        return sorted(
            name
            for name, workspace in self.workspaces.items()
            if workspace.namespace == namespace and workspace.channel == channel
        )

    def slack_ids_of(self, *names: str) -> set[str]:
        """The Slack ids of whoever ``names`` are (GitHub logins, commit authors as "Name <email>" or e-mails),
        as ``[people]`` maps them; a name it does not know maps to nothing."""
        wanted = {_identity_key(name) for name in names if name.strip()}
        found = set()
        for person in self.people.values():
            known = {*(login.lower() for login in person.github), *(email.lower() for email in person.emails)}
            if known & wanted:
                found.add(person.slack)
        return found

    def namespaces_for_push(self, repository_names: set[str], branch: str) -> list[str]:
        """The namespaces a push to ``branch`` of a repository (known by any of its names) builds, sorted.

        More than one when a repository holds several services (a monorepo): each is built.
        """
        return sorted(
            name
            for name, namespace in self.namespaces.items()
            if namespace.matches(repository_names) and branch in namespace.branches
        )


def _identity_key(name: str) -> str:
    """A GitHub login or an e-mail, lower-cased; "Name <email>" (git's author) gives its e-mail."""
    name = name.strip()
    if name.endswith(">") and "<" in name:
        name = name[name.rindex("<") + 1 : -1]
    return name.lower()


def parse_config(text: str, *, where: str = "icd.toml") -> PipelineConfig:
    """Parse and check a config; :class:`ConfigError` names the file and every field at fault."""
    try:
        return PipelineConfig.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(filter(None, [".".join(str(part) for part in error["loc"]), error["msg"]]))
            for error in exc.errors()
        )
        raise ConfigError(f"{where} breaks the pipeline config rules: {problems}") from exc


_LOADED: dict[tuple[Path, int], PipelineConfig] = {}


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: Path | None = None) -> PipelineConfig:
    """The pipeline config, re-read whenever the file changed, so a long-lived worker picks up edits."""
    path = path or config_path()
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise ConfigError(f"no pipeline config at {path} (set ${CONFIG_ENV} or create icd.toml)") from None
    key = (path, stamp)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = parse_config(path.read_text(encoding="utf-8"), where=str(path))
    return _LOADED[key]
