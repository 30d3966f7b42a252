"""The post-apply health gate: wait, with Consul blocking queries, until the new instance is passing.

The deploy calls this after ``terraform apply`` registered the new instance. It never sleeps and polls:
each round is one blocking query on ``/v1/health/service/:name`` that Consul answers the moment that
service's health changes, so the gate opens within milliseconds of the last check passing. The instance's
status is the same aggregate the watch uses (``snapshot.aggregate``). An instance that stays unhealthy is an
expected outcome, returned as ``HealthGateResult(healthy=False, ...)`` with Consul's own check output and
what the gate was matching on against what it found; only a failing Consul raises (``ConsulError``).

A progressive rollout gates each batch the way Nomad's ``update`` block does (``wait_until_batch_healthy``):
every new instance of the batch must be registered with the deploy's Meta and passing, and stay passing
for ``min_healthy_time`` (each instance's timer starts when the gate first sees it passing, and any other
reading resets it), all within ``healthy_deadline``. ``min_healthy_time = 0`` is the single-instance gate's
rule: passing once is enough. The gate still never polls: each blocking query waits at most until the
deadline or, when every instance passes, until the last pending timer completes; those are the only
moments the verdict can change without Consul saying something changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import consul

from icd.health.consul import consul_call
from icd.health.snapshot import ServiceEntry, aggregate, parse_service_entries

GateStatus = Literal["passing", "warning", "critical", "maintenance", "missing"]
_RANK: Mapping[str, int] = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}


@dataclass(frozen=True)
class HealthGateResult:
    """``status`` is the matched instance's status, or ``missing`` when none matched yet.

    ``criteria`` says what the gate matched on and ``found`` what Consul had instead, so an operator can
    tell "unhealthy" from "never registered the way the contract says"."""

    healthy: bool
    status: GateStatus
    output: str
    waited_seconds: float
    service_id: str | None = None
    criteria: str = ""
    found: str = ""


def describe_criteria(service_name: str, service_id: str | None, expect_meta: Mapping[str, str]) -> str:
    parts = [f"service {service_name!r}"]
    if service_id:
        parts.append(f"ID {service_id!r}")
    parts += [f"Meta.{key}={value!r}" for key, value in sorted(expect_meta.items())]
    return ", ".join(parts)


def describe_found(entries: Sequence[ServiceEntry], keys: Sequence[str]) -> str:
    if not entries:
        return "no instance of the service is registered"
    described = []
    for entry in entries:
        meta = ", ".join(f"Meta.{key}={entry.meta.get(key)!r}" for key in keys) if keys else ""
        status = aggregate(entry.instance)
        shown = "maintenance" if status.maintenance else status.status
        described.append(f"{entry.instance.service_id} ({shown}{'; ' + meta if meta else ''})")
    return "; ".join(described)


def evaluate_instances(
    entries: Sequence[ServiceEntry], *, service_id: str | None, expect_meta: Mapping[str, str]
) -> tuple[GateStatus, str, str | None]:
    """Pure: the best matching instance's status, the output of its failing checks and its service ID.

    With several matches (no ``service_id``, only meta), the gate follows the healthiest, since one
    passing instance of the new version is what the deploy waits for.
    """
    best: tuple[int, GateStatus, str, str | None] | None = None
    for entry in entries:
        if service_id is not None and entry.instance.service_id != service_id:
            continue
        if any(entry.meta.get(key) != value for key, value in expect_meta.items()):
            continue
        status = aggregate(entry.instance)
        shown: GateStatus = "maintenance" if status.maintenance else status.status
        output = "\n".join(f"{c.name}: {c.status}: {c.output.strip()}" for c in status.failing)
        candidate = (_RANK[shown], shown, "" if status.maintenance else output, entry.instance.service_id)
        if best is None or candidate[0] < best[0]:
            best = candidate
    if best is None:
        return "missing", "no registered instance matches", None
    return best[1], best[2], best[3]


def next_index(previous: str | None, answered: object) -> str | None:
    """The index for the next blocking query after Consul answered with ``answered``.

    As Consul's docs advise: an index that went backwards (agent restart) means "start over" with a plain
    read, and one below 1 becomes 1, since ``index=0`` never blocks and the gate would spin.
    """
    new = int(str(answered))
    if previous is not None and new < int(previous):
        return None
    return str(max(new, 1))


def wait_until_healthy(
    client: consul.Consul,
    *,
    service_name: str,
    service_id: str | None,
    expect_meta: Mapping[str, str],
    deadline_seconds: float,
) -> HealthGateResult:
    """Block until an instance of ``service_name`` (this ``service_id``, with ``expect_meta``) passes.

    Returns ``healthy=True`` as soon as it does, else ``healthy=False`` with the last status, check output
    and what was found once ``deadline_seconds`` have passed. Raises ``ConsulError`` if Consul can't be
    queried.
    """
    started = time.monotonic()
    index: str | None = None
    while True:
        remaining = deadline_seconds - (time.monotonic() - started)
        kwargs: dict[str, Any] = {}
        if index is not None:
            kwargs = {"index": index, "wait": f"{max(1, int(remaining * 1000))}ms"}
        new_index, raw = consul_call(
            f"query the health of {service_name}", client.health.service, service_name, **kwargs
        )
        entries = parse_service_entries(raw or ())
        status, output, matched_id = evaluate_instances(entries, service_id=service_id, expect_meta=expect_meta)
        waited = time.monotonic() - started
        if status == "passing" or waited >= deadline_seconds:
            return HealthGateResult(
                healthy=status == "passing",
                status=status,
                output=output,
                waited_seconds=round(waited, 3),
                service_id=matched_id,
                criteria=describe_criteria(service_name, service_id, expect_meta),
                found=describe_found(entries, sorted(expect_meta)),
            )
        index = next_index(index, new_index)


# --- the batch gate of a progressive rollout -------------------------------------------------------------


@dataclass(frozen=True)
class InstanceHealth:
    """One instance of a batch as the gate last saw it (not ``snapshot.InstanceHealth``, Consul's raw view).

    ``output`` holds its failing checks as ``name: status: output`` lines, "" when passing, or why nothing
    matched when ``missing``; ``passing_for`` is how long the gate has seen it passing without a break (0
    when it is not passing)."""

    service_id: str
    status: GateStatus
    output: str
    passing_for: float


@dataclass(frozen=True)
class BatchGateResult:
    """The batch's verdict: ``instances`` in the order of the service IDs the gate was given.

    ``min_healthy_seconds`` is the rule the verdict applied, so ``failing`` can tell an instance that passes
    but not yet for long enough from one that stayed healthy."""

    healthy: bool
    waited_seconds: float
    instances: tuple[InstanceHealth, ...]
    criteria: str = ""
    min_healthy_seconds: float = 0.0

    @property
    def failing(self) -> InstanceHealth | None:
        """The first instance that is not healthy (not passing, or not for long enough); None when healthy."""
        if self.healthy:
            return None
        return next((i for i in self.instances if not _stayed_healthy(i, self.min_healthy_seconds)), None)


def _stayed_healthy(instance: InstanceHealth, min_healthy_seconds: float) -> bool:
    return instance.status == "passing" and instance.passing_for >= min_healthy_seconds


def _checked_batch(service_ids: Sequence[str], min_healthy_seconds: float, deadline_seconds: float) -> tuple[str, ...]:
    # A str is a Sequence[str] too: "web-1" would otherwise be gated as five one-letter IDs.
    if isinstance(service_ids, str):
        raise TypeError(f"service_ids must be a list of service IDs, not the string {service_ids!r}")
    ids = tuple(service_ids)
    if not ids:
        raise ValueError("a batch gate needs at least one service ID")
    if not all(isinstance(service_id, str) and service_id for service_id in ids):
        raise ValueError(f"service IDs must be non-empty strings, got {list(ids)!r}")
    repeated = sorted({service_id for service_id in ids if ids.count(service_id) > 1})
    if repeated:
        raise ValueError(f"service IDs must be distinct; repeated: {', '.join(repeated)}")
    for name, value in (("min_healthy_seconds", min_healthy_seconds), ("deadline_seconds", deadline_seconds)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    if min_healthy_seconds and min_healthy_seconds >= deadline_seconds:
        # Nomad refuses the same update block: no batch could ever pass.
        raise ValueError(
            f"min_healthy_seconds ({min_healthy_seconds:g}) must be shorter than deadline_seconds "
            f"({deadline_seconds:g}): no batch could ever pass"
        )
    return ids


def _missing_output(entries: Sequence[ServiceEntry], service_id: str, keys: Sequence[str]) -> str:
    same_id = [entry for entry in entries if entry.instance.service_id == service_id]
    if not same_id:
        return "not registered"
    return f"registered without the expected Meta: {describe_found(same_id, keys)}"


def _wait_param(seconds: float) -> str:
    # Whole milliseconds, rounded up so the query never returns before the moment it waits for; Consul (and
    # the stand-in) parse Go durations such as "1500ms" and add up to wait/16 of jitter, never less.
    return f"{max(1, math.ceil(seconds * 1000))}ms"


def wait_until_batch_healthy(
    client: consul.Consul,
    *,
    service_name: str,
    service_ids: Sequence[str],
    expect_meta: Mapping[str, str],
    min_healthy_seconds: float,
    deadline_seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> BatchGateResult:
    """Block until every instance in ``service_ids`` (of ``service_name``, with ``expect_meta``) has been
    passing for ``min_healthy_seconds`` without a break, or until ``deadline_seconds`` have passed.

    An instance's timer starts at the first reading that shows it passing; any other reading (warning,
    critical, maintenance, missing or other Meta) resets it. ``min_healthy_seconds=0``: passing once is
    enough. Returns ``healthy=False`` at the deadline with each instance's status and failing check output.
    Raises ``ValueError``/``TypeError`` for a malformed batch and ``ConsulError`` if Consul can't be queried.
    """
    ids = _checked_batch(service_ids, min_healthy_seconds, deadline_seconds)
    within = f"passing for {min_healthy_seconds:g}s" if min_healthy_seconds else "passing"
    criteria = (
        f"{describe_criteria(service_name, None, expect_meta)}; "
        f"IDs {', '.join(repr(service_id) for service_id in ids)}; each {within} within {deadline_seconds:g}s"
    )
    keys = sorted(expect_meta)
    started = clock()
    deadline_at = started + deadline_seconds
    wake_at = deadline_at
    passing_since: dict[str, float] = {}
    index: str | None = None
    while True:
        kwargs: dict[str, Any] = {}
        if index is not None:
            kwargs = {"index": index, "wait": _wait_param(wake_at - clock())}
        new_index, raw = consul_call(
            f"query the health of {service_name}", client.health.service, service_name, **kwargs
        )
        now = clock()
        entries = parse_service_entries(raw or ())
        instances = []
        for service_id in ids:
            status, output, _ = evaluate_instances(entries, service_id=service_id, expect_meta=expect_meta)
            if status == "missing":
                output = _missing_output(entries, service_id, keys)
            passing_for = 0.0
            if status == "passing":
                passing_for = now - passing_since.setdefault(service_id, now)
            else:
                passing_since.pop(service_id, None)
            instances.append(InstanceHealth(service_id, status, output, passing_for))
        healthy = all(_stayed_healthy(instance, min_healthy_seconds) for instance in instances)
        if healthy or now >= deadline_at:
            return BatchGateResult(
                healthy=healthy,
                waited_seconds=round(now - started, 3),
                instances=tuple(instances),
                criteria=criteria,
                min_healthy_seconds=min_healthy_seconds,
            )
        # Without a change in Consul the verdict can only turn at the deadline or, once every instance
        # passes, when the last of their timers completes; a change wakes the query before either.
        wake_at = deadline_at
        if len(passing_since) == len(ids):
            wake_at = min(deadline_at, max(passing_since.values()) + min_healthy_seconds)
        index = next_index(index, new_index)
