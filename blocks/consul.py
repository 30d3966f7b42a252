"""The Consul connection block: where the agent is and its ACL token; hands out py-consul clients."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import consul
import requests
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from tasks.errors import ConsulError

DEFAULT_HTTP_PORT = 8500
DEFAULT_HTTPS_PORT = 8501


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


class ConsulConnection(Block):
    """Where a Consul agent's HTTP API is and how to talk to it.

    Example:
        ```python
        connection = ConsulConnection.load("prod")
        client = connection.get_client()
        with consul_errors("list services"):
            client.catalog.services()
        ```
    """

    _block_type_name = "Consul Connection"
    _description = "Address, ACL token and TLS settings of a Consul agent's HTTP API."

    address: str = Field(
        default="http://127.0.0.1:8500",
        description="The agent's HTTP API, as CONSUL_HTTP_ADDR: http(s)://host:port.",
    )
    token: SecretStr | None = Field(default=None, description="ACL token sent as X-Consul-Token.")
    datacenter: str | None = Field(default=None, description="Datacenter to query; the agent's own if unset.")
    timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long to wait for the agent to answer; blocking queries add their wait to it.",
    )
    verify_tls: bool = Field(default=True, description="Verify the agent's TLS certificate (https only).")

    def endpoint(self) -> ConsulEndpoint:
        return parse_consul_address(self.address)

    def get_client(self) -> consul.Consul:
        """A py-consul client configured only from this block (the CONSUL_HTTP_* environment is ignored)."""
        endpoint = self.endpoint()
        secret = self.token.get_secret_value() if self.token is not None else None
        client = consul.Consul(
            host=endpoint.host,
            port=endpoint.port,
            token=secret,
            scheme=endpoint.scheme,
            dc=self.datacenter,
            verify=self.verify_tls,
            connections_timeout=self.timeout_seconds,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override the token it was given; the block is the one source.
        client.token = secret
        return client

    def leader(self) -> str:
        """The Raft leader's address; raises ``ConsulError`` if the agent can't be reached or refuses."""
        with consul_errors("read the leader"):
            leader = self.get_client().status.leader()
        if not isinstance(leader, str):
            raise ConsulError(f"Consul answered an unexpected leader: {leader!r}")
        return leader
