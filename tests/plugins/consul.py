"""Fixtures: a Consul stand-in over real HTTP, a py-consul client and a ConsulConnection block for it.

``consul_http_addr`` is the contract suite's target: a real agent when ``CONSUL_HTTP_ADDR`` is set (with
``CONSUL_HTTP_TOKEN`` if its ACLs need one), otherwise a fresh stand-in.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import consul
import pytest
import requests

from blocks.consul import ConsulConnection
from standins.consul import ConsulStandIn


class CountingClient:
    """A real py-consul client whose HTTP requests are counted by path (a requests response hook)."""

    def __init__(self, http_addr: str) -> None:
        host, port = http_addr.removeprefix("http://").split(":")
        self.client = consul.Consul(host=host, port=int(port))
        self.paths: list[str] = []
        session: requests.Session = self.client.http.session
        session.hooks["response"].append(self._count)

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.paths.append(urllib.parse.urlsplit(response.url).path)

    def count(self, path: str) -> int:
        return self.paths.count(path)


@pytest.fixture
def consul_standin() -> Iterator[ConsulStandIn]:
    """A started stand-in on a free loopback port, stopped after the test."""
    with ConsulStandIn() as standin:
        yield standin


@pytest.fixture
def consul_client(consul_standin: ConsulStandIn) -> consul.Consul:
    host, port = consul_standin.address.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port), token=None)


@pytest.fixture
def consul_connection(consul_standin: ConsulStandIn) -> ConsulConnection:
    """An unsaved block pointing at the stand-in."""
    return ConsulConnection(address=consul_standin.http_addr, timeout_seconds=5.0)


@pytest.fixture
def consul_http_addr() -> Iterator[str]:
    """``http(s)://host:port`` of a real agent (CONSUL_HTTP_ADDR) or of a fresh stand-in."""
    real = os.environ.get("CONSUL_HTTP_ADDR")
    if real:
        yield real if "://" in real else f"http://{real}"
        return
    with ConsulStandIn() as standin:
        yield standin.http_addr
