"""The kluster.ai credentials block: the one place that makes an openai client."""

from __future__ import annotations

import functools
import ssl
import threading
from typing import Any

import httpx
from openai import DefaultHttpxClient, OpenAI
from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr

DEFAULT_BASE_URL = "https://api.kluster.ai/v1"


class KlusterCredentials(CredentialsBlock):
    """Credentials and connection settings for the kluster.ai Batch API.

    The API key is a ``SecretStr``: Prefect stores it encrypted and shows it masked,
    and it never appears in this block's repr.

    Attributes:
        api_key: The kluster.ai API key.
        base_url: Base URL of the OpenAI-compatible API.
        timeout: Seconds before a single HTTP request times out.
        max_retries: Retries the openai SDK makes itself on transient errors.

    Examples:
        Load stored kluster.ai credentials:
        ```python
        from prefect_kluster import KlusterCredentials

        kluster_credentials = KlusterCredentials.load("BLOCK_NAME")
        ```

        Save credentials once, then get an openai client for kluster.ai in any flow:
        ```python
        from prefect_kluster import KlusterCredentials

        KlusterCredentials(api_key="...").save("BLOCK_NAME", overwrite=True)
        client = KlusterCredentials.load("BLOCK_NAME").get_client()
        models = client.models.list()
        ```
    """

    _block_type_name = "kluster.ai Credentials"
    _block_type_slug = "kluster-ai-credentials"
    _logo_url = "https://avatars.githubusercontent.com/u/39270045?s=200&v=4"
    _description = "API key and endpoint for kluster.ai batch inference (OpenAI-compatible)."
    _documentation_url = "https://docs.kluster.ai/"

    api_key: SecretStr = Field(title="API Key", description="The kluster.ai API key.")
    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        title="Base URL",
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
        """Return an openai client configured for kluster.ai (the only HTTP client used).

        Each client is new (callers close it), but all share one TLS context: building one
        loads the CA bundle, 40-55 ms of CPU here, and a run makes a client per step and
        per task thread."""
        return OpenAI(
            api_key=self.api_key.get_secret_value(),
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
            http_client=_KeyForgettingHttpxClient(verify=tls_context()),
        )


class _KeyForgettingHttpxClient(DefaultHttpxClient):  # type: ignore[misc,valid-type]
    """openai's default HTTP client, but each request forgets its Authorization header once
    it has been sent. The SDK's errors keep the request (``exc.request``,
    ``exc.response.request``), and Prefect persists a failed task's exception, pickled with
    every header, in its result storage (local files, or a bucket shared by workers)."""

    def send(self, request: Any, **kwargs: Any) -> Any:
        try:
            response = super().send(request, **kwargs)
        finally:
            _forget_key(request)
        for sent in (response.request, *(r.request for r in response.history)):
            _forget_key(sent)
        return response


def _forget_key(request: Any) -> None:
    request.headers.pop("authorization", None)


_TLS_LOCK = threading.Lock()


def tls_context() -> ssl.SSLContext:
    """The process's TLS context, made as httpx makes its default one (certifi's bundle, or
    SSL_CERT_FILE / SSL_CERT_DIR when set), once: threads that ask while it is being made
    (a run's first clients start together) wait for it rather than make their own."""
    with _TLS_LOCK:
        return _made_tls_context()


@functools.cache
def _made_tls_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()
