"""``icd-inbound``: the project's one inbound HTTP app (Starlette, served by uvicorn; both come with Prefect).

    icd-inbound --host 0.0.0.0 --port 8787 [--secret-block github-webhook-secret]

``POST /github`` takes GitHub's push webhook: verified with ``X-Hub-Signature-256`` against the secret in a
Prefect ``Secret`` block, mapped to a namespace by ``icd.toml``, and turned into an ``icd.push.received``
event that the ``build-artifact`` deployment triggers on. What it answers, and why, is
``icd/inbound/github.py``. ``GET /health`` answers 200. Later inbound calls (Slack's approval buttons) get
their own route here, not a second server.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from icd import events
from icd.config import PipelineConfig, load_config
from icd.inbound.github import MAX_BODY_BYTES, Answer, decide
from icd.prefect_tls import reuse_tls_context_for_plain_http

SECRET_BLOCK = "github-webhook-secret"  # noqa: S105  # the block's name, not a secret


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing before reading past ``limit`` (also when Content-Length lies or is absent)."""
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


def already_received(event_id: str) -> bool:
    """Whether the server already stored this event (a redelivery after the trigger service forgot it)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventIDFilter, EventOccurredFilter

    since = datetime.now(UTC) - timedelta(days=7)
    with get_client(sync_client=True) as client:
        page = client.read_events(
            filter=EventFilter(
                id=EventIDFilter(id=[UUID(event_id)]),
                occurred=EventOccurredFilter(since=since),  # type: ignore[arg-type]  # a datetime is a DateTime
            ),
            limit=1,
        )
    return bool(page.events)


def emit_now(spec: events.EventSpec) -> None:
    events.emit(spec)
    events.flush()


def create_app(
    *,
    secret: Callable[[], bytes],
    config: Callable[[], PipelineConfig] = load_config,
    emit: Callable[[events.EventSpec], None] = emit_now,
    seen: Callable[[str], bool] = already_received,
    max_bytes: int = MAX_BODY_BYTES,
) -> Starlette:
    """The app, with its collaborators injectable (the tests give a fixed secret and record the events)."""

    async def github(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, max_bytes)
        except _TooLarge:
            return JSONResponse({"error": f"the body is larger than {max_bytes} bytes"}, status_code=413)
        headers = {name.lower(): value for name, value in request.headers.items()}
        answer: Answer = decide(headers=headers, body=body, secret=secret(), config=config(), max_bytes=max_bytes)
        payload: dict[str, Any] = dict(answer.body)
        duplicates = []
        for event in answer.events:
            # Both talk to the Prefect API synchronously: off the event loop.
            if await run_in_threadpool(seen, str(event.id)):
                duplicates.append(str(event.id))
            else:
                await run_in_threadpool(emit, event)
        if duplicates:
            payload["duplicate_event_ids"] = duplicates
        return JSONResponse(payload, status_code=answer.status)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/github", github, methods=["POST"]), Route("/health", health, methods=["GET"])])


def secret_from_block(name: str) -> Callable[[], bytes]:
    """The webhook secret from a Prefect ``Secret`` block, loaded once, never logged."""
    from prefect.blocks.system import Secret

    value = str(Secret.load(name).get()).encode()  # type: ignore[union-attr]  # sync load returns the block
    if not value:
        raise SystemExit(f"the Secret block {name!r} is empty")
    return lambda: value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icd-inbound", description="Serve the inbound webhooks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--secret-block", default=SECRET_BLOCK, help="Prefect Secret block holding the secret")
    args = parser.parse_args(argv)
    reuse_tls_context_for_plain_http()
    import uvicorn

    uvicorn.run(create_app(secret=secret_from_block(args.secret_block)), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
