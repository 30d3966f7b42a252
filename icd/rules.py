"""The one rule set every parameter passes before anything happens: names, refs, ids and bounds.

Flows, deployments, CLIs and the webhook all validate through these functions (flow parameters through the
``Annotated`` types at the bottom, which Prefect checks before the run starts), and the library checks again
where a value becomes a key or a path, so no component accepts what another rejects.

**Names** (namespace parts, channels, workspaces, service names) land in many places at once: S3 keys,
Prefect concurrency-limit, variable and artifact keys (no underscores allowed there), Consul service names
and IDs (DNS labels), file names and Packer/Terraform variables. The one rule that is safe in all of them:
a lowercase letter, then up to 62 lowercase letters, digits or ``-`` (a DNS label). Every check is a
full-string match: ``re.match(...$)`` would let a trailing newline through.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import AfterValidator, Field

from icd.errors import InvalidChannelError, InvalidInputError, InvalidNameError, InvalidNamespaceError

NAME_PATTERN: Final = r"[a-z][a-z0-9-]{0,62}"
NAME_RULE: Final = "a lowercase letter, then up to 62 lowercase letters, digits or '-'"
NAMESPACE_RULE: Final = f"'org/name', each part {NAME_RULE}"
LATEST: Final = "latest"

_NAME = re.compile(NAME_PATTERN)
# A git ref as a developer types it: no leading '-', no '..', no control characters, no spaces.
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")

# Bounds. The workspace lock's lease must cover the approval wait plus planning and applying, and
# Prefect's lease API accepts at most 24 h, so the approval wait is capped well below that.
PLAN_AND_APPLY_MARGIN_SECONDS: Final = 1800
MAX_LEASE_SECONDS: Final = 24 * 3600
MAX_APPROVAL_TIMEOUT_SECONDS: Final = MAX_LEASE_SECONDS - PLAN_AND_APPLY_MARGIN_SECONDS
MIN_APPROVAL_TIMEOUT_SECONDS: Final = 1
MAX_HEALTH_DEADLINE_SECONDS: Final = 3600
MAX_LOCK_WAIT_SECONDS: Final = 24 * 3600


def check_name(value: object, *, what: str = "name") -> str:
    """``value`` if it follows the name rule; :class:`InvalidNameError` naming the rule otherwise."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidNameError(f"invalid {what} name {value!r}: {NAME_RULE}")
    return value


def check_channel(value: object, *, what: str = "channel") -> str:
    """A channel or workspace name; the same rule, raised as :class:`InvalidChannelError`."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidChannelError(f"invalid {what} name {value!r}: {NAME_RULE}")
    return value


def check_workspace(value: object) -> str:
    return check_channel(value, what="workspace")


def check_namespace(value: object) -> str:
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) != 2 or not all(_NAME.fullmatch(part) for part in parts):
        raise InvalidNamespaceError(f"invalid namespace {value!r}: a namespace is {NAMESPACE_RULE}")
    assert isinstance(value, str)  # narrowed by the split above; for the type checker
    return value


def check_ref(value: object) -> str:
    """A branch, tag or commit as given to ``git``; never something git could read as an option."""
    if not isinstance(value, str) or not _REF.fullmatch(value) or ".." in value or value.endswith((".lock", "/")):
        raise InvalidInputError(f"invalid git ref {value!r}: letters, digits, '.', '_', '/' or '-', no '..'")
    return value


def check_run_id(value: object) -> str:
    """A Prefect flow run id (a UUID), as it appears in keys and links."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidInputError(f"invalid run id {value!r}: expected a UUID") from None


def check_seconds(value: float, *, what: str, minimum: float, maximum: float) -> float:
    """A duration within ``[minimum, maximum]`` seconds; the message says both bounds."""
    if not minimum <= value <= maximum:
        raise InvalidInputError(f"{what} must be between {minimum:g} and {maximum:g} seconds, got {value:g}")
    return value


def check_approval_timeout(value: int) -> int:
    check_seconds(
        value,
        what="approval_timeout_seconds",
        minimum=MIN_APPROVAL_TIMEOUT_SECONDS,
        maximum=MAX_APPROVAL_TIMEOUT_SECONDS,
    )
    return value


def check_relative_path(value: str, *, within: Path, what: str) -> Path:
    """``within / value`` if it stays inside ``within`` (no absolute paths, no ``..`` escapes)."""
    if not value or Path(value).is_absolute():
        raise InvalidInputError(f"{what} {value!r} must be a relative path inside {within}")
    root = within.resolve()
    resolved = (root / value).resolve()
    if resolved != root and root not in resolved.parents:
        raise InvalidInputError(f"{what} {value!r} leaves {within}")
    return resolved


def schema_pattern(pattern: str) -> str:
    """``pattern`` as a JSON-schema ``pattern`` that only a whole value matches, in every engine that reads it.

    The Prefect server checks a run's parameters with Python's ``re.search``, where ``$`` also matches before
    a trailing newline: ``^name$`` let "staging\\n" through, and the run it created failed later. ``\\Z``
    would fix Python but means a literal "Z" to the UI's JavaScript; "``$`` not followed by a newline" means
    the end of the text to both."""
    return f"^{pattern}$(?!\\n)"


# Annotated types for flow signatures. The JSON-schema pattern lets the Prefect UI and server refuse a bad
# value before a run is even created. The pattern is only in the schema, not checked by pydantic (whose
# message would be the bare regex): a run created anyway fails in the rule's words, from the validator.
def _schema(pattern: str, description: str) -> Any:
    return Field(description=description, json_schema_extra={"pattern": schema_pattern(pattern)})


_NAME_SCHEMA = _schema(NAME_PATTERN, f"Name rule: {NAME_RULE}.")
Name = Annotated[str, _NAME_SCHEMA, AfterValidator(check_name)]
Channel = Annotated[str, _NAME_SCHEMA, AfterValidator(check_channel)]
Workspace = Annotated[str, _NAME_SCHEMA, AfterValidator(check_workspace)]
Namespace = Annotated[
    str,
    _schema(f"{NAME_PATTERN}/{NAME_PATTERN}", f"Namespace rule: {NAMESPACE_RULE}."),
    AfterValidator(check_namespace),
]
GitRef = Annotated[str, AfterValidator(check_ref)]
ApprovalTimeout = Annotated[
    int,
    Field(ge=MIN_APPROVAL_TIMEOUT_SECONDS, le=MAX_APPROVAL_TIMEOUT_SECONDS),
    AfterValidator(check_approval_timeout),
]
HealthDeadline = Annotated[float, Field(gt=0, le=MAX_HEALTH_DEADLINE_SECONDS)]
LockWait = Annotated[float, Field(ge=0, le=MAX_LOCK_WAIT_SECONDS)]
