"""The deploy record: one Markdown table per workspace saying what happened, who decided and why.

Every value is escaped for a Markdown cell (``icd/text.py``): an approver's comment with a newline or a
``|`` can't break the table, and raw HTML or links in it are shown as typed.
"""

from __future__ import annotations

from collections.abc import Mapping

from icd.text import markdown_cell, markdown_inline


def artifact_key(kind: str, workspace: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-{workspace}".lower()


def record_markdown(workspace: str, facts: Mapping[str, str]) -> str:
    rows = "\n".join(f"| {markdown_cell(key)} | {markdown_cell(value)} |" for key, value in facts.items())
    return f"## Deploy record: {markdown_inline(workspace)}\n\n| fact | value |\n|---|---|\n{rows}\n"
