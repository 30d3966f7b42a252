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
import json
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
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
from icd.interactions.reply import InteractionHandler
from icd.interactions.signing import NotVerified, RequestVerifier
from prefect_patches.shared_tls import reuse_tls_context_for_plain_http

SECRET_BLOCK = "github-webhook-secret"  # noqa: S105  # the block's name, not a secret
SLACK_SIGNING_SECRET_BLOCK = "slack-signing-secret"  # noqa: S105  # the block's name, not a secret
SLACK_APP_TOKEN_BLOCK = "slack-app-token"  # noqa: S105  # the block's name, not a secret
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
    slack: SlackEndpoint | None = None,
) -> Starlette:
    """The app, with its collaborators injectable (the tests give a fixed secret and record the events).
    ``slack``: the interactions endpoint (``POST /slack/interactions``), when a Slack app is set up."""
    ledger = ledger or refusals.RefusalLedger()
    parsing = asyncio.Semaphore(parse_slots)
    slack_refused: Counter[str] = Counter()

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

    async def slack_interactions(request: Request) -> Response:
        """Slack's interactivity request URL: verified, answered at once, acted on after the answer is sent."""
        assert slack is not None  # the route exists only with an endpoint
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            async with asyncio.timeout(read_seconds):
                body = await _read_small(request, SLACK_BODY_MAX_BYTES)
        except (TimeoutError, ClientDisconnect):
            return JSONResponse({"error": "the body did not arrive"}, status_code=408)
        if body is None:
            slack_refused["too-large"] += 1
            return JSONResponse({"error": "too large for an interaction"}, status_code=413)
        verdict = slack.verifier.check(headers, body)
        if isinstance(verdict, NotVerified):
            slack_refused[verdict.reason] += 1
            log.warning("refused a Slack interaction: %s (%s)", verdict.reason, verdict.detail)
            return JSONResponse({"error": verdict.reason}, status_code=401)
        if verdict.replay:
            slack_refused["replay"] += 1
            log.warning("a signed Slack interaction came again: answered, not acted on twice")
            return Response(status_code=200)
        payload = _interaction_payload(body)
        if payload is None:
            slack_refused["malformed"] += 1
            return JSONResponse({"error": "no payload"}, status_code=400)
        reply = slack.handler.receive(payload)
        later = BackgroundTask(_logged, reply.later) if reply.later is not None else None
        if reply.body is None:
            return Response(status_code=200, background=later)
        return JSONResponse(reply.body, status_code=200, background=later)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "refused": ledger.counts(), "slack_refused": dict(slack_refused)})

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

    routes = [Route("/github", github, methods=["POST"]), Route("/health", health, methods=["GET"])]
    if slack is not None:
        routes.append(Route("/slack/interactions", slack_interactions, methods=["POST"]))
    return Starlette(routes=routes, lifespan=summaries)


@dataclass(frozen=True)
class SlackEndpoint:
    """What ``POST /slack/interactions`` needs: the verifier (the app's signing secret) and the handler."""

    verifier: RequestVerifier
    handler: InteractionHandler


# Slack's interaction payloads are a few KB (a message's blocks at most 50 of them); a MiB is generous.
SLACK_BODY_MAX_BYTES = 1024 * 1024


