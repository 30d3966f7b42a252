"""Deploy windows: while a deploy replaces a service's instances, their health changes are expected.

A deploy writes ``icd/deploy-windows/<service_name>`` in Consul KV before it applies and removes it after
its health gate decided; a teardown does the same around its destroy (its ``to_version`` is empty: nothing
comes after). While the window is open, alerts about instances of that service whose Service Meta
``artifact_version`` is the outgoing version (``from_version``) or the incoming one (``to_version``, whose
first checks start critical as Consul's do) are expected, as ``docs/service-contract.md`` says: the watch
records them at severity ``info`` instead of paging, and the deploy's own verdict is the one message.

The window also names the instances running the outgoing version when it opened (``leaving``): the watch
may never have learnt an instance's Meta (it asks only when something changes), and an instance that is
deregistered first can't be asked any more, so its departure is recognised by its ID.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import consul

from icd.errors import ConsulError
from icd.health.consul import consul_call
from icd.health.snapshot import parse_service_meta

DEPLOY_WINDOW_PREFIX = "icd/deploy-windows/"


@dataclass(frozen=True)
class DeployWindow:
    deploy_run_id: str
    from_version: str
    to_version: str
    until: datetime
    leaving: tuple[str, ...] = ()  # instance keys (node/service ID) running from_version when it opened

    def covers(self, meta: Mapping[str, str] | None, now: datetime, instance: str | None = None) -> bool:
        """Whether an alert about an instance (its key, its Service Meta) is expected now: it runs the outgoing
        or the incoming version, or it ran the outgoing one when the window opened."""
        if now >= self.until:
            return False
        if instance is not None and instance in self.leaving:
            return True
        version = (meta or {}).get("artifact_version")
        return bool(version) and version in (self.from_version, self.to_version)

    def to_json(self) -> str:
        return json.dumps(
            {
                "deploy_run_id": self.deploy_run_id,
                "from_version": self.from_version,
                "to_version": self.to_version,
                "until": self.until.astimezone(UTC).isoformat(),
                "leaving": list(self.leaving),
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> DeployWindow:
        data = json.loads(raw)
        until = datetime.fromisoformat(data["until"].replace("Z", "+00:00"))
        return cls(
            deploy_run_id=str(data["deploy_run_id"]),
            from_version=str(data["from_version"]),
            to_version=str(data["to_version"]),
            until=until if until.tzinfo else until.replace(tzinfo=UTC),
            leaving=tuple(str(key) for key in data.get("leaving", ())),
        )


def read_deploy_windows(client: consul.Consul) -> dict[str, DeployWindow]:
    _, items = consul_call("read the deploy windows", client.kv.get, DEPLOY_WINDOW_PREFIX, recurse=True)
    windows: dict[str, DeployWindow] = {}
    for item in items or ():
        if item.get("Value"):
            try:
                windows[item["Key"][len(DEPLOY_WINDOW_PREFIX) :]] = DeployWindow.from_json(item["Value"])
            except (ValueError, KeyError, TypeError):
                continue  # a malformed window must not stop health alerts; it simply does not apply
    return windows


def open_deploy_window(
    client: consul.Consul,
    service_name: str,
    *,
    deploy_run_id: str,
    from_version: str,
    to_version: str,
    duration: timedelta,
    now: datetime | None = None,
) -> DeployWindow:
    """Mark the replacement of ``service_name`` from ``from_version`` as expected until ``now + duration``."""
    _, entries = consul_call(f"read the instances of {service_name}", client.health.service, service_name)
    leaving = sorted(
        key
        for key, meta in parse_service_meta(entries or ()).items()
        if from_version and meta.get("artifact_version") == from_version
    )
    window = DeployWindow(
        deploy_run_id=deploy_run_id,
        from_version=from_version,
        to_version=to_version,
        until=(now or datetime.now(UTC)) + duration,
        leaving=tuple(leaving),
    )
    if not consul_call("write the deploy window", client.kv.put, DEPLOY_WINDOW_PREFIX + service_name, window.to_json()):
        raise ConsulError(f"Consul refused the deploy window for {service_name}")
    return window


def close_deploy_window(client: consul.Consul, service_name: str, *, deploy_run_id: str | None = None) -> bool:
    """Remove the window; with ``deploy_run_id`` only if it is still that run's. True when one was removed."""
    key = DEPLOY_WINDOW_PREFIX + service_name
    _, item = consul_call("read the deploy window", client.kv.get, key)
    if item is None:
        return False
    if deploy_run_id is not None and item.get("Value"):
        try:
            owner = DeployWindow.from_json(item["Value"]).deploy_run_id
        except (ValueError, KeyError, TypeError):
            owner = None
        if owner != deploy_run_id:
            return False
    return bool(consul_call("delete the deploy window", client.kv.delete, key, cas=item["ModifyIndex"]))
