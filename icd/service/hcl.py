"""Reading HCL2 files (Packer templates, Terraform stacks) as blocks, for the pre-flight check.

python-hcl2 parses; this module turns its dictionaries into :class:`Block` values (type, labels, body, file),
so the checks ask "the `variable` blocks" or "the `post-processor` blocks inside `build`" instead of walking
python-hcl2's nesting. Values stay as python-hcl2 gives them with quotes stripped: literals as Python values,
expressions as ``${...}`` strings, heredocs as their text. That is enough to tell what is declared and which
variables an expression reads; nothing here evaluates HCL.

A file that doesn't parse is a :class:`ParseProblem` naming the line, never an exception: the check reports
it like any other breach, and Packer or Terraform would refuse the file anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
from lark.exceptions import LarkError, UnexpectedInput

_BLOCK_MARKER = "__is_block__"
_OPTIONS = hcl2.SerializationOptions(with_comments=False, explicit_blocks=True, strip_string_quotes=True)


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
        document = hcl2.loads(text, serialization_options=_OPTIONS)
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
            document = hcl2.loads(text, serialization_options=_OPTIONS)
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
