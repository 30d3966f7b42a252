"""Drift: what a workspace runs that is no longer what its Terraform state says, and when to say so.

Two sources, one report:

- **Terraform**: a refresh-only plan (``Terraform.refresh_plan``) reads every resource back; ``resource_drift``
  names each that changed or disappeared out of band (before = the state, after = what the provider read),
  and an output whose value no longer follows from the state's resources shows a state edited by hand.
  Values Terraform marks sensitive arrive as "(sensitive)" and stay so.
- **Consul**: the instances the state deployed (its ``service_id`` output, or a fleet's ``service_ids`` list:
  ``Running.service_ids``) must be registered, and every instance of the service whose Meta says it was
  deployed by this workspace must be one of the state's. Anything else is drift too: a deregistered
  instance, or one nobody's state owns. A list output that moves is told leaf by leaf (``instance_present.1``),
  so the ignore list can name one slot and no change hides past a shortened value.

Told on change, as HCP Terraform's health assessments do: the report has a :func:`fingerprint` (a hash of the
drifted set, values included), and :func:`decide` compares it with the last one told, so a check tells on
first detection and when the set changes, a resolved drift once, a failing check once and again when it
works. The ignore list (``[[workspaces.<name>.drift_ignore]]``: an address or an attribute path, with who and
why) is applied before the fingerprint, so an ignored attribute never tells.

What was last told is kept in S3 beside the registry (:class:`DriftStore`, ``<prefix>drift/<workspace>.json``),
not in Consul KV: the check already holds the registry block for the state it plans, and Consul is one of the
two things it checks, so a Consul outage must not also erase what the check remembers (it is told as a failing
check, once). The document is not sealed: altering it can only repeat or skip a notice, never deploy anything.

Pure except :class:`DriftStore`: tested as tables (tests/test_drift_report.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icd.config import DriftIgnore
from icd.errors import RegistryStorageError
from icd.health.snapshot import ServiceEntry
from icd.notify.message import Action, Confirm, Notification, Severity
from icd.registry.s3 import S3Objects
from icd.text import one_line, version_label
from icd.tools.terraform import Plan

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DriftKind = Literal["changed", "deleted", "output", "missing-from-consul", "unknown-in-consul"]
# What a check tells: a new drift, a changed one, a resolved one, a check that fails, one that works again.
Tell = Literal["detected", "changed", "resolved", "failing", "recovered"]
CONSUL_PREFIX = "consul."
OUTPUT_PREFIX = "output."
_VALUE_MAX = 80
_HISTORY_MAX = 50  # the tells kept in the memory document, newest last (the audit's "drift checks since")
SCHEMA = 1


@dataclass(frozen=True)
class AttributeDrift:
    path: str  # dotted (``triggers.artifact``; list items by index: ``tags.0``); "" for the whole object
    before: Any
    after: Any


@dataclass(frozen=True)
class DriftedItem:
    """One thing that left its state: a resource, an output, a Consul instance."""

    address: str
    kind: DriftKind
    changes: tuple[AttributeDrift, ...] = ()

    def describe(self) -> str:
        """One line for people: what drifted, before -> after."""
        if self.kind == "missing-from-consul":
            return "in the state, but not registered in Consul"
        if self.kind == "unknown-in-consul":
            return "registered in Consul for this workspace, but not in its state"
        if self.kind == "deleted":
            return "deleted outside Terraform"
        return "; ".join(
            f"{change.path or 'value'}: {show_value(change.before)} → {show_value(change.after)}"
            for change in self.changes
        )


@dataclass(frozen=True)
class DriftReport:
    """What one check found in ``workspace``, after the ignore list."""

    workspace: str
    items: tuple[DriftedItem, ...]
    ignored: tuple[str, ...] = ()  # what the ignore list hid, and whose decision it was
    touched_by: str | None = None  # the deploy run that last applied the workspace (Consul Meta or deploy record)

    @property
    def drifted(self) -> bool:
        return bool(self.items)

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.items)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(item.address for item in self.items)


def show_value(value: Any) -> str:
    """A value as one short line: strings as they are, everything else as compact JSON."""
    if value is None:
        return "(none)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return one_line(text, _VALUE_MAX) or '""'


# --- where drift comes from ----------------------------------------------------------------------------


def _flatten(value: Any, path: str, into: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), into)
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            _flatten(item, f"{path}.{index}" if path else str(index), into)
    else:
        into[path] = value


def attribute_drift(before: Any, after: Any) -> tuple[AttributeDrift, ...]:
    """Every leaf that differs between two attribute values, by dotted path, sorted."""
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    _flatten(before, "", old)
    _flatten(after, "", new)
    return tuple(
        AttributeDrift(path, old.get(path), new.get(path))
        for path in sorted(old.keys() | new.keys())
        if old.get(path) != new.get(path)
    )


def terraform_drift(plan: Plan) -> list[DriftedItem]:
    """The drift a refresh-only plan shows: resources read back different or gone, outputs that moved."""
    items = []
    for drift in plan.resource_drift:
        if drift.after is None or drift.action == "delete":
            items.append(DriftedItem(drift.address, "deleted", (AttributeDrift("", "present", None),)))
        else:
            items.append(DriftedItem(drift.address, "changed", attribute_drift(drift.before, drift.after)))
    for output in plan.output_changes:
        if output.action not in ("no-op", "read"):
            # A scalar keeps its one "" path; a list or map (a fleet's instance_present, service_ids) is
            # compared leaf by leaf, as resources are: each slot that moved is named, and none is lost to
            # show_value's shortening in the fingerprint.
            changes = attribute_drift(output.before, output.after) or (AttributeDrift("", output.before, output.after),)
            items.append(DriftedItem(f"{OUTPUT_PREFIX}{output.name}", "output", changes))
    return items


def _expected(state_service_ids: Sequence[str]) -> list[str]:
    # A lone string is a Sequence[str] too: refuse it, or "web-1" would be read as the IDs "w", "e", ...
    if isinstance(state_service_ids, str):
        raise TypeError(f"state_service_ids takes a list of service IDs, not the string {state_service_ids!r}")
    return [service_id for service_id in state_service_ids if service_id]


def consul_drift(
    workspace: str, state_service_ids: Sequence[str], entries: Iterable[ServiceEntry]
) -> list[DriftedItem]:
    """The state's instances (``Running.service_ids``: one, a fleet's, or none) missing from Consul, and
    instances Consul holds for ``workspace`` that the state doesn't (their Meta ``workspace`` is this one;
    another workspace's instances of the service are not ours)."""
    expected = _expected(state_service_ids)
    registered = {entry.instance.service_id: entry for entry in entries}
    items = []
    for service_id in sorted(set(expected)):
        if service_id not in registered:
            items.append(DriftedItem(f"{CONSUL_PREFIX}{service_id}", "missing-from-consul"))
    for service_id, entry in sorted(registered.items()):
        if entry.meta.get("workspace") == workspace and service_id not in expected:
            run = entry.meta.get("deploy_run_id")
            changes = (AttributeDrift("deploy_run_id", None, run),) if run else ()
            items.append(DriftedItem(f"{CONSUL_PREFIX}{service_id}", "unknown-in-consul", changes))
    return items


