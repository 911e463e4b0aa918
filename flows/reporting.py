"""What a run leaves in the Prefect UI: progress, summary and table artifacts, and events.

Every function here is safe to call from a flow or task run, and a no-op (returning None)
outside one, so library code can report unconditionally. Reporting never fails a run: a
Prefect API error is logged as a warning and the run goes on.

Nothing here sees credentials: the inputs are batch and summary values, which hold no key.

Artifact keys (the UI's Artifacts page groups versions of a key across runs):
``kluster-batch-progress``, ``kluster-batch-summary``, ``kluster-batch-shards``,
``kluster-batches`` and ``kluster-models``. Events: ``kluster.batch.<event>`` on the
resource ``kluster.batch.<batch id>``.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.events.schemas.events import Event

from prefect_kluster.tasks._prefect import prefect_client
from prefect_kluster.tasks.cost import ActualCost, CostEstimate
from prefect_kluster.tasks.events import (  # re-exported: the reporting API
    BATCH_EVENTS,
    EVENT_PREFIX,
    batch_event_payload,
    emit_batch_event,
)
from prefect_kluster.tasks.join import JoinSummary
from prefect_kluster.tasks.types import BatchInfo, ModelInfo

PROGRESS_KEY = "kluster-batch-progress"
SUMMARY_KEY = "kluster-batch-summary"
SHARDS_KEY_SUFFIX = "-shards"
BATCHES_KEY = "kluster-batches"
MODELS_KEY = "kluster-models"

_log = logging.getLogger("prefect.kluster.reporting")


def in_run() -> bool:
    """True inside a Prefect flow run or task run."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:
        return _log


__all__ = ["BATCH_EVENTS", "EVENT_PREFIX", "batch_event_payload", "emit_batch_event"]


def _warn(what: str, exc: BaseException) -> None:
    _logger().warning("Could not %s: %s: %s", what, type(exc).__name__, exc)


def artifact_key(text: str) -> str:
    """A valid artifact key (lower-case letters, digits and dashes) from any text."""
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return key or "kluster"


