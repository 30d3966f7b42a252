"""One deploy, step by step, without Prefect's task machinery: git sources, artifacts and their integrity,
Terraform working directories, plan and apply, the plan summary, the approval rules, the workspace lock and
the deploy record. ``tasks/`` wraps each step in a thin Prefect task."""
