"""Where the workspace queue's records live, behind one small interface (``queue.QueueStore``).

* :class:`S3QueueStore`: one sealed object per workspace in the registry's bucket, swapped with S3's
  conditional writes (``IfMatch`` on the ETag, ``IfNoneMatch`` to create), like every registry record. It
  sits beside the Terraform state and the saved plans it guards, and survives a reset of the Prefect
  server. Sealed (``icd/registry/signing.py``) so a record written outside the loop is refused, never obeyed.
* :class:`MemoryQueueStore`: the same contract in a dict, for the fast tests and one-process tools.
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import ValidationError

from icd.deploy.queue import QueueRecord
from icd.errors import RegistryIntegrityError
from icd.registry.s3 import S3Objects
from icd.registry.signing import Sealer
from icd.rules import check_workspace


class MemoryQueueStore:
    """Records in memory, with a version counter as the compare-and-swap token."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[QueueRecord, str]] = {}
        self._lock = threading.Lock()
        self._writes = 0

    def load(self, workspace: str) -> tuple[QueueRecord, str] | None:
        with self._lock:
            return self._records.get(workspace)

    def save(self, record: QueueRecord, *, expected: str | None) -> bool:
        with self._lock:
            current = self._records.get(record.workspace)
            if (current[1] if current else None) != expected:
                return False
            self._writes += 1
            self._records[record.workspace] = (record, str(self._writes))
            return True

    def workspaces(self) -> list[str]:
        with self._lock:
            return sorted(self._records)


class S3QueueStore:
    """Records as sealed objects ``<prefix>queues/<workspace>.json``; the ETag is the CAS token."""

    def __init__(self, s3_client: Any, bucket: str, prefix: str, *, sealer: Sealer) -> None:
        self._objects = S3Objects(s3_client, bucket)
        self._folder = f"{prefix}queues/"
        self._sealer = sealer
        self.bucket = bucket

    def _key(self, workspace: str) -> str:
        return f"{self._folder}{check_workspace(workspace)}.json"

    def load(self, workspace: str) -> tuple[QueueRecord, str] | None:
        key = self._key(workspace)
        found = self._objects.read(key)
        if found is None:
            return None
        where = f"s3://{self.bucket}/{key}"
        payload = self._sealer.open(key, found.body, where=where)
        try:
            record = QueueRecord.model_validate(payload)
        except ValidationError as exc:
            raise RegistryIntegrityError(
                f"{where} is sealed but is not a queue record: {exc.error_count()} errors"
            ) from exc
        if record.workspace != workspace:
            raise RegistryIntegrityError(f"{where} holds the queue of workspace {record.workspace!r}")
        return record, found.etag

    def save(self, record: QueueRecord, *, expected: str | None) -> bool:
        key = self._key(record.workspace)
        return self._objects.write(key, self._sealer.seal(key, record.model_dump(mode="json")), if_match=expected)

    def workspaces(self) -> list[str]:
        return sorted(key[len(self._folder) :].removesuffix(".json") for key in self._objects.list_keys(self._folder))
