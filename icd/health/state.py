"""The health watch's state in Consul KV: a versioned schema with named fields, written with CAS.

The state lives at ``icd/health-watch/<watch_name>/state``, beside the data it describes (a Consul restore
brings both back together), surviving Prefect server resets, and written with ``?cas=<ModifyIndex>`` so
two overlapping runs can't both claim one transition: the loser's write fails, it re-reads the winner's
state and finds nothing left to report. A Prefect variable has no compare-and-swap.

The document carries ``schema`` and is checked on read: a document of another schema is refused with a
message naming both, never misread. Schema 3 added the flap-damping fields of each record; a schema 2 document
(written before damping) is read as records with no recent changes, not flapping, and paged if critical (the
watch that wrote it paged every critical transition), and is written back as schema 3. A watch that reads
only schema 2 refuses a schema 3 document by its version, rather than as a broken one.

It is compact JSON, zlib-compressed above 256 KiB so thousands of instances stay under Consul's 512 KiB value
limit.

**Saving cannot adopt another writer's index.** Consul's KV ``PUT ?cas=`` answers only true/false, so the
new ModifyIndex has to be read back, and a writer that slipped in between would hand us *its* index.
Every save therefore writes a fresh ``writer`` token; the read-back index is ours only if the document
still carries our token. Otherwise the save reports that it succeeded but was superseded, and the caller
reloads instead of swapping against an index it does not own.
"""

from __future__ import annotations

import base64
import json
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import consul
from pydantic import BaseModel, ConfigDict, ValidationError

from icd.errors import ConsulError
from icd.health.consul import consul_call
from icd.health.engine import InstanceRecord, WatchState
from icd.notify.message import Notification

SCHEMA = 3
_READABLE_SCHEMAS = (2, 3)
STATE_KEY_TEMPLATE = "icd/health-watch/{watch_name}/state"
_COMPRESS_ABOVE_BYTES = 256 * 1024
_ZLIB_PREFIX = b"zlib:"


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service_name: str
    node: str
    service_id: str
    alerted_status: str | None
    observed_status: str
    observed_since: float
    maintenance: bool = False
    last_alert_at: float | None = None
    meta: dict[str, str] | None = None
    # Schema 3: flap damping. A schema 2 row has none of them; a schema 3 row only those not at their default.
    recent_changes: list[float] = []
    flapping_since: float | None = None
    flap_changes: int = 0
    paged: bool | None = None  # absent: not paged (schema 3), or paged if it was announced critical (schema 2)


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int
    writer: str
    instances: dict[str, _Row]
    # The notifications themselves (pydantic validates the dataclass, and refuses a field it does not have), so a
    # field added to Notification with a default is stored and read without a change here. An item written
    # before messages had a kind is a health message: only the health watch has an outbox.
    outbox: list[Notification]
    outbox_since: float | None = None


def _ts(moment: datetime | None) -> float | None:
    return None if moment is None else round(moment.timestamp(), 3)


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class StoredState:
    state: WatchState
    outbox: tuple[Notification, ...]
    outbox_since: datetime | None
    modify_index: int  # 0: the key does not exist yet (a CAS of 0 creates it only if still absent)


def encode_state(
    state: WatchState,
    outbox: Sequence[Notification] = (),
    outbox_since: datetime | None = None,
    *,
    writer: str = "",
) -> bytes:
    document = {
        "schema_version": SCHEMA,
        "writer": writer,
        "instances": {
            key: {
                "service_name": rec.service_name,
                "node": rec.node,
                "service_id": rec.service_id,
                "alerted_status": rec.alerted_status,
                "observed_status": rec.observed_status,
                "observed_since": _ts(rec.observed_since),
                "maintenance": rec.maintenance,
                "last_alert_at": _ts(rec.last_alert_at),
                "meta": dict(rec.meta) if rec.meta is not None else None,
                "recent_changes": [_ts(moment) for moment in rec.recent_changes],
                "flapping_since": _ts(rec.flapping_since),
                "flap_changes": rec.flap_changes,
                "paged": True if rec.paged else None,
            }
            for key, rec in state.instances.items()
        },
        "outbox": list(outbox),
        "outbox_since": _ts(outbox_since),
    }
    # Fields at their default are left out: most records are passing and quiet, and a smaller document is
    # cheaper to write every round and stays uncompressed for longer.
    raw = _Document.model_validate(document).model_dump_json(exclude_defaults=True).encode()
    if len(raw) > _COMPRESS_ABOVE_BYTES:
        return _ZLIB_PREFIX + base64.b64encode(zlib.compress(raw, 6))
    return raw


