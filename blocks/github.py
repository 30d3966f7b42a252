"""The GitHub connection block: the token deploy and build statuses are posted with; hands out a cached
githubkit client."""

from __future__ import annotations

from githubkit import GitHub, TokenAuthStrategy
from prefect.blocks.core import Block
from pydantic import Field, PrivateAttr, SecretStr

GITHUB_BLOCK = "github"
DEFAULT_API_URL = "https://api.github.com"


class GitHubConnection(Block):
    """A token that may write deployments and commit statuses of the namespaces' repositories.

    A fine-grained token needs "Deployments" and "Commit statuses" (read and write) on those repositories.

    Example:
        ```python
        github = GitHubConnection.load("github").get_client()
        DeploymentReporter(github).deliver(report)   # icd/github/deployments.py
        ```
    """

    _block_type_name = "GitHub Connection"
    _description = "Token and API address used to report deploys and builds to GitHub."

    token: SecretStr = Field(description="Sent as the Authorization header; needs deployments and statuses write.")
    api_url: str = Field(
        default=DEFAULT_API_URL, description="GitHub's REST API (GitHub Enterprise: https://HOST/api/v3)."
    )
    timeout_seconds: float = Field(default=10.0, gt=0, description="How long to wait for GitHub to answer.")

    _client: GitHub[TokenAuthStrategy] | None = PrivateAttr(default=None)

    def get_client(self) -> GitHub[TokenAuthStrategy]:
        """A githubkit client of this block's token and API. githubkit's own retries and HTTP cache are off:
        a report is best effort and redelivered later (``tasks/github_status.py``), and a cached GET would
        hide a deployment created a moment ago."""
        if self._client is None:
            self._client = GitHub(
                TokenAuthStrategy(self.token.get_secret_value()),
                base_url=self.api_url,
                auto_retry=False,
                http_cache=False,
                timeout=self.timeout_seconds,
                user_agent="immutable-cd",
            )
        return self._client
