"""End to end, on the real loop: operators are told what fails (a Slack 5xx burst costs seconds, a typo in
``icd.toml`` is told), and not paged for what a teardown does; the records say what runs (issue 20)."""

from __future__ import annotations

import json
from typing import Any, cast

import consul
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Cancelling

from examples.local_env import api_client
from tasks.watch import FIRST_WATCH_TAG
from tests.helpers import told
from tests.plugins.deploy_env import ENDED, DeployEnv, Names
from tests.test_events import stored_events
from tests.waiting import wait_until


def _redeliveries_of(env: DeployEnv, fragment: str) -> list[FlowRun]:
    return [run for run in env.runs_of("deliver-notification") if fragment in json.dumps(run.parameters)]


# --- notifications ------------------------------------------------------------------------------------------


def test_a_burst_of_slack_5xx_delays_the_approval_notice_by_seconds_not_a_redelivery(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    env.build(names)
    headline = f"Plan waiting for approval: {names.namespace}"
    env.slack.fail_next(3, status=503, text_containing=headline)

    run = env.deploy(names.workspace, 1)
    [notice] = wait_until(lambda: told(env, headline), timeout=240, message="the approval notice never came")

    faulted = [call for call in env.slack.faulted_calls() if headline in call.text]
    assert len(faulted) == 3
    [message] = [m for m in env.slack.messages if headline in m.text]
    assert message.received_at - faulted[0].at < 8, "retried within seconds, not deferred to a redelivery"
    assert _redeliveries_of(env, names.namespace) == []
    assert notice
    env.wait_for_question(run.id)
    env.answer(run.id, env.plan_sha(names.workspace, run.id), decision="reject")
    env.wait_for(run.id, states=ENDED)


def _with_a_typo(env: DeployEnv, names: Names) -> str:
    """The session's icd.toml with a misspelt key in this test's namespace; returns the good text."""
    good = env.config_path.read_text()
    section = f'[namespaces."{names.namespace}"]\n'
    assert section in good
    env.config_path.write_text(good.replace(section, f'{section}servce_name = "{names.service_name}"\n'))
    return good


def test_a_typo_in_icd_toml_fails_the_build_and_the_deploy_and_both_are_told(deploy_env: DeployEnv) -> None:
    env = deploy_env
    names = env.service()
    good = _with_a_typo(env, names)
    try:
        build = run_deployment(
            "build-artifact/build-artifact", parameters={"namespace": names.namespace, "plan": False}, timeout=0
        )
        deploy = env.deploy(names.workspace, 1)
        built = env.wait_for(build.id, states=ENDED)  # type: ignore[union-attr]  # the sync variant
        deployed = env.wait_for(deploy.id, states=ENDED)
    finally:
        env.config_path.write_text(good)

    for done in (built, deployed):
        assert done.state is not None
        assert done.state.type.value == "FAILED", done.state
        assert "servce_name" in (done.state.message or ""), done.state
    [build_notice] = wait_until(lambda: told(env, f"Build of {names.namespace} main failed: ConfigError"), timeout=60)
    assert "servce_name" in build_notice
    [deploy_notice] = wait_until(lambda: told(env, f"Deploy failed on {names.workspace}: ConfigError"), timeout=60)
    assert "servce_name" in deploy_notice


# --- quiet and true records ---------------------------------------------------------------------------------


def _watching(env: DeployEnv, watch_name: str) -> FlowRun:
    watch = cast(
        FlowRun,
        run_deployment(
            "consul-health/consul-health", parameters={"window_seconds": 300, "watch_name": watch_name}, timeout=0
        ),
    )
    env.wait_for(watch.id, states={"RUNNING"})
    host, port = env.consul.address.rsplit(":", 1)
    kv = consul.Consul(host=host, port=int(port)).kv
    wait_until(lambda: kv.get(f"icd/health-watch/{watch_name}/state")[1], timeout=60, message="no baseline")
    return watch


def _pages_about(env: DeployEnv, service: str) -> list[dict[str, Any]]:
    return [post for post in env.receiver.posts if service in json.dumps(post)]


def test_a_teardown_under_a_running_watch_pages_nobody_and_leaves_the_channel_listing(
    deploy_env: DeployEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.registry import main as icd_registry

    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    assert env.approve(run.id, names.workspace).state.name == "Deployed"  # type: ignore[union-attr]
    registry = env.registry.registry()
    assert [(p.channel, p.version) for p in registry.list_channels(names.namespace)] == [
        ("latest", version),
        (names.workspace, version),
    ]
    watch = _watching(env, names.workspace)
    host, port = env.consul.address.rsplit(":", 1)
    agent = consul.Consul(host=host, port=int(port))
    try:
        argv = ["--block", "registry", "teardown", names.workspace, "--by", "ops", "--why", "retired"]
        assert icd_registry(argv) == 0
        [teardown] = wait_until(
            lambda: env.runs_of("deploy-artifact", workspace=names.workspace, teardown=True), timeout=120
        )
        env.wait_for_question(teardown.id)
        done = env.approve(teardown.id, names.workspace, approver="carol")
        assert done.state is not None
        assert (done.state.type.value, done.state.name) == ("COMPLETED", "TornDown"), done.state

        [left] = wait_until(
            lambda: stored_events("icd.health.disappeared", **{"icd.service": names.service_name}),
            timeout=60,
            message="the watch never recorded the instance leaving",
        )
        assert left.resource["icd.expected"] == "true"
        seen = stored_events("icd.health.critical", **{"icd.service": names.service_name})
        assert all(event.resource["icd.page"] == "false" for event in seen), seen
        # A later failure of another service pages: once its page is in, the automation has judged every event
        # of the teardown before it, so "no page about the service" below is final, not a snapshot.
        sentinel = f"sentinel-{names.service_name}"
        agent.agent.service.register(sentinel, service_id=sentinel, check={"TTL": "600s", "Status": "critical"})
        wait_until(lambda: _pages_about(env, sentinel), timeout=60, message="the sentinel's page never came")
    finally:
        api_client().set_flow_run_state(watch.id, Cancelling(), force=True)
        env.wait_for(watch.id, states={"CANCELLED"}, timeout=120)
        agent.agent.service.deregister(f"sentinel-{names.service_name}")
    [sentinel_page] = _pages_about(env, f"sentinel-{names.service_name}")
    assert "(a new instance)" in json.dumps(sentinel_page), "no None reaches an operator"
    assert _pages_about(env, names.service_name) == [sentinel_page]
    assert told(env, names.service_name, "instance left") == []
    assert told(env, f"{names.service_name} is critical") == []

    # The workspace's channel no longer lists it at its last version; its history says who and why.
    capsys.readouterr()
    assert icd_registry(["--block", "registry", "channels", names.namespace]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["latest"]
    assert icd_registry(["--block", "registry", "history", names.namespace, names.workspace]) == 0
    history = capsys.readouterr().out
    assert "None" not in history
    last = history.splitlines()[-1].split("\t")
    assert last[1:3] == [f"v{version} -> nothing", "carol"]
    assert "torn down" in last[3]
    assert "retired" in last[3]

    # The next plan there starts from nothing deployed, as the first one did.
    again = env.deploy(names.workspace, version)
    env.wait_for_question(again.id)
    assert f"Deploy {names.namespace} v{version} to {names.workspace}:" in env.state_message(again.id)
    from_nothing = ("Plan waiting for approval", f"{names.namespace} nothing deployed", names.workspace)
    # (The first deploy's notice, which said the same, now says how that deploy ended: one line per deploy.)
    wait_until(
        lambda: [
            m
            for m in env.slack.messages
            if m.thread_key == f"deploy-run:{again.id}" and all(fragment in m.text for fragment in from_nothing)
        ],
        timeout=60,
        message="the next plan is not from nothing",
    )
    env.answer(again.id, env.plan_sha(names.workspace, again.id), decision="reject")
    env.wait_for(again.id, states=ENDED)


# --- health is watched from the start -----------------------------------------------------------------------


def test_icd_setup_starts_the_first_health_watch_at_once(deploy_env: DeployEnv) -> None:
    first = [run for run in deploy_env.runs_of("consul-health") if FIRST_WATCH_TAG in run.tags]
    assert len(first) == 1, "icd-setup started one watch run"
    [run] = first
    assert run.created is not None
    assert run.expected_start_time is not None
    assert (run.expected_start_time - run.created).total_seconds() < 60, "not an interval later"
    # The session paused the deployment right after icd-setup: a run of the schedule then ends without watching.
    done = deploy_env.wait_for(run.id, states=ENDED)
    assert done.state is not None
    assert done.state.type.value == "COMPLETED", done.state
