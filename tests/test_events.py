"""The loop through events, end to end: the webhook, the triggers of prefect.yaml, the automations, the
Event Feed. Everything here goes through the real server's trigger service; no flow function is called."""

from __future__ import annotations

import json
import uuid
from typing import Any

import consul
import httpx
import pytest
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent
from prefect.states import Cancelling

from examples.local_env import api_client, deliver_webhook, git, github_push
from icd import operations
from icd.config import load_config
from tests.helpers import consul_instances
from tests.plugins.deploy_env import ENDED, WEBHOOK_SECRET, DeployEnv, Names
from tests.waiting import wait_until


def stored_events(name: str, **labels: str) -> list[ReceivedEvent]:
    """Events the server stored (it stores in batches, so callers poll)."""
    resource = EventResourceFilter(labels={key: [value] for key, value in labels.items()}) if labels else None
    page = api_client().read_events(
        filter=EventFilter(event=EventNameFilter(name=[name]), resource=resource),  # type: ignore[arg-type]
        limit=50,
    )
    return list(page.events)


def webhook(env: DeployEnv, names: Names, payload: object, **options: Any) -> httpx.Response:
    options.setdefault("delivery", str(uuid.uuid4()))
    return deliver_webhook(f"{env.inbound_url}/github", WEBHOOK_SECRET, payload, **options)


def push_of(env: DeployEnv, names: Names, commit: str, branch: str = "main", **changes: object) -> dict[str, Any]:
    alias = env.namespaces[names.namespace]["repository_aliases"][0]  # type: ignore[index]
    # Known only by its alias: every test's namespace builds from the same local repository.
    payload = github_push(
        full_name=str(alias), clone_url=f"https://github.com/{alias}.git", branch=branch, after=commit
    )
    payload.update(changes)
    return payload


