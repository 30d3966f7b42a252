"""S3 object access for the registry and the plan store: conditional writes and one error mapping.

Every call to S3 the project makes goes through :class:`S3Objects`, so botocore's errors are translated
into ours in one place (``RegistryStorageError`` names the bucket and key, never a credential), and a
lost conditional write is a return value, not an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from icd.errors import RegistryStorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import PutObjectRequestTypeDef
else:  # the stubs are a dev dependency; at run time the names only have to exist
    S3Client = object
    PutObjectRequestTypeDef = dict

T = TypeVar("T")
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def is_conflict(exc: ClientError) -> bool:
    """A conditional write lost: the key exists (IfNoneMatch) or changed (IfMatch)."""
    return _error_code(exc) in _CONFLICT_CODES


def is_not_found(exc: ClientError) -> bool:
    return _error_code(exc) in _NOT_FOUND_CODES


def storage_error(exc: Exception, *, bucket: str, key: str = "") -> RegistryStorageError:
    """The error to raise for a failed S3 call; names bucket and key, never credentials."""
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code == "NoSuchBucket":
            return RegistryStorageError(
                f"S3 bucket {bucket!r} does not exist (or is not visible to these credentials); "
                "create it or fix the registry block's bucket"
            )
        message = exc.response.get("Error", {}).get("Message", "")
        return RegistryStorageError(f"S3 refused a request for {where}: {code} {message}".rstrip())
    return RegistryStorageError(f"S3 could not be reached for {where}: {type(exc).__name__}")


@dataclass(frozen=True)
class StoredObject:
    body: bytes
    etag: str
    metadata: Mapping[str, str] = field(default_factory=dict)


class S3Objects:
    """Objects in one bucket: read, conditional create/swap, head, list. Thread-safe (boto3 clients are)."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def _fail(self, exc: Exception, key: str) -> RegistryStorageError:
        return storage_error(exc, bucket=self.bucket, key=key)

    def _get(self, key: str, call: Callable[[], T]) -> T | None:
        """``call()``, None when the key does not exist, our error for any other failure."""
        try:
            return call()
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise self._fail(exc, key) from exc
        except BotoCoreError as exc:
            raise self._fail(exc, key) from exc

    def read(self, key: str) -> StoredObject | None:
        """Body, ETag and user metadata, or None when the key does not exist."""

        def get() -> StoredObject:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return StoredObject(response["Body"].read(), response["ETag"], response.get("Metadata") or {})

        return self._get(key, get)

    def head(self, key: str) -> Mapping[str, str] | None:
        """The user metadata of ``key``, or None when it does not exist."""
        return self._get(key, lambda: self.client.head_object(Bucket=self.bucket, Key=key).get("Metadata") or {})

    def write(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None,
        content_type: str = "application/json",
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Create (``if_match=None``: only if absent) or swap (only if the ETag still matches).

        False when the condition failed, i.e. someone else won; S3 checks the body's SHA-256 on upload.
        """
        request: PutObjectRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "ContentType": content_type,
            "Metadata": dict(metadata or {}),
            "ChecksumAlgorithm": "SHA256",
        }
        if if_match is None:
            request["IfNoneMatch"] = "*"
        else:
            request["IfMatch"] = if_match
        try:
            self.client.put_object(**request)
        except ClientError as exc:
            # An IfMatch against a key deleted meanwhile is a lost race too.
            if is_conflict(exc) or (if_match is not None and is_not_found(exc)):
                return False
            raise self._fail(exc, key) from exc
        except BotoCoreError as exc:
            raise self._fail(exc, key) from exc
        return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        yield from (key for key, _ in self._list(prefix, delimiter=None))

    def list_folders(self, prefix: str) -> Iterator[str]:
        yield from (folder for _, folder in self._list(prefix, delimiter="/") if folder)

    def _list(self, prefix: str, *, delimiter: str | None) -> Iterator[tuple[str, str]]:
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            if delimiter:
                pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter=delimiter)
            else:
                pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"], ""
                for folder in page.get("CommonPrefixes", []):
                    yield "", folder["Prefix"]
        except ClientError as exc:
            raise self._fail(exc, prefix) from exc
        except BotoCoreError as exc:
            raise self._fail(exc, prefix) from exc
