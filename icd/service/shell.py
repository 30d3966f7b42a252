"""Reading a provisioner's shell command far enough to see a daemon that would keep Terraform waiting.

Terraform's ``local-exec`` gives its command a pipe as stdout and stderr and waits for that pipe's end-of-file,
not just for the shell: a process the command leaves running (``app &``, ``nohup``, ``setsid``, ``disown``)
with that pipe as its output keeps the apply "Still creating..." until the apply's watch stops it
(docs/service-contract.md#detached-daemons). :func:`daemons_holding_output` finds such commands in the text
of a command. It is a reading, not a shell: quotes, ``;``, ``&&``, ``||``, ``|``, ``&`` and redirections are
understood, an ``exec >log 2>&1`` covers what follows it, and anything it can't follow (a function, a
nested ``sh -c '...'``, ``${...}`` that hides a redirection) is not reported rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# fd, operator, target: `>log`, `2>&1`, `&>/dev/null`, `1>&-`, `>> "$dir/app.log"`.
_REDIRECT = re.compile(r"(?<![\w$])(?P<fd>\d?)(?P<op>&>>|&>|>>|>&|>\||>)\s*(?P<target>&?-|&?\d+|\S+)")
_DETACHERS = frozenset({"nohup", "setsid", "disown", "daemonize", "start-stop-daemon"})
_COMMAND_PREFIXES = frozenset({"env", "exec", "command", "nice", "ionice", "timeout", "sudo", "time"})


@dataclass(frozen=True)
class _Segment:
    text: str
    background: bool  # ended by a single `&`


def _segments(command: str) -> list[_Segment]:
    """Simple commands, split at unquoted `;`, newlines, `&&`, `||`, `|` and `&`; comments dropped."""
    segments: list[_Segment] = []
    current: list[str] = []
    quote: str | None = None
    i = 0

    def cut(background: bool) -> None:
        text = "".join(current).strip()
        if text:
            segments.append(_Segment(text, background))
        current.clear()

    while i < len(command):
        char = command[i]
        nxt = command[i + 1] if i + 1 < len(command) else ""
        if quote is not None:
            current.append(char)
            if char == "\\" and quote == '"' and nxt:
                current.append(nxt)
                i += 1
            elif char == quote:
                quote = None
        elif char == "\\" and nxt == "\n":
            i += 1  # a line continuation
        elif char == "\\" and nxt:
            current += [char, nxt]
            i += 1
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char == "#" and (not current or current[-1] in " \t"):
            while i < len(command) and command[i] != "\n":
                i += 1
            continue
        elif char in ";\n":
            cut(False)
        elif char in "&|" and nxt == char:
            cut(False)
            i += 1
        elif char == "|":
            cut(False)
        elif char == "&" and ((current and current[-1] in "<>") or nxt == ">"):
            current.append(char)  # part of a redirection: >&, <&, &>
        elif char == "&":
            cut(True)
        else:
            current.append(char)
        i += 1
    cut(False)
    return segments


def _unquoted(text: str) -> str:
    """``text`` with quoted strings blanked, so a `>` inside quotes is no redirection."""
    return re.sub(r"'[^']*'|\"(?:\\.|[^\"\\])*\"", lambda m: "_" * len(m.group(0)), text)


def _output_redirected(text: str) -> tuple[bool, bool]:
    """Whether a simple command's stdout and stderr, in that order, leave the pipe (to a file or closed)."""
    out = err = False
    for match in _REDIRECT.finditer(_unquoted(text)):
        fd, op, target = match.group("fd"), match.group("op"), match.group("target")
        if op in ("&>", "&>>") or (op == ">&" and not fd and not re.fullmatch(r"&?-|&?\d+", target)):
            out = err = True
        elif fd in ("", "1"):
            out = err if op == ">&" and target.lstrip("&") == "2" else True
        elif fd == "2":
            # `2>&1` copies where stdout goes now: before `>log` it is still the pipe.
            err = out if op == ">&" and target.lstrip("&") == "1" else True
    return out, err


def _words(text: str) -> list[str]:
    return _unquoted(text).split()


def _detaches(segment: _Segment) -> bool:
    if segment.background:
        return True
    words = _words(segment.text)
    while words and (words[0] in _COMMAND_PREFIXES or re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0])):
        words = words[1:]
    return bool(words) and words[0] in _DETACHERS - {"disown"}


def daemons_holding_output(command: str) -> list[str]:
    """The simple commands of ``command`` that leave a process running with the shell's stdout or stderr
    (Terraform's pipe) as its own: backgrounded or detached without redirecting both."""
    found = []
    covered = (False, False)  # by an `exec >log 2>&1` earlier in the script
    for segment in _segments(command):
        words = _words(segment.text)
        rest = _unquoted(segment.text)[len("exec") :] if words[:1] == ["exec"] else ""
        if rest.strip() and not _REDIRECT.sub("", rest).strip():  # `exec >log 2>&1`: only redirections
            out, err = _output_redirected(segment.text)
            covered = (covered[0] or out, covered[1] or err)
            continue
        if not _detaches(segment) or words[:1] == ["disown"]:
            continue
        out, err = _output_redirected(segment.text)
        if not ((out or covered[0]) and (err or covered[1])):
            found.append(segment.text + (" &" if segment.background else ""))
    return found
