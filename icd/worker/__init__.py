"""The warm process worker (``icd-worker``): flow runs forked from a process with everything imported.

``warm`` is the worker; ``preload`` is what its fork server imports, and is imported nowhere else.
"""

# Set by the worker before it starts the fork server, which inherits its environment.
PRELOAD_ENV = "ICD_WORKER_PRELOAD"
PROJECT_ENV = "ICD_WORKER_PROJECT_DIR"
