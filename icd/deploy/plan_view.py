"""What an operator reads before approving: the artifact version diff and the resource changes.

Pure functions over a typed Terraform plan, so the summary can be tested as a table. Raw artifact ids in
the plan are turned into registry versions ("acmeinc/web v3 -> v4") with a lookup the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from icd.registry.models import ArtifactVersion
from icd.text import markdown_cell, markdown_inline
from icd.tools.terraform import Plan

# The trigger names that carry an artifact id in our stacks (local image path, or AMI id on AWS).
ARTIFACT_KEYS = ("artifact_id", "artifact", "ami")
_ACTION_LABELS = {
    "create": "add",
    "update": "change",
    "replace": "replace",
    "delete": "destroy",
    "no-op": "no-op",
    "read": "read",
}


@dataclass(frozen=True)
class ResourceRow:
    address: str
    action: str
    before_artifact: str | None
    after_artifact: str | None
    before_version: int | None
    after_version: int | None


@dataclass(frozen=True)
class PlanView:
    namespace: str
    channel: str
    from_version: int | None
    to_version: int
    add: int
    change: int
    replace: int
    destroy: int
    rows: tuple[ResourceRow, ...]
    plan_sha256: str

    @property
    def version_diff(self) -> str:
        before = f"v{self.from_version}" if self.from_version is not None else "nothing deployed"
        return f"{self.namespace} {before} -> v{self.to_version}"

    def headline(self, workspace: str) -> str:
        """One line: what is asked. "acmeinc/web v1 -> v2 to staging: 1 replace"."""
        parts = [
            f"{count} {label}"
            for count, label in (
                (self.add, "add"),
                (self.change, "change"),
                (self.replace, "replace"),
                (self.destroy, "destroy"),
            )
            if count
        ]
        return f"{self.version_diff} to {workspace}: {', '.join(parts) or 'no resource changes'}"

    @property
    def counts(self) -> str:
        return f"{self.add} to add, {self.change} to change, {self.replace} to replace, {self.destroy} to destroy"

    def table_rows(self) -> list[dict[str, str]]:
        return [
            {
                "resource": row.address,
                "action": row.action,
                "artifact before": _artifact_cell(row.before_artifact, row.before_version),
                "artifact after": _artifact_cell(row.after_artifact, row.after_version),
            }
            for row in self.rows
        ]

    def markdown(self, *, workspace: str, extra: Mapping[str, str] | None = None) -> str:
        lines = [
            f"## Plan for workspace `{workspace}`",
            "",
            f"**Artifact:** {self.version_diff} (channel `{self.channel}`)",
            "",
            f"**Resources:** {self.counts}",
            "",
            f"**Plan sha256:** `{self.plan_sha256}`",
            "",
        ]
        for key, value in (extra or {}).items():
            lines += [f"**{key}:** {markdown_inline(value)}", ""]
        if self.rows:
            lines += ["| resource | action | artifact before | artifact after |", "|---|---|---|---|"]
            for cells in self.table_rows():
                lines.append("| " + " | ".join(markdown_cell(cell) for cell in cells.values()) + " |")
        return "\n".join(lines) + "\n"


def _artifact_cell(artifact: str | None, version: int | None) -> str:
    if artifact is None:
        return "-"
    return f"v{version} ({artifact})" if version is not None else artifact


def _artifact_of(values: Mapping[str, Any] | None) -> str | None:
    if not values:
        return None
    triggers = values.get("triggers") or {}
    for source in (triggers, values):
        if isinstance(source, Mapping):
            for key in ARTIFACT_KEYS:
                value = source.get(key)
                if isinstance(value, str) and value:
                    return value
    return None


def summarize_plan(
    plan: Plan,
    *,
    namespace: str,
    to_version: int,
    channel: str,
    channel_version: int | None,
    find_version: Callable[[str], ArtifactVersion | None],
) -> PlanView:
    """``channel_version`` is what the channel pointed at; the plan's own "before" ids refine it."""
    cache: dict[str, int | None] = {}

    def version_of(artifact: str | None) -> int | None:
        if artifact is None:
            return None
        if artifact not in cache:
            found = find_version(artifact)
            cache[artifact] = found.version if found else None
        return cache[artifact]

    rows = []
    deployed_before: int | None = None
    for change in plan.resource_changes:
        before, after = _artifact_of(change.before), _artifact_of(change.after)
        row = ResourceRow(
            address=change.address,
            action=_ACTION_LABELS.get(change.action, change.action),
            before_artifact=before,
            after_artifact=after,
            before_version=version_of(before),
            after_version=version_of(after),
        )
        deployed_before = deployed_before or row.before_version
        rows.append(row)
    counts = plan.summary()
    return PlanView(
        namespace=namespace,
        channel=channel,
        from_version=deployed_before if deployed_before is not None else channel_version,
        to_version=to_version,
        add=counts.add,
        change=counts.change,
        replace=counts.replace,
        destroy=counts.destroy,
        rows=tuple(rows),
        plan_sha256=plan.sha256,
    )