def deploy_run_of(state_service_ids: Sequence[str], entries: Iterable[ServiceEntry]) -> str | None:
    """The deploy run that registered the state's instances (their Service Meta), if Consul still has one:
    the first of ``state_service_ids`` (slot order) that Consul holds and that names a run."""
    by_id = {entry.instance.service_id: entry for entry in entries}
    for service_id in _expected(state_service_ids):
        entry = by_id.get(service_id)
        if entry is not None and entry.meta.get("deploy_run_id"):
            return entry.meta["deploy_run_id"]
    return None


# --- the ignore list -----------------------------------------------------------------------------------


def _covers(ignore: DriftIgnore, address: str) -> bool:
    return fnmatch.fnmatchcase(address, ignore.address)


def _under(path: str, attribute: str) -> bool:
    return path == attribute or path.startswith(f"{attribute}.")


def apply_ignores(
    items: Iterable[DriftedItem], ignores: Sequence[DriftIgnore]
) -> tuple[tuple[DriftedItem, ...], tuple[str, ...]]:
    """The items the ignore list leaves, and what it hid ("address attribute (by, why)"). An item whose every
    changed attribute is ignored is gone; one with others left keeps those."""
    kept: list[DriftedItem] = []
    hidden: list[str] = []
    for item in items:
        whole = next((ignore for ignore in ignores if ignore.attribute is None and _covers(ignore, item.address)), None)
        if whole is not None:
            hidden.append(f"{item.address} (by {whole.by}: {whole.why})")
            continue
        attribute_ignores = [i for i in ignores if i.attribute is not None and _covers(i, item.address)]
        left = []
        for change in item.changes:
            rule = next((i for i in attribute_ignores if i.attribute and _under(change.path, i.attribute)), None)
            if rule is None:
                left.append(change)
            else:
                hidden.append(f"{item.address} {change.path} (by {rule.by}: {rule.why})")
        if left or not item.changes:
            kept.append(DriftedItem(item.address, item.kind, tuple(left)))
    return tuple(sorted(kept, key=lambda item: item.address)), tuple(hidden)


