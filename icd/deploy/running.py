"""What runs in a workspace: the one answer, read from the workspace's Terraform state.

Everything that asks "what runs in W" asks here: the deploy (what it replaces), the revocation notice (who
still runs a revoked version), the teardown, the drift check and the audit. A channel pointer is not an
answer: it moves on promotion before anything is applied, and stays when a deploy failed or was torn down
by hand. The state is what Terraform last applied.

Pure: the state document as the backend stores it (``terraform state pull`` prints the same) gives a
:class:`Running`. The artifact is found from the state's resources the way a plan's view finds it
(``icd/deploy/plan_view.py``'s artifact keys: an image path, an AMI id), and named in the registry by
``find_version``; the stack's outputs (docs/service-contract.md#stack-outputs) add the build label and the
Consul service ID.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from icd.deploy.plan_view import artifact_of
from icd.deploy.rollout import slots_of_state
from icd.errors import TerraformError
from icd.registry.models import ArtifactVersion
from icd.service.contract import SERVICE_ID_OUTPUT, SERVICE_IDS_OUTPUT

# The stack's output naming the build label it deploys (examples/stacks/*: ``artifact_version``).
ARTIFACT_VERSION_OUTPUT = "artifact_version"


@dataclass(frozen=True)
class Running:
    """What ``workspace`` runs, as its state says. ``version`` is None when the state's artifact is not one of
    the namespace's registered versions (deployed by hand, or from another registry)."""

    workspace: str
    artifact_ids: tuple[str, ...]
    version: ArtifactVersion | None
    outputs: Mapping[str, Any] = field(default_factory=dict)
    serial: int = 0
    lineage: str = ""
    resources: tuple[str, ...] = ()  # the managed resources' addresses, for drift and the audit
    # Slot -> (artifact, build label) of a stack that runs a list of instances (docs/service-contract.md#rollout).
    slots: Mapping[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def service_id(self) -> str | None:
        value = self.outputs.get(SERVICE_ID_OUTPUT)
        return str(value) if value else None

    @property
    def service_ids(self) -> list[str]:
        """Every Consul instance the state deployed: a fleet's list output, else the single instance's ID."""
        fleet = self.outputs.get(SERVICE_IDS_OUTPUT)
        if isinstance(fleet, list):
            return [str(value) for value in fleet if value]
        return [self.service_id] if self.service_id else []

    @property
    def build_label(self) -> str | None:
        value = self.outputs.get(ARTIFACT_VERSION_OUTPUT)
        return str(value) if value else (self.version.build_label if self.version else None)

    def label(self) -> str:
        """For people: "v3", or the artifact when no registered version made it, or "nothing"."""
        if self.version is not None:
            return f"v{self.version.version}"
        return ", ".join(self.artifact_ids) or "nothing"


def _resource_instances(state: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(address, attributes) of every managed resource instance in a state document (format version 4)."""
    for resource in state.get("resources") or ():
        if not isinstance(resource, Mapping) or resource.get("mode") != "managed":
            continue
        module = f"{resource['module']}." if resource.get("module") else ""
        base = f"{module}{resource.get('type')}.{resource.get('name')}"
        for instance in resource.get("instances") or ():
            if not isinstance(instance, Mapping):
                continue
            key = instance.get("index_key")
            address = base if key is None else f"{base}[{json.dumps(key)}]"
            attributes = instance.get("attributes")
            yield address, attributes if isinstance(attributes, Mapping) else {}


def what_runs(
    state: bytes | str | None,
    *,
    workspace: str,
    find_version: Callable[[str], ArtifactVersion | None],
) -> Running | None:
    """What ``workspace`` runs, from its stored state; None when it runs nothing (no state yet, or every
    resource destroyed). Raises ``TerraformError`` for a document that is not a Terraform state."""
    if state is None or not state.strip():
        return None
    try:
        document = json.loads(state)
        if not isinstance(document, Mapping) or "version" not in document:
            raise ValueError("no format version")
    except ValueError as exc:
        raise TerraformError(f"the state of {workspace} is not a Terraform state: {exc}") from exc
    instances = list(_resource_instances(document))
    if not instances:
        return None
    artifacts: list[str] = []
    for _, attributes in instances:
        artifact = artifact_of(attributes)
        if artifact and artifact not in artifacts:
            artifacts.append(artifact)
    version = next((found for artifact in artifacts if (found := find_version(artifact)) is not None), None)
    outputs = {
        name: value.get("value")
        for name, value in (document.get("outputs") or {}).items()
        if isinstance(value, Mapping) and not value.get("sensitive")
    }
    return Running(
        workspace=workspace,
        artifact_ids=tuple(artifacts),
        version=version,
        outputs=outputs,
        serial=int(document.get("serial") or 0),
        lineage=str(document.get("lineage") or ""),
        resources=tuple(address for address, _ in instances),
        slots=slots_of_state(instances),
    )
