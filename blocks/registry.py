"""The Prefect block that points flows at the artifact registry and the saved-plan store.

Like prefect-aws's own blocks it holds configuration only (bucket, prefix, credentials) and hands out
ready-made clients; the registry and plan store themselves live in ``tasks/``.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field

from tasks.plan_store import PlanStore
from tasks.registry import Registry


class ArtifactRegistry(Block):
    """An S3 bucket holding artifact versions, channels and saved Terraform plans."""

    _block_type_name = "Artifact Registry"
    _description = "Artifact versions, channels and saved Terraform plans in one S3 bucket."

    bucket: str = Field(description="S3 bucket that holds the registry.")
    prefix: str = Field(default="registry/", description="Key prefix of everything the registry writes; ends in '/'.")
    aws_credentials: AwsCredentials = Field(
        default_factory=AwsCredentials,
        description="Credentials and client parameters (endpoint_url, region) for S3.",
    )

    def registry(self) -> Registry:
        return Registry(self.aws_credentials.get_s3_client(), self.bucket, self.prefix)

    def plan_store(self) -> PlanStore:
        return PlanStore(self.aws_credentials.get_s3_client(), self.bucket, f"{self.prefix}plans/")
