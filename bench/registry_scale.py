"""The registry look-ups a deploy makes, at 10, 100, 1,000 and 10,000 versions: flat, against a full scan.

    .venv/bin/python bench/registry_scale.py [--sizes 10,100,1000,10000] [--repeat 5]

A moto S3 server runs in this process, over real HTTP. Each namespace is filled with sealed records written
straight to S3 (what `register` writes: the version, its run, commit and artifact lookup entries, the index),
in parallel, so that 10,000 versions take a minute rather than an hour. Then, best of `--repeat`:

* **ours**: every look-up a deploy makes: the commit already built (`find_build`), the next build label,
  the version behind an artifact id of the plan (`find_by_artifact_id`), `latest`, the version to deploy
  (`resolve_deployable`), and one registration of a new version;
* **baseline**: the same answers the way the registry used to get them, by listing and reading every
  version (`list_versions` once per look-up, as `find_existing_build`, the build label and the plan summary
  did: four scans per deploy).

Requests are counted with a botocore event hook on the client.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3

from examples.local_env import start_moto
from icd.registry.models import (
    ArtifactVersion,
    ChannelAssignment,
    ChannelDocument,
    CommitBuilds,
    NamespaceIndex,
    Pointer,
)
from icd.registry.registry import Registry
from icd.registry.signing import Sealer

BUCKET = "icd-registry-scale"


class Counted:
    def __init__(self, client: Any) -> None:
        self.requests = 0
        client.meta.events.register("before-send.s3.*", self._count)

    def _count(self, **_: Any) -> None:
        self.requests += 1


def fill(registry: Registry, namespace: str, size: int) -> None:
    """``size`` versions of ``namespace``, as `register` would have left them (written in parallel)."""
    now = datetime.now(UTC)

    def write(number: int) -> None:
        record = ArtifactVersion(
            namespace=namespace,
            version=number,
            git_commit=f"{number:040x}",
            git_ref="main",
            packer_run_uuid=f"run-{number}",
            builder_type="null",
            artifacts={"local": f"/images/{namespace}/web-{number}.tar.gz"},
            artifact_sha256={"local": "ab" * 32},
            created_at=now,
            created_by="bench",
            parent_version=number - 1 or None,
            labels={"service_name": "web", "build_label": str(number)},
        )
        registry._write(registry._version_key(namespace, number), record, if_match=None)
        registry._write(registry._run_key(namespace, record.packer_run_uuid), Pointer(version=number), if_match=None)
        registry._write(
            registry._commit_key(namespace, record.git_commit), CommitBuilds(versions=[number]), if_match=None
        )
        registry._write(
            registry._artifact_key(namespace, record.artifacts["local"]), Pointer(version=number), if_match=None
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(write, range(1, size + 1)))
    registry._write(registry._index_key(namespace), NamespaceIndex(last_version=size), if_match=None)
    latest = ChannelAssignment(
        channel="latest", from_version=None, to_version=size, assigned_by="bench", assigned_at=now
    )
    registry._write(
        registry._channel_key(namespace, "latest"),
        ChannelDocument(channel="latest", version=size, history=[latest]),
        if_match=None,
    )


def ours(registry: Registry, namespace: str, size: int, run: int) -> None:
    commit = f"{size:040x}"
    assert registry.find_build(namespace, commit=commit, service_name="web", platform="local") is not None
    registry.next_build_label(namespace)
    assert registry.find_by_artifact_id(namespace, f"/images/{namespace}/web-{size}.tar.gz") is not None
    assert registry.get_channel(namespace, "latest") is not None
    registry.resolve_deployable(namespace, size)
    registry.register(
        namespace,
        git_commit=f"new-{run}",
        git_ref="main",
        packer_run_uuid=f"bench-run-{run}",
        builder_type="null",
        artifacts={"local": f"/images/new-{run}.tar.gz"},
        created_by="bench",
    )


def baseline(registry: Registry, namespace: str, size: int, run: int) -> None:
    commit = f"{size:040x}"
    for _ in range(4):  # find_existing_build, next_build_label, and the plan summary's two look-ups
        versions = registry.list_versions(namespace)
    assert any(v.git_commit == commit for v in versions)


def measure(client: Counted, step: Callable[[int], None], repeat: int) -> tuple[float, int]:
    best, requests = float("inf"), 0
    for run in range(repeat):
        client.requests = 0
        started = time.perf_counter()
        step(run)
        elapsed = time.perf_counter() - started
        if elapsed < best:
            best, requests = elapsed, client.requests
    return best, requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline-max", type=int, default=1000, help="skip the full scan above this size")
    args = parser.parse_args(argv)
    server, endpoint = start_moto()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            config=boto3.session.Config(max_pool_connections=64),
        )
        client.create_bucket(Bucket=BUCKET)
        counted = Counted(client)
        registry = Registry(client, BUCKET, "registry/", sealer=Sealer(b"registry-scale-bench-key"))
        print(f"{'versions':>9}  {'ours (deploy look-ups + 1 registration)':>42}  {'baseline (4 full scans)':>26}")
        for size in (int(part) for part in args.sizes.split(",")):
            namespace = f"scale/n{size}"
            started = time.perf_counter()
            fill(registry, namespace, size)
            filled = time.perf_counter() - started
            ours_time, ours_requests = measure(counted, partial(ours, registry, namespace, size), args.repeat)
            if size <= args.baseline_max:
                scan = partial(baseline, registry, namespace, size)
                base_time, base_requests = measure(counted, scan, args.repeat)  # best-of equal on both sides
                base = f"{base_time * 1000:9.1f} ms {base_requests:7d} req"
            else:
                base = f"{'(skipped; linear)':>26}"
            print(
                f"{size:9d}  {ours_time * 1000:24.1f} ms {ours_requests:9d} req    {base}   (filled in {filled:.0f}s)",
                flush=True,
            )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
