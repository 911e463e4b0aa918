"""Prefect API clients that cost no set-up, and a write that does not sleep seconds when
the server is briefly busy.

In a flow run, ``prefect_client`` is the run's own client: its connections are open and
its CSRF token fetched, where a new client fetches a token before its first write (a round
trip more on each claim and progress update). Elsewhere it makes a client, with the
process's TLS context: ``prefect.client.orchestration.get_client`` builds a new one for
every client it makes (loading the CA bundle: about 40 ms of CPU here, 50 ms a client in
all).

A Prefect server on SQLite answers 503 ("database is locked") when a delete (which reads,
then writes) meets other writes, and Prefect's client then sleeps ``2**n`` seconds (2, 4, 8
...) before trying again, and 2 s even with retries turned off. Thirty-two shards
releasing their claims at once spent 20 to 70 s in those sleeps. ``busy_retried_request``
tries such a call again after milliseconds instead.
"""

from __future__ import annotations

import contextlib
import functools
import random
import ssl
import time
from collections.abc import Iterator
from typing import Any

import certifi
import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY


@functools.cache
def _tls_context(insecure: bool, cert_file: str | None) -> ssl.SSLContext:
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cert_file or certifi.where())


@contextlib.contextmanager
def prefect_client() -> Iterator[SyncPrefectClient]:
    """The flow run's own sync client (Prefect's task threads share it too; it is not
    closed here), or outside a run (or once it has ended) ``get_client(sync_client=True)``
    with the process's TLS context (same settings: PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_SSL_CERT_FILE)."""
    run_context = SyncClientContext.get()
    if run_context is not None and _open(run_context.client):
        yield run_context.client
        return
    insecure = bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value())
    context = _tls_context(insecure, PREFECT_API_SSL_CERT_FILE.value() or None)
    with get_client(httpx_settings={"verify": context}, sync_client=True) as client:
        yield client


def _open(client: Any) -> bool:
    return bool(getattr(client, "_started", False)) and not getattr(client, "_closed", True)


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
