"""``icd-inbound``: the project's one inbound HTTP app (Starlette, served by uvicorn; both come with Prefect).

    icd-inbound --host 0.0.0.0 --port 8787 [--secret-block github-webhook-secret] [--limit-concurrency 128]
        [--refusal-window 60]

``POST /github`` takes GitHub's push webhook: verified with ``X-Hub-Signature-256`` against the secret in a
Prefect ``Secret`` block, mapped to a namespace by ``icd.toml``, and turned into an ``icd.push.received``
event that the ``build-artifact`` deployment triggers on. What it answers, and why, is
``icd/inbound/github.py``. Later inbound calls (Slack's approval buttons) get their own route here, not a
second server.

Bodies up to GitHub's 25 MB are read with bounded memory: each request holds at most 1 MiB of its body in
memory (the rest is spooled to a temporary file while it is hashed), at most ``--limit-concurrency``
requests are served at once (uvicorn answers 503 past that), a body must arrive within 10 s (GitHub's own
timeout), and at most two signed bodies are parsed at once (a streaming parser: the document is never
built). A refused request is counted (``GET /health``: ``refused`` by signed/unsigned and reason), logged
at warning level and emitted as ``icd.push.refused``, within the allowances of ``icd/inbound/refusals.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from icd import events
from icd.config import PipelineConfig, load_config
from icd.inbound import refusals
from icd.inbound.github import (
    MAX_BODY_BYTES,
    SPOOL_BYTES,
    Answer,
    BodyReader,
    decide_read,
    refuse_unread,
    too_slow,
)
from icd.prefect_tls import reuse_tls_context_for_plain_http

SECRET_BLOCK = "github-webhook-secret"  # noqa: S105  # the block's name, not a secret
READ_SECONDS = 10.0  # GitHub gives up on a delivery after 10 s: a body still arriving then is not GitHub's
PARSE_SLOTS = 2  # parsing is the CPU a large push costs: no more at once than this machine has cores
# Requests served at once, each holding at most SPOOL_BYTES of its body in memory. Past it uvicorn answers 503,
# and GitHub does not redeliver a failed delivery by itself: 50 copies of one push at once got 18 refusals at 32.
LIMIT_CONCURRENCY = 128
log = logging.getLogger("icd.inbound")


async def _read(request: Request, body: BodyReader) -> None:
    async for chunk in request.stream():
        if not body.feed(chunk):
            return  # past what is worth hashing: the rest is not read
    body.finish()


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


def _now() -> datetime:
    return datetime.now(UTC)


def create_app(
    *,
    secret: Callable[[], bytes],
    config: Callable[[], PipelineConfig] = load_config,
    emit: Callable[[events.EventSpec], None] = emit_now,
    seen: Callable[[str], bool] = already_received,
    max_bytes: int = MAX_BODY_BYTES,
    spool_bytes: int = SPOOL_BYTES,
    read_seconds: float = READ_SECONDS,
    parse_slots: int = PARSE_SLOTS,
    ledger: refusals.RefusalLedger | None = None,
    clock: Callable[[], datetime] = _now,
) -> Starlette:
    """The app, with its collaborators injectable (the tests give a fixed secret and record the events)."""
    ledger = ledger or refusals.RefusalLedger()
    parsing = asyncio.Semaphore(parse_slots)

    async def tell(refused: Sequence[events.EventSpec]) -> None:
        for spec in refused:
            log.warning(refusals.log_line(spec))
            await run_in_threadpool(emit, spec)

    async def refuse(answer: Answer) -> JSONResponse:
        if answer.refusal is not None:
            await tell(ledger.record(answer.refusal, clock()))
        return JSONResponse(dict(answer.body), status_code=answer.status)

    async def github(request: Request) -> JSONResponse:
        headers = {name.lower(): value for name, value in request.headers.items()}
        with BodyReader(secret(), max_bytes=max_bytes, spool_bytes=spool_bytes) as body:
            early = refuse_unread(headers, body)
            if early is not None:
                return await refuse(early)
            try:
                async with asyncio.timeout(read_seconds):
                    await _read(request, body)
            except TimeoutError:
                return await refuse(too_slow(headers, body, read_seconds))
            except ClientDisconnect:  # nobody is left to answer, and nothing was delivered
                return JSONResponse({"error": "the client went away"}, status_code=400)
            async with parsing:
                answer = await run_in_threadpool(lambda: decide_read(headers, body, config()))
        if answer.refusal is not None:
            return await refuse(answer)
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
        return JSONResponse({"ok": True, "refused": ledger.counts()})

    @contextlib.asynccontextmanager
    async def summaries(app: Starlette) -> AsyncIterator[None]:
        """Tells the summary of each window of held refusals soon after it ends (a tenth of a window)."""

        async def tell_due() -> None:
            while True:
                await asyncio.sleep(ledger.window.total_seconds() / 10)
                try:
                    await tell(ledger.due(clock()))
                except Exception:  # an unreachable API must not end the summaries for the app's lifetime
                    log.exception("could not emit the summary of refused requests (its log line is above)")

        ticking = asyncio.create_task(tell_due())
        try:
            yield
        finally:
            ticking.cancel()
            for spec in ledger.held():  # the Prefect API may be gone already: the log keeps them
                log.warning(refusals.log_line(spec))

    return Starlette(
        routes=[Route("/github", github, methods=["POST"]), Route("/health", health, methods=["GET"])],
        lifespan=summaries,
    )


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
    parser.add_argument(
        "--limit-concurrency",
        type=int,
        default=LIMIT_CONCURRENCY,
        help="requests served at once (each holds at most 1 MiB of its body in memory); 503 past that",
    )
    parser.add_argument(
        "--refusal-window",
        type=float,
        default=refusals.WINDOW_SECONDS,
        help="seconds: refusals past the allowance of a window are told as one summary when it ends",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reuse_tls_context_for_plain_http()
    import uvicorn

    app = create_app(
        secret=secret_from_block(args.secret_block),
        ledger=refusals.RefusalLedger(window_seconds=args.refusal_window),
    )
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.limit_concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
