"""The one exception tree of the project.

Library errors (botocore, subprocess, consul, slack_sdk, httpx) are translated into these at the boundary
with ``raise X from exc``, so callers catch ours and never a third party's. Only faults raise; an expected
outcome such as a rejected approval or a stale plan is a returned result (see ``flows/push_to_deploy.py``).
"""

from __future__ import annotations

from collections.abc import Sequence


class DeployError(Exception):
    """Base of every error this project raises on purpose."""


# --- external CLIs ------------------------------------------------------------------------------------


class ToolError(DeployError):
    """A CLI (packer, terraform) failed. Carries what an operator needs to see, never the environment."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        exit_code: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.argv = tuple(argv)
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class ToolTimeoutError(ToolError):
    """The CLI ran past its deadline; its whole process group was killed."""


class ToolOutputHeldError(ToolError):
    """The CLI exited, but a process it started (a daemon) still holds its output pipes open."""

    def __init__(self, message: str, *, holders: Sequence[str] = (), **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]  # kwargs are ToolError's keywords
        self.holders = tuple(holders)


class ToolStuckError(ToolError):
    """The CLI made no progress for longer than its watch allows (a Terraform apply only saying "Still
    creating..."); it was stopped, and every daemon of it that held its output was killed (``killed``)."""

    def __init__(
        self, message: str, *, holders: Sequence[str] = (), killed: Sequence[str] = (), **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]  # kwargs are ToolError's keywords
        self.holders = tuple(holders)
        self.killed = tuple(killed)


class PackerError(ToolError):
    """`packer build` failed or refused its template; the message is Packer's own (or names the `-only` at fault)."""


class TerraformError(ToolError):
    """Terraform exited with an error not covered by a more specific class."""


class StateLockedError(TerraformError):
    """Another operation holds the Terraform state lock. Transient: retry with backoff."""

    def __init__(self, message: str, *, lock_id: str | None, who: str | None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]  # kwargs are ToolError's keywords
        self.lock_id = lock_id
        self.who = who


class MissingVariableError(TerraformError):
    """A required input variable was not given."""

    def __init__(self, message: str, *, variables: Sequence[str], **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]  # kwargs are ToolError's keywords
        self.variables = tuple(variables)


class StalePlanError(TerraformError):
    """The saved plan no longer matches the state it was made against; nothing was applied."""


class PlanFormatError(TerraformError):
    """`terraform show -json` produced a format_version this project does not understand."""


# --- artifact registry --------------------------------------------------------------------------------


class RegistryError(DeployError):
    """Base for artifact registry errors."""


class InvalidInputError(DeployError, ValueError):
    """A parameter that breaks the project's rules (``icd/rules.py``); rejected before any side effect."""


class ConfigError(InvalidInputError):
    """The pipeline config (icd.toml) is missing, malformed, or names something that does not exist."""


class InvalidNameError(InvalidInputError):
    """A namespace, channel, workspace or service name that breaks the one name rule."""


class InvalidNamespaceError(InvalidNameError, RegistryError):
    """A namespace that breaks the `org/name` rule."""


class VersionNotFoundError(RegistryError, LookupError):
    """No such namespace, version or channel."""


class RevokedVersionError(RegistryError):
    """The version is revoked: it can't be assigned to a channel or deployed."""


class RegistryStorageError(RegistryError):
    """S3 refused or failed (missing bucket, access denied, network). Often transient."""


class RegistryIntegrityError(RegistryError):
    """A registry object's seal does not match its content: it was altered outside the registry."""


class ArtifactIntegrityError(DeployError):
    """An image's bytes are not the ones the registry recorded (digest mismatch, missing file)."""


class ProvenanceError(DeployError):
    """An artifact's signed provenance, or a deployment record, is missing, unsigned, signed by another key,
    changed after signing, or names another image (``icd/registry/provenance.py``): it is not deployed."""


class ConflictError(RegistryError):
    """A conditional write lost a race too many times in a row."""


# --- deploy flow --------------------------------------------------------------------------------------


class RunRecordStoreError(DeployError):
    """The run's result store (Prefect's results in S3) could not be read or written. A record that can't be
    read is never taken as absent: that would run a claim, a plan or a question again."""


class UnexpectedError(DeployError):
    """A deploy run met an exception the code does not expect (a bug). It stands in for it in what operators are
    told, naming only its type: its text could hold anything. The original is raised on, with its traceback."""


class PlanIntegrityError(DeployError):
    """The plan file about to be applied is not the one that was approved (hash mismatch, missing)."""


class StateCredentialsError(DeployError):
    """STS refused or could not be reached when asked for Terraform's short-lived, workspace-scoped credentials
    (icd/deploy/credentials.py); nothing ran with other credentials instead."""


class WorkspaceLockError(DeployError):
    """The per-workspace deploy lock could not be taken or is misconfigured."""


class InvalidSourceError(InvalidInputError):
    """The git repository or ref can't be resolved."""


class ContractBreachError(DeployError):
    """A service's template, stack or workspace breaks the service contract (docs/service-contract.md).

    Raised by the pre-flight check before anything is built; ``findings`` holds each breach's message."""

    def __init__(self, message: str, *, findings: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.findings = tuple(findings)


# --- consul and notifications -------------------------------------------------------------------------


class ConsulError(DeployError):
    """The Consul HTTP API failed or answered with something we can't use."""


class NotificationError(DeployError):
    """The notifier (Slack) refused or could not be reached."""


class TransientNotificationError(NotificationError):
    """Slack was unreachable, rate-limited us past the client's retries, or answered 5xx; retry later."""


class StatusReportError(DeployError):
    """GitHub refused a deployment or commit status, or answered something we can't use (icd/github/)."""


class TransientStatusReportError(StatusReportError):
    """GitHub was unreachable, timed out, rate-limited us or answered 5xx; redelivered later."""


class InvalidChannelError(InvalidNameError, RegistryError):
    """A channel or workspace name that breaks the name rule, or a write to `latest`."""
