"""The kluster.ai credentials block: the one place that makes an openai client."""

from __future__ import annotations

from openai import OpenAI
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

DEFAULT_BASE_URL = "https://api.kluster.ai/v1"


class KlusterCredentials(Block):
    """Credentials and connection settings for the kluster.ai Batch API.

    The API key is a ``SecretStr``: Prefect stores it encrypted and shows it masked,
    and it never appears in this block's repr.

    Example:
        Save once, then load by name in any flow::

            from prefect_kluster.blocks import KlusterCredentials

            KlusterCredentials(api_key="...").save("kluster", overwrite=True)
            client = KlusterCredentials.load("kluster").get_client()
    """

    _block_type_name = "kluster.ai Credentials"
    _block_type_slug = "kluster-ai-credentials"
    _logo_url = "https://avatars.githubusercontent.com/u/39270045?s=200&v=4"
    _description = "API key and endpoint for kluster.ai batch inference (OpenAI-compatible)."
    _documentation_url = "https://docs.kluster.ai/"

    api_key: SecretStr = Field(description="kluster.ai API key.")
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description="Base URL of the OpenAI-compatible API, ending in /v1.",
    )
    timeout: float = Field(
        default=60.0, gt=0, description="Seconds before a single HTTP request times out."
    )
    max_retries: int = Field(
        default=2,
        ge=0,
        description="Retries the openai SDK makes itself on connection errors, 429 and 5xx.",
    )

    def get_client(self) -> OpenAI:
        """Return an openai client configured for kluster.ai."""
        return OpenAI(
            api_key=self.api_key.get_secret_value(),
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
        )
