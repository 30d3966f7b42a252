"""Reading HCL2 files (Packer templates, Terraform stacks) as blocks, for the pre-flight check.

python-hcl2 parses; this module turns its dictionaries into :class:`Block` values (type, labels, body, file),
so the checks ask "the `variable` blocks" or "the `post-processor` blocks inside `build`" instead of walking
python-hcl2's nesting. Values stay as python-hcl2 gives them with quotes stripped: literals as Python values,
expressions as ``${...}`` strings, heredocs as their text. That is enough to tell what is declared and which
variables an expression reads; nothing here evaluates HCL.

A file that doesn't parse is a :class:`ParseProblem` naming the line, never an exception: the check reports
it like any other breach, and Packer or Terraform would refuse the file anyway.

Parsing is slow (Lark: 0.1-0.3 s for a template and its stacks, on every build's pre-flight check) and the
files rarely change, so what a text parsed to is kept on disk by the text's hash (``$ICD_HOME/cache/hcl``)
and read back as JSON. Only what parsed is kept; a text that doesn't parse is parsed, and refused, each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
import lark
from lark.exceptions import LarkError, UnexpectedInput

from icd.paths import state_home

_BLOCK_MARKER = "__is_block__"
_OPTIONS = hcl2.SerializationOptions(with_comments=False, explicit_blocks=True, strip_string_quotes=True)
# Part of every cache key: another python-hcl2, Lark or other options parse the same text differently.
_PARSER = f"python-hcl2 {getattr(hcl2, '__version__', '?')} lark {getattr(lark, '__version__', '?')} {_OPTIONS!r}"


def parse_cache() -> Path:
    return state_home() / "cache" / "hcl"


def _loads(text: str) -> dict[str, Any]:
    """python-hcl2's document of ``text``, read back from the parse cache when this text parsed before.
    Raises what python-hcl2 raises for a text that doesn't parse."""
    cached = _cache_entry(text)
    if cached is not None:
        with contextlib.suppress(OSError, ValueError):  # absent, or unreadable: parse it
            document = json.loads(cached.read_text(encoding="utf-8"))
            if isinstance(document, dict):
                return document
    document = hcl2.loads(text, serialization_options=_OPTIONS)
    if cached is not None:
        with contextlib.suppress(OSError, TypeError, ValueError):  # a cache that can't be written only costs time
            kept = json.dumps(document)
            if json.loads(kept) == document:  # only what JSON gives back unchanged
                _write_atomically(cached, kept)
    return document


def _cache_entry(text: str) -> Path | None:
    """Where the document of ``text`` is kept; None when there is nowhere to keep it (then it is only parsed)."""
    try:
        key = hashlib.sha256(_PARSER.encode() + b"\0" + text.encode("utf-8", "surrogatepass")).hexdigest()
        return parse_cache() / f"{key}.json"
    except (OSError, ValueError):  # no home directory to resolve (UnicodeError is a ValueError)
        return None


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the whole file or none: runs on one worker parse at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@dataclass(frozen=True)
class Block:
    """One block: ``variable "version" {...}`` is type ``variable``, labels ``("version",)``."""

    type: str
    labels: tuple[str, ...]
    body: Mapping[str, Any]
    file: Path

    @property
    def label(self) -> str:
        return ".".join(self.labels)

    def blocks(self, block_type: str) -> list[Block]:
        """The nested blocks of ``block_type`` (``provisioner``, ``post-processor``, ...), in file order."""
        value = self.body.get(block_type)
        if not isinstance(value, list) or not _is_block_list(value):
            return []
        return list(_blocks(block_type, value, self.file))

    def attributes(self) -> dict[str, Any]:
        """The body's attributes (``name = expression``), without its nested blocks."""
        return {key: value for key, value in self.body.items() if not _is_block_list(value)}


@dataclass(frozen=True)
class ParseProblem:
    file: Path
    line: int | None
    reason: str


@dataclass(frozen=True)
class HclFiles:
    """The top-level blocks of a set of files (a template or stack directory), and the files that failed."""

    blocks: tuple[Block, ...] = ()
    problems: tuple[ParseProblem, ...] = ()

    def of_type(self, block_type: str) -> list[Block]:
        return [block for block in self.blocks if block.type == block_type]


def _strip_marker(body: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != _BLOCK_MARKER}


