"""Assemble the local image: the app and its provisioning merged into one immutable tarball.

Packer's ``shell-local`` provisioner runs this during ``packer build`` (see ``app.pkr.hcl``); it is the
offline stand-in for what the ``amazon-ebs`` build does on an instance. Python 3 stdlib only.

The tarball is written to a temporary name and renamed into place, so a reader never sees half an image
and building twice with the same inputs replaces the previous file instead of failing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Fixed tar metadata: the image's bytes depend on its inputs and build time, not on who built it.
_MTIME = 0
_MODE_FILE = 0o644
_MODE_EXEC = 0o755


def service_definition(args: argparse.Namespace) -> dict[str, Any]:
    """The Consul service, as far as it is known at build time; bin/start fills in the rest."""
    return {
        "Name": args.service_name,
        "Tags": [f"v{args.version}", f"namespace={args.namespace}"],
        "Meta": {"artifact_version": args.version, "commit": args.commit, "namespace": args.namespace},
        "Check": {
            # {address} and {port} are filled in by bin/start once the app has bound its port.
            "HTTP": "http://{address}:{port}/health",
            "Interval": args.health_interval,
            "Timeout": args.health_timeout,
        },
    }


def release_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "namespace": args.namespace,
        "service_name": args.service_name,
        "version": args.version,
        "commit": args.commit,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = _MTIME
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def _json(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def assemble(args: argparse.Namespace) -> Path:
    for label, value in (("service_name", args.service_name), ("version", args.version)):
        # Both become part of a file name and a Consul service ID.
        if not _SAFE_NAME.fullmatch(value):
            raise SystemExit(f"{label} {value!r} must match {_SAFE_NAME.pattern}")
    src: Path = args.src_dir
    output_dir: Path = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    image = output_dir / f"{args.service_name}-{args.version}.tar.gz"
    partial = output_dir / f".{image.name}.{os.getpid()}.partial"
    try:
        with tarfile.open(partial, "w:gz") as tar:
            _add(tar, "app/app.py", (src / "app.py").read_bytes(), _MODE_FILE)
            _add(tar, "app/instance.py", (src / "instance.py").read_bytes(), _MODE_FILE)
            _add(tar, "bin/start", (src / "bin" / "start").read_bytes(), _MODE_EXEC)
            _add(tar, "bin/stop", (src / "bin" / "stop").read_bytes(), _MODE_EXEC)
            _add(tar, "release.json", _json(release_info(args)), _MODE_FILE)
            _add(tar, "consul/service.json", _json(service_definition(args)), _MODE_FILE)
        partial.replace(image)
    finally:
        partial.unlink(missing_ok=True)
    return image


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments, each defaulting to its ``ICD_*`` environment variable: Packer passes values that way, as
    data, so that no value is ever part of a shell command line."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="assemble the local app image")
    parser.add_argument("--src-dir", type=Path, default=env("ICD_SRC_DIR"))
    parser.add_argument("--output-dir", type=Path, default=env("ICD_OUTPUT_DIR"))
    parser.add_argument("--namespace", default=env("ICD_NAMESPACE"))
    parser.add_argument("--service-name", default=env("ICD_SERVICE_NAME"))
    parser.add_argument("--version", default=env("ICD_VERSION"))
    parser.add_argument("--commit", default=env("ICD_COMMIT"))
    parser.add_argument("--health-interval", default=env("ICD_HEALTH_INTERVAL", "10s"))
    parser.add_argument("--health-timeout", default=env("ICD_HEALTH_TIMEOUT", "2s"))
    args = parser.parse_args(argv)
    missing = [
        name
        for name in ("src_dir", "output_dir", "namespace", "service_name", "version", "commit")
        if not getattr(args, name)
    ]
    if missing:
        parser.error(
            f"missing: {', '.join(missing)} (pass --{missing[0].replace('_', '-')} or ICD_{missing[0].upper()})"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"image: {assemble(args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
