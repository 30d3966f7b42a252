"""The post-apply health gate: wait, with Consul blocking queries, until the new instance is passing.

The deploy calls this after ``terraform apply`` registered the new instance. It never sleeps and polls:
each round is one blocking query on ``/v1/health/service/:name`` that Consul answers the moment that
service's health changes, so the gate opens within milliseconds of the last check passing. The instance's
status is the same aggregate the watch uses (``snapshot.aggregate``). An instance that stays unhealthy is an
expected outcome, returned as ``HealthGateResult(healthy=False, ...)`` with Consul's own check output and
what the gate was matching on against what it found; only a failing Consul raises (``ConsulError``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
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
        # An index that went backwards (agent restart) means "start over", as Consul's docs advise.
        index = str(new_index) if index is None or int(new_index) >= int(index) else None