def large_push(env: DeployEnv, names: Names, commit: str, size: int, branch: str = "main") -> dict[str, Any]:
    """A push as GitHub sends a large one: many commits, each listing the files it touched."""
    files = [f"src/module_{n}/handler_{n}.py" for n in range(200)]
    pushed = {"id": commit, "message": "a change", "added": files, "modified": files, "removed": []}
    return push_of(env, names, commit, branch, commits=[pushed] * (size // len(json.dumps(pushed)) + 1))


def refused_counts(env: DeployEnv) -> dict[str, dict[str, int]]:
    """What icd-inbound's /health counts as refused, by signed / unsigned and reason."""
    counts: dict[str, dict[str, int]] = httpx.get(f"{env.inbound_url}/health", timeout=10).json()["refused"]
    return counts


@pytest.mark.parametrize(
    ("case", "status", "says", "counted"),
    [
        ("ping", 200, "pong", None),
        ("unmapped-repository", 202, "no namespace in icd.toml builds", None),
        ("unmapped-branch", 202, "no namespace in icd.toml builds", None),
        ("tag", 202, "a tag push builds nothing", None),
        ("deletion", 202, "a branch deletion builds nothing", None),
        ("bad-signature", 401, "X-Hub-Signature-256", ("unsigned", "bad-signature")),
        ("missing-signature", 401, "X-Hub-Signature-256", ("unsigned", "unsigned")),
        ("malformed-json", 400, "not JSON", ("signed", "malformed")),
        # A 2 MB push (over the old 1 MiB cap) is read whole and decided: this one's branch builds nothing.
        ("large-unmapped-branch", 202, "no namespace in icd.toml builds", None),
        ("unknown-event", 400, "unsupported event type", ("signed", "unsupported-event")),
    ],
)
def test_the_webhook_answers_every_row_and_starts_nothing_it_should_not(
    deploy_env: DeployEnv, case: str, status: int, says: str, counted: tuple[str, str] | None
) -> None:
    env = deploy_env
    names = env.service()
    commit = git(env.repo.path, "rev-parse", "HEAD")
    push = push_of(env, names, commit)
    requests: dict[str, tuple[object, dict[str, Any]]] = {
        "ping": ({"zen": "Keep it logically awesome.", "hook_id": 1}, {"event": "ping"}),
        "unmapped-repository": ({**push, "repository": {"full_name": "someone/else"}}, {}),
        "unmapped-branch": (push_of(env, names, commit, branch="feature"), {}),
        "tag": ({**push, "ref": "refs/tags/v1"}, {}),
        "deletion": ({**push, "deleted": True, "after": "0" * 40}, {}),
        "bad-signature": (push, {"signature": "sha256=" + "0" * 64}),
        "missing-signature": (push, {"signature": False}),
        "malformed-json": (b"{not json", {}),
        "large-unmapped-branch": (large_push(env, names, commit, 2 * 1024 * 1024, branch="feature"), {}),
        "unknown-event": (push, {"event": "issues"}),
    }
    payload, options = requests[case]
    before = refused_counts(env)
    answer = webhook(env, names, payload, **options)

    assert answer.status_code == status, answer.text
    assert says in answer.text
    if counted is not None:
        signed, reason = counted
        assert refused_counts(env)[signed].get(reason, 0) == before[signed].get(reason, 0) + 1
    else:
        assert refused_counts(env) == before
    assert stored_events("icd.push.received", **{"icd.namespace": names.namespace}) == []
    assert env.runs_of("build-artifact", namespace=names.namespace) == []


def refusals_of(delivery: str, reason: str) -> list[ReceivedEvent]:
    """The stored icd.push.refused events that name ``delivery`` (a summary names the last one it holds)."""
    return [
        event
        for event in stored_events("icd.push.refused", **{"icd.reason": reason})
        if event.payload["delivery"] == delivery
    ]


def test_a_signed_8_mb_push_builds(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    commit = git(env.repo.path, "rev-parse", "HEAD")
    payload = large_push(env, names, commit, 8 * 1024 * 1024)
    assert len(json.dumps(payload)) > 8 * 1024 * 1024

    answer = webhook(env, names, payload)
    assert answer.status_code == 202, answer.text
    [received] = wait_until(
        lambda: stored_events("icd.push.received", **{"icd.namespace": names.namespace}), timeout=30
    )
    assert (received.payload["commit"], received.payload["pusher"]) == (commit, "dev")
    [build] = wait_until(lambda: env.runs_of("build-artifact", namespace=names.namespace), timeout=60)
    assert env.wait_for(build.id, states=ENDED).state.type.value == "COMPLETED"  # type: ignore[union-attr]
    assert env.registry.registry().last_version(names.namespace) == 1


def test_a_body_over_25_mib_is_refused_counted_and_recorded(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    commit = git(env.repo.path, "rev-parse", "HEAD")
    delivery = str(uuid.uuid4())
    before = refused_counts(env)["signed"].get("too-large", 0)

    answer = webhook(env, names, large_push(env, names, commit, 26 * 1024 * 1024), delivery=delivery)
    assert answer.status_code == 413, answer.text
    assert answer.json()["reason"] == "too-large"
    assert refused_counts(env)["signed"]["too-large"] == before + 1, "signed: it was hashed, not kept"
    [refused] = wait_until(lambda: refusals_of(delivery, "too-large"), timeout=30)
    assert refused.resource["icd.signed"] == "true"
    assert refused.payload["size"] > 26 * 1024 * 1024
    assert stored_events("icd.push.received", **{"icd.namespace": names.namespace}) == []
    assert env.runs_of("build-artifact", namespace=names.namespace) == []


def test_an_unsigned_push_is_refused_counted_and_recorded(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    commit = git(env.repo.path, "rev-parse", "HEAD")
    delivery = str(uuid.uuid4())
    before = refused_counts(env)["unsigned"].get("unsigned", 0)

    answer = webhook(env, names, push_of(env, names, commit), delivery=delivery, signature=False)
    assert answer.status_code == 401, answer.text
    assert refused_counts(env)["unsigned"]["unsigned"] == before + 1
    # Told at once, or (after another unsigned refusal in the same window) in the window's summary.
    [refused] = wait_until(lambda: refusals_of(delivery, "unsigned"), timeout=30)
    assert (refused.resource["icd.signed"], refused.payload["status"]) == ("false", 401)
    assert refused.payload["repository"] == "", "nothing of an unsigned body is read"
    assert stored_events("icd.push.received", **{"icd.namespace": names.namespace}) == []


def test_a_signed_malformed_push_tells_operators_through_the_notification_block(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    tag = uuid.uuid4().hex
    # The delivery id is a header, outside the signature: what it says reaches operators escaped.
    delivery = f"{tag}<!channel>"

    answer = webhook(env, names, b'{"ref": "refs/heads/main", "repository": ', delivery=delivery)
    assert answer.status_code == 400, answer.text
    assert answer.json()["reason"] == "malformed"
    [refused] = wait_until(lambda: refusals_of(f"{tag}&lt;!channel&gt;", "malformed"), timeout=30)
    assert refused.resource["icd.signed"] == "true"
    [posted] = wait_until(
        lambda: [post for post in env.receiver.posts if tag in json.dumps(post)],
        timeout=60,
        message="the refused-push automation never posted to the notification block",
    )
    assert "GitHub push refused" in posted["text"]
    assert "malformed" in posted["text"]
    assert f"{tag}&lt;!channel&gt;" in posted["body"]
    assert "<!channel>" not in json.dumps(posted)
    assert WEBHOOK_SECRET not in json.dumps(posted)


def test_a_signed_push_builds_once_however_often_it_is_delivered(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    commit = git(env.repo.path, "rev-parse", "HEAD")
    delivery = str(uuid.uuid4())
    first = webhook(env, names, push_of(env, names, commit), delivery=delivery)
    assert first.status_code == 202, first.text
    assert first.json()["event"] == "icd.push.received"
    assert first.json()["namespaces"] == [names.namespace]
    [build] = wait_until(lambda: env.runs_of("build-artifact", namespace=names.namespace), timeout=60)
    again = [webhook(env, names, push_of(env, names, commit), delivery=delivery) for _ in range(3)]
    assert {answer.status_code for answer in again} == {202}
    env.wait_for(build.id, states=ENDED)
    assert len(stored_events("icd.push.received", **{"icd.namespace": names.namespace})) == 1
    assert len(env.runs_of("build-artifact", namespace=names.namespace)) == 1
    assert env.registry.registry().last_version(names.namespace) == 1
    # The warm worker's run said its pull step ran, through its events worker (prefect_patches/pull_step_events.py).
    resource = {"prefect.resource.id": f"prefect.flow-run.{build.id}"}
    [pulled] = wait_until(lambda: stored_events("prefect.flow-run.pull-step.executed", **resource), timeout=30)
    assert pulled.payload["step_name"] == "set_working_directory"
    assert [related.role for related in pulled.related] == ["deployment"]


def test_a_registration_plans_the_followers_of_latest_and_only_them(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()  # its workspace follows latest
    production = f"prod{names.workspace[2:]}"
    env.workspace(production, follows=f"{names.namespace}@production", stack="examples/stacks/local")
    other = env.service()  # another namespace's workspace: not touched either
    commit = git(env.repo.path, "rev-parse", "HEAD")
    assert webhook(env, names, push_of(env, names, commit)).status_code == 202

    [deploy] = wait_until(lambda: env.runs_of("deploy-artifact", workspace=names.workspace), timeout=120)
    env.wait_for(deploy.id, states={"PAUSED"})
    requested = wait_until(
        lambda: stored_events("icd.plan.requested", **{"icd.namespace": names.namespace}), timeout=30
    )
    assert [event.resource["icd.workspace"] for event in requested] == [names.workspace]
    assert {related.role for related in requested[0].related} >= {"artifact-version", "cause"}
    assert env.runs_of("deploy-artifact", workspace=production) == []
    assert env.runs_of("deploy-artifact", workspace=other.workspace) == []
    env.answer(deploy.id, env.plan_sha(names.workspace, deploy.id), decision="reject")
    env.wait_for(deploy.id, states=ENDED)


def test_a_promotion_plans_the_workspaces_following_the_channel(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    production = f"prod{names.workspace[2:]}"
    env.workspace(production, follows=f"{names.namespace}@production", stack="examples/stacks/local")
    env.build(names)
    registry = env.registry.registry()

    queue = env.registry.workspace_queue()
    done = operations.promote(
        registry, queue, load_config(), names.namespace, 1, "production", by="alice", why="go live"
    )
    assert done.plans_requested == [production]
    [deploy] = wait_until(lambda: env.runs_of("deploy-artifact", workspace=production), timeout=120)
    env.wait_for(deploy.id, states={"PAUSED"})
    assert env.approve(deploy.id, production).state.name == "Deployed"  # type: ignore[union-attr]
    [moved] = wait_until(
        lambda: stored_events("icd.channel.moved", **{"icd.namespace": names.namespace, "icd.channel": "production"}),
        timeout=30,
    )
    assert (moved.payload["by"], moved.payload["reason"]) == ("alice", "go live")


def test_a_revocation_tells_operators_which_workspace_runs_it(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    # A second workspace whose channel points at the version but which never deployed: its state holds
    # nothing, so it runs nothing and is not named (what runs is the state's answer, not a channel's).
    idle = f"{names.workspace}-idle"
    env.workspace(idle, follows=f"{names.namespace}@latest", stack="examples/stacks/local", promotes="latest")
    run, version = env.deploy_until_paused(names)
    assert env.approve(run.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]

    operations.revoke(env.registry.registry(), names.namespace, version, by="sec-team", why="CVE-2026-7")
    [notice] = wait_until(lambda: env.runs_of("revocation-notice", namespace=names.namespace), timeout=60)
    done = env.wait_for(notice.id, states=ENDED)
    told = wait_until(
        lambda: [m for m in env.slack.messages if f"v{version} was revoked; {names.workspace} runs it" in m.text],
        timeout=30,
    )
    assert "CVE-2026-7" in told[0].text
    assert done.state is not None
    assert done.state.type.value == "COMPLETED", done.state
    assert not [m for m in env.slack.messages if f"{idle} runs it" in m.text]


def test_a_teardown_from_the_command_plans_a_destroy_that_waits_for_approval_then_empties_the_workspace(
    deploy_env: DeployEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.registry import main as icd_registry

    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    assert env.approve(run.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]
    assert consul_instances(env, names.service_name), "deployed and registered"

    argv = ["--block", "registry", "teardown", names.workspace, "--by", "ops", "--why", "retired"]
    assert icd_registry(argv) == 0
    assert "waits for approval" in capsys.readouterr().out
    [teardown] = wait_until(
        lambda: env.runs_of("deploy-artifact", workspace=names.workspace, teardown=True), timeout=120
    )
    env.wait_for(teardown.id, states={"PAUSED"})
    # The suspension and its message are two writes: wait for the second.
    headline = f"Tear down {names.namespace} v{version} in {names.workspace}: 1 destroy"
    wait_until(lambda: headline in env.state_message(teardown.id), timeout=30, message="the run never said why")
    assert consul_instances(env, names.service_name), "nothing is destroyed before the approval"

    done = env.approve(teardown.id, names.workspace, approver="carol")
    assert (done.state.type.value, done.state.name) == ("COMPLETED", "TornDown"), done.state  # type: ignore[union-attr]
    assert consul_instances(env, names.service_name) == [], "the instance stopped and left Consul"
    assert env.holder(names.workspace) is None
    [requested] = wait_until(
        lambda: stored_events("icd.teardown.requested", **{"icd.workspace": names.workspace}), timeout=30
    )
    assert (requested.payload["by"], requested.payload["reason"]) == ("ops", "retired")
    [torn] = wait_until(
        lambda: stored_events("icd.workspace.torn-down", **{"icd.workspace": names.workspace}), timeout=30
    )
    assert torn.payload["by"] == "carol"
    assert icd_registry(argv) == 0, "asking again is harmless"
    [again] = wait_until(
        lambda: [
            r for r in env.runs_of("deploy-artifact", workspace=names.workspace, teardown=True) if r.id != teardown.id
        ],
        timeout=120,
    )
    ended = env.wait_for(again.id, states=ENDED)
    assert ended.state.name == "NothingToDeploy", ended.state  # type: ignore[union-attr]
    assert "nothing to tear down" in env.state_message(again.id)


def test_a_health_transition_is_an_event_with_its_deploy_and_version_and_pages_through_the_automation(
    deploy_env: DeployEnv,
) -> None:
    from prefect.deployments import run_deployment

    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    assert env.approve(run.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]
    watch = run_deployment(
        "consul-health/consul-health",
        parameters={"window_seconds": 60, "watch_name": names.workspace},
        timeout=0,
    )
    env.wait_for(watch.id, states={"RUNNING"})
    host, port = env.consul.address.rsplit(":", 1)
    kv = consul.Consul(host=host, port=int(port)).kv
    wait_until(lambda: kv.get(f"icd/health-watch/{names.workspace}/state")[1], timeout=60, message="no baseline")
    instance = next((env.icd_home / "instances" / names.workspace).glob(f"{names.service_name}-*"))
    (instance / "unhealthy").touch()

    [critical] = wait_until(
        lambda: stored_events("icd.health.critical", **{"icd.service": names.service_name}), timeout=60
    )
    assert critical.resource["prefect.resource.id"].endswith(f"/{names.service_name}-{names.workspace}-{version}")
    related = {r.role: r.id for r in critical.related}
    assert related["deploy-run"] == f"prefect.flow-run.{run.id}"
    assert related["artifact-version"] == f"icd.artifact.{names.namespace}.v{version}"
    posted = wait_until(
        lambda: [p for p in env.receiver.posts if names.service_name in json.dumps(p)],
        timeout=60,
        message="the critical-health automation never posted to the notification block",
    )
    assert "Critical" in posted[0]["text"]
    # The worker stops the watch (its control channel, then a kill).
    api_client().set_flow_run_state(watch.id, Cancelling(), force=True)
    env.wait_for(watch.id, states={"CANCELLED"}, timeout=120)
