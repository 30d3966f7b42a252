"""Talking to Consul's HTTP API through py-consul: the address rule and the one error translation."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
import requests

from icd.errors import ConsulError

DEFAULT_HTTP_PORT = 8500
DEFAULT_HTTPS_PORT = 8501
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConsulEndpoint:
    scheme: str
    host: str
    port: int


def parse_consul_address(address: str) -> ConsulEndpoint:
    """Split ``http://host:port``, ``https://host`` or bare ``host:port`` the way CONSUL_HTTP_ADDR is read."""
    text = address.strip()
    parsed = urllib.parse.urlsplit(text if "//" in text else f"//{text}")
    scheme = parsed.scheme or "http"
    if scheme not in ("http", "https"):
        raise ConsulError(f"Consul address {address!r} must use http or https")
    try:
        port = parsed.port
    except ValueError as exc:
        raise ConsulError(f"Consul address {address!r} has an invalid port") from exc
    if not parsed.hostname:
        raise ConsulError(f"Consul address {address!r} has no host")
    default_port = DEFAULT_HTTPS_PORT if scheme == "https" else DEFAULT_HTTP_PORT
    return ConsulEndpoint(scheme=scheme, host=parsed.hostname, port=port or default_port)


@contextmanager
def consul_errors(action: str) -> Iterator[None]:
    """Translate py-consul and requests failures into ``ConsulError`` naming what was being done."""
    try:
        yield
    except consul.ConsulException as exc:
        raise ConsulError(f"Consul refused to {action}: {exc}") from exc
    except requests.RequestException as exc:
        raise ConsulError(f"Consul could not be reached to {action}: {type(exc).__name__}") from exc


def consul_call(action: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` with its failures translated by :func:`consul_errors`."""
    with consul_errors(action):
        return func(*args, **kwargs)
