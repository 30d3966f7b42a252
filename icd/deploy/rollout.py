"""Progressive rollout: a workspace's instances replaced a batch at a time, under one approval.

Terraform applies a plan all at once, so a rollout in batches is several plans, and an approval of "the plan"
no longer covers what is applied. Here the operator approves a :class:`RolloutPath` instead: where the
workspace ends (every instance on the new version), the batch sequence, and the first batch's saved plan.
Each later batch is planned when its turn comes and checked against that path (:func:`deviation`): only the
instance slots of that batch may change, only as the approved first batch changed its slots (the same
resources, the same attributes, to the same artifact), and nothing else. A batch plan that passes is applied
without asking; one that does not stops the rollout with nothing more applied, and it is asked again.

The stack's side is docs/service-contract.md#rollout: a list variable ``instances`` whose element i is what
slot i runs, resources indexed by ``count`` (the slot), and an output listing each slot's Consul service ID.

Pure: the flow reads the state and plans; this module says what to plan next and whether a plan may go.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from icd.deploy.plan_view import artifact_of
from icd.health.gate import BatchGateResult
from icd.registry.models import ArtifactVersion
from icd.text import one_line
from icd.tools.terraform import Plan

# A resource instance of a counted resource: "null_resource.instance[2]" (module paths kept in the base).
_INDEXED = re.compile(r"^(?P<base>.+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True)
class Slot:
    """What one instance slot runs: the image and its build label (what the stack's instances list carries)."""

    artifact_id: str
    build_label: str
    version: int | None = None  # the registry version, when the image is a registered one

    @property
    def label(self) -> str:
        return f"v{self.version}" if self.version is not None else self.build_label or self.artifact_id

    def as_variable(self) -> dict[str, str]:
        return {"artifact_id": self.artifact_id, "artifact_version": self.build_label}


def encode_instances(slots: Sequence[Slot]) -> str:
    """The ``instances`` variable's value for ``-var``: JSON, which Terraform reads as an HCL expression, with
    HCL's template sequences escaped so that a ``${`` in a path stays text (it is data, never code)."""
    text = json.dumps([slot.as_variable() for slot in slots], separators=(",", ":"))
    return text.replace("${", "$${").replace("%{", "%%{")


@dataclass(frozen=True)
class RolloutPath:
    """What one approval covers: from ``start`` (what each slot ran before) to ``instances`` slots of
    ``target``, the slots of each batch in order, and the gate every batch must pass."""

    workspace: str
    target: Slot
    start: tuple[Slot | None, ...]  # slot i before the rollout (None: nothing runs there)
    instances: int
    batches: tuple[tuple[int, ...], ...]  # the slots each batch moves (removed slots go with the last)
    min_healthy_seconds: float
    healthy_deadline_seconds: float
    progress_deadline_seconds: float
    auto_revert: bool

    @property
    def total(self) -> int:
        return len(self.batches)

    def slots_after(self, batch: int) -> tuple[Slot, ...]:
        """The ``instances`` list once batches 0..``batch`` are applied. Slots past ``instances`` (a shrink)
        keep what they ran until the last batch removes them."""
        moved = {slot for done in self.batches[: batch + 1] for slot in done}
        last = batch >= self.total - 1
        length = self.instances if last else max(len(self.start), max(moved, default=-1) + 1)
        slots: list[Slot] = []
        for index in range(length):
            before = self.start[index] if index < len(self.start) else None
            if index in moved or before is None:
                slots.append(self.target)
            else:
                slots.append(before)
        return tuple(slots)

    def new_slots(self, batch: int) -> tuple[int, ...]:
        """The slots of ``batch`` that run the target afterwards (the ones its gate waits for)."""
        return tuple(slot for slot in self.batches[batch] if slot < self.instances)

    @property
    def revert_to(self) -> tuple[Slot, ...] | None:
        """What a failed batch puts back: what ran before, when one version ran on every slot (the last
        version that went fully healthy there). None when there is nothing to go back to (a first deploy) or
        the rollout started from a mix, which no single version describes."""
        present = [slot for slot in self.start if slot is not None]
        if not present or len(present) != len(self.start) or len({s.artifact_id for s in present}) != 1:
            return None
        return tuple(present)

    @property
    def outgoing_build_label(self) -> str:
        """The build label most slots leave (the deploy window's outgoing version; "" for a first deploy).
        A rollout that starts from a mix names the most common one; the others' transitions page as usual."""
        labels = [s.build_label for s in self.start if s is not None and s.artifact_id != self.target.artifact_id]
        return max(labels, key=labels.count) if labels else ""

    def from_label(self) -> str:
        labels = sorted({slot.label for slot in self.start if slot is not None})
        return " + ".join(labels) if labels else "nothing"

    def describe(self) -> str:
        """One line for the approval notice: the final state, the batches and the gate."""
        sizes = {len(batch) for batch in self.batches}
        size = f"{sizes.pop()}" if len(sizes) == 1 else "up to " + str(max(len(b) for b in self.batches))
        sequence = " | ".join(",".join(str(slot) for slot in batch) or "none" for batch in self.batches)
        revert = "reverts to " + self.revert_to[0].label if self.revert_to else "stops where it is"
        return (
            f"{self.instances} instance{'s' if self.instances != 1 else ''} {self.from_label()} → "
            f"{self.target.label} in {self.total} batch{'es' if self.total != 1 else ''} of {size} "
            f"(slots {sequence}); each batch healthy for {self.min_healthy_seconds:g} s within "
            f"{self.healthy_deadline_seconds:g} s, all within {self.progress_deadline_seconds:g} s; "
            f"a failed batch {revert}. Later batches are applied without asking when their plan stays on this path."
        )


def plan_path(
    *,
    workspace: str,
    target: Slot,
    start: Sequence[Slot | None],
    instances: int,
    max_parallel: int,
    min_healthy_seconds: float,
    healthy_deadline_seconds: float,
    progress_deadline_seconds: float,
    auto_revert: bool,
) -> RolloutPath:
    """The batches that take ``start`` to ``instances`` slots of ``target``: slots not on the target yet, in
    slot order, ``max_parallel`` at a time; slots past ``instances`` are removed with the last batch."""
    pending = [
        index
        for index in range(instances)
        if index >= len(start) or start[index] is None or start[index].artifact_id != target.artifact_id  # type: ignore[union-attr]
    ]
    removed = [index for index in range(instances, len(start)) if start[index] is not None]
    batches = [tuple(pending[i : i + max_parallel]) for i in range(0, len(pending), max_parallel)]
    if removed:
        batches = [*batches[:-1], (*batches[-1], *removed)] if batches else [tuple(removed)]
    # Every slot on the target already: one batch that moves none, so a plan that still has changes (outputs,
    # another resource of the stack) is approved and applied as one step, with no instance to gate.
    batches = batches or [()]
    return RolloutPath(
        workspace=workspace,
        target=target,
        start=tuple(start),
        instances=instances,
        batches=tuple(batches),
        min_healthy_seconds=min_healthy_seconds,
        healthy_deadline_seconds=healthy_deadline_seconds,
        progress_deadline_seconds=progress_deadline_seconds,
        auto_revert=auto_revert,
    )


@dataclass(frozen=True)
class ResourceDelta:
    """One resource instance a plan changes, in the terms a batch is checked in."""

    address: str
    action: str  # create, update, replace, delete
    changed: tuple[str, ...]  # the attribute paths whose value differs ("triggers.artifact_id", "id")
    after_artifact: str | None

    @property
    def base(self) -> str:
        match = _INDEXED.match(self.address)
        return match["base"] if match else self.address

    @property
    def slot(self) -> int | None:
        match = _INDEXED.match(self.address)
        return int(match["index"]) if match else None


def _flat(values: Mapping[str, Any] | None) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if isinstance(value, Mapping):
            flat |= {f"{key}.{inner}": item for inner, item in value.items()}
        else:
            flat[key] = value
    return flat


def resource_deltas(plan: Plan) -> tuple[ResourceDelta, ...]:
    """What ``plan`` changes, resource by resource (no-ops and reads left out)."""
    deltas = []
    for change in plan.resource_changes:
        if change.action in {"no-op", "read"}:
            continue
        before, after = _flat(change.before), _flat(change.after)
        changed = tuple(sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key)))
        deltas.append(ResourceDelta(change.address, change.action, changed, artifact_of(change.after)))
    return tuple(deltas)


