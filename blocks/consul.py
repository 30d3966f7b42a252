"""The Consul connection block: where the agent is and its ACL token; hands out a cached py-consul client."""

from __future__ import annotations

import consul
from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr, SecretStr

from icd.health.consul import ConsulEndpoint, parse_consul_address


class ConsulConnection(Block):
    """Where a Consul agent's HTTP API is and how to talk to it.

    Example:
        ```python
        client = ConsulConnection.load("prod").get_client()
        with consul_errors("list services"):   # icd.health.consul
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

    _client: consul.Consul | None = PrivateAttr(default=None)

    def endpoint(self) -> ConsulEndpoint:
        return parse_consul_address(self.address)

    def get_client(self) -> consul.Consul:
        """A py-consul client configured only from this block (the CONSUL_HTTP_* environment is ignored)."""
        if self._client is None:
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
            self._client = client
        return self._client
