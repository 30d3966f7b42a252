"""The silence book in Consul KV: one JSON document at ``icd/silences``, swapped with ``?cas=``.

Beside the health watch's own state and the deploy windows (``docs/decisions.md`` says why not S3 or a
Prefect variable): the watch reads it with the client it already holds, and two operators (or an operator
and the watch closing a silence) can't overwrite each other: a lost swap re-reads and applies the change
again to what the other wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import consul
from pydantic import ValidationError

from icd.errors import ConsulError
from icd.health.consul import consul_call
from icd.health.silences import SCHEMA, SilenceBook

SILENCES_KEY = "icd/silences"
_MAX_CAS_ATTEMPTS = 5
T = TypeVar("T")


@dataclass(frozen=True)
class StoredBook:
    book: SilenceBook
    modify_index: int  # 0: no document yet (a CAS of 0 creates it only if still absent)


def decode_book(raw: bytes, *, where: str = f"Consul key {SILENCES_KEY}") -> SilenceBook:
    """The book, or :class:`ConsulError` naming what is wrong (another schema, a broken document)."""
    try:
        book = SilenceBook.model_validate_json(raw)
    except ValidationError as exc:
        raise ConsulError(
            f"{where} is not a silence book of schema {SCHEMA}: {exc.error_count()} errors, first: "
            f"{exc.errors()[0]['msg']}; fix or delete it (deleting ends every silence)"
        ) from exc
    if book.schema_version != SCHEMA:
        raise ConsulError(f"{where} has schema {book.schema_version}, but this reads schema {SCHEMA}")
    return book


class SilenceStore:
    def __init__(self, client: consul.Consul, key: str = SILENCES_KEY) -> None:
        self.client = client
        self.key = key

    def load(self) -> StoredBook:
        _, item = consul_call("read the silences", self.client.kv.get, self.key)
        if item is None:
            return StoredBook(SilenceBook(), 0)
        raw = item.get("Value")
        book = decode_book(raw, where=f"Consul key {self.key}") if raw else SilenceBook()
        return StoredBook(book, int(item["ModifyIndex"]))

    def save(self, book: SilenceBook, *, cas: int) -> bool:
        """Write only if the document is still at ``cas``; False when another writer came first."""
        body = book.model_dump_json(exclude_defaults=False).encode()
        return bool(consul_call("write the silences", self.client.kv.put, self.key, body, cas=cas))

    def change(self, edit: Callable[[SilenceBook], tuple[SilenceBook, T]]) -> tuple[SilenceBook, T]:
        """Apply ``edit`` to the stored book and write it with CAS, again on a fresh read when another writer
        came first. ``edit`` returns the new book (the same object: nothing to write) and its outcome."""
        for _attempt in range(_MAX_CAS_ATTEMPTS):
            stored = self.load()
            book, outcome = edit(stored.book)
            if book is stored.book or self.save(book, cas=stored.modify_index):
                return book, outcome
        raise ConsulError(f"the silences lost {_MAX_CAS_ATTEMPTS} compare-and-swap races in a row")
