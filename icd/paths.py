"""Where the project and its runs' scratch space are on a worker."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def state_home() -> Path:
    """Where runs keep their scratch directories and local images (``ICD_HOME``; default ``.state/``)."""
    return Path(os.environ.get("ICD_HOME") or PROJECT_ROOT / ".state").resolve()