def deviation(
    path: RolloutPath, batch: int, planned: Iterable[ResourceDelta], approved: Iterable[ResourceDelta]
) -> str | None:
    """Why the plan of ``batch`` (its ``planned`` changes) is not on the approved path, or None when it is.

    ``approved`` is the first batch's plan, the one the operator read: a later batch may change the same
    resources of its own slots, by the same action and the same attributes, to the target's artifact. A slot
    it adds or removes must be one the path adds or removes in this batch.
    """
    shapes: dict[tuple[str, str], set[str]] = {}
    for delta in approved:
        shapes.setdefault((delta.base, delta.action), set()).update(delta.changed)
    bases = {base for base, _ in shapes}
    mine = set(path.batches[batch])
    problems: list[str] = []
    for delta in planned:
        where = f"{delta.address} ({delta.action})"
        if delta.slot is None or delta.base not in bases:
            problems.append(f"{where} is not an instance the approved rollout changes")
            continue
        if delta.slot not in mine:
            problems.append(f"{where} is slot {delta.slot}, not in batch {batch + 1} (slots {_slots(mine)})")
            continue
        if delta.action == "delete":
            if delta.slot < path.instances:
                problems.append(f"{where} would remove slot {delta.slot}, which the rollout keeps")
            continue
        if delta.action == "create":
            if delta.slot < len(path.start) and path.start[delta.slot] is not None:
                problems.append(f"{where} would create slot {delta.slot}, which runs already")
        else:
            allowed = shapes.get((delta.base, delta.action))
            if allowed is None:
                problems.append(f"{where}: the approved plan made no {delta.action} of {delta.base}")
                continue
            if extra := sorted(set(delta.changed) - allowed):
                problems.append(f"{where} changes {', '.join(extra)}, which the approved plan left alone")
        if delta.after_artifact is not None and delta.after_artifact != path.target.artifact_id:
            problems.append(
                f"{where} deploys {delta.after_artifact}, not {path.target.label} ({path.target.artifact_id})"
            )
    return "; ".join(problems) or None


