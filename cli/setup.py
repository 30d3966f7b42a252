"""``icd-setup``: what an operator runs once per Prefect server (and again after changing prefect.yaml or
automations.yaml): block types, the work pool, the deployments with their triggers, the automations.

    PREFECT_API_URL=http://prefect:4200/api icd-setup [--pool local-pool]

``icd-setup blocks`` creates the blocks the flows load by name, the registry bucket, the results bucket and
Terraform's lock table (each only if missing). Secrets come from the environment, never from arguments:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``ICD_SLACK_TOKEN``, ``ICD_WEBHOOK_SECRET``. The registry's
signing key is generated once and kept when the block already exists (a new key would orphan every record).

    icd-setup blocks --bucket B [--s3-endpoint URL] [--region R] --slack-channel '#ops' [--slack-api-url URL]
        --ui-url URL --consul-addr URL --alerts-url URL [--allow-private-alerts] [--state-role-arn ARN]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect.automations import AutomationCore
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from prefect_slack import SlackCredentials  # type: ignore[import-untyped]  # ships no type information
from pydantic import SecretStr

from blocks.consul import ConsulConnection
from blocks.github import DEFAULT_API_URL, GITHUB_BLOCK, GitHubConnection
from blocks.notifier import AppriseNotification, SlackNotifier
from blocks.registry import ArtifactRegistry
from cli.inbound import SECRET_BLOCK
from icd.deploy.credentials import UNSCOPED_WARNING
from icd.paths import PROJECT_ROOT
from icd.registry.provenance import generate_key_text
from icd.worker_settings import HEARTBEAT_SECONDS, ZOMBIE_AFTER_SECONDS
from tasks.watch import start_first_watch

# The block names the flows and automations load by default (flow parameters can name others).
REGISTRY_BLOCK = "registry"
NOTIFIER_BLOCK = "ops-slack"
SLACK_SIGNING_SECRET_BLOCK = "slack-signing-secret"  # noqa: S105  # the block's name, not a secret
SLACK_APP_TOKEN_BLOCK = "slack-app-token"  # noqa: S105  # the block's name, not a secret
CONSUL_BLOCK = "consul"
ALERTS_BLOCK = "ops-alerts"
# Task results (the cached steps a resumed deploy skips) live in S3, so a run can resume on any worker.
RESULTS_BLOCK = "icd-results"
STATE_LOCK_TABLE = "icd-terraform-locks"

AUTOMATIONS_FILE = PROJECT_ROOT / "automations.yaml"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


def register_block_types() -> None:
    # Apprise Notification: a notification block for any Apprise URL (e-mail over SMTP), for [notifications].
    for block in (ArtifactRegistry, SlackNotifier, AppriseNotification, ConsulConnection, GitHubConnection):
        block.register_type_and_schema()


def ensure_work_pool(name: str) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy_all(project_dir: Path = PROJECT_ROOT) -> None:
    """``prefect deploy --all`` from the project, so prefect.yaml is the one definition of the deployments."""
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=project_dir,
        env={**os.environ, "ICD_PROJECT_DIR": str(project_dir)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"prefect deploy --all failed:\n{result.stdout}\n{result.stderr}")


def _substitute(text: str) -> str:
    return _PLACEHOLDER.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)


def _block_id(action: dict[str, Any]) -> None:
    """Replace ``block`` + ``block_type`` (names) by the ``block_document_id`` the API wants."""
    name, kind = action.pop("block", None), action.pop("block_type", None)
    if name is None:
        return
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name, block_type_slug=kind)
        except ObjectNotFound:
            raise SystemExit(f"automations.yaml needs a {kind!r} block named {name!r}; create it first") from None
    action["block_document_id"] = str(document.id)


def load_automations(path: Path = AUTOMATIONS_FILE) -> list[AutomationCore]:
    document = yaml.safe_load(_substitute(path.read_text(encoding="utf-8")))
    automations = []
    for entry in document.get("automations", []):
        for action in entry.get("actions", []):
            _block_id(action)
        automations.append(AutomationCore.model_validate(entry))
    return automations


def apply_automations(path: Path = AUTOMATIONS_FILE) -> list[str]:
    """Create every automation of ``path``, replacing one of the same name; returns their names."""
    names = []
    with get_client(sync_client=True) as client:
        for automation in load_automations(path):
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            client.create_automation(automation)
            names.append(automation.name)
    return names


def check_zombie_window() -> None:
    """Refuse a zombie window (``ICD_ZOMBIE_AFTER_SECONDS``) that would crash live runs between two heartbeats."""
    value = os.environ.get("ICD_ZOMBIE_AFTER_SECONDS") or str(ZOMBIE_AFTER_SECONDS)
    if not value.isdigit() or int(value) < 2 * HEARTBEAT_SECONDS:
        raise SystemExit(
            f"icd-setup: ICD_ZOMBIE_AFTER_SECONDS={value!r} must be a whole number of at least "
            f"{2 * HEARTBEAT_SECONDS} (two heartbeats of {HEARTBEAT_SECONDS} s), or a live run is marked Crashed; "
            f"the default is {ZOMBIE_AFTER_SECONDS}"
        )


def setup(pool: str, project_dir: Path = PROJECT_ROOT, automations: Path = AUTOMATIONS_FILE) -> list[str]:
    check_zombie_window()
    register_block_types()
    ensure_work_pool(pool)
    deploy_all(project_dir)
    names = apply_automations(automations)
    start_first_watch()  # health is watched from the start, not from the schedule's first run
    return names


@dataclass(frozen=True)
class Site:
    """Where the flows' blocks point. The secrets are ``SecretStr`` from here on."""

    bucket: str
    aws_access_key_id: str
    aws_secret_access_key: SecretStr
    slack_token: SecretStr
    slack_channel: str
    prefect_ui_url: str | None  # deprecated here: [site] prefect_ui_url in icd.toml, or PREFECT_UI_URL
    consul_addr: str
    alerts_url: str
    webhook_secret: SecretStr
    region: str = "us-east-1"
    s3_endpoint: str | None = None
    slack_api_url: str = "https://slack.com/api/"
    allow_private_alerts: bool = False  # a receiver on a private address (a local one in the walkthrough)
    # The IAM role Terraform's steps assume, scoped to one workspace each (docs/operations.md); None: the keys above.
    state_role_arn: str | None = None
    # The Slack app's signing secret (its buttons post to icd-inbound's /slack/interactions), or its app-level
    # token (Socket Mode, no public URL); with either, approval notices and alerts carry buttons.
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    # A token that writes deployments and commit statuses (icd/github/); None: nothing is reported to GitHub.
    github_token: SecretStr | None = None
    github_api_url: str = DEFAULT_API_URL

    @property
    def results_bucket(self) -> str:
        return f"{self.bucket}-results"