def build_report(
    workspace: str,
    *,
    plan: Plan | None,
    state_service_ids: Sequence[str],
    consul_entries: Sequence[ServiceEntry],
    ignores: Sequence[DriftIgnore],
    recorded_run: str | None = None,
) -> DriftReport:
    """One check's report: Terraform's drift (None: the workspace runs nothing to plan) and Consul's, minus
    what the ignore list hides. ``recorded_run``: the last applying run of the deploy record, for when
    Consul no longer has the instance that would name it."""
    found = [
        *(terraform_drift(plan) if plan is not None else ()),
        *consul_drift(workspace, state_service_ids, consul_entries),
    ]
    items, ignored = apply_ignores(found, ignores)
    touched = deploy_run_of(state_service_ids, consul_entries) or recorded_run
    return DriftReport(workspace=workspace, items=items, ignored=ignored, touched_by=touched)


def fingerprint(items: Sequence[DriftedItem]) -> str | None:
    """A stable hash of the drifted set (addresses, kinds, paths and values, order aside); None when clean."""
    if not items:
        return None
    canonical = sorted(
        [item.address, item.kind, [[c.path, show_value(c.before), show_value(c.after)] for c in item.changes]]
        for item in items
    )
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()[:16]


# --- what was told, and what to tell now ---------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToldEntry(_Model):
    at: datetime
    tell: Tell
    fingerprint: str | None = None
    addresses: list[str] = Field(default_factory=list)
    run_id: str | None = None


