"""What an operator reads before approving: the artifact version diff and the resource changes.

Pure functions over a typed Terraform plan, so the summary can be tested as a table. Raw artifact ids in
the plan are turned into registry versions ("acmeinc/web v3 -> v4") with a lookup the caller passes in.

Two renderings: the approval form's (:meth:`PlanView.approval_markdown`), which must fit Prefect's Resume
modal without scrolling sideways, so it shows a one-line headline and short artifact labels ("v2 ·
8d0e4f7a": the version and the start of the image's sha256); and the plan artifact's
(:meth:`PlanView.markdown`), one click away, with the full artifact ids and the full plan hash.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from icd.registry.models import ArtifactVersion
from icd.text import markdown_cell, markdown_inline
from icd.tools.terraform import Plan

# The trigger names that carry an artifact id in our stacks (local image path, or AMI id on AWS).
# Contract: docs/service-contract.md#artifact-keys (the pre-flight check reports a stack that records none).
ARTIFACT_KEYS = ("artifact_id", "artifact", "ami")
_ACTION_LABELS = {
    "create": "add",
    "update": "change",
    "replace": "replace",
    "delete": "destroy",
    "no-op": "no-op",
    "read": "read",
}


# A short id is at most this long: with the version it must fit a narrow table cell.
SHORT_ID_MAX = 12


@dataclass(frozen=True)
class ResourceRow:
    address: str
    action: str
    before_artifact: str | None
    after_artifact: str | None
    before_version: int | None
    after_version: int | None
    # The registered sha256 of each side's image, when the registry knows it (local images).
    before_digest: str | None = None
    after_digest: str | None = None

    @property
    def before_label(self) -> str:
        """The old image as the approval form names it: its version alone ("v1"; the full plan has the rest)."""
        return artifact_label(self.before_artifact, self.before_version, self.before_digest, short=False)

    @property
    def after_label(self) -> str:
        """The new image as the approval form names it: "v2 · 8d0e4f7a"."""
        return artifact_label(self.after_artifact, self.after_version, self.after_digest)


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
    teardown: bool = False  # a destroy plan: the workspace is emptied, no version comes after

    @property
    def version_diff(self) -> str:
        before = f"v{self.from_version}" if self.from_version is not None else "nothing deployed"
        return f"{self.namespace} {before} -> {'torn down' if self.teardown else f'v{self.to_version}'}"

    def headline(self, workspace: str) -> str:
        """One line: what is asked. "Deploy acmeinc/web v1 → v2 to staging: 1 replace"."""
        if self.teardown:
            deployed = f" v{self.from_version}" if self.from_version is not None else ""
            return f"Tear down {self.namespace}{deployed} in {workspace}: {self.changes}"
        versions = (
            f"v{self.from_version} → v{self.to_version}" if self.from_version is not None else f"v{self.to_version}"
        )
        return f"Deploy {self.namespace} {versions} to {workspace}: {self.changes}"

    @property
    def changes(self) -> str:
        """The non-zero resource counts: "1 add, 1 replace"."""
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
        return ", ".join(parts) or "no resource changes"

    @property
    def counts(self) -> str:
        return f"{self.add} to add, {self.change} to change, {self.replace} to replace, {self.destroy} to destroy"

    def table_rows(self) -> list[dict[str, str]]:
        return [
            {
                "resource": row.address,
                "action": row.action,
                "artifact before": _artifact_cell(row.before_artifact, row.before_version, row.before_digest),
                "artifact after": _artifact_cell(row.after_artifact, row.after_version, row.after_digest),
            }
            for row in self.rows
        ]

    def approval_markdown(self, *, workspace: str, details_url: str | None) -> str:
        """The approval form's description: the headline, then a table narrow enough for the modal.

        Prefect's Resume modal (1280x800) gives the description a box about 470 px wide and as high as the
        form's fields leave (about 190 px, see ``PlanApproval``) that scrolls the rest. So the headline is a
        bold line, not a heading (a heading wraps), the table has the new image's short label and only the
        old one's version (the full plan, one click away on the new label, has both whole), addresses may
        wrap after their dots, and the lines an operator needs least (the link again, the plan hash that the
        form's own field carries whole) come last.
        """
        lines = [f"**{markdown_inline(self.headline(workspace))}**", ""]
        if self.rows:
            lines += ["| resource | action | before | after |", "|---|---|---|---|"]
            for row in self.rows:
                after = markdown_cell(row.after_label)
                if details_url and row.after_artifact:
                    after = f"[{after}]({details_url})"
                cells = [
                    _breakable(markdown_cell(row.address)),
                    markdown_cell(row.action),
                    markdown_cell(row.before_label),
                ]
                lines.append("| " + " | ".join([*cells, after]) + " |")
            lines.append("")
        details = f"[Full plan]({details_url})" if details_url else "Full plan in this run's Artifacts tab"
        lines.append(
            f"{details} · channel `{markdown_inline(self.channel)}` · plan sha256 `{self.plan_sha256[:12]}…` "
            "(whole in the Plan Sha256 field)"
        )
        return "\n".join(lines) + "\n"

    def markdown(self, *, workspace: str, extra: Mapping[str, str] | None = None) -> str:
        lines = [
            f"## {markdown_inline(self.headline(workspace))}",
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
        # One short list per resource, not a table: the full ids are long, and a table cell would clip them.
        for row in self.rows:
            before = _artifact_cell(row.before_artifact, row.before_version, row.before_digest)
            after = _artifact_cell(row.after_artifact, row.after_version, row.after_digest)
            lines += [
                f"**{markdown_inline(row.address)}**: {markdown_inline(row.action)}",
                "",
                f"- before: {markdown_inline(before)}",
                f"- after: {markdown_inline(after)}",
                "",
            ]
        return "\n".join(lines) + "\n"


def _artifact_cell(artifact: str | None, version: int | None, digest: str | None = None) -> str:
    """The full values behind a short label: the artifact id and the image's whole sha256."""
    if artifact is None:
        return "-"
    full = f"{artifact}, sha256 {digest}" if digest else artifact
    return f"v{version} ({full})" if version is not None else full


def short_artifact_id(artifact: str, digest: str | None = None) -> str:
    """A few characters that tell two images apart: the start of the image's sha256 when it is known,
    else the id's last path segment (an image path's file name; an AMI id as it is), shortened."""
    if digest:
        return digest[:8]
    name = artifact.rstrip("/").rsplit("/", 1)[-1] or artifact
    return name if len(name) <= SHORT_ID_MAX else name[: SHORT_ID_MAX - 1] + "…"


def artifact_label(artifact: str | None, version: int | None, digest: str | None = None, *, short: bool = True) -> str:
    """The label of an image: "v2 · 8d0e4f7a" (the version alone when not ``short``), the short id alone
    for an image the registry doesn't know, "-" for none."""
    if artifact is None:
        return "-"
    short_id = short_artifact_id(artifact, digest)
    if version is None:
        return short_id
    return f"v{version} · {short_id}" if short else f"v{version}"


def _breakable(address: str) -> str:
    """A resource address that may wrap after its dots and brackets (a zero-width space), so a long one
    (``module.web.aws_instance.this[0]``) narrows its column instead of widening the table."""
    return re.sub(r"([.\[])", "\\1\u200b", address)


def artifact_of(values: Mapping[str, Any] | None) -> str | None:
    """The artifact a resource runs: the first of ARTIFACT_KEYS among its triggers, else its attributes."""
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
    cache: dict[str, ArtifactVersion | None] = {}

    def found(artifact: str | None) -> ArtifactVersion | None:
        if artifact is None:
            return None
        if artifact not in cache:
            cache[artifact] = find_version(artifact)
        return cache[artifact]

    def version_of(artifact: str | None) -> int | None:
        record = found(artifact)
        return record.version if record else None

    def digest_of(artifact: str | None) -> str | None:
        record = found(artifact)
        if record is None:
            return None
        platform = next((name for name, value in record.artifacts.items() if value == artifact), None)
        return record.artifact_sha256.get(platform) if platform else None

    rows = []
    deployed_before: int | None = None
    for change in plan.resource_changes:
        before, after = artifact_of(change.before), artifact_of(change.after)
        row = ResourceRow(
            address=change.address,
            action=_ACTION_LABELS.get(change.action, change.action),
            before_artifact=before,
            after_artifact=after,
            before_version=version_of(before),
            after_version=version_of(after),
            before_digest=digest_of(before),
            after_digest=digest_of(after),
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