def save_blocks(site: Site) -> ArtifactRegistry:
    """The blocks the flows load by name (``registry``, ``ops-slack``, ``consul``, ``github-webhook-secret``,
    ``ops-alerts``, ``icd-results``) and the S3 buckets and DynamoDB table they need, each made if missing."""
    credentials = AwsCredentials(
        aws_access_key_id=site.aws_access_key_id,
        aws_secret_access_key=site.aws_secret_access_key,
        region_name=site.region,
        aws_client_parameters=AwsClientParameters(endpoint_url=site.s3_endpoint),
    )
    s3 = credentials.get_s3_client()
    for bucket in (site.bucket, site.results_bucket):
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            s3.create_bucket(Bucket=bucket)
    create_lock_table(credentials, STATE_LOCK_TABLE)
    registry = ArtifactRegistry(
        bucket=site.bucket,
        aws_credentials=credentials,
        signing_key=_existing_signing_key() or SecretStr(secrets.token_urlsafe(32)),
        provenance_key=_existing_provenance_key() or SecretStr(generate_key_text()),
        state_lock_table=STATE_LOCK_TABLE,
        state_role_arn=site.state_role_arn,
    )
    registry.save(REGISTRY_BLOCK, overwrite=True)
    # Task results in their own bucket: workers need them, the registry's readers don't.
    S3Bucket(bucket_name=site.results_bucket, credentials=credentials).save(RESULTS_BLOCK, overwrite=True)
    SlackNotifier(
        credentials=SlackCredentials(token=site.slack_token),
        channel=site.slack_channel,
        api_url=site.slack_api_url,
        prefect_ui_url=site.prefect_ui_url,
        buttons=site.slack_signing_secret is not None or site.slack_app_token is not None,
    ).save(NOTIFIER_BLOCK, overwrite=True)
    if site.slack_signing_secret is not None:
        Secret(value=site.slack_signing_secret).save(SLACK_SIGNING_SECRET_BLOCK, overwrite=True)
    if site.slack_app_token is not None:
        Secret(value=site.slack_app_token).save(SLACK_APP_TOKEN_BLOCK, overwrite=True)
    if site.github_token is not None:
        GitHubConnection(token=site.github_token, api_url=site.github_api_url).save(GITHUB_BLOCK, overwrite=True)
    ConsulConnection(address=site.consul_addr, timeout_seconds=10).save(CONSUL_BLOCK, overwrite=True)
    Secret(value=site.webhook_secret).save(SECRET_BLOCK, overwrite=True)
    # Where critical-health automations send; operators may pick PagerDuty, Teams, e-mail... in the UI instead.
    CustomWebhookNotificationBlock(
        name=ALERTS_BLOCK,
        url=site.alerts_url,
        json_data={"text": "{{subject}}", "body": "{{body}}"},
        headers=None,
        cookies=None,
        allow_private_urls=site.allow_private_alerts,
    ).save(ALERTS_BLOCK, overwrite=True)
    return registry


