"""Plain settings of the project's workers and of the runs they start: how long a worker's stop may take, how
often a run sends a heartbeat, when a silent run is taken for dead.

The warm worker itself is Prefect-patching code and lives apart, in ``prefect_patches/`` (which ``icd/``
never imports); these numbers are shared with the set-up (``cli/setup.py``), the automations and the test
harness, so they stay here, in the library.
"""

from __future__ import annotations

# A stopping worker lets a suspended run's process finish its teardown (about a second) for up to
# SUSPENDED_TEARDOWN_SECONDS; any other run, or one still alive after that, gets SIGTERM, then SIGKILL, each
# followed by its grace. So a worker's stop takes at most LONGEST_STOP_SECONDS: what whoever stops it (a
# service manager, a test harness) should wait before killing it, or its runs are left unstopped.
SUSPENDED_TEARDOWN_SECONDS = 15.0
TERM_GRACE_SECONDS = 10.0
KILL_GRACE_SECONDS = 5.0
LONGEST_STOP_SECONDS = SUSPENDED_TEARDOWN_SECONDS + TERM_GRACE_SECONDS + KILL_GRACE_SECONDS

# A dead worker is noticed within 90 s (docs/decisions.md, "A dead worker is noticed"): each flow run sends a
# heartbeat every HEARTBEAT_SECONDS (Prefect's minimum; its default is 180), and the `icd-zombie-runs`
# automation (automations.yaml, default of ICD_ZOMBIE_AFTER_SECONDS) marks a run Crashed after
# ZOMBIE_AFTER_SECONDS without one. Prefect evaluates that automation every 5 s, so a killed run is Crashed
# at most ZOMBIE_AFTER_SECONDS + 5 s after its last heartbeat; a live run may miss one heartbeat and send the
# next 10 s late before it is taken for dead.
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
HEARTBEAT_SECONDS = 30
ZOMBIE_AFTER_SECONDS = 70