def _slots(slots: Iterable[int]) -> str:
    return ", ".join(str(slot) for slot in sorted(slots))


def slots_of_state(instances: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[int, tuple[str, str]]:
    """Slot -> (artifact, build label) from a state's counted resource instances that carry an artifact
    (``(address, attributes)`` as ``icd/deploy/running.py`` reads them). The build label is the instance's own
    ``artifact_version`` when it records one."""
    found: dict[int, tuple[str, str]] = {}
    for address, attributes in instances:
        match = _INDEXED.match(address)
        artifact = artifact_of(attributes)
        if match is None or artifact is None:
            continue
        triggers = attributes.get("triggers")
        label = (triggers if isinstance(triggers, Mapping) else attributes).get("artifact_version") or ""
        found.setdefault(int(match["index"]), (artifact, str(label)))
    return found


def start_slots(
    slots: Mapping[int, tuple[str, str]], find_version: Callable[[str], ArtifactVersion | None]
) -> list[Slot | None]:
    """What each slot runs (``Running.slots``), each named by its registry version where it has one."""
    start: list[Slot | None] = [None] * (max(slots) + 1 if slots else 0)
    for index, (artifact, label) in slots.items():
        found = find_version(artifact)
        start[index] = Slot(artifact, label or (found.build_label if found else ""), found.version if found else None)
    return start


def describe_mix(slots: Sequence[Slot | None]) -> str:
    """What a workspace's slots run, by version: "1 x v3 (slot 0), 3 x v2 (slots 1, 2, 3)"."""
    by_label: dict[str, list[int]] = {}
    for index, slot in enumerate(slots):
        if slot is not None:
            by_label.setdefault(slot.label, []).append(index)
    if not by_label:
        return "no instance"
    return ", ".join(
        f"{len(where)} x {label} (slot{'s' if len(where) != 1 else ''} {_slots(where)})"
        for label, where in sorted(by_label.items(), key=lambda item: item[1][0])
    )


def batch_line(name: str, gate: BatchGateResult) -> str:
    """The thread's line for one batch: "batch 2/4: web-7, web-8 healthy after 11 s"."""
    ids = ", ".join(instance.service_id for instance in gate.instances)
    if not ids:
        return f"{name}: applied; no instance replaced"
    if gate.healthy:
        return f"{name}: {ids} healthy after {gate.waited_seconds:.0f} s"
    failing = gate.failing
    assert failing is not None
    # "; " is where the signed gate joins the batches' lines (icd/audit.py reads them apart): none in a check's text.
    check = f": {one_line(failing.output, 300).replace('; ', ', ')}" if failing.output else ""
    return f"{name}: {failing.service_id} {failing.status} after {gate.waited_seconds:.0f} s{check}"
