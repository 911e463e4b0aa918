"""Step 3: create a batch from an uploaded file."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from blocks import KlusterCredentials
from tasks.retry import RETRY_OPTIONS
from tasks.schema import CHAT_COMPLETIONS_URL
from tasks.types import BatchInfo


@task(name="submit-batch", **RETRY_OPTIONS)
def submit_batch(
    credentials: KlusterCredentials,
    input_file_id: str,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
    endpoint: str = CHAT_COMPLETIONS_URL,
) -> BatchInfo:
    """Create a batch job. ``completion_window`` is passed through as given ("24h", "48h",
    "72h", ...): the accepted values have changed over time, so the service decides."""
    with credentials.get_client() as client:
        batch = client.batches.create(
            input_file_id=input_file_id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window=completion_window,  # type: ignore[arg-type]
            metadata=metadata or None,
        )
    info = BatchInfo.from_sdk(batch)
    get_run_logger().info(
        "Submitted batch %s for file %s (%s)", info.id, input_file_id, info.status
    )
    return info
