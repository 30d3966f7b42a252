"""The audit chain: from a commit to the instances that run it now, each link from a record the system keeps.

    commit -> build run -> artifact digest and provenance -> registry version and its channel history
    -> each plan (hash, workspace) -> the decision (who, source, when, comment) -> the apply (run, outputs,
    the gate's verdict) -> the Consul instances carrying it now, with their health -> drift checks since

Pure: the command (``cli/audit.py``) reads the records and hands them here; this module puts them in order
and says, for each link, whether it holds (``ok``), is absent (``missing``: the step never happened, or its
record is gone) or fails its check (``broken``: a signature that doesn't verify, a digest that doesn't
match), with the reason. Nothing is guessed: a link with no record says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

LinkStatus = Literal["ok", "missing", "broken"]
_MARK: Mapping[LinkStatus, str] = {"ok": "✓", "missing": "?", "broken": "✗"}
PlanRole = Literal["approved", "batch", "rollback", "revert"]
# The plan ids a deploy run stores (flows/deploy_artifact.py): its own id for the plan it asks approval of,
# "-b<N>" for a rollout's later batches (at most 100 instances: 3 digits, so never a UUID's 12-hex tail),
# "-rollback" for an automatic rollback, "-revert" for a failed rollout's revert.
_PLAN_SUFFIX = re.compile(r"^(?P<run>.+?)-(?:b(?P<batch>\d{1,3})|(?P<role>rollback|revert))$")


@dataclass(frozen=True)
class Link:
    """One link of the chain: what it is, what its record says, and whether it holds."""

    kind: str  # commit, build, artifact, provenance, version, channel, plan, decision, apply, instance, drift
    label: str  # one line for people
    status: LinkStatus = "ok"
    facts: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""  # why it is missing or broken
    children: tuple[Link, ...] = ()  # e.g. a version's plans, a plan's decision and apply


@dataclass(frozen=True)
class Chain:
    """An audit: what was asked (``subject``) and the links found, in order."""

    subject: str
    links: tuple[Link, ...]

    @property
    def intact(self) -> bool:
        """Every link (and every link under it) holds."""
        return all(_intact(link) for link in self.links)

    def to_json(self) -> str:
        return json.dumps(
            {"subject": self.subject, "intact": self.intact, "links": [asdict(x) for x in self.links]}, indent=2
        )

    def to_text(self) -> str:
        lines = [f"audit of {self.subject}: {'every link holds' if self.intact else 'a link is missing or broken'}"]
        for link in self.links:
            lines += _text(link, 1)
        return "\n".join(lines)


def _intact(link: Link) -> bool:
    return link.status == "ok" and all(_intact(child) for child in link.children)


def _text(link: Link, depth: int) -> list[str]:
    indent = "  " * depth
    head = f"{indent}{_MARK[link.status]} {link.kind}: {link.label}"
    if link.status != "ok":
        head += f" [{link.status}: {link.reason}]"
    lines = [head]
    lines += [f"{indent}    {key}: {value}" for key, value in link.facts.items()]
    for child in link.children:
        lines += _text(child, depth + 1)
    return lines


@dataclass(frozen=True)
class PlanId:
    """Which run stored a plan, and why: the plan it asked approval of, a later batch, a rollback, a revert."""

    run_id: str
    role: PlanRole = "approved"
    batch: int | None = None  # the rollout's batch number (2 and up) of a "batch" plan


def parse_plan_id(plan_id: str) -> PlanId:
    """The run and role of a stored plan id ("<run>", "<run>-b2", "<run>-rollback", "<run>-revert")."""
    found = _PLAN_SUFFIX.match(plan_id)
    if found is None:
        return PlanId(plan_id)
    if found["batch"] is not None:
        return PlanId(found["run"], "batch", int(found["batch"]))
    return PlanId(found["run"], "rollback" if found["role"] == "rollback" else "revert")


# Where one batch's line ends in a rollout's signed gate: only before the next batch's own line, since a line
# holds "; " itself ("batch 2/3: applied; no instance replaced (plan ...)").
_NEXT_BATCH = re.compile(r"; (?=batch \d+/\d+: )")


def batch_gate(gate: str, batch: int) -> str | None:
    """Batch ``batch``'s line in a rollout's signed gate ("batch 1/3: ...; batch 2/3: ..."), if it has one."""
    prefix = f"batch {batch}/"
    return next((part.strip() for part in _NEXT_BATCH.split(gate) if part.strip().startswith(prefix)), None)


def batch_plan_sha(line: str) -> str | None:
    """The whole hash of the plan a signed batch line says was applied: the ``(plan <sha256>)`` it ends with, so a
    check's text earlier in the line can't name another."""
    named = _BATCH_PLAN.search(line)
    return named[1] if named else None


_BATCH_PLAN = re.compile(r"\(plan ([0-9a-f]{64})\)$")


def missing(kind: str, label: str, reason: str) -> Link:
    return Link(kind, label, "missing", reason=reason)


def broken(kind: str, label: str, reason: str, facts: Mapping[str, str] | None = None) -> Link:
    return Link(kind, label, "broken", dict(facts or {}), reason)


def chain(subject: str, links: Sequence[Link]) -> Chain:
    return Chain(subject, tuple(links))
