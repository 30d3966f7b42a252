"""The webhook under large, malformed and hostile requests: the streaming read, the refusals and their events,
as tables (no Prefect server). The rows of the ordinary contract are in tests/test_config_events.py."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from cli.inbound import create_app
from icd import events
from icd.config import parse_config
from icd.inbound import github
from icd.inbound.github import BodyReader, MalformedBody, decide, read_fields, signature_ok
from icd.inbound.refusals import RefusalLedger, log_line, refused_event

CONFIG = parse_config(
    """
[namespaces."acmeinc/web"]
repository = "https://github.com/acmeinc/web.git"
repository_aliases = ["acmeinc/web"]
service_name = "web"

[workspaces.staging]
follows = "acmeinc/web@latest"
stack = "examples/stacks/local"
"""
)
SECRET = b"inbound-test-secret"
COMMIT = "b" * 40
START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _signed(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def _push(**changes: Any) -> dict[str, Any]:
    return {
        "ref": "refs/heads/main",
        "after": COMMIT,
        "deleted": False,
        "repository": {"full_name": "acmeinc/web", "clone_url": "https://github.com/acmeinc/web.git"},
        "pusher": {"name": "dev"},
        **changes,
    }


def _large_push(size: int) -> bytes:
    """A push as GitHub sends a big one: many commits, each listing many files."""
    files = [f"src/module_{n}/file_{n}.py" for n in range(200)]
    commit = {"id": COMMIT, "message": "a change\n\nwith a body", "added": files, "modified": files}
    per_commit = len(json.dumps(commit))
    return json.dumps(_push(commits=[commit] * (size // per_commit + 1))).encode()


def _headers(body: bytes, event: str = "push", **overrides: str) -> dict[str, str]:
    return {"x-github-event": event, "x-github-delivery": "d-1", "x-hub-signature-256": _signed(body), **overrides}


# --- reading only the fields a push needs ----------------------------------------------------------------


def _fields_as_json_loads_sees_them(
    body: bytes,
) -> tuple[dict[str, object], dict[str, object] | None, dict[str, object] | None]:
    payload = json.loads(body)
    top = {key: payload[key] for key in ("ref", "after", "deleted", "zen") if key in payload}
    repository = payload.get("repository") if isinstance(payload.get("repository"), dict) else None
    pusher = payload.get("pusher") if isinstance(payload.get("pusher"), dict) else None
    return top, repository, pusher


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(_push()).encode(),
        json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode(),
        # Keys repeat: the last value wins, as in json.loads.
        b'{"ref": "refs/heads/a", "ref": "refs/heads/b", "repository": {"full_name": "x/1"}}',
        b'{"repository": {"full_name": "x/1"}, "repository": {"full_name": "x/2", "url": "u"}}',
        b'{"repository": {"full_name": "x/1"}, "repository": "not an object"}',
        b'{"repository": [{"full_name": "x/1"}], "pusher": null}',
        # Fields of nested objects and arrays are not the top-level ones.
        b'{"head_commit": {"ref": "refs/heads/evil", "repository": {"full_name": "x/evil"}}, "ref": "refs/heads/ok"}',
        b'{"commits": [{"after": "c"}, ["ref"]], "after": "' + COMMIT.encode() + b'"}',
        b'{"repository": {"owner": {"full_name": "x/owner"}, "full_name": "x/repo"}}',
        b'{"repository.full_name": "x/dotted", "repository": {"name": "r"}}',
        b'{"ref": {"nested": 1}, "deleted": true, "after": 3}',
        '{"pusher": {"name": "d\u00e9v \u2603"}, "ref": "refs/heads/\u00e9t\u00e9"}'.encode(),
    ],
)
def test_the_streamed_fields_are_what_json_loads_would_give(body: bytes) -> None:
    fields = read_fields(io.BytesIO(body))
    top, repository, pusher = _fields_as_json_loads_sees_them(body)
    assert {key: value for key, value in fields.top.items() if value is not github.CONTAINER} == {
        key: value for key, value in top.items() if not isinstance(value, dict | list)
    }
    assert set(fields.top) == set(top)
    wanted = ("full_name", "clone_url", "html_url", "ssh_url", "url")
    expected_repository = None if repository is None else {k: v for k, v in repository.items() if k in wanted}
    assert fields.repository == expected_repository
    assert fields.pusher == (None if pusher is None else {k: v for k, v in pusher.items() if k == "name"})


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'"a string"',
        b'{"a": 1} trailing',
        b'{"a": 1}{"b": 2}',
        b'{"a": "\xff"}',
        b'{"ref": "refs/heads/main", "repository": {"full_name": "x/y"',
        b'{"a": NaN}',
    ],
)
def test_a_malformed_body_is_refused_without_quoting_it(body: bytes) -> None:
    with pytest.raises(MalformedBody) as refused:
        read_fields(io.BytesIO(body))
    assert str(refused.value) in ("the body is not JSON", "the body is not a JSON object")


# --- the body, hashed while it is spooled ------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 1 << 20])
def test_the_signature_verified_chunk_by_chunk_is_the_one_over_the_whole_body(chunk_size: int) -> None:
    body = _large_push(200_000)
    with BodyReader(SECRET, spool_bytes=1024) as reader:
        for start in range(0, len(body), chunk_size):
            assert reader.feed(body[start : start + chunk_size])
        assert not reader.signature_ok(_signed(body)), "not before the whole body has arrived"
        reader.finish()
        assert reader.signature_ok(_signed(body)) == signature_ok(SECRET, body, _signed(body)) is True
        assert not reader.signature_ok(_signed(body + b" "))
        assert not reader.signature_ok(_signed(body)[:-1])
        assert reader.rewound().read() == body, "spooled whole, past spool_bytes too"
    with BodyReader(b"") as unkeyed:
        unkeyed.feed(body)
        unkeyed.finish()
        assert not unkeyed.signature_ok("sha256=" + hmac.new(b"", body, hashlib.sha256).hexdigest())


def test_a_body_past_the_cap_is_hashed_not_kept_and_past_twice_the_cap_not_read() -> None:
    body = b"x" * 3000
    with BodyReader(SECRET, max_bytes=1000, spool_bytes=100) as reader:
        assert all(reader.feed(body[start : start + 500]) for start in range(0, 2000, 500))
        assert reader.over_limit
        assert reader.rewound().read() == b"", "nothing of a refused body is kept"
        assert not reader.feed(body[2000:2500]), "past drain_bytes (twice the cap) reading stops"


# --- the contract, refusals included ---------------------------------------------------------------------


def _body(payload: object) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("payload", "headers", "max_bytes", "status", "reason", "signed"),
    [
        (_push(), {}, github.MAX_BODY_BYTES, 202, None, None),
        (_large_push(3 * 1024 * 1024), {}, github.MAX_BODY_BYTES, 202, None, None),
        # Past the cap (1000 here), a body is still hashed up to twice the cap: signed, or not.
        (_push(padding="x" * 1200), {}, 1000, 413, "too-large", True),
        (_push(padding="x" * 1200), {"x-hub-signature-256": "sha256=" + "0" * 64}, 1000, 413, "too-large", False),
        (_push(padding="x" * 2000), {}, 1000, 413, "too-large", False),
        (_push(), {"content-length": "2001"}, 1000, 413, "too-large", False),
        (_push(), {"x-hub-signature-256": ""}, github.MAX_BODY_BYTES, 401, "unsigned", False),
        (_push(), {"x-hub-signature-256": "sha256=" + "0" * 64}, github.MAX_BODY_BYTES, 401, "bad-signature", False),
        (_push(), {"x-hub-signature-256": "md5=abc"}, github.MAX_BODY_BYTES, 401, "bad-signature", False),
        (_push(), {"x-github-event": "issues"}, github.MAX_BODY_BYTES, 400, "unsupported-event", True),
        (b"{not json", {}, github.MAX_BODY_BYTES, 400, "malformed", True),
        (b"[]", {}, github.MAX_BODY_BYTES, 400, "malformed", True),
        ({"ref": "refs/heads/main"}, {}, github.MAX_BODY_BYTES, 400, "bad-push", True),
        (_push(after="not-a-sha"), {}, github.MAX_BODY_BYTES, 400, "bad-push", True),
        (_push(), {"x-github-delivery": ""}, github.MAX_BODY_BYTES, 400, "bad-push", True),
    ],
)
def test_every_refusal_says_why_and_whether_it_was_signed(
    payload: object, headers: dict[str, str], max_bytes: int, status: int, reason: str | None, signed: bool | None
) -> None:
    body = _body(payload)
    answer = decide(headers={**_headers(body), **headers}, body=body, secret=SECRET, config=CONFIG, max_bytes=max_bytes)
    assert answer.status == status, answer.body
    if reason is None:
        assert answer.refusal is None
        assert [event.event for event in answer.events] == [events.PUSH_RECEIVED]
        return
    assert answer.refusal is not None
    assert (answer.refusal.reason, answer.refusal.signed, answer.refusal.status) == (reason, signed, status)
    assert answer.body == {"error": answer.refusal.detail, "reason": reason}
    assert answer.events == ()


def test_a_signed_refusal_names_the_repository_and_an_unsigned_one_reads_nothing_of_the_body() -> None:
    body = _body(_push(after="nope"))
    signed = decide(headers=_headers(body), body=body, secret=SECRET, config=CONFIG).refusal
    assert signed is not None
    assert (signed.repository, signed.delivery, signed.event_type) == ("acmeinc/web", "d-1", "push")
    forged = {**_headers(body), "x-hub-signature-256": "sha256=" + "0" * 64}
    unsigned = decide(headers=forged, body=body, secret=SECRET, config=CONFIG).refusal
    assert unsigned is not None
    assert unsigned.repository == ""


# --- icd.push.refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("acmeinc/web", "acmeinc/web"),
        ("<!channel> <http://evil|click>", "&lt;!channel&gt; &lt;http://evil|click&gt;"),
        ("line one\nline two\r\n\tthree", "line one line two three"),
        ("zero\u200bwidth\u202eflip", "zerowidthflip"),
        ("x" * 500, "x" * 119 + "…"),
    ],
)
def test_what_came_with_the_request_is_made_safe_to_show(given: str, shown: str) -> None:
    spec = events.push_refused(
        reason="bad-push", status=400, signed=True, detail=given, delivery=given, event_type=given, repository=given
    )
    assert (spec.payload["delivery"], spec.payload["event_type"], spec.payload["repository"]) == (shown,) * 3
    assert "\n" not in spec.payload["detail"]
    assert spec.related[0]["prefect.resource.id"] == f"icd.repository.{shown}"


@pytest.mark.parametrize(
    ("signed", "delivery", "count", "same_id_again"),
    [(True, "d-1", 1, True), (True, "", 1, False), (True, "d-1", 3, False), (False, "d-1", 1, False)],
)
def test_a_signed_delivery_refused_again_is_the_same_event_and_nothing_else_is(
    signed: bool, delivery: str, count: int, same_id_again: bool
) -> None:
    def refused() -> events.EventSpec:
        return events.push_refused(
            reason="malformed", status=400, signed=signed, detail="d", delivery=delivery, count=count
        )

    first, again = refused(), refused()
    assert first.event == events.PUSH_REFUSED
    assert first.resource == {
        "prefect.resource.id": "icd.webhook.github",
        "prefect.resource.name": "GitHub webhook (icd-inbound)",
        "icd.reason": "malformed",
        "icd.signed": "true" if signed else "false",
        "icd.status": "400",
    }
    assert (first.id is not None and first.id == again.id) is same_id_again
    assert first.related == [], "no repository: no related resource"


# --- counted, told, never a flood ---------------------------------------------------------------------------


def _refusal(reason: str = "bad-signature", signed: bool = False, delivery: str = "d") -> github.Refusal:
    return github.Refusal(reason, f"{reason} detail", signed, delivery=delivery, event_type="push")


def test_unsigned_refusals_are_told_once_a_window_then_as_one_summary() -> None:
    ledger = RefusalLedger(window_seconds=60)
    told = [ledger.record(_refusal(delivery=str(n)), START + timedelta(seconds=n)) for n in range(60)]
    assert [len(batch) for batch in told] == [1] + [0] * 59
    assert ledger.due(START + timedelta(seconds=59)) == []
    [summary] = ledger.due(START + timedelta(seconds=60))
    assert (summary.payload["count"], summary.payload["since"]) == (59, (START + timedelta(seconds=1)).isoformat())
    assert summary.payload["delivery"] == "59", "the last one held"
    assert summary.resource["icd.signed"] == "false"
    assert ledger.counts() == {"signed": {}, "unsigned": {"bad-signature": 60}}
    # The summary took the new window's allowance: a steady flood is one event a window.
    assert ledger.record(_refusal(), START + timedelta(seconds=61)) == []
    assert ledger.due(START + timedelta(seconds=119)) == []
    assert [s.payload["count"] for s in ledger.due(START + timedelta(seconds=120))] == [1]
    assert ledger.due(START + timedelta(seconds=180)) == [], "a quiet window tells nothing"
    assert len(ledger.record(_refusal(), START + timedelta(seconds=181))) == 1, "and the next one is told at once"


def test_each_reason_and_signed_refusals_have_their_own_allowance() -> None:
    ledger = RefusalLedger(window_seconds=60, signed_per_window=3, unsigned_per_window=1)
    told = [
        *ledger.record(_refusal("unsigned"), START),
        *ledger.record(_refusal("bad-signature"), START),
        *ledger.record(_refusal("bad-signature"), START),
        *[spec for n in range(5) for spec in ledger.record(_refusal("malformed", True, f"m{n}"), START)],
    ]
    assert [(s.payload["reason"], s.payload["signed"], s.payload["delivery"]) for s in told] == [
        ("unsigned", False, "d"),
        ("bad-signature", False, "d"),
        ("malformed", True, "m0"),
        ("malformed", True, "m1"),
        ("malformed", True, "m2"),
    ]
    # A window that ends is summarised when the next refusal comes, even if no one asked for due().
    late = ledger.record(_refusal("malformed", True, "m5"), START + timedelta(seconds=61))
    assert [(s.payload["count"], s.payload["delivery"]) for s in late] == [(2, "m4"), (1, "m5")]
    assert [(s.payload["reason"], s.payload["count"]) for s in ledger.held()] == [("bad-signature", 1)]


def test_what_is_held_at_shutdown_is_still_told() -> None:
    ledger = RefusalLedger(window_seconds=60, signed_per_window=1)
    for n in range(3):
        ledger.record(_refusal("malformed", True, f"m{n}"), START)
    ledger.record(_refusal("unsigned"), START)
    assert [(s.payload["reason"], s.payload["count"]) for s in ledger.held()] == [("malformed", 2)]


def test_the_log_line_is_one_line_with_what_was_refused() -> None:
    refusal = github.Refusal("bad-push", "'after' is not a commit id: 'x\ny'", True, delivery="d-9", size=42)
    line = log_line(refused_event(refusal))
    assert line == "refused (signed): 400 bad-push: 'after' is not a commit id: 'x y' (delivery d-9, size 42)"
    summary = log_line(refused_event(_refusal(), count=7, since=START))
    assert summary.startswith(f"refused (7 unsigned requests since {START.isoformat()}): 401 bad-signature")


# --- the app ------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def _app(emitted: list[events.EventSpec], clock: Clock | None = None, **options: Any) -> Any:
    return create_app(
        secret=lambda: SECRET,
        config=lambda: CONFIG,
        emit=emitted.append,
        seen=lambda event_id: False,
        clock=clock or Clock(),
        **options,
    )


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _exchange(app: Any, *requests: tuple[str, bytes | AsyncIterator[bytes] | None, dict[str, str]]) -> list[Any]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inbound") as client:
            answers = []
            for method, content, headers in requests:
                answers.append(
                    await client.request(
                        method, "/github" if method == "POST" else "/health", content=content, headers=headers
                    )
                )
            return answers

    return asyncio.run(run())


def test_a_large_push_streamed_in_chunks_starts_its_build() -> None:
    emitted: list[events.EventSpec] = []
    body = _large_push(3 * 1024 * 1024)
    [answer] = _exchange(_app(emitted, spool_bytes=64 * 1024), ("POST", _chunks(body), _headers(body)))
    assert answer.status_code == 202, answer.text
    assert [(spec.event, spec.payload["commit"]) for spec in emitted] == [(events.PUSH_RECEIVED, COMMIT)]


def test_unsigned_junk_is_counted_every_time_and_told_once_a_window(caplog: pytest.LogCaptureFixture) -> None:
    emitted: list[events.EventSpec] = []
    app = _app(emitted)
    junk = [("POST", b'{"junk": true}', {"x-github-event": "push"})] * 20
    forged = [("POST", b"{}", {"x-github-event": "push", "x-hub-signature-256": "sha256=" + "1" * 64})] * 5
    with caplog.at_level(logging.WARNING, logger="icd.inbound"):
        *answers, health = _exchange(app, *junk, *forged, ("GET", None, {}))
    assert {answer.status_code for answer in answers} == {401}
    assert health.json()["refused"] == {"signed": {}, "unsigned": {"bad-signature": 5, "unsigned": 20}}
    assert [(spec.payload["reason"], spec.payload["count"]) for spec in emitted] == [
        ("unsigned", 1),
        ("bad-signature", 1),
    ]
    assert [record.levelname for record in caplog.records] == ["WARNING", "WARNING"]


def test_a_signed_refusal_is_told_with_its_repository_and_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    emitted: list[events.EventSpec] = []
    body = _body(_push(after="<!channel>"))
    with caplog.at_level(logging.WARNING, logger="icd.inbound"):
        [answer] = _exchange(_app(emitted), ("POST", body, _headers(body, **{"x-github-delivery": "d-42"})))
    assert answer.status_code == 400
    [refused] = emitted
    assert refused.resource["icd.signed"] == "true"
    assert (refused.payload["repository"], refused.payload["delivery"]) == ("acmeinc/web", "d-42")
    assert "&lt;!channel&gt;" in refused.payload["detail"]
    told = json.dumps([refused.payload, refused.resource, [r.getMessage() for r in caplog.records]])
    assert SECRET.decode() not in told
    assert _signed(body) not in told


def test_a_body_that_does_not_arrive_in_time_is_refused_as_slow() -> None:
    emitted: list[events.EventSpec] = []
    never = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"ref": '
        await never.wait()  # a client that stops sending: the server's deadline ends the wait
        yield b"}"

    body = b"{}"
    [answer] = _exchange(_app(emitted, read_seconds=0.2), ("POST", stalled(), _headers(body)))
    assert answer.status_code == 408
    assert [(spec.payload["reason"], spec.payload["signed"]) for spec in emitted] == [("slow", False)]


def test_the_app_tells_a_window_summary_when_the_window_ends_without_another_request() -> None:
    emitted: list[events.EventSpec] = []
    summary_told = threading.Event()

    def emit(spec: events.EventSpec) -> None:
        emitted.append(spec)
        if spec.payload["count"] > 1:
            summary_told.set()

    clock = Clock()
    app = create_app(
        secret=lambda: SECRET,
        config=lambda: CONFIG,
        emit=emit,
        seen=lambda event_id: False,
        clock=clock,
        ledger=RefusalLedger(window_seconds=0.5),
    )

    async def run() -> None:
        async with (
            app.router.lifespan_context(app),  # where the summaries are told, as uvicorn runs it
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inbound") as client,
        ):
            for _ in range(3):
                answer = await client.post("/github", content=b"{}", headers={"x-github-event": "push"})
                assert answer.status_code == 401
            assert [spec.payload["count"] for spec in emitted] == [1]
            clock.now += timedelta(seconds=1)
            assert await asyncio.to_thread(summary_told.wait, 10), "the window's summary was never told"

    asyncio.run(run())
    assert [(spec.payload["reason"], spec.payload["count"]) for spec in emitted] == [("unsigned", 1), ("unsigned", 2)]
