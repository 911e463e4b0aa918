"""Environment fallback for credentials when no saved block is named."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_kluster.blocks.credentials import DEFAULT_BASE_URL, KlusterCredentials


class MissingCredentialsError(RuntimeError):
    """Raised when neither a block name nor KLUSTER_API_KEY gives an API key."""


class KlusterSettings(BaseSettings):
    """Reads KLUSTER_API_KEY, KLUSTER_BASE_URL, KLUSTER_TIMEOUT and KLUSTER_MAX_RETRIES
    from the environment or a ``.env`` file in the working directory."""

    model_config = SettingsConfigDict(env_prefix="KLUSTER_", env_file=".env", extra="ignore")

    api_key: SecretStr | None = None
    base_url: str = DEFAULT_BASE_URL
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=2, ge=0)

    def to_credentials(self) -> KlusterCredentials:
        if self.api_key is None or not self.api_key.get_secret_value():
            raise MissingCredentialsError(
                "No kluster.ai API key: set KLUSTER_API_KEY (environment or .env) "
                "or pass credentials_block with the name of a saved KlusterCredentials block."
            )
        return KlusterCredentials(
            api_key=self.api_key,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
        )


def resolve_credentials(credentials_block: str | None = None) -> KlusterCredentials:
    """Load the named block, or fall back to KLUSTER_* settings when no name is given."""
    if credentials_block:
        return KlusterCredentials.load(credentials_block)
    return KlusterSettings().to_credentials()
