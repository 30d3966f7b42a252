"""A GitHub push webhook, verified and decided: which build it starts, or why it starts none.

Pure: the request's headers and its body, read by :class:`BodyReader`, give the HTTP answer plus the event to
emit, so every row of the webhook's contract is a table test (``decide`` takes the body as bytes):

    ping                                    -> 200
    a push of a mapped repository + branch  -> 202, naming the icd.push.received event it emits
    unmapped repository or branch, a tag,
    a branch deletion                       -> 202, starting nothing and saying why
    no X-Hub-Signature-256                  -> 401 unsigned         (refused before the body is read)
    a bad X-Hub-Signature-256               -> 401 bad-signature    (HMAC over the raw body, constant time)
    a body over 25 MiB                      -> 413 too-large        (signed if it was verifiable: see below)
    a body still arriving after 10 s        -> 408 slow             (answered by the server, cli/inbound.py)
    an unknown event type                   -> 400 unsupported-event
    malformed JSON, or not a JSON object    -> 400 malformed
    a push without ref, repository or
    X-GitHub-Delivery, or whose 'after'
    is not a commit id                      -> 400 bad-push

Every refusal carries a :class:`Refusal` (its reason, and whether the body's signature was verified), which
the server counts and turns into an ``icd.push.refused`` event (``icd/inbound/refusals.py``).

Memory is bounded whatever the size: the body is hashed chunk by chunk while it is spooled (in memory up to
1 MiB, then to a temporary file), and only the fields a push needs are taken from it, by a streaming JSON
parser (ijson over yajl), so the document is never built. GitHub caps payloads at 25 MB and does not deliver
larger ones; 25 MiB is accepted, so either reading of "MB" is covered. A body past the cap is still hashed,
not stored, up to twice the cap, so a signed one is known as signed and operators are told.

The event id is derived from ``X-GitHub-Delivery``, so a redelivered webhook is the same event and starts
one build however often it comes (Prefect's trigger service skips an event id it has seen; the server also
answers "duplicate" when the event is already stored).
"""

from __future__ import annotations

import hashlib
import hmac
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import ijson  # type: ignore[import-untyped]  # ships no type information

from icd import events
from icd.config import PipelineConfig

MAX_BODY_BYTES = 25 * 1024 * 1024  # GitHub's documented cap is 25 MB; 25 MiB covers either reading of MB
SPOOL_BYTES = 1024 * 1024  # a body larger than this goes to a temporary file while it is read
PARSE_BUFFER_BYTES = 64 * 1024
_ZERO_SHA = "0" * 40
_KNOWN_EVENTS = frozenset({"ping", "push"})
# Any of these may be what icd.toml calls the repository.
_REPOSITORY_NAMES = ("full_name", "clone_url", "html_url", "ssh_url", "url")
# The only fields read from a payload: top-level scalars, and scalars of these top-level objects.
_TOP_FIELDS = frozenset({"ref", "after", "deleted", "zen"})
_NESTED_FIELDS = {"repository": frozenset(_REPOSITORY_NAMES), "pusher": frozenset({"name"})}

