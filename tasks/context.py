"""What one deploy run works with: the workspace's settings from ``icd.toml``, the blocks, the run itself.

Built once at the top of ``deploy-artifact`` (and again, identically, when a resumed run re-runs from the
top): no side effects, so it needs no task. It also says how this run's requests, notices and plans look,
so the flow body only orchestrates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import cast

from blocks.consul import ConsulConnection
from blocks.notifier import load_notifier
from blocks.registry import ArtifactRegistry
from icd.config import WorkspaceConfig, load_config
from icd.deploy.approval import ApprovalDecision, ApprovalRules
from icd.deploy.artifacts import artifact_for
from icd.deploy.plan import PlanRequest
from icd.deploy.queue import DeployRequest, RunRef
from icd.deploy.rollout import Slot, encode_instances
from icd.deploy.stuck import heads_up_seconds, heads_up_text, heads_up_title
from icd.deploy.votes import ApprovalRequest
from icd.notify.message import MessageKind, Notification, NotificationReceipt, Notifier, Severity
from icd.paths import PROJECT_ROOT, state_home
from icd.registry.models import ArtifactVersion
from icd.service.contract import ROLLOUT_VARIABLE, StackVariables
from icd.text import operator_time
from icd.tools.terraform import ApplyWatch, HeadsUp
from tasks.approve import AwaitingApproval, approval_notice
from tasks.notify import notify, update_notice
from tasks.record import last_apply_seconds


@dataclass
class RunThread:
    """Where a deploy run's messages go once it has asked for approval: every later one replies in the thread
    of that notice (``root``), and the run's ending rewrites the notice itself, so the channel keeps one line
    per deploy (docs/operations.md#what-the-channel-shows). Before the notice there is no thread: a run that
    ends without asking (queued, nothing to deploy) says so in one top-level message."""

    root: NotificationReceipt | None = None
    artifact: str = ""  # what the notice asked about (``acmeinc/web v1 → v2``), kept in its rewrite
    decided: dict[str, str] = field(default_factory=dict)  # who decided, when, from where, why: kept too


@dataclass(frozen=True)
class DeployContext:
    run: RunRef
    workspace: str
    namespace: str
    settings: WorkspaceConfig  # follows, stack, platform, approval and health settings
    promotes: str | None  # the channel a healthy deploy moves, if any
    service_name: str
    registry: ArtifactRegistry
    notifier: Notifier
    consul: ConsulConnection
    teardown: bool = False  # destroy what the workspace runs, through the same plan-approve-apply path
    # Set once the approval notice is out (and again when a resumed run reads it back): see RunThread.
    thread: RunThread = field(default_factory=RunThread)

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def thread_key(self) -> str:
        """What every message of this run carries, so any reader can group them."""
        return run_thread_key(self.run.id)

    @property
    def run_url(self) -> str | None:
        return self.notifier.flow_run_url(self.run.id)

    @property
    def stack_dir(self) -> str:
        return str(PROJECT_ROOT / self.settings.stack)  # an absolute stack stays as it is

    def own_request(self, version: int) -> DeployRequest:
        """The request of a run started by hand (a person, push-to-deploy): it is the newest, so it wins."""
        return DeployRequest(
            id=self.run.id,
            workspace=self.workspace,
            namespace=self.namespace,
            version=version,
            teardown=self.teardown,
            by=f"run {self.run.name}",
            cause="manual run",
            requested_at=datetime.now(UTC),
        )

    def plan_request(
        self, version: ArtifactVersion, *, plan_id: str, rollback: bool = False, instances: Sequence[Slot] = ()
    ) -> PlanRequest:
        """What to plan; every stack gets the same variables. Contract: docs/service-contract.md#stack-variables
        (the pre-flight check reports a stack that doesn't declare one of them). A workspace that rolls out
        also passes what each slot runs (``instances``; docs/service-contract.md#rollout)."""
        variables = StackVariables(
            artifact_id=artifact_for(version, self.settings.platform),
            artifact_version=version.build_label,
            namespace=self.namespace,
            service_name=self.service_name,
            consul_addr=self.consul.address,
            deploy_run_id=self.run.id,
            workspace=self.workspace,
            instance_root=str(state_home() / "instances" / self.workspace),
        ).as_vars()
        if self.settings.rollout is not None:
            variables[ROLLOUT_VARIABLE] = encode_instances(instances)
        return PlanRequest(
            workspace=self.workspace,
            stack_dir=self.stack_dir,
            version=version,
            platform=self.settings.platform,
            follows=self.settings.channel,
            promotes=self.promotes,
            variables=variables,
            plan_id=plan_id,
            destroy=self.teardown,
            must_be_current=not rollback,
        )

    def notice(
        self,
        title: str,
        text: str,
        severity: Severity,
        *,
        facts: Mapping[str, str] | None = None,
        link_text: str | None = None,
        dedup_key: str | None = None,
        kind: MessageKind = "deploy",
    ) -> Notification:
        """A notification about this deploy: it always names the workspace and links to the run."""
        return Notification(
            title=title,
            text=text,
            severity=severity,
            fields={"workspace": self.workspace, **(facts or {})},
            link_url=self.run_url,
            link_text=link_text,
            dedup_key=dedup_key,
            kind=kind,
            thread_key=self.thread_key,
        )

    def warn(self, title: str, text: str, facts: dict[str, str], kind: MessageKind = "refusal") -> None:
        """Tell operators something about this run they may act on (a refused answer), with its link."""
        self.tell(self.notice(title, text, "warning", facts=facts, link_text="Open the run", kind=kind))

    def watch_apply(self, what: str) -> ApplyWatch:
        """The watch of one apply of this run (``what``: "apply", "teardown", "rollback"): a heads-up to
        operators once it runs longer than expected, a stop once it is stuck (``icd/deploy/stuck.py``)."""
        last = last_apply_seconds(self.workspace)
        stuck_after = self.settings.apply_timeout_seconds

        def tell_slow(heads_up: HeadsUp) -> None:
            facts = {"running for": f"{heads_up.elapsed_seconds:.0f}s", "stopped after": f"{stuck_after:.0f}s"}
            if heads_up.holders:
                facts["holding its output"] = ", ".join(heads_up.holders)
            self.warn(heads_up_title(self.workspace, what), heads_up_text(what, heads_up, last), facts, kind="deploy")

        return ApplyWatch(
            stuck_after=stuck_after, heads_up_after=heads_up_seconds(last, stuck_after), on_heads_up=tell_slow
        )

    def tell(
        self, notification: Notification, *, reply_to: NotificationReceipt | None = None
    ) -> NotificationReceipt | None:
        """Notify operators, best effort (``tasks/notify.py``): a Slack failure never changes the outcome. It
        goes in the thread of ``reply_to``, else of this run's approval notice once there is one."""
        return notify(self.notifier, notification, reply_to=reply_to or self.thread.root)

    def start_thread(self, notice: NotificationReceipt | None, artifact: str) -> None:
        """The approval notice is out (or read back on resume): later messages reply in its thread."""
        self.thread.root, self.thread.artifact = notice, artifact

    def approval_rules(self, version: ArtifactVersion) -> ApprovalRules:
        """What an answer on ``version``'s plan is judged by: the workspace's policy, who wrote the commit."""
        author = version.labels.get("commit_author", "")
        pushed_by = version.labels.get("pushed_by", "")
        names = tuple(filter(None, [pushed_by, author.partition("<")[2].rstrip(">"), author.partition(" <")[0]]))
        return ApprovalRules(
            workspace=self.workspace,
            policy=self.settings.approval,
            authors=tuple(sorted(load_config().slack_ids_of(author, pushed_by))),
            author_names=names,
        )

    def approval_request(self, asked: AwaitingApproval, rules: ApprovalRules) -> ApprovalRequest:
        """What the run asks, kept on it for the Slack buttons (``icd/deploy/votes.py``): the notice is made
        again exactly as it was sent, so a click can rewrite it in place."""
        planned = asked.planned
        notice = approval_notice(
            planned,
            asked.deadline,
            run_id=self.run_id,
            run_name=self.run.name,
            run_url=self.run_url,
            version=asked.version,
            rules=rules,
        )
        return ApprovalRequest(
            workspace=self.workspace,
            plan_sha256=planned.plan_sha256,
            artifact=planned.view.version_diff,
            deadline=asked.deadline,
            authors=rules.authors,
            notice=replace(notice, thread_key=self.thread_key),
            receipt=asked.notice,
        )

    def decided(self, decision: ApprovalDecision) -> None:
        """The answer is in: the notice says who decided, when, from where and why, without its buttons, and
        keeps saying it when the run's ending rewrites it (best effort)."""
        verb = "Approved" if decision.approved else "Rejected"
        where = "Slack" if decision.source == "slack" else "the Prefect UI"
        self.thread.decided = {
            f"{verb.lower()} by": decision.approver,
            "decided": f"{operator_time(datetime.now(UTC))} in {where}",
            **({"comment": decision.comment} if decision.comment else {}),
        }
        if self.thread.root is None:
            return
        doing = "applying the plan" if decision.approved else "nothing is applied"
        title = f"{verb}: {self.thread.artifact} on {self.workspace}"
        facts = {"artifact": self.thread.artifact, "run": self.run.name, **self.thread.decided}
        text = f"{verb} by {decision.approver} in {where}; {doing}. Details in the thread."
        notice = self.notice(title, text, "info", facts=facts, link_text="Open the run")
        update_notice(self.notifier, self.thread.root, replace(notice, kind="approval"))

    def ending_notice(self, title: str, text: str, severity: Severity, ended: str) -> Notification:
        """What the approval notice becomes when the run ends: the outcome in one line, who decided, no button
        to approve what can't be approved any more, the link to the run; the details are in the thread."""
        facts = {"artifact": self.thread.artifact, "run": self.run.name, **self.thread.decided, "ended": ended}
        return replace(
            self.notice(title, f"{text} Details in the thread.", severity, facts=facts, link_text="Open the run"),
            kind="approval",
        )

    def close_thread(self, title: str, text: str, severity: Severity, ended: str) -> None:
        """Rewrite the approval notice to say how the run ended (nothing when it never asked); best effort."""
        if self.thread.root is not None:
            update_notice(self.notifier, self.thread.root, self.ending_notice(title, text, severity, ended))


def run_thread_key(run_id: str) -> str:
    """The ``thread_key`` of every message about the deploy run ``run_id``."""
    return f"deploy-run:{run_id}"


def deploy_context(
    workspace: str,
    run: RunRef,
    *,
    registry_block: str,
    notifier_block: str,
    consul_block: str,
    teardown: bool,
) -> DeployContext:
    """The context of a run deploying to ``workspace``; a workspace missing from ``icd.toml`` is a ``ConfigError``."""
    config = load_config()
    settings = config.workspace(workspace)
    return DeployContext(
        run=run,
        workspace=workspace,
        namespace=settings.namespace,
        settings=settings,
        promotes=config.promoted_channel(workspace),
        service_name=config.namespace(settings.namespace).service_name,
        registry=cast(ArtifactRegistry, ArtifactRegistry.load(registry_block)),
        notifier=load_notifier(notifier_block),
        consul=cast(ConsulConnection, ConsulConnection.load(consul_block)),
        teardown=teardown,
    )


def tell_without_context(
    workspace: str, run: RunRef, notifier_block: str, title: str, text: str, severity: Severity
) -> None:
    """Tell operators about a run that has no context (``icd.toml`` could not say what ``workspace`` is): the
    notifier block is all it needs, and the notice is shaped as :meth:`DeployContext.notice` shapes one."""
    notifier = load_notifier(notifier_block)
    notice = Notification(
        title=title,
        text=text,
        severity=severity,
        fields={"workspace": workspace},
        link_url=notifier.flow_run_url(run.id),
        link_text="Open the run",
        thread_key=run_thread_key(run.id),
    )
    notify(notifier, notice)