def _existing_signing_key() -> SecretStr | None:
    try:
        existing = ArtifactRegistry.load(REGISTRY_BLOCK)
    except ValueError:  # Prefect's "Unable to find block document named ..."
        return None
    return existing.signing_key if isinstance(existing, ArtifactRegistry) else None


def _existing_provenance_key() -> SecretStr | None:
    """Kept like the signing key: a new key would make every provenance signed so far unverifiable."""
    try:
        existing = ArtifactRegistry.load(REGISTRY_BLOCK)
    except ValueError:  # Prefect's "Unable to find block document named ..."
        return None
    return existing.provenance_key if isinstance(existing, ArtifactRegistry) else None


def create_lock_table(credentials: AwsCredentials, table: str) -> None:
    """The DynamoDB table Terraform's S3 backend locks each workspace's state in (hash key ``LockID``)."""
    dynamodb = credentials.get_client("dynamodb")
    with contextlib.suppress(dynamodb.exceptions.ResourceInUseException):  # already there: fine
        dynamodb.create_table(
            TableName=table,
            AttributeDefinitions=[{"AttributeName": "LockID", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "LockID", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )


def _secret_from_env(name: str) -> SecretStr:
    secret = _optional_secret_from_env(name)
    if secret is None:
        raise SystemExit(f"icd-setup blocks: set ${name} (secrets are read from the environment, never argv)")
    return secret


def _optional_secret_from_env(name: str) -> SecretStr | None:
    value = os.environ.get(name, "")
    return SecretStr(value) if value else None


def blocks_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="icd-setup blocks", description="Create the blocks the flows load.")
    parser.add_argument("--bucket", required=True, help="the registry's S3 bucket (results go to BUCKET-results)")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--s3-endpoint", default=None, help="a non-AWS S3 endpoint (moto, MinIO)")
    parser.add_argument("--slack-channel", required=True, help="#channel or channel ID")
    parser.add_argument("--slack-api-url", default="https://slack.com/api/", help="Slack's Web API (or a stand-in)")
    parser.add_argument(
        "--ui-url",
        default=None,
        help="the Prefect UI's URL, for links in messages (deprecated: set [site] prefect_ui_url in icd.toml)",
    )
    parser.add_argument("--consul-addr", required=True, help="the Consul agent's HTTP API")
    parser.add_argument("--alerts-url", required=True, help="where critical-health alerts are posted")
    parser.add_argument("--allow-private-alerts", action="store_true", help="the alerts URL is on a private network")
    parser.add_argument(
        "--state-role-arn",
        default=None,
        help="IAM role Terraform assumes, scoped per workspace (docs/operations.md); without it, the keys above",
    )
    parser.add_argument(
        "--github-api-url", default=DEFAULT_API_URL, help="GitHub's REST API (or a stand-in); with $ICD_GITHUB_TOKEN"
    )
    args = parser.parse_args(argv)
    site = Site(
        bucket=args.bucket,
        aws_access_key_id=_secret_from_env("AWS_ACCESS_KEY_ID").get_secret_value(),
        aws_secret_access_key=_secret_from_env("AWS_SECRET_ACCESS_KEY"),
        slack_token=_secret_from_env("ICD_SLACK_TOKEN"),
        slack_channel=args.slack_channel,
        prefect_ui_url=args.ui_url,
        consul_addr=args.consul_addr,
        alerts_url=args.alerts_url,
        webhook_secret=_secret_from_env("ICD_WEBHOOK_SECRET"),
        region=args.region,
        s3_endpoint=args.s3_endpoint,
        slack_api_url=args.slack_api_url,
        allow_private_alerts=args.allow_private_alerts,
        state_role_arn=args.state_role_arn,
        slack_signing_secret=_optional_secret_from_env("ICD_SLACK_SIGNING_SECRET"),
        slack_app_token=_optional_secret_from_env("ICD_SLACK_APP_TOKEN"),
        github_token=_optional_secret_from_env("ICD_GITHUB_TOKEN"),
        github_api_url=args.github_api_url,
    )
    save_blocks(site)
    print(
        f"blocks saved: {REGISTRY_BLOCK}, {NOTIFIER_BLOCK}, {CONSUL_BLOCK}, {SECRET_BLOCK}, {ALERTS_BLOCK}, "
        f"{RESULTS_BLOCK} (s3://{site.bucket}, s3://{site.results_bucket}, lock table {STATE_LOCK_TABLE})"
    )
    if not site.state_role_arn:
        print(f"warning: {UNSCOPED_WARNING} (set --state-role-arn)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["blocks"]:
        return blocks_main(argv[1:])
    parser = argparse.ArgumentParser(prog="icd-setup", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pool", default="local-pool", help="the process work pool (default: %(default)s)")
    args = parser.parse_args(argv)
    created = setup(args.pool)
    print(f"deployments created from prefect.yaml; automations: {', '.join(created)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
