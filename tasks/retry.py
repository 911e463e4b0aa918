"""Which failures are worth retrying: transient ones only.

A 4xx (bad request, auth, not found) will fail the same way again, so it fails the task at
once with the service's message; connection errors, timeouts, 429 and 5xx are retried
with exponential backoff and jitter.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from prefect.tasks import exponential_backoff

TASK_RETRIES = 4
TASK_RETRY_DELAYS = exponential_backoff(backoff_factor=1)  # 1, 2, 4, 8 s
TASK_RETRY_JITTER = 0.5


def is_transient_error(exc: BaseException) -> bool:
    """True for failures that a later attempt can get past: the service's, and the Prefect
    server's (claims and pending records live there; a busy server answers 503)."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    if isinstance(exc, httpx.HTTPStatusError):  # the Prefect client's errors among them
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError))


def retry_on_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure was transient."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # the result could not be read: judge the read error
            exc = err
    return isinstance(exc, BaseException) and is_transient_error(exc)


def api_error_message(exc: BaseException) -> str:
    """The service's own message from an openai error, in either of kluster's body shapes."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(exc, "message", None) or exc)


# Keyword arguments shared by every task that calls the service. No cache policy: each call
# is a side effect or a fresh read. With results persisted (a Prefect setting a user may
# turn on), Prefect's default policy would answer a second call with the same inputs in
# the same run from the first one's result: a second submit_batch of one file would make
# no batch, a list or a status read would be stale. What a rerun may reuse, the run's
# journal and the service tell (tasks.journal, tasks.submit). Without a policy a task run
# also starts with no cache key to hash and no cache record to look up.
RETRY_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": TASK_RETRIES,
    "retry_delay_seconds": TASK_RETRY_DELAYS,
    "retry_jitter_factor": TASK_RETRY_JITTER,
    "retry_condition_fn": retry_on_transient,
}
