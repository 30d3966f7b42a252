"""Thin Prefect tasks, one module per step of the loop. Each takes blocks and calls the library (``icd``);
retries and caching are declared here (``policies.py``), the work is done there."""
