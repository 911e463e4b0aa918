"""Prefect API clients that share one TLS context.

``prefect.client.orchestration.get_client`` builds a new TLS context for every client it
makes (loading the CA bundle: about 40 ms of CPU here, 50 ms a client in all), and a run
makes one per claim, progress update and state read. ``prefect_client`` hands it the
process's context instead, made once the way Prefect makes it.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

import certifi
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY


@functools.cache
def _tls_context(insecure: bool, cert_file: str | None) -> ssl.SSLContext:
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cert_file or certifi.where())


def prefect_client() -> Any:
    """``get_client(sync_client=True)`` with the process's TLS context (same settings:
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY, PREFECT_API_SSL_CERT_FILE)."""
    insecure = bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value())
    context = _tls_context(insecure, PREFECT_API_SSL_CERT_FILE.value() or None)
    return get_client(httpx_settings={"verify": context}, sync_client=True)
