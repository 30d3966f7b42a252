"""The block that points flows at the artifact registry, the saved-plan store and the Terraform state.

Like prefect-aws's own blocks it holds configuration and secrets only (bucket, prefix, credentials, the
registry's signing key, the state lock table) and hands out ready-made, cached clients; the registry and
the plan store themselves live in ``icd/registry/``.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, PrivateAttr, SecretStr

from icd.deploy.credentials import (
    MAX_SESSION_SECONDS,
    MIN_SESSION_SECONDS,
    STEP_SESSION_SECONDS,
    ScopedCredentials,
    TerraformStep,
    scoped_credentials,
)
from icd.deploy.queue import WorkspaceQueue, prefect_run_alive
from icd.deploy.queue_store import S3QueueStore
from icd.deploy.running import Running, what_runs
from icd.deploy.workdir import StateBackend, fetch_state
from icd.registry.plans import PlanStore
from icd.registry.provenance import load_private_key
from icd.registry.registry import Registry
from icd.registry.signing import Sealer


class ArtifactRegistry(Block):
    """An S3 bucket holding artifact versions, channels, saved Terraform plans, Terraform states and each
    workspace's deploy queue."""

    _block_type_name = "Artifact Registry"
    _description = "Artifact versions, channels, saved Terraform plans and states in one S3 bucket."

    bucket: str = Field(description="S3 bucket that holds the registry.")
    prefix: str = Field(default="registry/", description="Key prefix of everything the registry writes; ends in '/'.")
    aws_credentials: AwsCredentials = Field(
        default_factory=AwsCredentials,
        description="Credentials and client parameters (endpoint_url, region) for S3 and DynamoDB.",
    )
    signing_key: SecretStr = Field(
        description=(
            "Secret that seals every registry record (HMAC-SHA256, at least 16 bytes). Records altered "
            "outside the registry are refused. Keep it only here: no instance or S3 policy needs it."
        ),
    )
    provenance_key: SecretStr | None = Field(
        default=None,
        description=(
            "Ed25519 private key (base64 of its 32-byte seed, or PEM) that signs each artifact's SLSA provenance and "
            "each deployment record; deploys refuse artifacts it did not sign. `icd-setup blocks` makes one."
        ),
    )
    state_lock_table: str | None = Field(
        default="icd-terraform-locks",
        description="DynamoDB table (hash key LockID) that Terraform locks each workspace's state in.",
    )

    state_role_arn: str | None = Field(
        default=None,
        description=(
            "IAM role Terraform's steps assume, each narrowed to one workspace's state object and lock items and "
            "lasting minutes (docs/operations.md#terraforms-credentials). Empty: Terraform gets this block's own "
            "credentials, which open the whole bucket to anything a stack starts."
        ),
    )
    apply_session_seconds: int = Field(
        default=STEP_SESSION_SECONDS["apply"],
        ge=MIN_SESSION_SECONDS,
        le=MAX_SESSION_SECONDS,
        description=(
            "How long an apply step's session lasts: longer than the stack's longest apply (Terraform can't save "
            "the state or release its lock once it expires), and no longer, since a leaked key lives that long."
        ),
    )

    _s3: Any = PrivateAttr(default=None)

    def s3_client(self) -> Any:
        """One boto3 S3 client per block instance (boto3 clients are thread-safe and slow to build)."""
        if self._s3 is None:
            self._s3 = self.aws_credentials.get_s3_client()
        return self._s3

    def _sealer(self) -> Sealer:
        return Sealer(self.signing_key.get_secret_value().encode())

    def registry(self) -> Registry:
        key = load_private_key(self.provenance_key.get_secret_value()) if self.provenance_key else None
        return Registry(self.s3_client(), self.bucket, self.prefix, sealer=self._sealer(), provenance_key=key)

    def workspace_queue(self) -> WorkspaceQueue:
        """Each workspace's lock and pending request (``icd/deploy/queue.py``), sealed in this bucket; a holder
        whose Prefect run has ended counts as gone."""
        store = S3QueueStore(self.s3_client(), self.bucket, self.prefix, sealer=self._sealer())
        return WorkspaceQueue(store, run_alive=prefect_run_alive)

    def plan_store(self) -> PlanStore:
        return PlanStore(self.s3_client(), self.bucket, f"{self.prefix}plans/")

    def state_backend(self) -> StateBackend:
        endpoint = self.aws_credentials.aws_client_parameters.endpoint_url
        return StateBackend(
            bucket=self.bucket,
            key_prefix=self.prefix,
            region=self.aws_credentials.region_name or "us-east-1",
            endpoint=str(endpoint) if endpoint else None,
            lock_table=self.state_lock_table,
            dynamodb_endpoint=str(endpoint) if endpoint and self.state_lock_table else None,
        )

    def workspace_state(self, workspace: str) -> tuple[bytes | None, str]:
        """The workspace's Terraform state as stored (None: it has none yet), and where it is."""
        backend = self.state_backend()
        return fetch_state(self.s3_client(), backend, workspace), backend.state_url(workspace)

    def running(self, workspace: str, namespace: str) -> Running | None:
        """What ``workspace`` runs, as its Terraform state says (``icd/deploy/running.py``): the one answer to
        "what runs in W", for the deploy, the revocation notice, the teardown, drift and the audit."""
        state, _ = self.workspace_state(workspace)
        registry = self.registry()
        return what_runs(
            state, workspace=workspace, find_version=lambda artifact: registry.find_by_artifact_id(namespace, artifact)
        )

    def terraform_env(
        self, workspace: str, step: TerraformStep, *, run_label: str = ""
    ) -> tuple[dict[str, str], ScopedCredentials | None]:
        """Terraform's environment for one step on ``workspace``: an STS session of ``state_role_arn`` scoped to
        the workspace's state and lock items (icd/deploy/credentials.py), and that session; without a state
        role, this block's own credentials (today's behaviour: the whole bucket) and None. Never argv or logs."""
        if self.state_role_arn:
            backend = self.state_backend()
            scoped = scoped_credentials(
                self.aws_credentials.get_client("sts"),
                role_arn=self.state_role_arn,
                backend=backend,
                workspace=workspace,
                step=step,
                duration_seconds=self.apply_session_seconds if step == "apply" else STEP_SESSION_SECONDS[step],
                run_label=run_label,
            )
            return scoped.env(backend.region), scoped
        return self._own_credentials_env(), None

    def _own_credentials_env(self) -> dict[str, str]:
        creds = self.aws_credentials
        env: dict[str, str] = {}
        if creds.aws_access_key_id:
            env["AWS_ACCESS_KEY_ID"] = creds.aws_access_key_id
        if creds.aws_secret_access_key:
            env["AWS_SECRET_ACCESS_KEY"] = creds.aws_secret_access_key.get_secret_value()
        if creds.aws_session_token:
            env["AWS_SESSION_TOKEN"] = creds.aws_session_token
        if creds.region_name:
            env["AWS_DEFAULT_REGION"] = creds.region_name
        return env