async def _read_small(request: Request, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _interaction_payload(body: bytes) -> dict[str, Any] | None:
    """Slack posts ``payload=<JSON>`` form-encoded."""
    try:
        fields = parse_qs(body.decode("utf-8"), strict_parsing=False)
        payload = json.loads(fields["payload"][0])
    except (UnicodeDecodeError, KeyError, IndexError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _logged(work: Callable[[], None]) -> None:
    """The work after an answer: a failure is logged (nobody is left to answer), never raised into the server."""
    try:
        work()
    except Exception:
        log.exception("acting on a Slack interaction failed")


def secret_from_block(name: str) -> Callable[[], bytes]:
    """The webhook secret from a Prefect ``Secret`` block, loaded once, never logged."""
    from prefect.blocks.system import Secret

    value = str(Secret.load(name).get()).encode()  # type: ignore[union-attr]  # sync load returns the block
    if not value:
        raise SystemExit(f"the Secret block {name!r} is empty")
    return lambda: value


def slack_handler(notifier_block: str, consul_block: str = "consul") -> InteractionHandler:
    """The handler of every Slack interaction: the operators' Slack notifier block gives the Web API client
    (reading users and groups, opening the reject modal) and the sender (rewriting notices, telling the
    channel of a silence); the Consul Connection block ``consul_block`` holds the silences and the health
    watch's state that a health alert's buttons act on (without it those buttons are not acted on)."""
    from blocks.consul import ConsulConnection
    from blocks.notifier import SlackNotifier
    from icd.interactions.alerts import AlertButtons
    from icd.interactions.approvals import ApprovalButtons
    from icd.interactions.handler import SlackInteractions
    from tasks.silences import publish_silences

    notifier = cast(SlackNotifier, SlackNotifier.load(notifier_block))
    buttons = ApprovalButtons(slack=notifier.get_client(), sender=notifier.channel_sender(), config=load_config)
    try:
        connection = cast(ConsulConnection, ConsulConnection.load(consul_block))
    except ValueError:
        log.info("no Consul Connection block %r: a health alert's buttons are not acted on", consul_block)
        return SlackInteractions(buttons)
    alerts = AlertButtons(
        consul_client=connection.get_client,
        sender=notifier.sender(log),  # as icd-silence tells it: the channel and the blocks routed for health
        slack=notifier.get_client(),
        published=publish_silences,
    )
    return SlackInteractions(buttons, alerts)


def slack_endpoint(signing_secret_block: str, notifier_block: str) -> SlackEndpoint | None:
    """``POST /slack/interactions``, when the Slack app's signing secret is saved (``icd-setup blocks
    --slack-signing-secret-env``); None (and a log line) when it is not: the GitHub webhook works alone."""
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(signing_secret_block)
    except ValueError:
        log.info(
            "no Secret block %r: Slack interactions are off (POST /slack/interactions is not served)",
            signing_secret_block,
        )
        return None
    secret = str(block.get())  # type: ignore[union-attr]  # sync load returns the block
    if not secret:
        raise SystemExit(f"the Secret block {signing_secret_block!r} is empty")
    return SlackEndpoint(RequestVerifier(secret), slack_handler(notifier_block))


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
    parser.add_argument(
        "--slack-signing-secret-block",
        default=SLACK_SIGNING_SECRET_BLOCK,
        help="Prefect Secret block with the Slack app's signing secret; serves POST /slack/interactions if it exists",
    )
    parser.add_argument("--notifier-block", default="ops-slack", help="the Slack Notifier block of the operators")
    parser.add_argument(
        "--slack-socket-mode",
        action="store_true",
        help="also receive Slack interactions over Socket Mode (no public URL needed; README: Slack app)",
    )
    parser.add_argument(
        "--slack-app-token-block",
        default=SLACK_APP_TOKEN_BLOCK,
        help="Prefect Secret block with the Slack app-level token (xapp-...) Socket Mode connects with",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reuse_tls_context_for_plain_http()
    import uvicorn

    app = create_app(
        secret=secret_from_block(args.secret_block),
        ledger=refusals.RefusalLedger(window_seconds=args.refusal_window),
        slack=slack_endpoint(args.slack_signing_secret_block, args.notifier_block),
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, limit_concurrency=args.limit_concurrency)
    )
    stop = threading.Event()
    socket_mode = (
        _start_socket_mode(args.slack_app_token_block, args.notifier_block, stop, server)
        if args.slack_socket_mode
        else None
    )
    try:
        server.run()
    finally:
        stop.set()
        if socket_mode is not None:
            socket_mode.join(timeout=10)
    return 1 if socket_mode is not None and socket_mode.failed else 0


class _SocketModeThread(threading.Thread):
    """Socket Mode beside the HTTP server; if Slack refuses the app token, the whole process stops (a site
    that asked for Socket Mode must not run on without its buttons)."""

    def __init__(self, run: Callable[[], None], server: Any) -> None:
        super().__init__(name="slack-socket-mode", daemon=True)
        self._run, self._server = run, server
        self.failed = False

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("Socket Mode stopped; icd-inbound stops with it")
            self.failed = True
            self._server.should_exit = True


def _start_socket_mode(token_block: str, notifier_block: str, stop: threading.Event, server: Any) -> _SocketModeThread:
    from prefect.blocks.system import Secret

    from blocks.notifier import SlackNotifier
    from icd.interactions.socket_mode import run_socket_mode

    token = str(Secret.load(token_block).get())  # type: ignore[union-attr]  # sync load returns the block
    api_url = cast(SlackNotifier, SlackNotifier.load(notifier_block)).api_url
    handler = slack_handler(notifier_block)
    thread = _SocketModeThread(
        lambda: run_socket_mode(handler, app_token=token, api_url=api_url, stop=stop, logger=log), server
    )
    thread.start()
    return thread


if __name__ == "__main__":
    raise SystemExit(main())
