"""A local stand-in for the few GitHub REST endpoints the deploy reports to, for tests and the offline demo.

It speaks enough of GitHub's wire format for ``githubkit.GitHub(token, base_url=standin.api_url)``:
deployments (https://docs.github.com/en/rest/deployments/deployments), deployment statuses
(https://docs.github.com/en/rest/deployments/statuses) and commit statuses
(https://docs.github.com/en/rest/commits/statuses). It checks what GitHub checks, so a wrong request fails
here as it would there: the token (``Authorization: Bearer <token>`` or ``token <token>``, else 401 "Bad
credentials"), JSON bodies (400), required fields, enums, types and the 140-character description (422), and a
deployment with ``required_contexts`` left out is refused (409) while the commit has a status that is not
``success``, as GitHub's default "every context must pass" does. Unlike GitHub, an unknown body field is a 422
too, so a misspelt field shows instead of being ignored.

``auto_inactive`` (default true) behaves as GitHub's: a ``success`` status adds an ``inactive`` status to the
environment's other non-transient, non-production deployments whose latest state is ``success``.

Faults: ``fail_next(n, status=502)`` answers the next ``n`` API requests with that status; ``down()`` closes the
listening socket (connections are refused, as in an outage) until ``up()`` opens it again on the same port.
What was sent is kept (``requests``, ``deployments``, ``statuses_of``, ``commit_statuses``); every accessor
is thread-safe. Run it on its own with ``python -m standins.github --port 8766``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

DEFAULT_TOKEN = "ghp_standin0000000000000000000000000000"  # noqa: S105  # a fixed fake token is the point
DOCS = "https://docs.github.com/rest"
DEPLOYMENT_STATES = ("error", "failure", "inactive", "in_progress", "queued", "pending", "success")
COMMIT_STATES = ("error", "failure", "pending", "success")
DESCRIPTION_LIMIT = 140
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO = r"/repos/(?P<owner>[A-Za-z0-9_.-]+)/(?P<repo>[A-Za-z0-9_.-]+)"
_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(_REPO + r"/deployments$"), "create_deployment"),
    ("GET", re.compile(_REPO + r"/deployments$"), "list_deployments"),
    ("GET", re.compile(_REPO + r"/deployments/(?P<id>\d+)$"), "get_deployment"),
    ("POST", re.compile(_REPO + r"/deployments/(?P<id>\d+)/statuses$"), "create_deployment_status"),
    ("GET", re.compile(_REPO + r"/deployments/(?P<id>\d+)/statuses$"), "list_deployment_statuses"),
    ("POST", re.compile(_REPO + r"/statuses/(?P<sha>[^/]+)$"), "create_commit_status"),
    ("GET", re.compile(_REPO + r"/commits/(?P<sha>[^/]+)/statuses$"), "list_commit_statuses"),
)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived, and what the stand-in answered."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int
    at: float  # time.time()


@dataclass(frozen=True)
class DeploymentStatusRecord:
    """A deployment status the stand-in holds (one that GitHub's ``auto_inactive`` added too)."""

    id: int
    deployment_id: int
    repository: str
    state: str
    description: str
    environment: str
    log_url: str
    environment_url: str
    created_at: datetime
    auto: bool = False  # added by auto_inactive, not posted


@dataclass
class _Deployment:
    id: int
    repository: str
    sha: str
    ref: str
    task: str
    environment: str
    payload: Any
    description: str | None
    transient_environment: bool
    production_environment: bool
    auto_merge: bool
    required_contexts: list[str] | None
    created_at: datetime
    statuses: list[DeploymentStatusRecord] = field(default_factory=list)

    @property
    def latest_state(self) -> str | None:
        return self.statuses[-1].state if self.statuses else None


class _Refusal(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"message": message, "documentation_url": DOCS, "status": str(status), **extra}


class GitHubStandIn:
    """A threaded HTTP server that answers like GitHub's REST API and records what it was sent.

    Use it as a context manager, or call ``start()`` / ``stop()``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = DEFAULT_TOKEN) -> None:
        self.host = host
        self.token = token
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._deployments: list[_Deployment] = []
        self._commit_statuses: list[dict[str, Any]] = []
        self._refs: dict[str, str] = {}
        self._serial = 0
        self._fail_next = 0
        self._fail_status = 502
        self._server: ThreadingHTTPServer | None = ThreadingHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        self._port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def api_url(self) -> str:
        """The ``base_url`` for ``githubkit.GitHub`` (as ``https://api.github.com``)."""
        return f"http://{self.host}:{self._port}"

    def start(self) -> GitHubStandIn:
        if self._thread is None and self._server is not None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"github-standin-{self._port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
        self._server = None

    def down(self) -> None:
        """An outage: the port refuses connections until :meth:`up`. What was received is kept."""
        self.stop()

    def up(self) -> None:
        """Back after :meth:`down`, on the same port (HTTPServer binds with SO_REUSEADDR)."""
        if self._server is None:
            self._server = ThreadingHTTPServer((self.host, self._port), _make_handler(self))
            self._server.daemon_threads = True
        self.start()

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def __enter__(self) -> GitHubStandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- set-up and faults ----------------------------------------------------------------------------

    def set_ref(self, name: str, sha: str) -> None:
        """A branch or tag a deployment's ``ref`` may name (a 40-hex sha needs none)."""
        with self._lock:
            self._refs[name] = sha

    def fail_next(self, n: int, status: int = 502) -> None:
        """Answer the next ``n`` API requests with ``status`` (GitHub's "Server Error" body)."""
        with self._lock:
            self._fail_next, self._fail_status = n, status

    # --- what was received ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def deployments(self, repository: str | None = None) -> list[dict[str, Any]]:
        """Deployments as GitHub shows them (oldest first), with ``states``: their statuses' states in order."""
        with self._lock:
            return [
                {**self._deployment_json(d), "states": [s.state for s in d.statuses]}
                for d in self._deployments
                if repository is None or d.repository == repository
            ]

    def statuses_of(self, deployment_id: int) -> list[DeploymentStatusRecord]:
        """A deployment's statuses, oldest first."""
        with self._lock:
            return [s for d in self._deployments if d.id == deployment_id for s in d.statuses]

    def commit_statuses(self, sha: str | None = None) -> list[dict[str, Any]]:
        """Commit statuses as created (oldest first), each with its ``repository`` and ``sha``."""
        with self._lock:
            return [dict(s) for s in self._commit_statuses if sha is None or s["sha"] == sha]

    def wait_for(self, predicate: Callable[[GitHubStandIn], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self)`` holds (checked whenever a request is recorded)."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self), timeout=timeout)

    # --- the API ----------------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        split = urlsplit(target)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        body: Any = None
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise _Refusal(400, "Problems parsing JSON") from exc
            status, answer = self._answer(method, split.path, query, headers, body)
        except _Refusal as refusal:
            status, answer = refusal.status, refusal.body
        with self._lock:
            self._requests.append(RecordedRequest(method, split.path, query, body, status, time.time()))
            self._lock.notify_all()
        return status, answer

    def _answer(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, Any]:
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                raise _Refusal(self._fail_status, "Server Error")
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "token") or credential != self.token:
            raise _Refusal(401, "Bad credentials")
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match and route_method == method:
                params = match.groupdict()
                repository = f"{params.pop('owner')}/{params.pop('repo')}"
                if method == "POST" and not isinstance(body, dict):
                    raise _Refusal(400, "Problems parsing JSON")
                with self._lock:
                    result: tuple[int, Any] = getattr(self, f"_{name}")(repository, params, query, body)
                    return result
        raise _Refusal(404, "Not Found")

    def _next_id(self) -> int:
        self._serial += 1
        return self._serial

    def _url(self, repository: str, rest: str = "") -> str:
        return f"{self.api_url}/repos/{repository}{rest}"

    def _find(self, repository: str, deployment_id: str) -> _Deployment:
        for deployment in self._deployments:
            if deployment.id == int(deployment_id) and deployment.repository == repository:
                return deployment
        raise _Refusal(404, "Not Found")

    def _create_deployment(
        self, repository: str, _params: dict[str, str], _query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        _check_fields(
            body,
            {
                "ref": str,
                "task": str,
                "auto_merge": bool,
                "required_contexts": list,
                "payload": (dict, str),
                "environment": str,
                "description": (str, type(None)),
                "transient_environment": bool,
                "production_environment": bool,
            },
            required=("ref",),
        )
        ref = body["ref"]
        sha = ref if _SHA.match(ref) else self._refs.get(ref)
        if sha is None:
            raise _Refusal(422, f"No ref found for: {ref}")
        required = body.get("required_contexts")
        if required is not None and not all(isinstance(context, str) for context in required):
            raise _Refusal(422, "Invalid request.\n\nFor 'properties/required_contexts', items must be strings.")
        # GitHub's default: every context on the commit must be success (required_contexts left out).
        latest: dict[str, str] = {}
        for status in self._commit_statuses:
            if status["sha"] == sha and status["repository"] == repository:
                latest[status["context"]] = status["state"]
        checked = latest if required is None else {c: latest.get(c, "missing") for c in required}
        failing = sorted(context for context, state in checked.items() if state != "success")
        if failing:
            raise _Refusal(409, f"Conflict: Commit status checks failed for {ref}.", contexts=failing)
        environment = body.get("environment", "production")
        deployment = _Deployment(
            id=self._next_id(),
            repository=repository,
            sha=sha,
            ref=ref,
            task=body.get("task", "deploy"),
            environment=environment,
            payload=body.get("payload", ""),
            description=body.get("description", ""),
            transient_environment=body.get("transient_environment", False),
            production_environment=body.get("production_environment", environment == "production"),
            auto_merge=body.get("auto_merge", True),
            required_contexts=required,
            created_at=_now(),
        )
        self._deployments.append(deployment)
        return 201, self._deployment_json(deployment)

    def _list_deployments(
        self, repository: str, _params: dict[str, str], query: dict[str, str], _body: Any
    ) -> tuple[int, Any]:
        found = [
            d
            for d in reversed(self._deployments)  # newest first, as GitHub lists them
            if d.repository == repository
            and all(query[key] == getattr(d, key) for key in ("sha", "ref", "task", "environment") if key in query)
        ]
        return 200, [self._deployment_json(d) for d in _page(found, query)]

    def _get_deployment(
        self, repository: str, params: dict[str, str], _query: dict[str, str], _body: Any
    ) -> tuple[int, Any]:
        return 200, self._deployment_json(self._find(repository, params["id"]))

    def _create_deployment_status(
        self, repository: str, params: dict[str, str], _query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        deployment = self._find(repository, params["id"])
        _check_fields(
            body,
            {
                "state": str,
                "target_url": str,
                "log_url": str,
                "description": str,
                "environment": str,
                "environment_url": str,
                "auto_inactive": bool,
            },
            required=("state",),
        )
        _check_enum("state", body["state"], DEPLOYMENT_STATES)
        _check_description(body.get("description", ""))
        if "environment" in body:
            deployment.environment = body["environment"]
        status = self._add_status(deployment, body)
        if body["state"] == "success" and body.get("auto_inactive", True):
            for other in self._deployments:
                if (
                    other is not deployment
                    and other.repository == repository
                    and other.environment == deployment.environment
                    and not other.transient_environment
                    and not other.production_environment
                    and other.latest_state == "success"
                ):
                    self._add_status(other, {"state": "inactive"}, auto=True)
        return 201, self._status_json(deployment, status)

    def _add_status(
        self, deployment: _Deployment, body: dict[str, Any], *, auto: bool = False
    ) -> DeploymentStatusRecord:
        log_url = body.get("log_url", body.get("target_url", ""))
        status = DeploymentStatusRecord(
            id=self._next_id(),
            deployment_id=deployment.id,
            repository=deployment.repository,
            state=body["state"],
            description=body.get("description", ""),
            environment=deployment.environment,
            log_url=log_url,
            environment_url=body.get("environment_url", ""),
            created_at=_now(),
            auto=auto,
        )
        deployment.statuses.append(status)
        return status

    def _list_deployment_statuses(
        self, repository: str, params: dict[str, str], query: dict[str, str], _body: Any
    ) -> tuple[int, Any]:
        deployment = self._find(repository, params["id"])
        newest_first = list(reversed(deployment.statuses))
        return 200, [self._status_json(deployment, s) for s in _page(newest_first, query)]

    def _create_commit_status(
        self, repository: str, params: dict[str, str], _query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        sha = params["sha"]
        if not _SHA.match(sha) and sha not in self._refs:
            raise _Refusal(422, f"No commit found for SHA: {sha}")
        sha = self._refs.get(sha, sha)
        _check_fields(
            body,
            {"state": str, "target_url": (str, type(None)), "description": (str, type(None)), "context": str},
            required=("state",),
        )
        _check_enum("state", body["state"], COMMIT_STATES)
        _check_description(body.get("description") or "")
        at = _stamp(_now())
        status = {
            "url": self._url(repository, f"/statuses/{sha}"),
            "avatar_url": None,
            "id": self._next_id(),
            "node_id": f"SC_standin{self._serial}",
            "state": body["state"],
            "description": body.get("description"),
            "target_url": body.get("target_url"),
            "context": body.get("context", "default"),
            "created_at": at,
            "updated_at": at,
            "creator": None,
            "repository": repository,
            "sha": sha,
        }
        self._commit_statuses.append(status)
        return 201, {k: v for k, v in status.items() if k not in ("repository", "sha")}

    def _list_commit_statuses(
        self, repository: str, params: dict[str, str], query: dict[str, str], _body: Any
    ) -> tuple[int, Any]:
        sha = self._refs.get(params["sha"], params["sha"])
        found = [
            {k: v for k, v in s.items() if k not in ("repository", "sha")}
            for s in reversed(self._commit_statuses)
            if s["sha"] == sha and s["repository"] == repository
        ]
        return 200, _page(found, query)

    def _deployment_json(self, d: _Deployment) -> dict[str, Any]:
        url = self._url(d.repository, f"/deployments/{d.id}")
        return {
            "url": url,
            "id": d.id,
            "node_id": f"DE_standin{d.id}",
            "sha": d.sha,
            "ref": d.ref,
            "task": d.task,
            "payload": d.payload,
            "original_environment": d.environment,
            "environment": d.environment,
            "description": d.description,
            "creator": None,
            "created_at": _stamp(d.created_at),
            "updated_at": _stamp(d.statuses[-1].created_at if d.statuses else d.created_at),
            "statuses_url": f"{url}/statuses",
            "repository_url": self._url(d.repository),
            "transient_environment": d.transient_environment,
            "production_environment": d.production_environment,
        }

    def _status_json(self, d: _Deployment, s: DeploymentStatusRecord) -> dict[str, Any]:
        deployment_url = self._url(d.repository, f"/deployments/{d.id}")
        return {
            "url": f"{deployment_url}/statuses/{s.id}",
            "id": s.id,
            "node_id": f"DES_standin{s.id}",
            "state": s.state,
            "creator": None,
            "description": s.description,
            "environment": s.environment,
            "target_url": s.log_url,
            "log_url": s.log_url,
            "environment_url": s.environment_url,
            "created_at": _stamp(s.created_at),
            "updated_at": _stamp(s.created_at),
            "deployment_url": deployment_url,
            "repository_url": self._url(d.repository),
        }


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(at: datetime) -> str:
    """GitHub's timestamps: ISO 8601, whole seconds, Z."""
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _page(items: list[Any], query: dict[str, str]) -> list[Any]:
    per_page = min(int(query.get("per_page", "30") or 30), 100)
    page = max(int(query.get("page", "1") or 1), 1)
    return items[(page - 1) * per_page : page * per_page]


def _check_fields(body: dict[str, Any], types: dict[str, Any], *, required: tuple[str, ...]) -> None:
    for name in required:
        if name not in body:
            raise _Refusal(422, f'Invalid request.\n\n"{name}" wasn\'t supplied.')
    for name, value in body.items():
        if name not in types:
            raise _Refusal(422, f"Invalid request.\n\n{name!r} is not a field of this endpoint (the stand-in's check).")
        expected = types[name]
        # bool is an int in Python, and GitHub refuses a number where a boolean goes (and the reverse).
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise _Refusal(
                422, f"Invalid request.\n\nFor 'properties/{name}', {json.dumps(value)} is not the right type."
            )


def _check_enum(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _Refusal(
            422, f"Invalid request.\n\nFor 'properties/{name}', {json.dumps(value)} is not one of {list(allowed)}."
        )


def _check_description(description: str) -> None:
    if len(description) > DESCRIPTION_LIMIT:
        raise _Refusal(
            422,
            "Validation Failed",
            errors=[
                {
                    "resource": "Status",
                    "field": "description",
                    "code": "custom",
                    "message": "description is too long (maximum is 140 characters)",
                }
            ],
        )


def _make_handler(standin: GitHubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {key.lower(): value for key, value in self.headers.items()}
            status, answer = standin.handle(self.command, self.path, headers, raw)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-GitHub-Media-Type", "github.v3; format=json")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:  # the stdlib's name
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local stand-in for GitHub's deployments and statuses API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    args = parser.parse_args(argv)
    standin = GitHubStandIn(args.host, args.port, args.token).start()
    print(f"GitHub stand-in on {standin.api_url} (token {standin.token})", flush=True)  # noqa: T201
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()


if __name__ == "__main__":
    main()
