"""icd.toml, the events it fans out, and the webhook's decisions: pure, as tables."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import httpx
import pytest

from cli.inbound import create_app
from icd import events
from icd.config import PipelineConfig, parse_config
from icd.errors import ConfigError
from icd.inbound.github import decide, signature_ok

CONFIG = parse_config(
    """
[namespaces."acmeinc/web"]
repository = "https://github.com/acmeinc/web.git"
repository_aliases = ["acmeinc/web"]
service_name = "web"

[namespaces."acmeinc/api"]
repository = "https://github.com/acmeinc/api.git"
branches = ["main", "release"]
service_name = "api"

[workspaces.staging]
follows = "acmeinc/web@latest"
stack = "examples/stacks/local"

[workspaces.canary]
follows = "acmeinc/web@staging"
stack = "examples/stacks/local"

[workspaces.production]
follows = "acmeinc/web@production"
stack = "examples/stacks/local"

[workspaces.api-staging]
follows = "acmeinc/api@latest"
stack = "examples/stacks/local"
promotes = "tested"
"""
)
SECRET = b"s3cret"
COMMIT = "a" * 40


def test_followers_and_promoted_channels() -> None:
    assert CONFIG.followers("acmeinc/web", "latest") == ["staging"]
    assert CONFIG.followers("acmeinc/web", "production") == ["production"]
    assert CONFIG.promoted_channel("staging") == "staging"
    assert CONFIG.promoted_channel("production") == "production" or CONFIG.promoted_channel("production") is None
    assert CONFIG.promoted_channel("api-staging") == "tested"
    assert CONFIG.namespaces_for_push({"acmeinc/web"}, "main") == ["acmeinc/web"]
    assert CONFIG.namespaces_for_push({"https://github.com/acmeinc/api.git"}, "release") == ["acmeinc/api"]
    assert CONFIG.namespaces_for_push({"acmeinc/web"}, "release") == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[workspaces.x]\nfollows = 'a/b@latest'\nstack = 's'\n", r"no \[namespaces\] entry defines"),
        ("[workspaces.x]\nfollows = 'a/b'\nstack = 's'\n", "follows"),
        ("[namespaces.'a/b']\nrepository = 'r'\nservice_name = 'Web'\n", "service_name"),
        ("[namespaces.'a/b']\nrepository = 'r'\nservice_name = 'w'\nbogus = 1\n", "bogus"),
        ("[workspaces.x\n", "not valid TOML"),
        (
            "[namespaces.'a/b']\nrepository = 'r'\nservice_name = 'w'\n"
            "[workspaces.x]\nfollows = 'a/b@latest'\nstack = 's'\napproval_timeout_seconds = 999999\n",
            "approval_timeout_seconds",
        ),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_config(text, where="icd.toml")


def test_a_registration_plans_followers_of_latest_and_a_move_followers_of_the_channel() -> None:
    registered = events.artifact_registered(
        namespace="acmeinc/web", version=3, commit=COMMIT, ref="main", build_run_id=None
    )
    [request] = events.plan_requests(CONFIG, registered)
    assert request.resource["icd.workspace"] == "staging"
    assert request.payload == {
        "workspace": "staging",
        "namespace": "acmeinc/web",
        "version": 3,
        "teardown": False,
        "because": events.ARTIFACT_REGISTERED,
        "by": "registration of v3",
        "request_id": str(request.id),  # the event is the request: the queue knows it by the same id
    }
    moved = events.channel_moved(
        namespace="acmeinc/web", channel="staging", from_version=2, to_version=3, by="x", reason="y"
    )
    [by_hand] = events.plan_requests(CONFIG, moved)
    assert (by_hand.payload["workspace"], by_hand.payload["by"]) == ("canary", "x")
    assert by_hand.id != request.id, "every request is its own"
    assert events.plan_requests(CONFIG, moved, skip="canary") == []
    revoked = events.version_revoked(namespace="acmeinc/web", version=3, by="x", reason="y")
    assert events.plan_requests(CONFIG, revoked) == []


def test_a_health_event_names_the_instance_its_version_and_deploy_run() -> None:
    spec = events.health_transition(
        kind="status",
        status="critical",
        previous="passing",
        service_name="web",
        service_id="web-staging-3",
        node="n1",
        meta={"namespace": "acmeinc/web", "artifact_version": "3", "deploy_run_id": "r-1"},
        expected=False,
        failing=["http: 500"],
        dedup_key="status:n1/web-staging-3:passing->critical@9",
    )
    assert spec.event == "icd.health.critical"
    assert spec.resource["prefect.resource.id"] == "icd.instance.n1/web-staging-3"
    assert {r["prefect.resource.role"]: r["prefect.resource.id"] for r in spec.related} == {
        "artifact-version": "icd.artifact.acmeinc/web.v3",
        "deploy-run": "prefect.flow-run.r-1",
    }


def _signed(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def _push(**changes: Any) -> bytes:
    payload = {
        "ref": "refs/heads/main",
        "after": COMMIT,
        "repository": {"full_name": "acmeinc/web", "clone_url": "https://github.com/acmeinc/web.git"},
        "pusher": {"name": "dev"},
        **changes,
    }
    return json.dumps(payload).encode()


def _headers(body: bytes, event: str = "push", **overrides: str) -> dict[str, str]:
    return {"x-github-event": event, "x-github-delivery": "d-1", "x-hub-signature-256": _signed(body), **overrides}


@pytest.mark.parametrize(
    ("body", "headers", "status", "starts"),
    [
        (b'{"zen": "hi"}', {"x-github-event": "ping"}, 200, 0),
        (_push(), {}, 202, 1),
        (_push(repository={"full_name": "other/repo"}), {}, 202, 0),
        (_push(ref="refs/heads/feature"), {}, 202, 0),
        (_push(ref="refs/tags/v1"), {}, 202, 0),
        (_push(deleted=True, after="0" * 40), {}, 202, 0),
        (_push(), {"x-hub-signature-256": "sha256=" + "0" * 64}, 401, 0),
        (_push(), {"x-hub-signature-256": ""}, 401, 0),
        (b"{nope", {}, 400, 0),
        (_push(), {"x-github-event": "issues"}, 400, 0),
        (_push(after="not-a-sha"), {}, 400, 0),
        (_push(), {"x-github-delivery": ""}, 400, 0),
    ],
)
def test_the_webhook_decides(body: bytes, headers: dict[str, str], status: int, starts: int) -> None:
    answer = decide(headers={**_headers(body), **headers}, body=body, secret=SECRET, config=CONFIG)
    assert answer.status == status, answer.body
    assert len(answer.events) == starts


def test_a_redelivery_is_the_same_event() -> None:
    body = _push()
    first = decide(headers=_headers(body), body=body, secret=SECRET, config=CONFIG)
    again = decide(headers=_headers(body), body=body, secret=SECRET, config=CONFIG)
    other = decide(headers=_headers(body, **{"x-github-delivery": "d-2"}), body=body, secret=SECRET, config=CONFIG)
    assert first.events[0].id == again.events[0].id != other.events[0].id


def test_signatures_are_compared_whole() -> None:
    body = b"{}"
    assert signature_ok(SECRET, body, _signed(body))
    assert not signature_ok(SECRET, body + b" ", _signed(body))
    assert not signature_ok(SECRET, body, _signed(body)[:-1])
    assert not signature_ok(b"", body, _signed(body))


def test_the_app_refuses_a_large_body_and_emits_what_it_decides() -> None:
    emitted: list[events.EventSpec] = []
    seen = {str(events.delivery_event_id("d-2", "acmeinc/web"))}
    app = create_app(
        secret=lambda: SECRET,
        config=lambda: CONFIG,
        emit=emitted.append,
        seen=lambda event_id: event_id in seen,
        max_bytes=1000,
    )

    async def exchange() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://inbound") as client:
            big, body = _push(padding="x" * 2000), _push()
            return [
                await client.post("/github", content=big, headers=_headers(big)),
                await client.post("/github", content=body, headers=_headers(body)),
                await client.post("/github", content=body, headers=_headers(body, **{"x-github-delivery": "d-2"})),
                await client.get("/health"),
            ]

    too_large, accepted, duplicate, health = asyncio.run(exchange())
    assert too_large.status_code == 413
    assert accepted.status_code == 202
    assert accepted.json()["namespaces"] == ["acmeinc/web"]
    assert duplicate.json()["duplicate_event_ids"] == list(seen)
    assert [spec.event for spec in emitted] == ["icd.push.refused", "icd.push.received"]
    assert health.json() == {"ok": True, "refused": {"signed": {}, "unsigned": {"too-large": 1}}, "slack_refused": {}}


def test_the_project_config_is_valid() -> None:
    from icd.paths import PROJECT_ROOT

    config = parse_config((PROJECT_ROOT / "icd.toml").read_text())
    assert isinstance(config, PipelineConfig)
    assert config.followers("acmeinc/web", "latest") == ["staging"]