def decode_state(
    raw: bytes, *, where: str = "the health watch state"
) -> tuple[WatchState, tuple[Notification, ...], datetime | None, str]:
    """State, outbox, outbox time and writer token; :class:`ConsulError` for another schema or a bad document."""
    try:
        if raw.startswith(_ZLIB_PREFIX):
            raw = zlib.decompress(base64.b64decode(raw[len(_ZLIB_PREFIX) :]))
        parsed: Any = json.loads(raw)
    except (ValueError, zlib.error) as exc:
        raise ConsulError(f"{where} is not a JSON document: {exc}") from exc
    found = parsed.get("schema_version") if isinstance(parsed, dict) else None
    if found not in _READABLE_SCHEMAS:
        raise ConsulError(
            f"{where} has schema {found!r}, but this watch reads schema {SCHEMA} (an older or newer watch wrote "
            "it); refusing to misread it. Delete the key to start afresh: the next run reports current health once."
        )
    for item in parsed.get("outbox") or ():
        if isinstance(item, dict):
            item.setdefault("kind", "health")
    try:
        document = _Document.model_validate(parsed)
    except ValidationError as exc:
        raise ConsulError(
            f"{where} breaks schema {found}: {exc.error_count()} errors, first: {exc.errors()[0]['msg']}"
        ) from exc
    instances = {
        key: InstanceRecord(
            service_name=row.service_name,
            node=row.node,
            service_id=row.service_id,
            alerted_status=row.alerted_status,
            observed_status=row.observed_status,
            observed_since=datetime.fromtimestamp(row.observed_since, UTC),
            maintenance=row.maintenance,
            last_alert_at=_dt(row.last_alert_at),
            meta=row.meta,
            recent_changes=tuple(datetime.fromtimestamp(moment, UTC) for moment in row.recent_changes),
            flapping_since=_dt(row.flapping_since),
            flap_changes=row.flap_changes,
            paged=bool(row.paged) if row.paged is not None or found != 2 else row.alerted_status == "critical",
        )
        for key, row in document.instances.items()
    }
    outbox = tuple(document.outbox)
    return WatchState(instances=instances), outbox, _dt(document.outbox_since), document.writer


def writer_of(raw: bytes) -> str | None:
    """The ``writer`` token of a stored document, read without checking or building the rest; ``None`` when
    it is not one of ours (:func:`decode_state` says why, when the state is loaded)."""
    try:
        if raw.startswith(_ZLIB_PREFIX):
            raw = zlib.decompress(base64.b64decode(raw[len(_ZLIB_PREFIX) :]))
        parsed: Any = json.loads(raw)
    except (ValueError, zlib.error):
        return None
    writer = parsed.get("writer") if isinstance(parsed, dict) else None
    return writer if isinstance(writer, str) else None


@dataclass(frozen=True)
class SaveResult:
    """``written``: our CAS won. ``modify_index``: the index of our write, or None if another writer has
    already replaced it (then reload before the next CAS), or if it was not read back yet (``confirm``).
    ``writer``: the token our write carries."""

    written: bool
    modify_index: int | None
    writer: str | None = None


class HealthStateStore:
    """The watch state in Consul KV, always written with ``?cas=`` against the last read ModifyIndex."""

    def __init__(self, client: consul.Consul, watch_name: str) -> None:
        self.client = client
        self.key = STATE_KEY_TEMPLATE.format(watch_name=watch_name)

    def load(self) -> StoredState:
        _, item = consul_call("read the health watch state", self.client.kv.get, self.key)
        if item is None or not item.get("Value"):
            return StoredState(WatchState(), (), None, int(item["ModifyIndex"]) if item else 0)
        state, outbox, since, _ = decode_state(item["Value"], where=f"Consul key {self.key}")
        return StoredState(state, outbox, since, int(item["ModifyIndex"]))

    def save(
        self,
        state: WatchState,
        *,
        cas: int,
        outbox: Sequence[Notification] = (),
        outbox_since: datetime | None = None,
        confirm: bool = True,
    ) -> SaveResult:
        """Write with CAS, then read the new ModifyIndex back (``confirm=False``: later, with :meth:`confirm`;
        a watch sends its alerts first, since the won CAS already makes them its own)."""
        writer = uuid.uuid4().hex
        body = encode_state(state, outbox, outbox_since, writer=writer)
        if not consul_call("write the health watch state", self.client.kv.put, self.key, body, cas=cas):
            return SaveResult(written=False, modify_index=None)
        return self.confirm(writer) if confirm else SaveResult(written=True, modify_index=None, writer=writer)

    def confirm(self, writer: str) -> SaveResult:
        """Read back the ModifyIndex of the write that carried ``writer``; None if another has replaced it."""
        _, item = consul_call("read the health watch state", self.client.kv.get, self.key)
        if item is None or not item.get("Value"):
            return SaveResult(written=True, modify_index=None, writer=writer)
        # Only the writer token is needed here (the rest is what we wrote): no full decode.
        ours = writer_of(item["Value"]) == writer
        return SaveResult(written=True, modify_index=int(item["ModifyIndex"]) if ours else None, writer=writer)
