"""``ConsulStandIn``: wires the state, the check scheduler and the HTTP front together; and the CLI."""

from __future__ import annotations

import argparse
import sys
import threading

from standins.consul.agent import Agent
from standins.consul.checks import MIN_CHECK_INTERVAL_SECONDS, CheckScheduler
from standins.consul.routes import Api
from standins.consul.server import HttpFront
from standins.consul.state import DEFAULT_CHECK_UPDATE_INTERVAL_SECONDS, ConsulState


class ConsulStandIn:
    """A single-node Consul agent over real HTTP on loopback; ``start()`` returns self. A context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        node_name: str = "standin-node",
        datacenter: str = "dc1",
        acl_token: str | None = None,
        *,
        check_update_interval: float = DEFAULT_CHECK_UPDATE_INTERVAL_SECONDS,
        min_check_interval: float = MIN_CHECK_INTERVAL_SECONDS,
        check_workers: int = 8,
    ) -> None:
        self._host = host
        self._port = port
        self._state = ConsulState(node_name, datacenter, host, check_update_interval)
        self._scheduler = CheckScheduler(self._state, min_check_interval, check_workers)
        self._http = HttpFront(Api(self._state, Agent(self._state, self._scheduler)), acl_token)

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> ConsulStandIn:
        self._port = self._http.start(self._host, self._port)
        self._scheduler.start()
        return self

    def stop(self) -> None:
        self._state.stop()
        self._http.stop()
        self._scheduler.stop()

    def __enter__(self) -> ConsulStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- properties -----------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def http_addr(self) -> str:
        return f"http://{self.address}"

    @property
    def node_name(self) -> str:
        return self._state.node_name

    @property
    def datacenter(self) -> str:
        return self._state.datacenter

    @property
    def acl_token(self) -> str | None:
        return self._http.acl_token

    @acl_token.setter
    def acl_token(self, token: str | None) -> None:
        self._http.acl_token = token

    @property
    def min_check_interval(self) -> float:
        return self._scheduler.min_check_interval

    @min_check_interval.setter
    def min_check_interval(self, seconds: float) -> None:
        self._scheduler.min_check_interval = seconds

    @property
    def waiting_queries(self) -> int:
        """Blocking queries parked right now, waiting for a change or their ``wait``; for tests to sync on."""
        with self._state.cond:
            return self._state.waiting_queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Consul HTTP API stand-in until interrupted.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--node-name", default="standin-node")
    parser.add_argument("--datacenter", default="dc1")
    parser.add_argument("--acl-token", default=None, help="require this X-Consul-Token on every request")
    args = parser.parse_args(argv)
    standin = ConsulStandIn(args.host, args.port, args.node_name, args.datacenter, args.acl_token).start()
    sys.stderr.write(f"Consul stand-in listening on {standin.http_addr} (node {args.node_name})\n")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0
