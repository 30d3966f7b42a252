"""Peak memory of handling one 25 MB GitHub push: the streaming webhook against the whole-body read it replaced.

    .venv/bin/python bench/inbound_memory.py [--rounds 3] [--concurrent 4]

Both sides are Starlette apps in this process, called as uvicorn calls them: an ASGI ``http.request`` message
per 64 KiB chunk, read from a file, so the sender holds one chunk at a time. Each request is a signed
25,000,000-byte push as GitHub sends a large one (many commits, each listing the files it touched), for a
namespace of ``icd.toml`` that builds it, so both sides verify, parse and decide it to the same 202.

* **ours**: ``cli/inbound.py``'s app as served: the body hashed chunk by chunk while it is spooled (1 MiB in
  memory, the rest in a temporary file), then only the fields a push needs read by ijson;
* **baseline**: the handler as it was at d9c8efe (``_read_body`` joining the chunks, ``json.loads`` of the
  whole body, HMAC over the bytes), with its cap raised from 1 MiB to 25 MiB so that it accepts the push.

Rounds alternate ours and baseline. Two figures per request, each the largest over the rounds:

* **Python heap peak**: ``tracemalloc``'s peak during the request (every Python object, the body's bytes
  and the parsed document included; not the C parser's own buffers);
* **RSS peak**: the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
  before each request) minus its resident size before it: what the machine sees, C buffers included.

``--concurrent N`` runs N of the same pushes at once on each side (the RSS figure only). A last row is
hostile: a signed push whose one commit message is 20 MB, the one shape whose largest value ours must hold.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import hashlib
import hmac
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cli.inbound import create_app
from icd import events
from icd.config import PipelineConfig, parse_config

SECRET = b"bench-secret"
PUSH_BYTES = 25_000_000
CHUNK = 64 * 1024
COMMIT = "c" * 40
CONFIG = parse_config(
    """
[namespaces."acmeinc/web"]
repository = "https://github.com/acmeinc/web.git"
repository_aliases = ["acmeinc/web"]
service_name = "web"
"""
)
# --- the baseline: the handler as it was at d9c8efe, cap raised to 25 MiB ----------------------------------

BASELINE_MAX_BYTES = 25 * 1024 * 1024


class _TooLarge(Exception):
    pass


async def _baseline_read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _baseline_decide(headers: Mapping[str, str], body: bytes, config: PipelineConfig) -> tuple[int, dict[str, Any]]:
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), headers.get("x-hub-signature-256", "").strip().encode()):
        return 401, {"error": "missing or bad X-Hub-Signature-256"}
    payload = json.loads(body)
    repository = payload["repository"]
    names = {
        str(repository[key]) for key in ("full_name", "clone_url", "html_url", "ssh_url", "url") if repository.get(key)
    }
    branch = payload["ref"].removeprefix("refs/heads/")
    namespaces = config.namespaces_for_push(names, branch)
    started = [
        events.push_received(
            repository=str(repository["full_name"]),
            branch=branch,
            commit=str(payload["after"]),
            namespace=namespace,
            delivery=headers["x-github-delivery"],
            pusher=str(payload["pusher"]["name"]),
        )
        for namespace in namespaces
    ]
    return 202, {"event_ids": [str(event.id) for event in started]}


def baseline_app() -> Starlette:
    async def github(request: Request) -> JSONResponse:
        try:
            body = await _baseline_read_body(request, BASELINE_MAX_BYTES)
        except _TooLarge:
            return JSONResponse({"error": "too large"}, status_code=413)
        headers = {name.lower(): value for name, value in request.headers.items()}
        status, answer = _baseline_decide(headers, body, CONFIG)
        return JSONResponse(answer, status_code=status)

    return Starlette(routes=[Route("/github", github, methods=["POST"])])


def ours_app() -> Starlette:
    emitted: list[events.EventSpec] = []
    return create_app(secret=lambda: SECRET, config=lambda: CONFIG, emit=emitted.append, seen=lambda _: False)


# --- the pushes -----------------------------------------------------------------------------------------------


def realistic_push(size: int) -> bytes:
    """GitHub's large pushes are long lists: up to 2,048 commits, each with the files it added and changed."""
    files = [f"services/web/src/module_{n:04d}/handler_{n:04d}.py" for n in range(120)]
    commit = {"id": COMMIT, "message": "a change\n\nwith a body", "added": files, "modified": files, "removed": []}
    head = json.dumps(_push_fields(commits=[])).encode()[:-2]  # up to the commits' "["
    one = json.dumps(commit).encode()
    count = max(1, (size - len(head) - 2) // (len(one) + 2))
    body = head + b", ".join([one] * count)
    return body + b" " * (size - len(body) - 2) + b"]}"


def hostile_push(message_bytes: int) -> bytes:
    commit = {"id": COMMIT, "message": "x" * message_bytes, "added": [], "modified": [], "removed": []}
    return json.dumps(_push_fields(commits=[commit])).encode()


def _push_fields(**more: Any) -> dict[str, Any]:
    return {
        "ref": "refs/heads/main",
        "before": "0" * 40,
        "after": COMMIT,
        "repository": {"full_name": "acmeinc/web", "clone_url": "https://github.com/acmeinc/web.git"},
        "pusher": {"name": "dev", "email": "dev@example.com"},
        "deleted": False,
        **more,
    }


# --- one request, as uvicorn makes it -------------------------------------------------------------------------


async def deliver(app: Starlette, path: Path, size: int, signature: str) -> int:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(size).encode()),
        (b"x-github-event", b"push"),
        (b"x-github-delivery", b"bench-delivery"),
        (b"x-hub-signature-256", signature.encode()),
    ]
    scope: dict[str, Any] = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST"}
    scope |= {"scheme": "http"}
    scope |= {"path": "/github", "raw_path": b"/github", "query_string": b"", "headers": headers}
    scope |= {"server": ("127.0.0.1", 8787), "client": ("127.0.0.1", 5000), "root_path": ""}
    status = 0
    with path.open("rb") as source:

        async def receive() -> MutableMapping[str, Any]:
            chunk = await run_in_threadpool(source.read, CHUNK)
            return {"type": "http.request", "body": chunk, "more_body": len(chunk) == CHUNK}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope, receive, send)
    return status


