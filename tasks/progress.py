"""Progress summed over every batch of a flow run, whichever task thread reports it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from prefect_kluster.tasks.events import emit_batch_event
from prefect_kluster.tasks.types import BatchInfo, RequestCounts

_lock = threading.Lock()
_boards: dict[str, dict[str, BatchInfo]] = {}
_listeners: dict[str, list[Callable[[dict[str, BatchInfo]], None]]] = {}


def _run_key() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def watch_progress(listener: Callable[[dict[str, BatchInfo]], None]) -> None:
    """Call ``listener`` with every batch's latest state whenever one of them changes."""
    key = _run_key()
    if key is not None:
        with _lock:
            _listeners.setdefault(key, []).append(listener)


def report_progress(batch: BatchInfo) -> None:
    """Record a batch's latest state and log the run's total."""
    report_many([batch])


def report_many(batches: list[BatchInfo]) -> None:
    """Record the latest state of several batches (one poll cycle) and tell the listeners
    once: a run's progress artifact is updated at most once per cycle."""
    key = _run_key()
    if key is None or not batches:
        return
    with _lock:
        board = _boards.setdefault(key, {})
        for batch in batches:
            board[batch.id] = batch
        snapshot = dict(board)
        listeners = list(_listeners.get(key, ()))
    if len(snapshot) > 1:
        total = summed_counts(snapshot.values())
        get_run_logger().info(
            "All %d batches: %d/%d requests done (%d failed)",
            len(snapshot),
            total.completed + total.failed,
            total.total,
            total.failed,
        )
    for listener in listeners:
        listener(snapshot)


def summed_counts(batches: object) -> RequestCounts:
    total = RequestCounts()
    for batch in batches:  # type: ignore[attr-defined]
        total.total += batch.request_counts.total
        total.completed += batch.request_counts.completed
        total.failed += batch.request_counts.failed
    return total


def announce_batch(batch: BatchInfo, event: str) -> None:
    """Emit the ``kluster.batch.<event>`` Prefect event (a no-op outside a run)."""
    emit_batch_event(batch, event)


def forget_run() -> None:
    key = _run_key()
    with _lock:
        _boards.pop(key or "", None)
        _listeners.pop(key or "", None)
