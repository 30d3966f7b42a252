"""How long an apply may take before operators hear about it, and before it is stopped as stuck.

Terraform waits for a provisioner's output to reach end-of-file, so a daemon a provisioner starts without
redirecting its output keeps the apply "Still creating..." for ever. The apply's watch
(:class:`~icd.tools.terraform.ApplyWatch`) stops it after the workspace's ``apply_timeout_seconds`` without
progress; before that, once the apply runs longer than expected, operators get a heads-up naming what is
still in progress and what holds the output open. Expected is three times the workspace's last apply (from
its deploy record), never less than :data:`HEADS_UP_FLOOR_SECONDS`, always before the timeout.
docs/operations.md#stuck-applies says what an operator sees.
"""

from __future__ import annotations

from icd.tools.terraform import HeadsUp

# An apply may take this many times the last one before operators are told.
HEADS_UP_FACTOR = 3.0
# ... and never less than this (the example's apply takes about 2 s: 6 s would page on a busy machine).
HEADS_UP_FLOOR_SECONDS = 120.0


def heads_up_seconds(last_apply_seconds: float | None, stuck_after: float) -> float:
    """When to tell operators an apply is slow: 3 x the last apply, at least the floor, and at the latest
    halfway to the timeout, so the heads-up always comes before the stop."""
    expected = max(HEADS_UP_FLOOR_SECONDS, HEADS_UP_FACTOR * (last_apply_seconds or 0.0))
    return min(expected, stuck_after / 2)


def heads_up_title(workspace: str, what: str) -> str:
    return f"Slow {what} on {workspace}"


def heads_up_text(what: str, heads_up: HeadsUp, last_apply_seconds: float | None) -> str:
    """What operators read: what is still in progress, for how long, the likely cause, and what happens next."""
    doing = ", ".join(map(str, heads_up.in_progress)) or "no resource reported in progress"
    usual = (
        f"the last apply took {last_apply_seconds:.0f}s"
        if last_apply_seconds is not None
        else "no earlier apply on record"
    )
    cause = (
        f" Likely cause: {', '.join(heads_up.holders)} holds the output of a provisioner open (a daemon started "
        "without redirecting its output), and Terraform waits for it to close; see "
        "docs/service-contract.md#detached-daemons."
        if heads_up.holders
        else ""
    )
    return (
        f"The {what} has run {heads_up.elapsed_seconds:.0f}s ({usual}): {doing}.{cause} Without other progress "
        f"it is stopped as stuck after {heads_up.stuck_after_seconds:.0f}s (apply_timeout_seconds), the run ends "
        "Failed and the workspace is released; cancel the run to stop it now."
    )