def _kib(line: str) -> int:
    return int(line.split()[1])


def _status() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {line.split(":")[0]: _kib(line) for line in status if line.startswith(("VmHWM", "VmRSS"))}


def rss_peak(run: Callable[[], Any]) -> tuple[int, float]:
    """Resident high-water mark above the resident size before ``run``, in bytes; and its wall time."""
    gc.collect()
    # glibc keeps memory a previous run freed (its mmap threshold grows after large frees): hand it back, or
    # the next run reuses it without raising the high-water mark.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size
    before = _status()["VmRSS"]
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    return (_status()["VmHWM"] - before) * 1024, elapsed


def heap_peak(run: Callable[[], Any]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(
    make_app: Callable[[], Starlette], path: Path, size: int, signature: str, concurrent: int
) -> tuple[int, int, float]:
    def once() -> None:
        app = make_app()

        async def all_at_once() -> list[int]:
            return await asyncio.gather(*(deliver(app, path, size, signature) for _ in range(concurrent)))

        statuses = asyncio.run(all_at_once())
        if set(statuses) != {202}:
            raise SystemExit(f"{make_app.__name__}: expected 202 for every push, got {statuses}")

    rss, seconds = rss_peak(once)
    heap = heap_peak(once) if concurrent == 1 else 0
    return rss, heap, seconds


def mib(value: float) -> str:
    return f"{value / 1024 / 1024:8.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=4)
    args = parser.parse_args()

    cases = [("25 MB push", realistic_push(PUSH_BYTES), 1)]
    if args.concurrent > 1:
        cases.append((f"{args.concurrent} x 25 MB at once", cases[0][1], args.concurrent))
    cases.append(("hostile: one 20 MB message", hostile_push(20_000_000), 1))
    print(f"{'case':<44} {'side':<9} {'RSS peak':>12} {'heap peak':>12} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        for name, body, concurrent in cases:
            path = Path(scratch) / "push.json"
            path.write_bytes(body)
            signature = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
            size = len(body)
            del body
            results: dict[str, list[tuple[int, int, float]]] = {"ours": [], "baseline": []}
            for _ in range(args.rounds):
                for side, make_app in (("ours", ours_app), ("baseline", baseline_app)):
                    results[side].append(measure(make_app, path, size, signature, concurrent))
            for side, runs in results.items():
                rss = max(run[0] for run in runs)
                heap = max(run[1] for run in runs)
                seconds = statistics.median(run[2] for run in runs)
                heap_text = mib(heap) if heap else f"{'-':>12}"
                print(f"{name + f' ({size:,} B)':<44} {side:<9} {mib(rss):>12} {heap_text:>12} {seconds:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