# Why a request was refused: the vocabulary of icd.push.refused's ``icd.reason`` label and of /health.
TOO_LARGE = "too-large"
SLOW = "slow"
UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad-signature"
UNSUPPORTED_EVENT = "unsupported-event"
MALFORMED = "malformed"
BAD_PUSH = "bad-push"
STATUS = {
    TOO_LARGE: 413,
    SLOW: 408,
    UNSIGNED: 401,
    BAD_SIGNATURE: 401,
    UNSUPPORTED_EVENT: 400,
    MALFORMED: 400,
    BAD_PUSH: 400,
}


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, with what it said about itself. ``signed``: its signature was verified, so
    it came from GitHub; only then are ``repository`` (from the body) and the headers worth an operator's time.
    """

    reason: str
    detail: str
    signed: bool
    delivery: str = ""
    event_type: str = ""
    repository: str = ""
    size: int = 0

    @property
    def status(self) -> int:
        return STATUS[self.reason]


@dataclass(frozen=True)
class Answer:
    status: int
    body: Mapping[str, Any]
    events: tuple[events.EventSpec, ...] = field(default=(), compare=False)
    refusal: Refusal | None = field(default=None, compare=False)


class BodyReader:
    """One request body, read chunk by chunk: hashed for ``X-Hub-Signature-256`` as it arrives, spooled (in
    memory up to ``spool_bytes``, then in a temporary file) up to ``max_bytes``, past which it is only hashed
    (so a signed oversized body is still known as signed) until ``drain_bytes``, where reading stops."""

    def __init__(
        self,
        secret: bytes,
        *,
        max_bytes: int = MAX_BODY_BYTES,
        spool_bytes: int = SPOOL_BYTES,
        drain_bytes: int | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.drain_bytes = 2 * max_bytes if drain_bytes is None else drain_bytes
        self.size = 0
        self.complete = False
        self._keyed = bool(secret)
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)
        self._spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=spool_bytes)  # noqa: SIM115  # closed by close()

    @property
    def over_limit(self) -> bool:
        return self.size > self.max_bytes

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; False once reading should stop (past ``drain_bytes``: the rest is not read)."""
        self.size += len(chunk)
        if self.size > self.drain_bytes:
            return False
        self._mac.update(chunk)
        if self.over_limit:
            self._spool.truncate(0)  # no disk kept for a body that is refused anyway
        else:
            self._spool.write(chunk)
        return True

    def finish(self) -> None:
        """The stream ended: the whole body was hashed, so its signature can be verified."""
        self.complete = True

    def signature_ok(self, header: str | None) -> bool:
        return self.complete and self._keyed and _signature_matches(self._mac.hexdigest(), header)

    def rewound(self) -> IO[bytes]:
        self._spool.seek(0)
        return self._spool

    def close(self) -> None:
        self._spool.close()

    def __enter__(self) -> BodyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signature_matches(hexdigest: str, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(("sha256=" + hexdigest).encode(), header.strip().encode())


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    """``X-Hub-Signature-256`` is ``sha256=`` + HMAC-SHA256(secret, raw body), compared in constant time."""
    return bool(secret) and _signature_matches(hmac.new(secret, body, hashlib.sha256).hexdigest(), header)


class MalformedBody(ValueError):
    pass


CONTAINER = object()  # the value of a field that is an object or an array, which no field of ours may be


@dataclass(frozen=True)
class Fields:
    """What a ping or a push needs from a payload, each key's last value as ``json.loads`` would keep it."""

    top: Mapping[str, object]
    repository: Mapping[str, object] | None
    pusher: Mapping[str, object] | None


def read_fields(stream: IO[bytes]) -> Fields:
    """The fields of :class:`Fields` from a JSON object, read as a stream of tokens: nothing else is kept, and
    the whole document is still checked (trailing garbage, bad UTF-8 and truncation are malformed)."""
    tokens: Iterator[tuple[str, Any]] = ijson.basic_parse(stream, use_float=True, buf_size=PARSE_BUFFER_BYTES)
    top: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {}  # repository and pusher, when they are objects
    # For each open container below the root: the key it sits under (None inside an array).
    opened: list[str | None] = []
    key: str | None = None  # the last key read in the innermost open object
    try:
        first, _ = next(tokens)
        if first != "start_map":
            raise MalformedBody("the body is not a JSON object")
        for parsed, value in tokens:
            if parsed == "map_key":
                key = value
            elif parsed in ("end_map", "end_array"):
                key = opened.pop() if opened else None
            else:
                starts = parsed in ("start_map", "start_array")
                _keep(top, nested, opened, key, CONTAINER if starts else value, parsed == "start_map")
                if starts:
                    opened.append(key)
                    key = None
    except (ijson.JSONError, UnicodeDecodeError) as error:  # ijson's message quotes the body: never shown
        raise MalformedBody("the body is not JSON") from error
    return Fields(top, nested.get("repository"), nested.get("pusher"))


def _keep(
    top: dict[str, object],
    nested: dict[str, dict[str, object]],
    opened: list[str | None],
    key: str | None,
    value: object,
    is_object: bool,
) -> None:
    """Record ``value`` of ``key`` if it is one of the fields; a later value of a key replaces an earlier one."""
    if key is None:  # an array's item
        return
    if not opened:
        nested.pop(key, None)
        if key in _TOP_FIELDS:
            top[key] = value
        if is_object and key in _NESTED_FIELDS:
            nested[key] = {}
    elif len(opened) == 1 and opened[0] in nested:
        parent = nested[opened[0]]
        if key in _NESTED_FIELDS[str(opened[0])]:
            parent[key] = None if value is CONTAINER else value


def _refused(reason: str, detail: str, headers: Mapping[str, str], *, signed: bool, **facts: Any) -> Answer:
    refusal = Refusal(
        reason,
        detail,
        signed,
        delivery=headers.get("x-github-delivery", ""),
        event_type=headers.get("x-github-event", ""),
        **facts,
    )
    return Answer(refusal.status, {"error": detail, "reason": reason}, refusal=refusal)


def _ignored(reason: str, **facts: str) -> Answer:
    return Answer(202, {"started": None, "reason": reason, **facts})


def refuse_unread(headers: Mapping[str, str], body: BodyReader) -> Answer | None:
    """What can be refused from the headers alone, before any of the body is read: a declared length past
    what would be hashed (such a body can't be verified), and a request without a signature."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body.drain_bytes:
        detail = f"the body is larger than {body.max_bytes} bytes"
        return _refused(TOO_LARGE, detail, headers, signed=False, size=int(declared))
    if not headers.get("x-hub-signature-256"):
        return _refused(UNSIGNED, "missing X-Hub-Signature-256", headers, signed=False)
    return None


def too_slow(headers: Mapping[str, str], body: BodyReader, seconds: float) -> Answer:
    """A body that had not arrived after ``seconds`` (GitHub itself gives up after 10 s): not verifiable."""
    detail = f"the body did not arrive within {seconds:g} s"
    return _refused(SLOW, detail, headers, signed=False, size=body.size)


def decide_read(headers: Mapping[str, str], body: BodyReader, config: PipelineConfig) -> Answer:
    """The answer to one request whose body ``body`` read (``headers`` with lower-case names)."""
    signed = body.signature_ok(headers.get("x-hub-signature-256"))
    if body.over_limit:
        detail = f"the body is larger than {body.max_bytes} bytes"
        return _refused(TOO_LARGE, detail, headers, signed=signed, size=body.size)
    if not signed:
        return _refused(BAD_SIGNATURE, "bad X-Hub-Signature-256", headers, signed=False, size=body.size)
    try:
        fields: Fields | None = read_fields(body.rewound())
        malformed = ""
    except MalformedBody as error:
        fields, malformed = None, str(error)
    repository = _full_name(fields.repository) if fields and fields.repository is not None else ""
    kind = headers.get("x-github-event", "")
    if kind not in _KNOWN_EVENTS:
        detail = f"unsupported event type {kind!r}; this endpoint takes ping and push"
        return _refused(UNSUPPORTED_EVENT, detail, headers, signed=True, repository=repository, size=body.size)
    if fields is None:
        return _refused(MALFORMED, malformed, headers, signed=True, size=body.size)
    if kind == "ping":
        zen = fields.top.get("zen")
        return Answer(200, {"pong": True, "zen": zen if isinstance(zen, str) else ""})
    return _push(fields, headers, config, size=body.size)


def decide(
    *, headers: Mapping[str, str], body: bytes, secret: bytes, config: PipelineConfig, max_bytes: int = MAX_BODY_BYTES
) -> Answer:
    """The answer to one webhook request whose body is in memory (the table tests; the server streams)."""
    with BodyReader(secret, max_bytes=max_bytes) as reader:
        early = refuse_unread(headers, reader)
        if early is not None:
            return early
        if reader.feed(body):
            reader.finish()
        return decide_read(headers, reader, config)


def _full_name(repository: Mapping[str, object]) -> str:
    names = _names(repository)
    return str(repository.get("full_name") or next(iter(sorted(names)), "?"))


def _names(repository: Mapping[str, object]) -> set[str]:
    return {str(repository[key]) for key in _REPOSITORY_NAMES if repository.get(key)}


def _push(fields: Fields, headers: Mapping[str, str], config: PipelineConfig, *, size: int) -> Answer:
    """A verified push: the events it starts, why it starts none, or why it is refused."""
    repository = fields.repository
    full_name = _full_name(repository) if repository is not None else ""

    def bad(detail: str) -> Answer:
        return _refused(BAD_PUSH, detail, headers, signed=True, repository=full_name, size=size)

    ref = fields.top.get("ref")
    if not isinstance(ref, str) or repository is None:
        return bad("a push needs 'ref' and 'repository'")
    delivery = headers.get("x-github-delivery", "")
    if not delivery:
        return bad("a push needs an X-GitHub-Delivery id")
    names = _names(repository)
    if ref.startswith("refs/tags/"):
        return _ignored("a tag push builds nothing; builds follow branches", ref=ref)
    if not ref.startswith("refs/heads/"):
        return _ignored(f"{ref!r} is not a branch", ref=ref)
    branch = ref.removeprefix("refs/heads/")
    after = fields.top.get("after")
    commit = after if isinstance(after, str) else ""
    if fields.top.get("deleted") is True or commit == _ZERO_SHA:
        return _ignored("a branch deletion builds nothing", ref=ref)
    namespaces = config.namespaces_for_push(names, branch)
    if not namespaces:
        return _ignored(f"no namespace in icd.toml builds {full_name} {branch}", repository=full_name, branch=branch)
    if len(commit) != 40 or any(ch not in "0123456789abcdef" for ch in commit):
        return bad(f"'after' is not a commit id: {commit!r}")
    pusher = (fields.pusher or {}).get("name")
    started = tuple(
        events.push_received(
            repository=full_name,
            branch=branch,
            commit=commit,
            namespace=namespace,
            delivery=delivery,
            pusher=pusher if isinstance(pusher, str) else "",
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
