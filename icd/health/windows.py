"""Deploy windows: while a deploy replaces a service's instances, their health changes are expected.

A deploy writes ``icd/deploy-windows/<service_name>`` in Consul KV before it applies and removes it after
its health gate decided. While the window is open, alerts about instances of that service that run the
outgoing version (``from_version``) or the incoming one (``to_version``, whose first checks start critical
as Consul's do) are expected: the watch records them at severity ``info`` instead of paging, and the gate's
verdict is the one message about the deploy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import consul

from icd.errors import ConsulError
from icd.health.consul import consul_call

DEPLOY_WINDOW_PREFIX = "icd/deploy-windows/"


@dataclass(frozen=True)
class DeployWindow:
    deploy_run_id: str
    from_version: str
    to_version: str
    until: datetime

    def covers(self, meta: Mapping[str, str] | None, now: datetime) -> bool:
        """Whether an alert about an instance with this Service Meta is expected now."""
        if now >= self.until or meta is None:
            return False
        version = meta.get("artifact_version")
        return version == self.from_version or (
            version == self.to_version and meta.get("deploy_run_id") == self.deploy_run_id
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "deploy_run_id": self.deploy_run_id,
                "from_version": self.from_version,
                "to_version": self.to_version,
                "until": self.until.astimezone(UTC).isoformat(),
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
    window = DeployWindow(
        deploy_run_id=deploy_run_id,
        from_version=from_version,
        to_version=to_version,
        until=(now or datetime.now(UTC)) + duration,
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
