"""The whole loop on this machine, offline, through the same events a team's setup uses: `make demo`.

    1. a developer pushes v1; GitHub's signed push webhook reaches icd-inbound
       -> build -> registered -> staging plan (nothing deployed -> v1) -> Approve clicked in Slack (signed)
       -> apply -> healthy (Consul)
    2. the developer pushes a change: v2 -> build -> registered -> staging plan "acmeinc/web v1 → v2"
       -> approved in the Prefect UI's form -> apply (v1's instance is replaced) -> healthy
    3. promote v2 to production (icd-registry promote) -> production plan -> Approve in Slack -> a rollout to
       3 instances, one batch at a time, each gated on its instance's health (a line per batch in the thread)
    4. one production instance's health breaks -> icd.health.critical event, Slack alert, webhook notification
    5. the drift check finds production clean; one of its instances is deregistered from Consul by hand -> the
       drift check tells it (icd.drift.detected, the Slack notice with the way back)
    6. the audit chain of what production runs: commit -> build -> signed provenance -> version -> plan ->
       decision (who, from where) -> apply -> the Consul instances now -> drift checks

Starts moto (S3, DynamoDB), the Consul and Slack API stand-ins (or a real `consul agent -dev` when `consul`
is on PATH), a Prefect server, a process worker and the inbound webhook app; creates the blocks, the
deployments (with their triggers) and the automations exactly as an operator would (`icd-setup`).
Unattended by default: the demo approves each plan after printing it, from Slack (the stand-in signs the
click as Slack does and posts it to icd-inbound's interactivity URL) or as the UI's form does. With
`--interactive` it waits for you to approve in the Prefect UI (the link is printed). At the end it stops
everything and removes its state folder (about 9 MB in the temp dir); `--keep` leaves everything running,
and the folder in place, until Ctrl-C, so the Event Feed it links can be browsed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from prefect.deployments import run_deployment
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from blocks.consul import ConsulConnection
from cli.audit import Auditor
from examples.local_env import (
    LocalServices,
    ManagedProcess,
    api_client,
    deliver_webhook,
    first_run_after,
    free_port,
    git,
    github_push,
    make_app_repo,
    provision,
    spawn,
    start_inbound,
    start_moto,
    start_prefect_server,
    start_worker,
    stop_instances,
    wait_for_run,
    worker_env,
    write_config,
)
from icd import operations
from icd.config import load_config
from standins.slack import RECEIVED_PATH, SlackStandIn

POOL = "local-pool"
TOKEN = "xoxb-demo-token"
OPERATOR = "U0OPS"  # the stand-in's on-call operator, who approves from Slack
NAMESPACE = "acmeinc/web"
# Production runs a fleet (examples/stacks/local-fleet), replaced one instance at a time, each batch held
# healthy for 2 s before the next starts; staging stays one instance (examples/stacks/local).
PRODUCTION_ROLLOUT = {"instances": 3, "max_parallel": 1, "min_healthy_time_seconds": 2}
# A batch's thread message repeats its title ("... batch 2/3") before the line: take the last "batch N/M: ...".
BATCH_LINE = re.compile(r"(?:batch \d+/\d+: )*(batch \d+/\d+: .*)")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


class Demo:
    def __init__(self, home: Path, interactive: bool) -> None:
        self.home = home
        self.interactive = interactive
        self.started = time.monotonic()
        self.processes: list[ManagedProcess] = []
        self.shown_messages = 0

    def step(self, text: str) -> None:
        print(f"\n[{time.monotonic() - self.started:5.1f}s] == {text}", flush=True)

    def say(self, text: str) -> None:
        print(f"         {text}", flush=True)

    def slack(self, slack_url: str) -> None:
        """Print the Slack messages received since last time, as an operator reads them."""
        received = httpx.get(f"{slack_url}{RECEIVED_PATH}", timeout=10).json()
        for message in received["messages"][self.shown_messages :]:
            lines = message["rendered"].splitlines()
            self.say(f"Slack #ops > {lines[0] if lines else message['text']}")
            for line in lines[1:]:
                self.say(f"            {line}")
        self.shown_messages = len(received["messages"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactive", action="store_true", help="wait for approval in the Prefect UI")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = parser.parse_args(argv)
    demo = Demo(Path(tempfile.mkdtemp(prefix="icd-demo-")), args.interactive)
    demo.step(f"starting S3/DynamoDB (moto), Consul, Slack, Prefect; state in {demo.home}")
    moto, endpoint = start_moto()
    consul_standin = None
    if shutil.which("consul"):
        consul_port = free_port()
        demo.processes.append(
            spawn(
                "consul",
                ["consul", "agent", "-dev", "-http-port", str(consul_port)],
                env={},
                log_dir=demo.home / "logs",
            )
        )
        consul_addr = f"http://127.0.0.1:{consul_port}"
    else:
        from standins.consul import ConsulStandIn

        consul_standin = ConsulStandIn().start()
        consul_addr = consul_standin.http_addr
    slack = SlackStandIn(token=TOKEN).start()
    server = start_prefect_server(demo.home / "prefect")
    demo.say(f"Prefect UI: {server.ui_url}")
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            return run_loop(demo, args, server, endpoint, consul_addr, slack)
    except KeyboardInterrupt:
        return 0 if args.keep else 130
    finally:
        for process in demo.processes:
            process.stop()
        stop_instances(demo.home / "icd")
        server.stop()
        slack.stop()
        if consul_standin is not None:
            consul_standin.stop()
        moto.stop()
        if args.keep:
            demo.step(f"stopped; the demo's state is kept in {demo.home}")
        else:
            shutil.rmtree(demo.home, ignore_errors=True)
            demo.step(
                f"done in {time.monotonic() - demo.started:.0f}s; everything is stopped and {demo.home} removed "
                "(`make demo ARGS=--keep` keeps the Prefect UI and its Event Feed running)"
            )


def run_loop(
    demo: Demo, args: argparse.Namespace, server: Any, endpoint: str, consul_addr: str, slack: SlackStandIn
) -> int:
    repo = make_app_repo(demo.home / "app-repo")
    config = write_config(
        demo.home / "icd.toml",
        namespaces={NAMESPACE: {"repository": str(repo), "repository_aliases": [NAMESPACE], "service_name": "web"}},
        workspaces={
            "staging": {"follows": f"{NAMESPACE}@latest", "stack": "examples/stacks/local"},
            "production": {
                "follows": f"{NAMESPACE}@production",
                "stack": "examples/stacks/local-fleet",
                "rollout": PRODUCTION_ROLLOUT,
            },
        },
    )
    os.environ["ICD_CONFIG"] = str(config)
    webhook_secret = secrets.token_urlsafe(24)
    signing_secret = secrets.token_urlsafe(24)  # the Slack app's: the stand-in signs each click with it
    slack.add_user(OPERATOR, "ops-oncall", "Ops On-call")
    demo.step("creating blocks, deployments with their triggers, and automations (icd-setup)")
    registry = provision(
        server,
        LocalServices(
            s3_endpoint=endpoint,
            bucket="icd-demo",
            aws_access_key_id="demo",
            aws_secret_access_key="demo",
            slack_api_url=slack.api_url,
            slack_token=TOKEN,
            consul_addr=consul_addr,
        ),
        pool=POOL,
        alerts_url=slack.webhook_url("alerts"),
        webhook_secret=webhook_secret,
        slack_signing_secret=signing_secret,
    )
    demo.processes.append(start_worker(server, POOL, env=worker_env(demo.home / "icd", config)))
    inbound, inbound_url = start_inbound(server, config=config)
    demo.processes.append(inbound)
    demo.say(f"webhook endpoint: {inbound_url}/github; Slack interactivity URL: {inbound_url}/slack/interactions")
    slack.set_interactivity(f"{inbound_url}/slack/interactions", signing_secret)

    demo.step("1. a developer pushes v1; GitHub delivers the signed push webhook")
    if not push_and_deploy(demo, server, slack, registry, repo, inbound_url, webhook_secret, via="slack"):
        return 1

    demo.step("2. the developer pushes a change (v2): the staging plan replaces v1")
    (repo / "CHANGELOG.md").write_text("# web\n\n- v2: the second release, pushed by the demo\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "v2")
    if not push_and_deploy(demo, server, slack, registry, repo, inbound_url, webhook_secret, via="ui"):
        return 1
    show_release(demo, demo.home / "icd" / "instances" / "staging")

    version = registry.registry().last_version(NAMESPACE)
    demo.step(f"3. promote v{version} to production (icd-registry promote) -> a rollout to 3 instances")
    promoted_at = time.time()
    done = operations.promote(
        registry.registry(),
        registry.workspace_queue(),
        load_config(),
        NAMESPACE,
        version,
        "production",
        by="demo",
        why=f"staging is healthy on v{version}",
    )
    demo.say(f"{NAMESPACE}@production -> v{done.assignment.to_version}; plans requested for {done.plans_requested}")
    if not approve(demo, server, slack, registry, "production", after=promoted_at, via="slack", batches=True):
        return 1
    show_release(demo, demo.home / "icd" / "instances" / "production")

    demo.step("4. one production instance's health breaks (slot 0); the watch sees it")
    watch = run_deployment("consul-health/consul-health", parameters={"window_seconds": 40}, timeout=0)
    wait_for_run(watch.id, {"RUNNING"})
    wait_for_baseline(consul_addr)
    # The fleet's instance directories are web-<slot>-<version>: break slot 0's, the others stay healthy.
    instance = next((demo.home / "icd" / "instances" / "production").glob("web-0-*"))
    (instance / "unhealthy").touch()
    demo.say(f"touched {instance / 'unhealthy'}: /health answers 500 from now on")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not slack.webhook_deliveries:
        time.sleep(0.3)
    demo.slack(slack.base_url)
    for delivery in slack.webhook_deliveries:
        demo.say(f"webhook notification ({delivery.webhook_id}) > {delivery.payload.get('text')}")
    for event in stored_events("icd.health.critical"):
        demo.say(f"event {event.event} about {event.resource.get('prefect.resource.name')}")
    paged = bool(slack.webhook_deliveries)

    demo.step("5. the drift check: production is clean; then an instance leaves Consul behind Terraform's back")
    if not drift_check(demo, slack, "production", expect="clean"):
        return 1
    running = registry.running("production", NAMESPACE)
    service_ids = running.service_ids if running else []
    if len(service_ids) != PRODUCTION_ROLLOUT["instances"]:
        demo.say(f"production's state lists instances {service_ids}, not {PRODUCTION_ROLLOUT['instances']}")
        return 1
    service_id = service_ids[-1]  # the last slot: one of the fleet, not the one whose health was broken
    httpx.put(f"{consul_addr}/v1/agent/service/deregister/{service_id}", timeout=10).raise_for_status()
    demo.say(f"deregistered {service_id} from Consul by hand")
    if not drift_check(demo, slack, "production", expect="drift"):
        return 1

    demo.step("6. the audit chain of what production runs (icd-audit --workspace production)")
    print(Auditor(registry, ConsulConnection.load("consul"), load_config()).workspace("production").to_text())
    if args.keep:
        demo.step(
            f"done in {time.monotonic() - demo.started:.0f}s; everything keeps running until Ctrl-C. "
            f"The Event Feed tells it all: {server.ui_url}/events"
        )
        while True:
            time.sleep(3600)
    return 0 if paged else 1


def drift_check(demo: Demo, slack: SlackStandIn, workspace: str, *, expect: str) -> bool:
    """Run the drift check of ``workspace`` now (as its schedule would) and show what it told."""
    told_before = len(slack.messages)
    run = run_deployment("drift-check/drift-check", parameters={"workspaces": [workspace], "force": True}, timeout=0)
    done = wait_for_run(run.id, ENDED)  # type: ignore[union-attr]  # the sync variant
    message = done.state.message if done.state else ""
    demo.say(f"drift check {done.name}: {done.state.name if done.state else '?'}: {message}")
    demo.slack(slack.base_url)
    drifted = any("drift" in m.text.lower() for m in slack.messages[told_before:])
    if (expect == "drift") != drifted:
        demo.say(f"expected {expect}, the check said otherwise")
        return False
    return done.state is not None and done.state.type.value == "COMPLETED"


def push_and_deploy(
    demo: Demo,
    server: Any,
    slack: SlackStandIn,
    registry: Any,
    repo: Path,
    inbound_url: str,
    secret: str,
    *,
    via: str,
) -> bool:
    """Deliver GitHub's push of ``repo``'s main, wait for the build, then approve the staging plan it asks."""
    commit = git(repo, "rev-parse", "HEAD")
    parents = git(repo, "rev-list", "--parents", "-n", "1", "HEAD").split()[1:]
    pushed_at = time.time()
    push = github_push(full_name=NAMESPACE, clone_url=str(repo), branch="main", after=commit)
    if parents:  # the branch existed: GitHub says what it pointed at before
        push = github_push(full_name=NAMESPACE, clone_url=str(repo), branch="main", after=commit, before=parents[0])
    answer = deliver_webhook(
        f"{inbound_url}/github",
        secret,
        push,
        delivery=str(uuid.uuid4()),
    )
    demo.say(f"webhook answered {answer.status_code}: {answer.json()}")
    build = first_run_after("build-artifact", pushed_at)
    demo.say(f"build run {build.name}: {server.ui_url}/runs/flow-run/{build.id}")
    build = wait_for_run(build.id, ENDED)
    if build.state is None or build.state.type.value != "COMPLETED":
        demo.say(f"the build ended {build.state}")
        return False
    return approve(demo, server, slack, registry, "staging", after=pushed_at, via=via)


def show_release(demo: Demo, instances: Path) -> None:
    """What the workspace's instance answers on ``GET /``: the version it was built as."""
    for port_file in sorted(instances.glob("web-*/app.port")):
        with contextlib.suppress(httpx.HTTPError, ValueError, OSError):
            answer = httpx.get(f"http://127.0.0.1:{int(port_file.read_text())}/", timeout=5).json()
            demo.say(f"{instances.name} answers GET /: {answer}")


