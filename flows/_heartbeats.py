"""Flow runs return when their work is done, not up to a second later.

Prefect 3.9's synchronous flow engine sends flow-run heartbeats from a thread that sleeps
in one-second steps, and joins that thread when the run ends, so every flow call returns 0
to 1 s after its body has (0.95 s of a 2.2 s, 500-request run measured here; the same again
for each shard-group child run and each flow a test calls). Prefect's asynchronous engine
does not wait for that thread (``join_on_exit=False``): it ends by itself at its next
one-second step without sending another beat. This makes the synchronous engine do the
same. Heartbeats are sent as before, at the same frequency.

It wraps Prefect's private ``prefect.flow_engine._send_heartbeats`` once, when
``prefect_kluster.flows`` is imported, so it applies to every synchronous flow in the
process; a Prefect whose function does not take ``join_on_exit`` is left as it is.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import prefect.flow_engine as flow_engine

PREFECT_SEND_HEARTBEATS: Callable[..., Any] | None = None  # Prefect's own, once wrapped


def _is_wrapped(send: Callable[..., Any]) -> bool:
    return getattr(send, "_kluster_prompt_exit", False)


def install() -> bool:
    """Wrap Prefect's heartbeat context so a run does not wait for the heartbeat thread's
    current one-second sleep; True if it is (now or already) wrapped."""
    global PREFECT_SEND_HEARTBEATS
    send = getattr(flow_engine, "_send_heartbeats", None)
    if send is None:
        return False
    if _is_wrapped(send):
        return True
    try:
        if "join_on_exit" not in inspect.signature(send).parameters:
            return False
    except (TypeError, ValueError):
        return False
    original = send

    @contextlib.contextmanager
    def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
        with original(engine, join_on_exit=False):
            yield

    send_heartbeats._kluster_prompt_exit = True  # type: ignore[attr-defined]
    PREFECT_SEND_HEARTBEATS = original
    flow_engine._send_heartbeats = send_heartbeats
    return True


install()
