"""A GitHub push webhook, verified and decided: which build it starts, or why it starts none.

Pure: ``decide`` takes the request as bytes and headers and returns the HTTP answer plus the event to emit,
so every row of the webhook's contract is a table test:

    ping                                    -> 200
    a push of a mapped repository + branch  -> 202, naming the icd.push.received event it emits
    unmapped repository or branch, a tag,
    a branch deletion                       -> 202, starting nothing and saying why
    bad or missing X-Hub-Signature-256      -> 401 (checked first, in constant time, over the raw body)
    malformed JSON                          -> 400
    an unknown event type                   -> 400
    a body over the limit                   -> 413 (checked by the server before it is read whole)

The event id is derived from ``X-GitHub-Delivery``, so a redelivered webhook is the same event and starts
one build however often it comes (Prefect's trigger service skips an event id it has seen; the server also
answers "duplicate" when the event is already stored).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from icd import events
from icd.config import PipelineConfig

MAX_BODY_BYTES = 1024 * 1024  # GitHub caps payloads at 25 MB; a push we can use is far smaller
_ZERO_SHA = "0" * 40
_KNOWN_EVENTS = frozenset({"ping", "push"})
# Any of these may be what icd.toml calls the repository.
_REPOSITORY_NAMES = ("full_name", "clone_url", "html_url", "ssh_url", "url")


@dataclass(frozen=True)
class Answer:
    status: int
    body: Mapping[str, Any]
    events: tuple[events.EventSpec, ...] = field(default=(), compare=False)


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    """``X-Hub-Signature-256`` is ``sha256=`` + HMAC-SHA256(secret, raw body), compared in constant time."""
    if not header or not header.startswith("sha256=") or not secret:
        return False
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.strip().encode())


def _refused(status: int, reason: str) -> Answer:
    return Answer(status, {"error": reason})


def _ignored(reason: str, **facts: str) -> Answer:
    return Answer(202, {"started": None, "reason": reason, **facts})


def decide(
    *, headers: Mapping[str, str], body: bytes, secret: bytes, config: PipelineConfig, max_bytes: int = MAX_BODY_BYTES
) -> Answer:
    """The answer to one webhook request (``headers`` with lower-case names)."""
    if len(body) > max_bytes:
        return _refused(413, f"the body is larger than {max_bytes} bytes")
    if not signature_ok(secret, body, headers.get("x-hub-signature-256")):
        return _refused(401, "missing or bad X-Hub-Signature-256")
    kind = headers.get("x-github-event", "")
    if kind not in _KNOWN_EVENTS:
        return _refused(400, f"unsupported event type {kind!r}; this endpoint takes ping and push")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _refused(400, "the body is not JSON")
    if not isinstance(payload, dict):
        return _refused(400, "the body is not a JSON object")
    if kind == "ping":
        return Answer(200, {"pong": True, "zen": str(payload.get("zen", ""))})
    return _push(payload, headers.get("x-github-delivery", ""), config)


def _push(payload: Mapping[str, Any], delivery: str, config: PipelineConfig) -> Answer:
    ref = payload.get("ref")
    repository = payload.get("repository") if isinstance(payload.get("repository"), dict) else None
    if not isinstance(ref, str) or repository is None:
        return _refused(400, "a push needs 'ref' and 'repository'")
    if not delivery:
        return _refused(400, "a push needs an X-GitHub-Delivery id")
    names = {
        str(repository[key]) for key in ("full_name", "clone_url", "html_url", "ssh_url", "url") if repository.get(key)
    }
    full_name = str(repository.get("full_name") or next(iter(sorted(names)), "?"))
    if ref.startswith("refs/tags/"):
        return _ignored("a tag push builds nothing; builds follow branches", ref=ref)
    if not ref.startswith("refs/heads/"):
        return _ignored(f"{ref!r} is not a branch", ref=ref)
    branch = ref.removeprefix("refs/heads/")
    commit = str(payload.get("after") or "")
    if payload.get("deleted") or commit == _ZERO_SHA:
        return _ignored("a branch deletion builds nothing", ref=ref)
    namespaces = config.namespaces_for_push(names, branch)
    if not namespaces:
        return _ignored(f"no namespace in icd.toml builds {full_name} {branch}", repository=full_name, branch=branch)
    if len(commit) != 40 or any(ch not in "0123456789abcdef" for ch in commit):
        return _refused(400, f"'after' is not a commit id: {commit!r}")
    pusher = payload.get("pusher") if isinstance(payload.get("pusher"), dict) else {}
    started = tuple(
        events.push_received(
            repository=full_name,
            branch=branch,
            commit=commit,
            namespace=namespace,
            delivery=delivery,
            pusher=str((pusher or {}).get("name", "")),
        )
        for namespace in namespaces
    )
    body = {
        "event": events.PUSH_RECEIVED,
        "event_ids": [str(event.id) for event in started],
        "namespaces": namespaces,
        "branch": branch,
        "commit": commit,
    }
    return Answer(202, body, started)
