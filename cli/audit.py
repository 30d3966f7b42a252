"""``icd-audit``: which commit is this, who approved it, which plan, where does it run: one command.

    icd-audit NAMESPACE VERSION [--workspace W] [--json]
    icd-audit --workspace W [--json]          # what W runs now (its Terraform state), audited
    icd-audit --instance SERVICE_ID [--json]  # the Consul instance's deploy run, audited

Every link comes from a record the system keeps, each checked as it is read: the registry's sealed version
record (HMAC), the build's signed SLSA provenance (Ed25519, DSSE), the channel history, the stored plans
(their SHA-256), the signed deployment records (the decision: who, from where, when, why; the apply: run,
outputs, the gate's verdict), Consul's instances and health now, and the drift checks since. A link whose
record is absent is shown as missing, one whose check fails as broken, each with the reason; nothing is
guessed. The exit code is 0 when every link holds, 1 otherwise (2: bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from blocks.consul import ConsulConnection
from blocks.registry import ArtifactRegistry
from icd.audit import Chain, Link, batch_gate, batch_plan_sha, broken, chain, missing, parse_plan_id
from icd.config import PipelineConfig, load_config
from icd.deploy.drift import DriftMemory, DriftStore
from icd.errors import DeployError
from icd.health.snapshot import ServiceEntry, aggregate, parse_service_entries
from icd.registry.models import ArtifactVersion
from icd.registry.provenance import CheckedEnvelope
from icd.text import operator_time


class Auditor:
    """Reads the records of one installation (its blocks) and joins them into a :class:`Chain`."""

    def __init__(self, registry: ArtifactRegistry, consul: ConsulConnection | None, config: PipelineConfig) -> None:
        self.block = registry
        self.registry = registry.registry()
        self.consul = consul
        self.config = config
        self._records: dict[str, list[CheckedEnvelope]] = {}
        self._entries: dict[str, list[ServiceEntry]] = {}
        self._drift_memories: dict[str, DriftMemory | None] = {}

    # --- entry points ------------------------------------------------------------------------------------

    def version(self, namespace: str, number: int, *, workspace: str | None = None) -> Chain:
        subject = f"{namespace} v{number}" + (f" in {workspace}" if workspace else "")
        try:
            version = self.registry.get(namespace, number)
        except DeployError as exc:
            return chain(subject, [broken("version", f"{namespace} v{number}", str(exc))])
        links = [
            self._commit(version),
            self._build(version),
            *self._artifacts(version),
            self._channels(version),
            *self._plans(version, workspace),
        ]
        return chain(subject, links)

    def workspace(self, workspace: str) -> Chain:
        settings = self.config.workspace(workspace)
        running = self.block.running(workspace, settings.namespace)
        if running is None:
            return chain(f"what {workspace} runs", [missing("state", workspace, "its Terraform state holds nothing")])
        if running.version is None:
            label = ", ".join(running.artifact_ids) or "an unknown artifact"
            reason = f"the state runs {label}, which no version of {settings.namespace} produced"
            return chain(f"what {workspace} runs", [broken("state", workspace, reason)])
        return self.version(settings.namespace, running.version.version, workspace=workspace)

    def instance(self, service_id: str) -> Chain:
        found = self._consul_instance(service_id)
        if found is None:
            return chain(f"instance {service_id}", [missing("instance", service_id, "Consul has no such service")])
        meta = found.get("Meta") or {}
        workspace = str(meta.get("workspace") or "")
        if workspace not in self.config.workspaces:
            reason = f"its Meta names workspace {workspace!r}, which icd.toml does not"
            return chain(f"instance {service_id}", [broken("instance", service_id, reason)])
        return self.workspace(workspace)

    # --- links -------------------------------------------------------------------------------------------

    def _commit(self, version: ArtifactVersion) -> Link:
        facts = {"ref": version.git_ref}
        for key in ("commit_author", "pushed_by"):
            if version.labels.get(key):
                facts[key.replace("_", " ")] = version.labels[key]
        return Link("commit", version.git_commit, facts=facts)

    def _build(self, version: ArtifactVersion) -> Link:
        run = version.labels.get("build_run_id", "")
        facts = {
            "by": version.created_by,
            "at": operator_time(version.created_at),
            "packer run": version.packer_run_uuid,
        }
        if not run:
            return Link("build", version.created_by, "missing", facts, "the version names no build run")
        return Link("build", f"run {run}", facts=facts)

    def _artifacts(self, version: ArtifactVersion) -> list[Link]:
        links = []
        for platform, artifact in sorted(version.artifacts.items()):
            digest = version.artifact_sha256.get(platform, "")
            facts = {"platform": platform, "sha256": digest or "-"}
            try:
                verified = self.registry.verify_provenance(version, platform)
            except DeployError as exc:
                links.append(
                    Link("artifact", artifact, "ok", facts, children=(broken("provenance", platform, str(exc)),))
                )
                continue
            run = verified.statement.get("predicate", {}).get("runDetails", {})
            invocation = str(run.get("metadata", {}).get("invocationId", ""))
            provenance = Link(
                "provenance",
                f"SLSA v1, signed by key {verified.keyid[:16]}",
                facts={"builder": str(run.get("builder", {}).get("id", "")), "build run": invocation},
            )
            if invocation and invocation != version.labels.get("build_run_id", invocation):
                provenance = broken("provenance", provenance.label, "it names another build run than the version")
            links.append(Link("artifact", artifact, "ok", facts, children=(provenance,)))
        if not links:
            links.append(missing("artifact", "-", "the version lists no artifact"))
        return links

    def _channels(self, version: ArtifactVersion) -> Link:
        moves = []
        for pointer in self.registry.list_channels(version.namespace):
            for move in self.registry.channel_history(version.namespace, pointer.channel):
                if version.version in (move.to_version, move.from_version):
                    moves.append(move)
        moves.sort(key=lambda move: move.assigned_at)
        facts = {
            f"{operator_time(move.assigned_at)} {move.channel}": (
                f"{_v(move.from_version)} -> {_v(move.to_version)} by {move.assigned_by}"
                + (f" ({move.reason})" if move.reason else "")
            )
            for move in moves
        }
        revoked = version.revocation
        if revoked is not None:
            facts["revoked"] = f"{operator_time(revoked.revoked_at)} by {revoked.revoked_by}: {revoked.reason}"
        return Link("version", f"{version.namespace} v{version.version}", facts=facts)

    def _plans(self, version: ArtifactVersion, workspace: str | None) -> list[Link]:
        plans = self.block.plan_store().plans_of(version.namespace, version.version)
        if workspace is not None:
            plans = [plan for plan in plans if plan.workspace == workspace]
        if not plans:
            return [missing("plan", "-", "no plan of this version is stored (never planned, or not in a workspace)")]
        links = []
        for plan in plans:
            which = parse_plan_id(plan.plan_id)
            run_id = which.run_id
            record = self._record_of(plan.workspace, run_id)
            children: list[Link] = []
            facts = {"run": run_id}
            if which.role in ("rollback", "revert"):
                what, policy = (
                    ("rollback", "rollback_on_unhealthy") if which.role == "rollback" else ("revert", "auto_revert")
                )
                children.append(Link("decision", f"automatic {what} by run {run_id}", facts={"policy": policy}))
                children += self._apply(record, plan.workspace, rollback=True, build_label=version.build_label)
            elif which.role == "batch" and which.batch is not None:
                # A rollout's later batch: applied under the approval of the run's first plan, and only while
                # it stayed on the approved path; its instances are listed under that plan's apply (same run).
                facts["batch"] = str(which.batch)
                children.append(self._batch_decision(record, run_id, which.batch, plan.sha256))
            else:
                children.append(self._decision(record, run_id, plan.sha256))
                children += self._apply(record, plan.workspace, rollback=False, build_label=version.build_label)
            links.append(Link("plan", f"{plan.sha256[:16]} in {plan.workspace}", facts=facts, children=tuple(children)))
        return links

    def _batch_decision(self, record: CheckedEnvelope | None, run_id: str, batch: int, plan_sha: str) -> Link:
        label = f"batch {batch} of run {run_id}"
        if record is None:
            return missing("decision", label, "no signed decision of its run covers this batch")
        if record.verified is None:
            return broken("decision", label, record.problem)
        verdict = record.verified.statement.get("verdict", {})
        if verdict.get("outcome") == "Rejected":
            return broken("decision", label, "its run's rollout was rejected, yet this batch was planned")
        line = batch_gate(str(verdict.get("gate") or ""), batch)
        # Each applied batch's line names its plan's whole hash: the stored plan must be that one.
        if line is not None:
            named = batch_plan_sha(line)
            if named is None:  # a rollout signs every applied batch's line with its plan's hash
                return broken("decision", label, f"the signed record's line for batch {batch} names no plan")
            if named != plan_sha:
                return broken(
                    "decision", label, f"the signed record applied plan {named}, the stored one is {plan_sha}"
                )
        facts = {"gate": line or "not applied (the signed record has no line for this batch)"}
        return Link("decision", f"covered by the rollout's approval (run {run_id})", facts=facts)

    def _decision(self, record: CheckedEnvelope | None, run_id: str, plan_sha: str) -> Link:
        if record is None:
            return missing("decision", f"run {run_id}", "no signed decision (still waiting, superseded, timed out)")
        if record.verified is None:
            return broken("decision", f"run {run_id}", record.problem)
        said = record.verified.statement
        approval = said.get("approval", {})
        verdict = said.get("verdict", {})
        if said.get("plan", {}).get("sha256") != plan_sha:
            return broken("decision", f"run {run_id}", "the signed record names another plan than the one stored")
        decided = "rejected" if verdict.get("outcome") == "Rejected" else "approved"
        facts = {
            "by": str(approval.get("approvers", "")),
            "source": "Slack (signed click)" if approval.get("source") == "slack" else "Prefect UI / API (typed name)",
            "recorded": str(said.get("recordedAt", "")),
            "comment": str(approval.get("comment") or "-"),
        }
        return Link("decision", f"{decided} (run {run_id})", facts=facts)

    def _apply(self, record: CheckedEnvelope | None, workspace: str, *, rollback: bool, build_label: str) -> list[Link]:
        if record is None or record.verified is None:
            return []  # the decision link already says why
        said = record.verified.statement
        verdict = said.get("verdict", {})
        outcome = str(verdict.get("outcome", ""))
        if outcome == "Rejected":
            return [Link("apply", "nothing applied: rejected")]
        apply = said.get("apply", {})
        outputs = apply.get("outputs") or {}
        facts = {
            "run": str(apply.get("runId", "")),
            "outcome": outcome,
            "gate": str(verdict.get("gate") or "-"),
            "outputs": ", ".join(f"{k}={v}" for k, v in sorted(outputs.items())) or "-",
        }
        label = "the rollback's apply" if rollback else f"applied in {workspace}"
        run_id = str(apply.get("runId", ""))
        children = () if rollback else (*self._instances(workspace, run_id, build_label), *self._drift(workspace, said))
        return [Link("apply", label, facts=facts, children=tuple(children))]

    def _instances(self, workspace: str, run_id: str, build_label: str) -> list[Link]:
        """The Consul instances this apply started that run now: its run id in their Meta, and this version's
        build label (a rollback inside the same run starts the previous version under that run id)."""
        if self.consul is None:
            return [missing("instance", workspace, "no Consul block: instances not read")]
        entries = self._consul_entries(workspace)
        if entries is None:
            return [missing("instance", workspace, "Consul did not answer")]
        mine = [
            entry
            for entry in entries
            if entry.meta.get("deploy_run_id") == run_id
            and (not build_label or entry.meta.get("artifact_version", build_label) == build_label)
        ]
        if not mine:
            return [Link("instance", "none carries this deploy now", facts={"workspace": workspace})]
        return [
            Link(
                "instance",
                entry.instance.service_id,
                # The health watch's own aggregation: the worst check, maintenance aside.
                facts={
                    "node": entry.instance.node,
                    "health": aggregate(entry.instance).status if entry.instance.checks else "no checks",
                    # A fleet's instance says its slot (examples/stacks/local-fleet); a single one has none.
                    **({"slot": entry.meta["slot"]} if entry.meta.get("slot") else {}),
                },
            )
            for entry in mine
        ]

    def _drift(self, workspace: str, said: dict[str, Any]) -> list[Link]:
        try:
            memory = self._drift_memory(workspace)
        except DeployError as exc:
            return [broken("drift", workspace, str(exc))]
        if memory is None or memory.checked_at is None:
            # A fact, not a gap: the audit says so, and the chain still holds.
            return [Link("drift", "no drift check has run in this workspace")]
        recorded = _when(str(said.get("recordedAt", "")))
        since = [entry for entry in memory.history if recorded is None or entry.at >= recorded]
        facts = {operator_time(entry.at): f"{entry.tell}: {', '.join(entry.addresses) or '-'}" for entry in since}
        label = f"last checked {operator_time(memory.checked_at)}: " + ("drifted" if memory.fingerprint else "clean")
        return [Link("drift", label, facts=facts)]

    # --- reading -----------------------------------------------------------------------------------------

    def _record_of(self, workspace: str, run_id: str) -> CheckedEnvelope | None:
        if workspace not in self._records:
            self._records[workspace] = self.registry.deployment_records(workspace)
        return next((r for r in self._records[workspace] if r.where.endswith(f"/{run_id}.dsse.json")), None)

    def _drift_memory(self, workspace: str) -> DriftMemory | None:
        """What the drift check of ``workspace`` last told; read once per audit (every apply link shows it)."""
        if workspace not in self._drift_memories:
            store = DriftStore(self.block.s3_client(), self.block.bucket, self.block.prefix)
            self._drift_memories[workspace] = store.load(workspace)
        return self._drift_memories[workspace]

    def _consul_entries(self, workspace: str) -> list[ServiceEntry] | None:
        """The workspace's instances in Consul with their checks, read once per audit; None when Consul fails."""
        assert self.consul is not None
        if workspace not in self._entries:
            settings = self.config.workspace(workspace)
            service = self.config.namespace(settings.namespace).service_name
            try:
                _, entries = self.consul.get_client().health.service(service)
            except Exception:  # noqa: BLE001  # shown as a missing link, with the reason
                return None
            parsed = parse_service_entries(entries)
            self._entries[workspace] = [entry for entry in parsed if entry.meta.get("workspace") == workspace]
        return self._entries[workspace]

    def _consul_instance(self, service_id: str) -> dict[str, Any] | None:
        if self.consul is None:
            return None
        services = self.consul.get_client().agent.services()
        found = services.get(service_id)
        return cast(dict[str, Any], found) if found else None


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "nothing"


def _when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icd-audit", description="Print the audit chain of a version.")
    parser.add_argument("namespace", nargs="?", help="e.g. acmeinc/web")
    parser.add_argument("version", nargs="?", type=int)
    parser.add_argument("--workspace", help="what this workspace runs (alone), or limit a version's chain to it")
    parser.add_argument("--instance", help="a Consul service ID")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--block", default="registry", help="the registry block")
    parser.add_argument("--consul-block", default="consul")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.instance or args.workspace or (args.namespace and args.version)):
        parser.error("give NAMESPACE VERSION, --workspace W or --instance SERVICE_ID")
    registry = cast(ArtifactRegistry, ArtifactRegistry.load(args.block))
    try:
        consul = cast(ConsulConnection, ConsulConnection.load(args.consul_block))
    except ValueError:
        consul = None
    auditor = Auditor(registry, consul, load_config())
    if args.instance:
        found = auditor.instance(args.instance)
    elif args.namespace and args.version:
        found = auditor.version(args.namespace, args.version, workspace=args.workspace)
    else:
        found = auditor.workspace(args.workspace)
    print(found.to_json() if args.json else found.to_text())
    return 0 if found.intact else 1


if __name__ == "__main__":
    sys.exit(main())