class DriftMemory(_Model):
    """What the drift check of one workspace last told, and when it last checked."""

    schema_version: int = SCHEMA
    workspace: str
    fingerprint: str | None = None  # the drift last told; None: clean (or never drifted)
    addresses: list[str] = Field(default_factory=list)  # what that drift named, for the "resolved" notice
    error: str | None = None  # the failure last told; None: the check works
    checked_at: datetime | None = None  # the last check that ran (a skipped one does not count)
    history: list[ToldEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    tell: Tell | None
    memory: DriftMemory
    recovered: bool = False  # the check failed before this one: a drift notice says it works again


def due(memory: DriftMemory | None, interval_seconds: float, now: datetime) -> bool:
    """Whether a workspace's drift check is due: never checked, or ``interval_seconds`` since the last check."""
    return memory is None or memory.checked_at is None or now - memory.checked_at >= timedelta(seconds=interval_seconds)


def _told(memory: DriftMemory, entry: ToldEntry | None, **changes: Any) -> DriftMemory:
    history = [*memory.history, entry][-_HISTORY_MAX:] if entry is not None else memory.history
    return memory.model_copy(update={**changes, "history": history})


def decide(
    memory: DriftMemory | None,
    workspace: str,
    *,
    report: DriftReport | None = None,
    error: str | None = None,
    now: datetime,
    run_id: str | None = None,
) -> Decision:
    """What to tell after a check that found ``report`` (or failed with ``error``), given what was told before.

    A drift is told when its fingerprint differs from the last one told (first detection, a change); a clean
    check after a told drift tells it resolved, once. A failure is told once; the first check that works
    again says so (with its drift news, if any, in the same notice). Nothing else tells.
    """
    previous = memory or DriftMemory(workspace=workspace)
    if report is None:
        if error is None:
            raise ValueError("decide needs a report or an error")
        if previous.error is not None:
            return Decision(None, previous.model_copy(update={"checked_at": now}))
        entry = ToldEntry(at=now, tell="failing", fingerprint=previous.fingerprint, run_id=run_id)
        return Decision("failing", _told(previous, entry, error=error, checked_at=now))
    recovered = previous.error is not None
    new = report.fingerprint
    tell: Tell | None
    if new == previous.fingerprint:
        tell = "recovered" if recovered else None
    elif new is None:
        tell = "resolved"
    else:
        tell = "detected" if previous.fingerprint is None else "changed"
    addresses = list(report.addresses) if new else []
    told = ToldEntry(at=now, tell=tell, fingerprint=new, addresses=addresses, run_id=run_id) if tell else None
    updated = _told(previous, told, fingerprint=new, addresses=addresses, error=None, checked_at=now)
    return Decision(tell, updated, recovered=recovered and tell not in (None, "recovered"))


# --- telling -------------------------------------------------------------------------------------------


# The drift notice's button (``Action.id``): a normal deploy of what the workspace should run.
RECONCILE_ACTION = "reconcile"


def reconcile_command(workspace: str, version: int | None) -> str | None:
    """The one command that puts the workspace back: a normal deploy of what it should run, planned and
    approved as usual. None when no registered version runs there (nothing to name)."""
    if version is None:
        return None
    return f"prefect deployment run deploy-artifact/deploy-artifact -p workspace={workspace} -p version={version}"


_TITLES: Mapping[Tell, tuple[str, Severity]] = {
    "detected": ("Drift in {ws}: {n} left the state", "warning"),
    "changed": ("Drift in {ws} changed: {n} left the state", "warning"),
    "resolved": ("Drift in {ws} resolved: it matches its state again", "success"),
    "failing": ("Drift check of {ws} fails", "warning"),
    "recovered": ("Drift check of {ws} works again", "info"),
}


def _count(n: int) -> str:
    return f"{n} resource" if n == 1 else f"{n} resources"


def drift_notice(
    decision: Decision,
    *,
    report: DriftReport | None,
    error: str | None,
    namespace: str,
    version: int | None,
    previous: DriftMemory | None = None,
    link_url: str | None = None,
) -> Notification:
    """The notice of one tell: each drifted item with before → after and the deploy run that last touched the
    workspace, the reconcile command, what the ignore list hid. Everything is escaped when rendered."""
    assert decision.tell is not None
    tell = decision.tell
    workspace = decision.memory.workspace
    items = report.items if report is not None else ()
    template, severity = _TITLES[tell]
    title = template.format(ws=workspace, n=_count(len(items)))
    lines: list[str] = []
    if tell in ("detected", "changed"):
        touched = report.touched_by if report is not None else None
        by = f" (last deployed by run {touched})" if touched else ""
        lines += [f"• `{item.address}`{by}: {item.describe()}" for item in items]
        if command := reconcile_command(workspace, version):
            lines.append(f"To reconcile, deploy what it should run, planned and approved as usual: `{command}`")
    elif tell == "resolved":
        was = ", ".join(previous.addresses) if previous is not None and previous.addresses else "the drift told"
        lines.append(f"No drift any more in {was}.")
    elif tell == "failing":
        lines.append(f"The check could not run: {one_line(error or '', 400)}. Told once; told again when it works.")
    else:
        lines.append("The check runs again; the drift is as last told." if items else "The check runs again; no drift.")
    if decision.recovered:
        lines.append("(The check failed before this run; it works again.)")
    if report is not None and report.ignored:
        lines.append("Ignored by the workspace's drift_ignore: " + "; ".join(report.ignored))
    facts = {"workspace": workspace, "runs": f"{namespace} {version_label(version)}"}
    if report is not None and report.fingerprint:
        facts["fingerprint"] = report.fingerprint
    actions: tuple[Action, ...] = ()
    if tell in ("detected", "changed") and version is not None:
        # The same deploy as the command: it plans and asks for approval as usual (icd/interactions/reconcile.py).
        target = json.dumps({"workspace": workspace, "version": version}, separators=(",", ":"))
        confirm = Confirm(
            "Reconcile?",
            f"Plan {namespace} v{version} into {workspace} again; it asks for approval as usual.",
            "Plan it",
        )
        actions = (Action(RECONCILE_ACTION, f"Reconcile (plan v{version})", target, confirm=confirm),)
    return Notification(
        title=title,
        text="\n".join(lines),
        severity=severity,
        fields=facts,
        link_url=link_url,
        link_text="Open the check" if link_url else None,
        dedup_key=f"drift:{workspace}:{tell}:{decision.memory.fingerprint or decision.memory.error or ''}",
        kind="deploy",
        thread_key=f"drift:{workspace}",
        actions=actions,
    )


def table_rows(report: DriftReport) -> list[dict[str, str]]:
    """The check's table artifact: one row per drifted attribute (or item), then one per ignored one."""
    rows = []
    for item in report.items:
        for change in item.changes or (AttributeDrift("", None, None),):
            rows.append(
                {
                    "address": item.address,
                    "kind": item.kind,
                    "attribute": change.path or "-",
                    "before": show_value(change.before) if item.changes else "-",
                    "after": show_value(change.after) if item.changes else "-",
                    "last deployed by": report.touched_by or "-",
                }
            )
    for hidden in report.ignored:
        rows.append(
            {
                "address": hidden,
                "kind": "ignored",
                "attribute": "-",
                "before": "-",
                "after": "-",
                "last deployed by": "-",
            }
        )
    return rows


# --- where what was told is kept -----------------------------------------------------------------------


@dataclass
class DriftStore:
    """Each workspace's :class:`DriftMemory` at ``<prefix>drift/<workspace>.json`` in the registry bucket,
    written with the ETag it was read at: two checks of one workspace racing can't both tell the same change
    (the loser's save returns False and it stays quiet)."""

    client: S3Client
    bucket: str
    prefix: str
    _etags: dict[str, str | None] = field(default_factory=dict)

    def key(self, workspace: str) -> str:
        return f"{self.prefix}drift/{workspace}.json"

    def load(self, workspace: str) -> DriftMemory | None:
        stored = S3Objects(self.client, self.bucket).read(self.key(workspace))
        self._etags[workspace] = stored.etag if stored is not None else None
        if stored is None:
            return None
        try:
            memory = DriftMemory.model_validate_json(stored.body)
        except ValidationError as exc:
            raise RegistryStorageError(
                f"{self.key(workspace)} is not a drift memory of schema {SCHEMA} ({exc.error_count()} errors); "
                "delete it to start afresh (the next drift is then told again)"
            ) from exc
        return memory

    def save(self, memory: DriftMemory) -> bool:
        """Write ``memory`` if nobody wrote since :meth:`load`; False when another check came first."""
        workspace = memory.workspace
        if workspace not in self._etags:
            raise ValueError(f"load the drift memory of {workspace} before saving it")
        body = memory.model_dump_json().encode()
        saved = S3Objects(self.client, self.bucket).write(self.key(workspace), body, if_match=self._etags[workspace])
        if saved:
            self._etags.pop(workspace)
        return saved
