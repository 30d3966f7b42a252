"""The deploy record: one Markdown table per workspace saying what happened, who decided and why.

Every value is escaped for a Markdown cell (``icd/text.py``): an approver's comment with a newline or a
``|`` can't break the table, and raw HTML or links in it are shown as typed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from icd.text import markdown_cell, markdown_inline


def artifact_key(kind: str, workspace: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-{workspace}".lower()


def record_markdown(workspace: str, facts: Mapping[str, str]) -> str:
    rows = "\n".join(f"| {markdown_cell(key)} | {markdown_cell(value)} |" for key, value in facts.items())
    return f"## Deploy record: {markdown_inline(workspace)}\n\n| fact | value |\n|---|---|\n{rows}\n"


# The row `| applied in | 12.3s |` that a run whose apply ended writes (flows/deploy_artifact.py).
_APPLIED_IN = re.compile(r"^\| applied in \| (\d+(?:\.\d+)?)s \|$", re.MULTILINE)


# A teardown's destroy says little of how long creating the instance takes, which is what the heads-up measures.
_TORN_DOWN = re.compile(r"^\| outcome \| TornDown \|$", re.MULTILINE)


def applied_seconds(markdown: str) -> float | None:
    """How long the apply of a deploy record took; None when the run applied nothing or tore down."""
    match = _APPLIED_IN.search(markdown)
    return float(match.group(1)) if match and not _TORN_DOWN.search(markdown) else None
