"""Prefect API clients that share one TLS context, and a write that does not sleep seconds
when the server is briefly busy.

``prefect.client.orchestration.get_client`` builds a new TLS context for every client it
makes (loading the CA bundle: about 40 ms of CPU here, 50 ms a client in all), and a run
makes one per claim, progress update and state read. ``prefect_client`` hands it the
process's context instead, made once the way Prefect makes it.

A Prefect server on SQLite answers 503 ("database is locked") when a delete (which reads,
then writes) meets other writes, and Prefect's client then sleeps ``2**n`` seconds (2, 4, 8
...) before trying again, and 2 s even with retries turned off. Thirty-two shards
releasing their claims at once spent 20 to 70 s in those sleeps. ``busy_retried_request``
tries such a call again after milliseconds instead.
"""

from __future__ import annotations

import functools
import random
import ssl
import time
from typing import Any

import certifi
import httpx
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


BUSY_CODES = frozenset({429, 502, 503})


def busy_retried_request(
    method: str, path: str, *, json: Any = None, budget: float = 60.0
) -> httpx.Response:
    """One Prefect API call, sent again after 10 ms to 0.5 s (jittered, doubling) while the
    server answers busy (429, 502, 503), for up to ``budget`` seconds. Returns the last
    response without raising; connection errors propagate. Anything the short path cannot
    do (a CSRF token to fetch) goes through Prefect's own client."""
    with prefect_client() as client:
        http = client._client  # a PrefectHttpxSyncClient: its send() is the sleeping one
        deadline = time.monotonic() + budget
        pause = 0.01
        while True:
            request = http.build_request(method, path, json=json)
            response = httpx.Client.send(http, request)
            if response.status_code == 403 and "CSRF" in response.text:
                return http.send(http.build_request(method, path, json=json))
            if response.status_code not in BUSY_CODES or time.monotonic() >= deadline:
                return response
            response.close()
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.5)
