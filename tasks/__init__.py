"""Thin Prefect tasks, one module per step of the loop. Each takes blocks and calls the library (``icd``);
retries and caching are declared here (``policies.py``), the work is done there."""

import logging

# The library's INFO lines (one per tool call, with its duration) belong in the run log; workers attach the
# `icd` logger to Prefect's handlers with PREFECT_LOGGING_EXTRA_LOGGERS=icd (examples/local_env.py).
logging.getLogger("icd").setLevel(logging.INFO)
