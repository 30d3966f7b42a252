"""The service contract in code: what the pipeline hands a service's Packer template and Terraform stack, and
what it reads back. ``docs/service-contract.md`` is the page for humans; each name here is cited there, and
the flows build what they pass from these types, so the page, the pre-flight check and the runs can't drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Final, Literal

CONTRACT_PAGE: Final = "docs/service-contract.md"

# The page's sections; a finding of the pre-flight check cites one.
Section = Literal[
    "packer-variables",
    "sources-built",
    "manifest",
    "stack-variables",
    "stack-outputs",
    "consul-registration",
    "artifact-keys",
    "detached-daemons",
    "provisioner-environment",
    "one-service-per-workspace",
    "rollout",
]


def cite(section: Section) -> str:
    return f"{CONTRACT_PAGE}#{section}"


# Contract: docs/service-contract.md#sources-built. A namespace's `packer_only` in icd.toml overrides it.
DEFAULT_PACKER_ONLY: Final = ("null.local_image",)

# Contract: docs/service-contract.md#manifest. The adapter reads the manifest here, in the template directory.
MANIFEST_POST_PROCESSOR: Final = "manifest"
# A local image (null or file builder) is the file the manifest names here (icd/deploy/artifacts.py).
IMAGE_PATH_KEY: Final = "image_path"
LOCAL_IMAGE_BUILDERS: Final = frozenset({"null", "file"})

# Contract: docs/service-contract.md#consul-registration. The health gate matches the new instance on this
# Service Meta key (its value is the deploy run's id); the health watch also reads `artifact_version`.
GATE_META_KEY: Final = "deploy_run_id"

# Contract: docs/service-contract.md#stack-outputs. When the stack outputs it, the gate also matches on the ID.
SERVICE_ID_OUTPUT: Final = "service_id"

# Contract: docs/service-contract.md#one-service-per-workspace. A resource records whose it is under this
# key: an attribute, or a key of one of these maps (a null_resource's triggers, a cloud resource's tags, ...).
IDENTITY_KEY: Final = "namespace"
IDENTITY_MAPS: Final = ("triggers", "tags", "meta", "labels")

# Contract: docs/service-contract.md#rollout. A stack that declares this variable can be rolled out in
# batches: slot i runs element i of the list, each an {artifact_id, artifact_version} object passed as JSON
# text. It outputs each slot's Consul service ID, in slot order, under SERVICE_IDS_OUTPUT.
ROLLOUT_VARIABLE: Final = "instances"
SERVICE_IDS_OUTPUT: Final = "service_ids"
# The attributes of each element of ROLLOUT_VARIABLE, all strings.
ROLLOUT_SLOT_FIELDS: Final = ("artifact_id", "artifact_version")


@dataclass(frozen=True)
class PackerVariables:
    """Contract: docs/service-contract.md#packer-variables. What build-artifact passes to every template as
    ``-var name=value``; Packer refuses an undeclared one, so a template declares all of them."""

    namespace: str = field(metadata={"doc": "the registry namespace, org/name"})
    version: str = field(metadata={"doc": "the build label, the version the registry will most likely assign"})
    commit: str = field(metadata={"doc": "the commit being built"})
    output_dir: str = field(metadata={"doc": "a directory of this build's own for a local image"})
    service_name: str = field(metadata={"doc": "the Consul service name the image registers under"})

    def as_vars(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StackVariables:
    """Contract: docs/service-contract.md#stack-variables. What deploy-artifact passes to every stack as
    ``-var name=value``; Terraform refuses an undeclared one, so a stack declares all of them."""

    artifact_id: str = field(metadata={"doc": "the image for the workspace's platform: a local image's path, an AMI"})
    artifact_version: str = field(metadata={"doc": "the version's build label, what Packer got as version"})
    namespace: str = field(metadata={"doc": "the registry namespace, org/name"})
    service_name: str = field(metadata={"doc": "the Consul service name"})
    consul_addr: str = field(metadata={"doc": "the Consul agent's HTTP API"})
    deploy_run_id: str = field(metadata={"doc": "the deploy run's id, for the instance's Service Meta"})
    workspace: str = field(metadata={"doc": "the workspace deploying"})
    instance_root: str = field(metadata={"doc": "a directory of the workspace's own for local instances"})

    def as_vars(self) -> dict[str, str]:
        return dataclasses.asdict(self)


# The names, in the order the page lists them, and what each one carries (for the pre-flight's messages).
PACKER_VARIABLES: Final = {item.name: str(item.metadata["doc"]) for item in dataclasses.fields(PackerVariables)}
STACK_VARIABLES: Final = {item.name: str(item.metadata["doc"]) for item in dataclasses.fields(StackVariables)}
