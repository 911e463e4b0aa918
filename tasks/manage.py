"""Managing batches outside a run: cancel one, list batches, list models."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks.retry import RETRY_OPTIONS
from prefect_kluster.tasks.types import BatchInfo, ModelInfo, parse_timestamp


@task(name="cancel-batch", **RETRY_OPTIONS)
def cancel_batch(credentials: KlusterCredentials, batch_id: str) -> BatchInfo:
    """Ask the service to cancel a batch. It goes to "cancelling" first (for up to ten
    minutes on kluster.ai), then "cancelled"; lines already done stay in its output."""
    with credentials.get_client() as client:
        # An explicit {} body: an empty body once got a 500 from kluster.ai.
        batch = client.batches.cancel(batch_id, extra_body={})
    info = BatchInfo.from_sdk(batch)
    get_run_logger().info("Cancel requested for batch %s: now %s", info.id, info.status)
    return info


@task(name="list-batches", **RETRY_OPTIONS)
def list_batches(credentials: KlusterCredentials, limit: int = 20) -> list[BatchInfo]:
    """The newest ``limit`` batches, newest first (follows pages past 100)."""
    found: list[BatchInfo] = []
    with credentials.get_client() as client:
        for batch in client.batches.list(limit=min(max(limit, 1), 100)):
            found.append(BatchInfo.from_sdk(batch))
            if len(found) >= limit:
                break
    return found


@task(name="list-models", **RETRY_OPTIONS)
def list_models(credentials: KlusterCredentials) -> list[ModelInfo]:
    """Models the service offers for batch inference."""
    with credentials.get_client() as client:
        return [
            ModelInfo(
                id=model.id,
                owned_by=getattr(model, "owned_by", None),
                created=parse_timestamp(getattr(model, "created", None)),
            )
            for model in client.models.list()
        ]
