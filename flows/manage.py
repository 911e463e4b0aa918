"""Small flows for the Prefect UI: list models, list batches, cancel a batch."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from prefect_kluster.blocks import resolve_credentials
from prefect_kluster.flows.reporting import publish_batches_table, publish_models_table
from prefect_kluster.tasks.manage import cancel_batch, list_batches, list_models
from prefect_kluster.tasks.types import BatchInfo, ModelInfo


@flow(name="kluster-list-models")
def list_models_flow(credentials_block: str | None = None) -> list[ModelInfo]:
    """List the models kluster.ai offers.

    Args:
        credentials_block: Name of a saved kluster.ai Credentials block (default: KLUSTER_*
            environment variables).
    """
    models = list_models(resolve_credentials(credentials_block))
    get_run_logger().info("%d models: %s", len(models), ", ".join(m.id for m in models))
    publish_models_table(models)
    return models


@flow(name="kluster-list-batches")
def list_batches_flow(limit: int = 20, credentials_block: str | None = None) -> list[BatchInfo]:
    """List the newest batches with their status and progress.

    Args:
        limit: How many batches, newest first.
        credentials_block: Name of a saved kluster.ai Credentials block.
    """
    batches = list_batches(resolve_credentials(credentials_block), limit)
    logger = get_run_logger()
    for batch in batches:
        logger.info("%s  %-12s %s", batch.id, batch.status, batch.progress)
    publish_batches_table(batches)
    return batches


@flow(name="kluster-cancel-batch")
def cancel_batch_flow(batch_id: str, credentials_block: str | None = None) -> BatchInfo:
    """Cancel a running batch; lines already done stay in its output.

    Args:
        batch_id: The id of the batch to cancel.
        credentials_block: Name of a saved kluster.ai Credentials block.
    """
    return cancel_batch(resolve_credentials(credentials_block), batch_id)
