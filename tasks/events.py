"""Prefect events about batches: ``kluster.batch.<event>`` on ``kluster.batch.<id>``.

In the tasks layer, so the tasks that see a batch change emit them directly; a no-op outside
a flow or task run, and never fails a run (an API error is logged as a warning).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.events.schemas.events import Event

from prefect_kluster.tasks.types import BatchInfo

EVENT_PREFIX = "kluster.batch"
# Events the batch flow emits; others are accepted (lower-cased) but these are the contract.
BATCH_EVENTS = frozenset({"submitted", "completed", "failed", "expired", "cancelled"})
_MAX_EVENT_ERRORS = 5
_log = logging.getLogger("prefect.kluster.events")


def batch_event_payload(batch: BatchInfo) -> dict[str, Any]:
    counts = batch.request_counts
    payload: dict[str, Any] = {
        "status": batch.status,
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "progress": batch.progress,
        "input_file_id": batch.input_file_id,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "completion_window": batch.completion_window,
    }
    if "shard_index" in batch.metadata:
        payload["shard_index"] = batch.metadata["shard_index"]
    if batch.errors:
        payload["errors"] = batch.errors[:_MAX_EVENT_ERRORS]
    return payload


def emit_batch_event(batch: BatchInfo, event: str) -> Event | None:
    """Emit ``kluster.batch.<event>`` (submitted, completed, failed, expired, cancelled)
    about the batch; Prefect relates it to the current flow and task run. Returns the
    event, or None outside a run."""
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    name = f"{EVENT_PREFIX}.{event.strip().lower()}"
    related = [
        {
            "prefect.resource.id": f"kluster.file.{file_id}",
            "prefect.resource.role": role,
        }
        for role, file_id in (
            ("input-file", batch.input_file_id),
            ("output-file", batch.output_file_id),
            ("error-file", batch.error_file_id),
        )
        if file_id
    ]
    try:
        return emit_event(
            event=name,
            resource={
                "prefect.resource.id": f"{EVENT_PREFIX}.{batch.id}",
                "prefect.resource.name": batch.id,
            },
            related=related or None,
            payload=batch_event_payload(batch),
        )
    except Exception as exc:
        _log.warning("Could not emit %s: %s: %s", name, type(exc).__name__, exc)
        return None
