"""Cache keys that make a task run once per flow run.

A suspended flow re-runs from the top when it is resumed. Every step before the approval wait is a task
whose result is persisted under a key made of the flow run id and the step, so the re-run takes the cached
result instead of building, registering or planning again.
"""

from __future__ import annotations

from typing import Any

from prefect.context import TaskRunContext


def run_scoped_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    flow_run_id = context.task_run.flow_run_id
    step = parameters.get("step") or ""
    return f"icd-{flow_run_id}-{context.task.name}-{step}".rstrip("-")
