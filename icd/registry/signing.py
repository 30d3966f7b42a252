"""Registry records that can't be altered unnoticed: every object is sealed with an HMAC-SHA256.

Anyone who can write to the bucket (a leaked S3 key, a compromised instance that got hold of one) could
otherwise rewrite a version's build facts, point a channel elsewhere or delete a revocation, and every
later deploy would trust it. So every registry object is an envelope::

    {"icd": 1, "payload": {...}, "hmac": "<hex>"}

whose HMAC covers the object's S3 key and the canonical payload bytes. Binding the key stops a valid
record being copied over another (v1's facts under v2's key). The signing key lives in the
``ArtifactRegistry`` block as a ``SecretStr``; the S3 credentials can't produce a valid seal, and no
deployed workload holds either. Reads verify before parsing and raise :class:`RegistryIntegrityError`
naming the object; why HMAC rather than public-key signatures is in ``docs/decisions.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from icd.errors import RegistryIntegrityError

ENVELOPE_VERSION = 1
MIN_KEY_BYTES = 16


def canonical(payload: Any) -> bytes:
    """The one byte form of a payload that is signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Sealer:
    """Seals and opens registry objects with one secret key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the registry signing key must be at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def _mac(self, object_key: str, payload: bytes) -> str:
        return hmac.new(self._key, object_key.encode() + b"\n" + payload, hashlib.sha256).hexdigest()

    def seal(self, object_key: str, payload: Any) -> bytes:
        body = canonical(payload)
        envelope = {"icd": ENVELOPE_VERSION, "payload": payload, "hmac": self._mac(object_key, body)}
        return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def open(self, object_key: str, body: bytes, *, where: str) -> Any:
        """The payload of a sealed object; :class:`RegistryIntegrityError` if it is not ours or was changed."""
        try:
            envelope = json.loads(body)
            payload = envelope["payload"]
            given = str(envelope["hmac"])
            version = envelope["icd"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryIntegrityError(f"{where} is not a sealed registry object ({type(exc).__name__})") from exc
        if version != ENVELOPE_VERSION:
            raise RegistryIntegrityError(f"{where} has envelope version {version!r}; this reader knows 1")
        if not hmac.compare_digest(given, self._mac(object_key, canonical(payload))):
            raise RegistryIntegrityError(
                f"{where} was altered outside the registry: its seal does not match its content; "
                "nothing that depends on it will be deployed"
            )
        return payload
