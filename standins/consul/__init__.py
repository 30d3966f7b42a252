"""A Consul agent stand-in that speaks the subset of Consul's HTTP API this project uses.

No Consul binary can be installed where tests and the offline demo run, so this server answers the same
requests with the same JSON shapes, status codes and headers as a single-node Consul agent in dev mode:
agent service/check registration with checks that really run (HTTP, TCP and TTL), health, catalog, KV, and
blocking queries (``?index=&wait=``) that wake as soon as the watched data changes.

Where the stand-in must choose, it does what Consul does and says so:
- a check starts ``critical`` unless its definition gives a ``Status``;
- a check update with the same status and output changes nothing and bumps no index;
- an update that only changes the output reaches the catalog (health endpoints) at most once per
  ``check_update_interval`` (Consul's anti-entropy default is 5 minutes); ``/v1/agent/checks`` shows it
  at once;
- check intervals below one second are raised to one second (Consul's ``MinInterval``);
- script checks are refused, as on an agent without ``enable_script_checks``.

Stdlib only. One scheduler thread keeps a heap of due times for every check and a small thread pool runs
the HTTP/TCP probes, so ten thousand TTL checks cost no threads.

Package layout, one concept a module:

- ``parsing``: Go durations, lenient JSON keys, query flags, ``ApiError``;
- ``state``: service, check and KV records, and the indexed state blocking queries wait on;
- ``checks``: the check scheduler and the HTTP/TCP probes;
- ``agent``: the write operations (registration, TTL updates, maintenance, KV writes);
- ``routes``: the route table and endpoint handlers, blocking queries included;
- ``server``: the HTTP transport (ACL, headers, clients that go away);
- ``standin``: ``ConsulStandIn`` and the command line (``python -m standins.consul``).
"""

from standins.consul.parsing import ApiError, format_duration, parse_duration
from standins.consul.standin import ConsulStandIn, main
from standins.consul.state import CHECK_STATUSES, CRITICAL, PASSING, WARNING

__all__ = [
    "CHECK_STATUSES",
    "CRITICAL",
    "PASSING",
    "WARNING",
    "ApiError",
    "ConsulStandIn",
    "format_duration",
    "main",
    "parse_duration",
]
