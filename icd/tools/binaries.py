"""Where the pinned CLIs and the Terraform provider mirror live.

``scripts/bootstrap.sh`` installs them into the project's ``.venv`` and ``.tools``; a worker elsewhere points
at its own with the environment variables below.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from icd.paths import PROJECT_ROOT


def terraform_binary() -> str:
    """The venv's verified Terraform first, whatever else is on PATH (override: ICD_TERRAFORM)."""
    if explicit := os.environ.get("ICD_TERRAFORM"):
        return explicit
    beside_python = Path(sys.executable).parent / "terraform"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("terraform") or "terraform"


def packer_binary() -> str:
    return os.environ.get("ICD_PACKER") or shutil.which("packer") or "packer"


def terraform_cli_config() -> Path | None:
    """The CLI config that installs providers only from the project's filesystem mirror."""
    if explicit := os.environ.get("ICD_TERRAFORM_CLI_CONFIG"):
        return Path(explicit)
    bundled = PROJECT_ROOT / ".tools" / "terraformrc"
    return bundled if bundled.exists() else None
