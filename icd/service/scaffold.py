"""The scaffold: a new service's repository skeleton and its icd.toml entry, honouring the service contract
(docs/service-contract.md) from the first commit, so a team starts from something the pipeline deploys.

What it writes, under the service's directory:

* ``src/app.py``, a tiny HTTP service, and ``packer/<service>.pkr.hcl``, the template that bakes it
  (from ``icd/service/skeleton/``, with the service's names filled in);
* the parts every local image shares with the example, copied from ``examples/`` so they have one home:
  ``src/instance.py`` and ``src/bin/{start,stop}`` (start detached, register in Consul with the Service Meta
  the gate needs, stop), ``packer/assemble_image.py`` (the tarball), and the local stack
  ``examples/stacks/local/main.tf`` as ``stack/main.tf`` (or ``stack_dir``);
* a ``[namespaces."org/name"]`` entry and a ``[workspaces.<name>]`` entry appended to icd.toml.

Nothing is written unless everything can be: names pass ``icd/rules.py``, no file is overwritten, and the
config with the new entries passes ``parse_config`` before the first file is created.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from icd.config import parse_config
from icd.deploy.source import check_repo
from icd.errors import ConfigError, InvalidInputError
from icd.paths import PROJECT_ROOT
from icd.rules import LATEST, check_channel, check_name, check_namespace, check_ref, check_workspace
from icd.service.contract import DEFAULT_PACKER_ONLY

SKELETON = Path(__file__).resolve().parent / "skeleton"
EXAMPLES = PROJECT_ROOT / "examples"
TEMPLATE_DIR = "packer"

# Where each shared file comes from: (source, destination in the service's repository, executable).
_SHARED = (
    (EXAMPLES / "app" / "src" / "instance.py", "src/instance.py", False),
    (EXAMPLES / "app" / "src" / "bin" / "start", "src/bin/start", True),
    (EXAMPLES / "app" / "src" / "bin" / "stop", "src/bin/stop", True),
    (EXAMPLES / "app" / "packer" / "assemble_image.py", f"{TEMPLATE_DIR}/assemble_image.py", False),
)
_STACK_SOURCE = EXAMPLES / "stacks" / "local" / "main.tf"


@dataclass(frozen=True)
class NewService:
    """What ``icd-service new`` is asked for; :meth:`checked` applies the project's rules to every value."""

    service_name: str
    namespace: str
    workspace: str
    channel: str
    directory: Path
    stack_dir: Path
    repository: str
    branch: str = "main"

    def checked(self) -> NewService:
        check_name(self.service_name, what="service")
        check_namespace(self.namespace)
        check_workspace(self.workspace)
        if self.channel != LATEST:
            check_channel(self.channel)
        check_repo(self.repository)
        check_ref(self.branch)
        return self


@dataclass(frozen=True)
class Scaffolded:
    files: tuple[Path, ...]
    config_path: Path
    config_entry: str


def _substitute(text: str, service: NewService) -> str:
    # Names passed the name rule, so they are safe inside HCL and TOML strings and Python literals.
    return (
        text.replace("__SERVICE_NAME__", service.service_name)
        .replace("__NAMESPACE__", service.namespace)
        .replace("__WORKSPACE__", service.workspace)
    )


def _stack_text(service: NewService) -> str:
    """The example's local stack with a header of this service's own (the body is the same contract)."""
    lines = _STACK_SOURCE.read_text(encoding="utf-8").splitlines(keepends=True)
    body = "".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")) :])
    header = (
        f"# One instance of {service.service_name} ({service.namespace}) on the worker's machine, from the local\n"
        "# image its Packer template builds; a new version replaces it. Copied from immutable-cd's\n"
        "# examples/stacks/local; what the pipeline passes and expects is docs/service-contract.md there.\n"
    )
    return header + body


def service_files(service: NewService) -> dict[Path, tuple[str, bool]]:
    """Every file of the skeleton: path -> (content, executable)."""
    root, skeleton = service.directory, SKELETON
    files: dict[Path, tuple[str, bool]] = {
        root / "src" / "app.py": (_substitute((skeleton / "app.py").read_text(encoding="utf-8"), service), False),
        root / TEMPLATE_DIR / f"{service.service_name}.pkr.hcl": (
            _substitute((skeleton / "service.pkr.hcl").read_text(encoding="utf-8"), service),
            False,
        ),
        root / "README.md": (_substitute((skeleton / "README.md").read_text(encoding="utf-8"), service), False),
        root / ".gitignore": ((skeleton / "gitignore").read_text(encoding="utf-8"), False),
        service.stack_dir / "main.tf": (_stack_text(service), False),
    }
    for source, destination, executable in _SHARED:
        files[root / destination] = (source.read_text(encoding="utf-8"), executable)
    return files


def _toml(value: object) -> str:
    # JSON strings and lists of them are valid TOML; every value here is a string or a list of strings.
    return json.dumps(value)


def _relative_to_project(path: Path) -> str:
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(PROJECT_ROOT.resolve()))
    except ValueError:
        return str(resolved)


def config_entry(service: NewService) -> str:
    """The icd.toml text for the new namespace and its workspace."""
    namespace: Mapping[str, object] = {
        "repository": service.repository,
        "branches": [service.branch],
        "service_name": service.service_name,
        "template_dir": TEMPLATE_DIR,
        "packer_only": list(DEFAULT_PACKER_ONLY),
    }
    workspace: Mapping[str, object] = {
        "follows": f"{service.namespace}@{service.channel}",
        "stack": _relative_to_project(service.stack_dir),
        "platform": "local",
    }
    lines = [f"# {service.service_name}: added by icd-service new (docs/service-contract.md)"]
    lines.append(f"[namespaces.{_toml(service.namespace)}]")
    lines += [f"{key} = {_toml(value)}" for key, value in namespace.items()]
    lines += ["", f"[workspaces.{service.workspace}]"]
    lines += [f"{key} = {_toml(value)}" for key, value in workspace.items()]
    return "\n".join(lines) + "\n"


def scaffold(service: NewService, config_path: Path) -> Scaffolded:
    """Write the skeleton and append its entries to ``config_path``; refuses before writing anything if a
    name breaks the rules, a file exists, or the namespace or workspace is already configured."""
    service = service.checked()
    files = service_files(service)
    existing = sorted(str(path) for path in files if path.exists())
    if existing:
        raise InvalidInputError(f"refusing to overwrite {', '.join(existing)}; choose another --dir or --stack-dir")
    current = config_path.read_text(encoding="utf-8") if config_path.exists() else ""
    config = parse_config(current, where=str(config_path))
    if service.namespace in config.namespaces:
        raise ConfigError(f"{config_path} already configures namespace {service.namespace}")
    if service.workspace in config.workspaces:
        following = config.workspaces[service.workspace].namespace
        raise ConfigError(
            f"{config_path} already has workspace {service.workspace} (it follows {following}); a workspace "
            "holds one service: choose another --workspace"
        )
    entry = config_entry(service)
    updated = f"{current.rstrip()}\n\n{entry}" if current.strip() else entry
    parse_config(updated, where=str(config_path))  # the whole file, as every flow will read it

    for path, (content, executable) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        if executable:
            path.chmod(0o755)
    # Replaced in one step: a worker re-reading icd.toml never sees half an entry.
    partial = config_path.with_name(f".{config_path.name}.{os.getpid()}.partial")
    partial.write_text(updated, encoding="utf-8")
    if config_path.exists():
        shutil.copymode(config_path, partial)
    partial.replace(config_path)
    return Scaffolded(tuple(sorted(files)), config_path, entry)
