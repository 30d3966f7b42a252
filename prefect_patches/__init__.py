"""Where this project patches or reaches into Prefect's (and botocore's) private code, and nowhere else.

* ``warm_worker``: Prefect's process worker whose flow runs are forked from a preloaded process
  (``icd-worker``);
* ``fork_server_preload``: what that process imports and prepares once (imported only by the fork server);
* ``shared_tls``: one TLS context for a process's Prefect clients of an ``http://`` API;
* ``settings_reuse``, ``pull_step_events``: a forked run's start without rebuilding Prefect's settings or
  opening a connection for its pull step's event;
* ``heartbeat_stop``: a forked run's end without waiting for its heartbeat thread;
* ``seams``: every private name the above rely on, with a fingerprint of what they rely on and the Prefect
  version it was checked against (``tests/test_prefect_seams.py`` fails when one changes).

The library, blocks, tasks and flows never import this package (``[tool.importlinter]`` in pyproject.toml):
only the commands (``cli/``), the examples and the tests do, so Prefect's stock process worker
(``prefect worker start --type process``) runs every flow unchanged. Why: docs/decisions.md, "The Prefect
patches in their own room".
"""

# Set by the warm worker before it starts the fork server, which inherits its environment.
PRELOAD_ENV = "ICD_WORKER_PRELOAD"
PROJECT_ENV = "ICD_WORKER_PROJECT_DIR"
