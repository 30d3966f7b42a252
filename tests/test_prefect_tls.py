"""prefect_patches/shared_tls.py: Prefect clients of an http:// API share one TLS context; everything else is
Prefect's."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

from prefect_patches import shared_tls


@pytest.fixture
def contexts_built(monkeypatch: pytest.MonkeyPatch) -> list[ssl.SSLContext]:
    """Every TLS context built from now on (by Prefect or by shared_tls), with shared_tls's cache empty."""
    built: list[ssl.SSLContext] = []
    original = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    monkeypatch.setattr(shared_tls, "_CONTEXTS", {})
    shared_tls.reuse_tls_context_for_plain_http()
    shared_tls.reuse_tls_context_for_plain_http()  # idempotent: wrapped once
    return built


CLIENTS: list[type[PrefectClient] | type[SyncPrefectClient]] = [PrefectClient, SyncPrefectClient]


def test_clients_of_an_http_api_build_one_context_between_them(contexts_built: list[ssl.SSLContext]) -> None:
    for make in CLIENTS * 3:
        make("http://127.0.0.1:4200/api")
    assert len(contexts_built) == 1
    [context] = contexts_built
    # Built as Prefect builds it: verifying, against a CA bundle.
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.get_ca_certs()


def test_clients_of_an_https_api_are_left_to_prefect(contexts_built: list[ssl.SSLContext]) -> None:
    for make in CLIENTS:
        make("https://prefect.example.com/api")
    assert len(contexts_built) == len(CLIENTS), "each https client builds its own, as Prefect does"


def test_a_client_given_its_own_context_keeps_it(contexts_built: list[ssl.SSLContext]) -> None:
    own = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for make in CLIENTS:
        make("http://127.0.0.1:4200/api", httpx_settings={"verify": own})
    assert contexts_built == []


def test_the_insecure_setting_is_kept(contexts_built: list[ssl.SSLContext]) -> None:
    with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        SyncPrefectClient("http://127.0.0.1:4200/api")
        context = shared_tls.shared_tls_context()
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    assert shared_tls.shared_tls_context() is not context, "the verifying context is another one"
