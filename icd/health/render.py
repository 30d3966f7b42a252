"""What operators read about health: one notification per alert, and the current-health table."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta

from icd.health.config import WatchConfig
from icd.health.engine import Alert, AlertKind, WatchState, instance_status
from icd.health.snapshot import HealthSnapshot
from icd.notify.message import Action, Confirm, Notification

_TITLES: Mapping[AlertKind, str] = {
    "status": "{service} is {status} on {node}",
    "appeared": "{service}: new instance is {status} on {node}",
    "disappeared": "{service}: instance left {node}",
    "maintenance_on": "{service}: maintenance mode ON on {node}",
    "maintenance_off": "{service}: maintenance mode OFF on {node}",
    "reminder": "{service} is still {status} on {node}",
    "flapping": "{service} is flapping on {node}",
    "settled": "{service} is {status} on {node}",
}

# The buttons of a failing alert (``icd/interactions/alerts.py`` acts on them): take the incident, or silence
# the instance for a while (None: until every instance the silence matches passes again).
ACK_ACTION = "ack"
SILENCE_ACTIONS: Mapping[str, timedelta | None] = {
    "silence-1h": timedelta(hours=1),
    "silence-4h": timedelta(hours=4),
    "silence-recovered": None,
}
ALERT_ACTIONS = frozenset({ACK_ACTION, *SILENCE_ACTIONS})
_SILENCE_LABELS = {"silence-1h": "1 h", "silence-4h": "4 h", "silence-recovered": "until it recovers"}
# Alerts about an instance that is failing now; a recovery, a departure or maintenance has nothing to take.
_FAILING_KINDS: frozenset[AlertKind] = frozenset({"status", "appeared", "reminder", "flapping", "settled"})
_ACTION_VALUE_MAX = 2000  # Slack's limit for a button's value


def alert_title(alert: Alert) -> str:
    kind = alert.kind
    if kind == "settled" and alert.flap is not None:
        return f"{alert.service_name} is stable again on {alert.node}: {alert.status}"
    if kind == "reminder" and alert.flap is not None:
        return f"{alert.service_name} is still flapping on {alert.node}"
    if kind == "settled" and alert.previous_status is None:
        kind = "appeared"  # a newcomer held back by its threshold: its first announcement
    status = "recovered (passing)" if kind in ("status", "settled") and alert.status == "passing" else alert.status
    return _TITLES[kind].format(service=alert.service_name, status=status, node=alert.node)


def duration(span: timedelta) -> str:
    """A span as operators read it: ``9.5 s``, ``12 min``, ``3.2 h``."""
    seconds = span.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _change_line(alert: Alert) -> str | None:
    """What changed, in one line (``None``: nothing beyond the title)."""
    flap, sid = alert.flap, alert.service_id
    if alert.kind == "flapping" and flap is not None:
        return (
            f"`{sid}`: {flap.changes} status changes in {duration(flap.span)}, now {alert.status}. Each change is "
            "still recorded as an event; the next message here says when it is stable again."
        )
    if alert.kind == "settled" and flap is not None:
        return f"`{sid}`: stable again: {alert.status} after {flap.changes} changes over {duration(flap.span)}"
    if alert.kind == "reminder":
        if flap is not None:
            return f"`{sid}`: {flap.changes} changes over {duration(flap.span)} so far, now {alert.status}"
        return None
    if alert.previous_status is None:
        return None
    line = f"`{sid}`: {alert.previous_status} -> {alert.status}"
    if alert.kind == "settled" and alert.status_since is not None:
        line += f", held for {duration(alert.at - alert.status_since)}"
    return line


def alert_actions(alert: Alert, watch: str | None = None) -> tuple[Action, ...]:
    """Acknowledge and the Silence buttons, on an alert that says an instance is failing (none on a recovery, a
    departure, maintenance or a deploy's expected failure); Acknowledge only while nobody took the incident.
    Each names the instance as the health watch ``watch`` keys it, so a click acts on exactly that one."""
    if alert.kind not in _FAILING_KINDS or alert.status not in ("critical", "warning") or alert.expected_by is not None:
        return ()
    target = {"instance": f"{alert.node}/{alert.service_id}", "service": alert.service_name, "node": alert.node}
    if watch is not None:
        target["watch"] = watch
    value = json.dumps(target, separators=(",", ":"))
    if len(value) > _ACTION_VALUE_MAX:  # a truncated name would act on another instance, or none: no buttons
        return ()
    actions = [] if alert.acknowledged_by else [Action(ACK_ACTION, "Acknowledge", value, style="primary")]
    for action_id, shown in _SILENCE_LABELS.items():
        how_long = f"for {shown}" if SILENCE_ACTIONS[action_id] else "until every instance it matches passes again"
        confirm = Confirm(
            title=f"Silence {alert.service_name} on {alert.node}?",
            text=(
                f"Alerts of *{alert.service_name}* on *{alert.node}* are recorded but not sent and page no one, "
                f"{how_long}. The channel is told, with your name."
            ),
            confirm=f"Silence {shown}",
        )
        actions.append(Action(action_id, f"Silence {shown}", value, confirm=confirm))
    return tuple(actions)


def alert_notification(
    alert: Alert, deploy_run_url: Callable[[str], str | None] | None = None, *, watch: str | None = None
) -> Notification:
    """The operator message for one alert: what changed, why (failing checks), which deploy it runs, and the
    buttons to take or silence it (``watch``: the health watch's name, which the buttons carry)."""
    title = alert_title(alert)
    lines: list[str] = []
    if alert.expected_by is not None:
        window = alert.expected_by
        lines.append(
            f"_Expected during deploy of {window.from_version} -> {window.to_version} (run {window.deploy_run_id})._"
        )
    if (change := _change_line(alert)) is not None:
        lines.append(change)
    lines.extend(
        f"• *{check.name}* (`{check.check_id}`) {check.status}: {check.output or 'no output'}"
        for check in alert.failing_checks
    )
    meta = alert.meta or {}
    fields = {
        "Service": alert.service_name,
        "Instance": alert.service_id,
        "Node": alert.node,
        "Status": alert.status,
        "Version": meta.get("artifact_version", "unknown"),
        "Deploy run": meta.get("deploy_run_id", "unknown"),
    }
    if "commit" in meta:
        fields["Commit"] = meta["commit"]
    if alert.acknowledged_by is not None:
        fields["Taken by"] = alert.acknowledged_by
    run_id = meta.get("deploy_run_id", "")
    link = deploy_run_url(run_id) if deploy_run_url is not None and _is_uuid(run_id) else None
    return Notification(
        title=title,
        text="\n".join(lines) or title,
        severity=alert.severity,
        fields=fields,
        link_url=link,
        link_text="Open deploy run" if link else None,
        dedup_key=alert.dedup_key,
        kind="health",
        actions=alert_actions(alert, watch),
    )


def _is_uuid(value: str) -> bool:
    # Only a Prefect flow run ID makes a working link; other run identifiers are shown as text.
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def health_table(snapshot: HealthSnapshot, state: WatchState, config: WatchConfig) -> list[dict[str, str]]:
    """Rows for the Prefect table artifact: one per watched instance, worst first."""
    rows: list[dict[str, str]] = []
    for key, instance in snapshot.instances.items():
        if config.ignores_instance(instance.service_name, instance.node):
            continue
        current = instance_status(instance, config)
        rec = state.instances.get(key)
        meta = (rec.meta if rec is not None else None) or {}
        rows.append(
            {
                "service": instance.service_name,
                "instance": instance.service_id,
                "node": instance.node,
                "status": "maintenance" if current.maintenance else current.status,
                "failing_checks": ", ".join(c.name for c in current.failing),
                "version": meta.get("artifact_version", ""),
            }
        )
    rank = {"critical": 0, "warning": 1, "maintenance": 2, "passing": 3}
    rows.sort(key=lambda r: (rank[r["status"]], r["service"], r["node"], r["instance"]))
    return rows
