"""``icd-setup``: what an operator runs once per Prefect server (and again after changing prefect.yaml or
automations.yaml): block types, the work pool, the deployments with their triggers, the automations.

    PREFECT_API_URL=http://prefect:4200/api icd-setup [--pool local-pool]

Blocks with secrets (the registry's credentials and signing key, the Slack token, the webhook secret, the
alerts' notification block) are the operator's to create, in the UI or in Python (``examples/local_env.py``
shows every one); this command never sees a secret.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect.automations import AutomationCore
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from blocks.consul import ConsulConnection
from blocks.notifier import SlackNotifier
from blocks.registry import ArtifactRegistry
from icd.paths import PROJECT_ROOT

AUTOMATIONS_FILE = PROJECT_ROOT / "automations.yaml"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


def register_block_types() -> None:
    for block in (ArtifactRegistry, SlackNotifier, ConsulConnection):
        block.register_type_and_schema()


def ensure_work_pool(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy_all(project_dir: Path = PROJECT_ROOT) -> None:
    """``prefect deploy --all`` from the project, so prefect.yaml is the one definition of the deployments."""
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=project_dir,
        env={**os.environ, "ICD_PROJECT_DIR": str(project_dir)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"prefect deploy --all failed:\n{result.stdout}\n{result.stderr}")


def _substitute(text: str) -> str:
    return _PLACEHOLDER.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)


def _block_id(action: dict[str, Any]) -> None:
    """Replace ``block`` + ``block_type`` (names) by the ``block_document_id`` the API wants."""
    name, kind = action.pop("block", None), action.pop("block_type", None)
    if name is None:
        return
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name, block_type_slug=kind)
        except ObjectNotFound:
            raise SystemExit(f"automations.yaml needs a {kind!r} block named {name!r}; create it first") from None
    action["block_document_id"] = str(document.id)


def load_automations(path: Path = AUTOMATIONS_FILE) -> list[AutomationCore]:
    document = yaml.safe_load(_substitute(path.read_text(encoding="utf-8")))
    automations = []
    for entry in document.get("automations", []):
        for action in entry.get("actions", []):
            _block_id(action)
        automations.append(AutomationCore.model_validate(entry))
    return automations


def apply_automations(path: Path = AUTOMATIONS_FILE) -> list[str]:
    """Create every automation of ``path``, replacing one of the same name; returns their names."""
    names = []
    with get_client(sync_client=True) as client:
        for automation in load_automations(path):
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            client.create_automation(automation)
            names.append(automation.name)
    return names


def setup(pool: str, project_dir: Path = PROJECT_ROOT, automations: Path = AUTOMATIONS_FILE) -> list[str]:
    register_block_types()
    ensure_work_pool(pool)
    deploy_all(project_dir)
    return apply_automations(automations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icd-setup", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pool", default="local-pool", help="the process work pool (default: %(default)s)")
    args = parser.parse_args(argv)
    created = setup(args.pool)
    print(f"deployments created from prefect.yaml; automations: {', '.join(created)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
