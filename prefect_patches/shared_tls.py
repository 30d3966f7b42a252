"""One TLS context for every Prefect API client of a process whose API is plain ``http://``.

Prefect 3.9 builds a new TLS context for every API client it opens (``PrefectClient`` and
``SyncPrefectClient``), parsing the whole CA bundle each time: about 25 ms of CPU, even when the API URL is
``http://`` and the context is never used. A flow run opens about eight clients, the worker two per run it
submits; measured on the end-to-end tests, those contexts were a seventh of all the CPU they used.

``reuse_tls_context_for_plain_http()`` gives those clients one context, built once exactly as Prefect would
build it (``PREFECT_API_SSL_CERT_FILE`` or certifi's bundle; unverified if
``PREFECT_API_TLS_INSECURE_SKIP_VERIFY``). Clients of an ``https://`` API, and clients given their own
``verify``, are left to Prefect untouched. The worker, its fork server (so every flow run) and the inbound app
call it at start; a Prefect upgrade that changes the clients' constructors is caught by
``tests/test_prefect_tls.py``, and any change to them by ``prefect_patches/seams.py``.
"""

from __future__ import annotations

import functools
import ssl
import threading
from typing import Any

import certifi
from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

_APPLIED = "__icd_reuses_tls_context__"
_CONTEXTS: dict[tuple[bool, str], ssl.SSLContext] = {}
_LOCK = threading.Lock()


def shared_tls_context() -> ssl.SSLContext:
    """The context Prefect would build for a client under the current settings, built once per settings."""
    insecure = bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value())
    cert_file = "" if insecure else (PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
    with _LOCK:
        context = _CONTEXTS.get((insecure, cert_file))
        if context is None:
            if insecure:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context = ssl.create_default_context(cafile=cert_file)
            _CONTEXTS[(insecure, cert_file)] = context
        return context


def reuse_tls_context_for_plain_http() -> None:
    """Make this process's Prefect clients of an ``http://`` API share one TLS context (idempotent)."""
    for client_class in (PrefectClient, SyncPrefectClient):
        if getattr(client_class.__init__, _APPLIED, False):
            continue
        client_class.__init__ = _sharing(client_class.__init__)  # type: ignore[method-assign]


def _sharing(init: Any) -> Any:
    @functools.wraps(init)
    def __init__(self: Any, api: Any, *args: Any, httpx_settings: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if isinstance(api, str) and api.startswith("http://") and not (httpx_settings or {}).get("verify"):
            httpx_settings = {**(httpx_settings or {}), "verify": shared_tls_context()}
        init(self, api, *args, httpx_settings=httpx_settings, **kwargs)

    setattr(__init__, _APPLIED, True)
    return __init__