def _percent(done: int, total: int) -> float:
    if total <= 0:
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * done / total)), 2)


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def _md(value: Any) -> str:
    """Text for a markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


# --- progress -------------------------------------------------------------------------------


def create_batch_progress(total: int, key: str | None = PROGRESS_KEY) -> UUID | None:
    """Create a progress artifact at 0% for a run of ``total`` requests; its id, or None
    outside a run (or if the Prefect API refused it)."""
    if not in_run():
        return None
    try:
        return create_progress_artifact(
            progress=0.0,
            key=artifact_key(key) if key else None,
            description=f"0 of {total} requests done",
        )
    except Exception as exc:
        _warn("create the progress artifact", exc)
        return None


def update_batch_progress(artifact_id: UUID | None, done: int, total: int) -> bool:
    """Set the progress artifact to ``done`` of ``total`` (as a percentage); True if the
    Prefect server took it. A no-op (False) when ``artifact_id`` is None or outside a run."""
    if artifact_id is None or not in_run():
        return False
    try:
        # Prefect's update_progress_artifact makes a new client (and TLS context) a call.
        update = ArtifactUpdate(
            data=_percent(done, total), description=f"{done} of {total} requests done"
        )
        with prefect_client() as client:
            client.update_artifact(artifact_id=artifact_id, artifact=update)
    except Exception as exc:
        _warn("update the progress artifact", exc)
        return False
    return True


# --- run summary ----------------------------------------------------------------------------


def overall_status(batches: Sequence[BatchInfo]) -> str:
    """completed, or the first of failed/expired/cancelled that any batch ended in."""
    for status in ("failed", "expired", "cancelled"):
        if any(b.status == status for b in batches):
            return status
    if any(not b.is_terminal for b in batches):
        return "running"
    return "completed"


def _shard_index(batch: BatchInfo, position: int) -> int:
    try:
        return int(batch.metadata.get("shard_index", position))
    except ValueError:
        return position


def shard_rows(batches: Sequence[BatchInfo], summary: JoinSummary | None = None) -> list[dict]:
    """One row per batch (= shard): batch id, shard index, lines, status, completed, failed
    (and the round, when batches carry a ``round`` metadata value)."""
    lines_by_shard = {s.index: s.requests for s in summary.shards} if summary else {}
    with_rounds = any("round" in b.metadata for b in batches)
    rows = []
    for position, batch in enumerate(batches):
        index = _shard_index(batch, position)
        row: dict[str, Any] = {"batch_id": batch.id, "shard": index}
        if with_rounds:  # failed-line rounds reuse shard numbers: tell them apart
            row["round"] = batch.metadata.get("round", "1")
        row.update(
            lines=batch.request_counts.total
            if with_rounds
            else lines_by_shard.get(index, batch.request_counts.total),
            status=batch.status,
            completed=batch.request_counts.completed,
            failed=batch.request_counts.failed,
        )
        rows.append(row)
    return rows


def summary_markdown(
    batches: Sequence[BatchInfo],
    summary: JoinSummary,
    status: str | None = None,
    extra_rows: Sequence[tuple[str, Any]] = (),
) -> str:
    """The run summary as markdown: status, counts, tokens and where the output is."""
    status = status or overall_status(batches)
    usage = summary.usage
    rows = [
        ("Status", f"**{status}**"),
        ("Requests", summary.requests),
        ("Succeeded", summary.succeeded),
        ("Failed", f"{summary.failed} ({summary.retryable} retryable)"),
        ("Batches", len(batches)),
        ("Prompt tokens", usage.prompt_tokens),
        ("Completion tokens", usage.completion_tokens),
        ("Total tokens", usage.total_tokens),
        ("Output", f"`{summary.output_path}`"),
    ]
    if summary.parquet_path:
        rows.append(("Parquet copy", f"`{summary.parquet_path}`"))
    rows += list(extra_rows)
    out = [f"# kluster.ai batch run: {status}", "", "| | |", "|---|---|"]
    out += [f"| {name} | {_md(value)} |" for name, value in rows]
    out += ["", "## Batches", ""]
    for row in shard_rows(batches, summary):
        out.append(
            f"- shard {row['shard']}: `{_md(row['batch_id'])}` {row['status']}, "
            f"{row['completed']} completed, {row['failed']} failed of {row['lines']} lines"
        )
    problems = [(b.id, e) for b in batches for e in b.errors]
    if problems:
        out += ["", "## Batch errors", ""]
        out += [f"- `{_md(batch_id)}`: {_md(error)}" for batch_id, error in problems[:20]]
    return "\n".join(out) + "\n"


def publish_run_summary(
    batches: Sequence[BatchInfo],
    summary: JoinSummary,
    status: str | None = None,
    key: str | None = SUMMARY_KEY,
    extra_rows: Sequence[tuple[str, Any]] = (),
) -> tuple[UUID, UUID] | None:
    """Publish the run's markdown summary (key ``key``) and its table of batches/shards
    (key ``key + "-shards"``); their ids, or None outside a run or on an API error.

    ``status`` defaults to the overall status of ``batches``; ``key=None`` makes
    unkeyed artifacts (shown on the run page only)."""
    if not in_run():
        return None
    base = artifact_key(key) if key else None
    try:
        # the two go to the server side by side: the run's end waits for both
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kluster-summary") as pool:
            table = pool.submit(
                contextvars.copy_context().run,
                create_table_artifact,
                table=shard_rows(batches, summary),
                key=f"{base}{SHARDS_KEY_SUFFIX}" if base else None,
                description="kluster.ai batches of this run, one per shard",
            )
            markdown_id = create_markdown_artifact(
                markdown=summary_markdown(batches, summary, status, extra_rows),
                key=base,
                description="kluster.ai batch run summary",
            )
            table_id = table.result()
    except Exception as exc:
        _warn("publish the run summary", exc)
        return None
    return markdown_id, table_id


# --- cost -----------------------------------------------------------------------------------

COST_KEY = "kluster-cost-estimate"


def publish_cost_estimate(estimate: CostEstimate, key: str | None = COST_KEY) -> UUID | None:
    """The estimate per model and completion window, as a markdown artifact."""
    if not in_run():
        return None
    try:
        return create_markdown_artifact(
            markdown="# kluster.ai cost estimate\n\n" + estimate.to_markdown() + "\n",
            key=artifact_key(key) if key else None,
            description="Cost estimate, made before any upload",
        )
    except Exception as exc:
        _warn("publish the cost estimate", exc)
        return None


def emit_run_cost(estimate: CostEstimate, cost: ActualCost, output_path: str) -> Event | None:
    """``kluster.run.cost``: what the run was estimated to cost and what it cost, on the
    resource of the flow run's output."""
    if not in_run():
        return None
    try:
        return emit_event(
            event="kluster.run.cost",
            resource={
                "prefect.resource.id": f"kluster.output.{output_path}",
                "prefect.resource.name": output_path,
            },
            payload={
                "window": cost.window,
                "actual_usd": cost.total_usd,
                "estimated_usd": estimate.central_usd(cost.window),
                "estimated_max_usd": estimate.upper_usd(cost.window),
                "by_model": cost.models,
                "price_source": cost.price_source,
            },
        )
    except Exception as exc:
        _warn("emit kluster.run.cost", exc)
        return None


# --- tables for the list flows ----------------------------------------------------------------


def batch_rows(batches: Iterable[BatchInfo]) -> list[dict]:
    return [
        {
            "batch_id": b.id,
            "status": b.status,
            "progress": b.progress,
            "total": b.request_counts.total,
            "completed": b.request_counts.completed,
            "failed": b.request_counts.failed,
            "created_at": _iso(b.created_at),
            "completed_at": _iso(b.completed_at),
            "input_file_id": b.input_file_id or "",
            "output_file_id": b.output_file_id or "",
        }
        for b in batches
    ]


def model_rows(models: Iterable[ModelInfo]) -> list[dict]:
    return [
        {"model": m.id, "owned_by": m.owned_by or "", "created": _iso(m.created)} for m in models
    ]


def _publish_table(rows: list[dict], key: str | None, description: str) -> UUID | None:
    if not in_run():
        return None
    try:
        return create_table_artifact(
            table=rows, key=artifact_key(key) if key else None, description=description
        )
    except Exception as exc:
        _warn(f"publish the {key or 'table'} artifact", exc)
        return None


def publish_batches_table(
    batches: Sequence[BatchInfo], key: str | None = BATCHES_KEY
) -> UUID | None:
    """A table artifact of batches (id, status, counts, times, file ids)."""
    return _publish_table(batch_rows(batches), key, f"{len(batches)} kluster.ai batches")


def publish_models_table(models: Sequence[ModelInfo], key: str | None = MODELS_KEY) -> UUID | None:
    """A table artifact of the models the service offers."""
    return _publish_table(model_rows(models), key, f"{len(models)} kluster.ai models")