def _leads_to_block(node: object) -> bool:
    """Whether ``node`` is a block body, or a chain of label dicts ending in one (``{"null": {"x": {...}}}``)."""
    if not isinstance(node, Mapping):
        return False
    if node.get(_BLOCK_MARKER):
        return True
    return bool(node) and all(_leads_to_block(child) for child in node.values())


def _is_block_list(value: object) -> bool:
    # python-hcl2 gives nested blocks as a list of (label dicts leading to) bodies marked as blocks; a list
    # attribute (`sources = [...]`, `only = [...]`) holds strings or plain objects, never a marked body.
    return isinstance(value, list) and bool(value) and all(_leads_to_block(item) for item in value)


def _descend(block_type: str, labels: tuple[str, ...], node: Mapping[str, Any], file: Path) -> Iterator[Block]:
    if node.get(_BLOCK_MARKER):
        yield Block(block_type, labels, _strip_marker(node), file)
        return
    for label, child in node.items():
        if isinstance(child, Mapping):
            yield from _descend(block_type, (*labels, str(label)), child, file)


def _blocks(block_type: str, entries: Iterable[Any], file: Path) -> Iterator[Block]:
    for entry in entries:
        if isinstance(entry, Mapping):
            yield from _descend(block_type, (), entry, file)


def parse_text(text: str, file: Path) -> tuple[list[Block], ParseProblem | None]:
    """The top-level blocks of one file's text, or the reason it doesn't parse."""
    try:
        document = _loads(text)
    except UnexpectedInput as exc:
        return [], _unexpected(exc, text, file)
    except (LarkError, ValueError, TypeError, KeyError) as exc:
        # python-hcl2's transformer raises plain errors for some malformed input; the file is at fault either way.
        return [], ParseProblem(file, None, _first_line(str(exc)) or type(exc).__name__)
    blocks: list[Block] = []
    for block_type, entries in document.items():
        if _is_block_list(entries):
            blocks += _blocks(str(block_type), entries, file)
    return blocks, None


def _unexpected(exc: UnexpectedInput, text: str, file: Path) -> ParseProblem:
    # Lark's own message repeats the whole rest of the file as the offending token; the line itself is clearer.
    lines = text.splitlines()
    if 0 < exc.line <= len(lines):
        return ParseProblem(
            file, exc.line, f"unexpected text at line {exc.line}, column {exc.column}: {lines[exc.line - 1].strip()}"
        )
    return ParseProblem(file, None, "unexpected end of file")


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else ""


def read_files(paths: Iterable[Path]) -> HclFiles:
    blocks: list[Block] = []
    problems: list[ParseProblem] = []
    for path in sorted(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(ParseProblem(path, None, f"can't be read: {exc}"))
            continue
        found, problem = parse_text(text, path)
        blocks += found
        if problem is not None:
            problems.append(problem)
    return HclFiles(tuple(blocks), tuple(problems))


def read_assignments(paths: Iterable[Path]) -> tuple[set[str], list[ParseProblem]]:
    """The names a variable-values file assigns (``*.auto.pkrvars.hcl``, ``terraform.tfvars``, ...)."""
    names: set[str] = set()
    problems: list[ParseProblem] = []
    for path in sorted(paths):
        try:
            text = path.read_text(encoding="utf-8")
            document = _loads(text)
        except UnexpectedInput as exc:
            problems.append(_unexpected(exc, text, path))
            continue
        except (OSError, UnicodeDecodeError, LarkError, ValueError, TypeError, KeyError) as exc:
            problems.append(ParseProblem(path, None, _first_line(str(exc)) or type(exc).__name__))
            continue
        names |= {str(key) for key, value in document.items() if not _is_block_list(value)}
    return names, problems


def strings_in(value: object) -> Iterator[str]:
    """Every string inside an attribute value (expressions, literals, heredocs), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for child in value.values():
            yield from strings_in(child)
    elif isinstance(value, list | tuple):
        for child in value:
            yield from strings_in(child)


def reads_variable(value: object, name: str) -> bool:
    """Whether an expression (or any string inside ``value``) reads ``var.<name>``."""
    pattern = re.compile(rf"(?<![\w.]){re.escape('var.' + name)}(?![\w-])")
    return any(pattern.search(text) for text in strings_in(value))


def literal(value: object) -> str | None:
    """A literal string value (``"x"``), or None for an expression (``${...}``) or anything else."""
    if isinstance(value, str) and "${" not in value and "%{" not in value and not value.startswith("<<"):
        return value
    return None
