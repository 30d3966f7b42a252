"""Text that operators type, made safe for each place it is shown.

Everything an operator or a developer controls (an approver's name, a comment, a commit message, a check's
output) passes through one of these before it reaches Slack mrkdwn, a Markdown artifact or Consul service
meta. Slack rendering escapes every text it sends (``icd/notify/slack.py``), so a ``<!channel>`` or a
``<http://evil|innocent>`` in a comment shows as typed instead of pinging everyone or disguising a link.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime

IDENTITY_MAX = 100
CONSUL_META_VALUE_MAX = 512  # Consul refuses longer service meta values
_WHITESPACE = re.compile(r"\s+")
# Format (Cf: zero-width space, bidi overrides), control (Cc), unassigned, private-use and surrogates.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Cn", "Co", "Cs"})
_VISIBLE_CATEGORIES = ("L", "N", "P", "S")


def slack_mrkdwn(text: str) -> str:
    """Escape Slack's three control characters; ``*bold*`` and backticks are formatting, not injection."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown_cell(text: str) -> str:
    """One table cell of a Markdown artifact: no line breaks, no cell separators, no raw HTML."""
    flat = _WHITESPACE.sub(" ", text).strip()
    return (
        flat.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("`", "\\`")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("*", "\\*")
        .replace("_", "\\_")
        .replace("[", "\\[")
    ) or "-"


def markdown_inline(text: str) -> str:
    """A value inside a Markdown paragraph: the same escaping as a cell."""
    return markdown_cell(text)


def consul_meta_value(text: str) -> str:
    """A service meta value: printable, single line, within Consul's 512-character limit."""
    visible = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)
    return _WHITESPACE.sub(" ", visible).strip()[:CONSUL_META_VALUE_MAX]


def normalize_identity(name: str) -> str | None:
    """An approver's name as recorded: NFKC, invisible characters dropped, spaces folded.

    ``None`` when nothing visible is left (an empty name, only spaces, only zero-width characters): such
    an answer is refused, because a record must say who decided.
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", name))
    text = "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE_CATEGORIES).strip()
    if not any(unicodedata.category(ch).startswith(_VISIBLE_CATEGORIES) for ch in text):
        return None
    return text[:IDENTITY_MAX]


def one_line(text: str, limit: int) -> str:
    """A single line of at most ``limit`` characters, for state messages and titles."""
    flat = _WHITESPACE.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def hash_difference(given: str, expected: str) -> str:
    """Both full hashes and the first position where they differ, for an operator comparing by eye."""
    position = next((i for i, (a, b) in enumerate(zip(given, expected, strict=False)) if a != b), None)
    if position is None:
        position = min(len(given), len(expected))
    return f"{given or '(none)'} differs from the plan waiting, {expected}, from character {position + 1} on"


def operator_time(moment: datetime | str) -> str:
    """A time as operators read it everywhere (Slack, state messages, forms, records, logs): UTC, to the
    second, one format: "2026-11-27 20:29:05 UTC". A naive time is taken as UTC; a string as ISO 8601."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def version_label(version: int | None) -> str:
    """A registry version as operators read it: ``v5``, or ``nothing`` for a channel that points at none (an
    operator never reads "vNone")."""
    return f"v{version}" if version is not None else "nothing"
