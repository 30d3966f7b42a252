"""Step 1: resolve the pushed ref to a commit, checked out into the run's work directory."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from icd.deploy.source import SourceCheckout, checkout_source
from tasks.policies import ONCE_PER_RUN


# Git faults are not transient in a way a retry fixes (bad ref, missing repo), so no retries.
@task(name="resolve-source", persist_result=True, cache_policy=ONCE_PER_RUN)
def resolve_source(repo: str, ref: str, workdir: str) -> SourceCheckout:
    checkout = checkout_source(repo, ref, Path(workdir))
    get_run_logger().info("resolved %s@%s to %s", repo, ref, checkout.commit)
    return checkout