def stored_events(prefix: str, timeout: float = 30) -> list[Any]:
    """Events whose name starts with ``prefix``, once the server has stored them (it does so in batches)."""
    from prefect.events.filters import EventFilter, EventNameFilter

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = api_client().read_events(filter=EventFilter(event=EventNameFilter(prefix=[prefix])), limit=10)
        if page.events:
            return list(page.events)
        time.sleep(0.5)
    return []


def wait_for_baseline(consul_addr: str, timeout: float = 60) -> None:
    """The watch has read the current health once it has persisted its state (so the break is news)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{consul_addr}/v1/kv/icd/health-watch/default/state", timeout=5).status_code == 200:
            return
        time.sleep(0.2)
    raise TimeoutError("the health watch never took its baseline")


def approve(
    demo: Demo,
    server: Any,
    slack: SlackStandIn,
    registry: Any,
    workspace: str,
    *,
    after: float,
    via: str,
    batches: bool = False,
) -> bool:
    """Approve the plan ``workspace``'s newest run waits on: ``via`` "slack" clicks Approve on its notice (the
    stand-in signs the click as Slack does; the run resumes once icd-inbound checked it), "ui" answers as the
    Prefect UI's form does. Interactive: you do either. ``batches``: a rollout; print the line each batch
    posted in the deploy's thread, and fail unless there was one."""
    run = first_run_after("deploy-artifact", after)
    paused = wait_for_run(run.id, {"PAUSED", *ENDED})
    if paused.state is None or paused.state.type.value != "PAUSED":
        demo.say(f"the {workspace} run ended without asking: {paused.state}")
        return False
    sha = registry.plan_store().sha256_of(workspace, str(run.id))
    demo.say(f"plan for {workspace} is waiting: {server.ui_url}/runs/flow-run/{run.id}")
    demo.slack(slack.base_url)
    if demo.interactive:
        demo.say("approve it in the UI (choose approve, type your name; the plan hash is pre-filled) ...")
    elif via == "slack":
        notice = next(m for m in slack.top_level() if m.thread_key == f"deploy-run:{run.id}")
        clicked = slack.click(notice.ts, "icd.approve", OPERATOR)
        demo.say(f"clicked Approve in Slack as ops-oncall (signed; icd-inbound answered {clicked.status})")
    else:
        answer = {"decision": "approve", "approver": "demo", "comment": "demo", "plan_sha256": sha}
        resume_flow_run(run.id, run_input=answer)
        demo.say("approved in the UI's form as 'demo'")
    done = wait_for_run(run.id, ENDED, timeout=7200)
    demo.say(f"run {done.name}: {done.state.name if done.state else '?'}: {done.state.message if done.state else ''}")
    demo.slack(slack.base_url)
    if batches:
        parent = next((m for m in slack.top_level() if m.thread_key == f"deploy-run:{run.id}"), None)
        replies = slack.thread(parent.ts) if parent is not None else []
        lines = [found.group(1) for m in replies if (found := BATCH_LINE.search(m.text))]
        for line in lines:
            demo.say(f"rollout > {line}")
        if not lines:
            demo.say(f"the {workspace} rollout posted no batch line in its thread")
            return False
    return done.state is not None and done.state.name == "Deployed"


if __name__ == "__main__":
    sys.exit(main())
