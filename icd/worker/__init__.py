"""The warm process worker (``icd-worker``): flow runs forked from a process with everything imported.

``warm`` is the worker; ``preload`` is what its fork server imports, and is imported nowhere else.
"""

# A stopping worker lets a suspended run's process finish its teardown (about a second) for up to
# SUSPENDED_TEARDOWN_SECONDS; any other run, or one still alive after that, gets SIGTERM, then SIGKILL, each
# followed by its grace. So a worker's stop takes at most LONGEST_STOP_SECONDS: what whoever stops it (a
# service manager, a test harness) should wait before killing it, or its runs are left unstopped.
SUSPENDED_TEARDOWN_SECONDS = 15.0
TERM_GRACE_SECONDS = 10.0
KILL_GRACE_SECONDS = 5.0
LONGEST_STOP_SECONDS = SUSPENDED_TEARDOWN_SECONDS + TERM_GRACE_SECONDS + KILL_GRACE_SECONDS

# Set by the worker before it starts the fork server, which inherits its environment.
PRELOAD_ENV = "ICD_WORKER_PRELOAD"
PROJECT_ENV = "ICD_WORKER_PROJECT_DIR"
