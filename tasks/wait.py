"""Step 4: wait for a batch to reach a terminal status."""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import task
from prefect.logging import get_run_logger

from blocks import KlusterCredentials
from tasks.progress import announce_batch, report_progress
from tasks.retry import RETRY_OPTIONS
from tasks.types import BatchInfo


class BatchWaitTimeout(RuntimeError):
    """The batch was still running when the wait's timeout ran out (it keeps running)."""

    def __init__(self, batch: BatchInfo, timeout: float):
        self.batch = batch
        super().__init__(
            f"batch {batch.id} still {batch.status} ({batch.progress}) after {timeout:g} s"
        )


def retrieve_batch(credentials: KlusterCredentials, batch_id: str) -> BatchInfo:
    with credentials.get_client() as client:
        return BatchInfo.from_sdk(client.batches.retrieve(batch_id))


def poll_batch(
    credentials: KlusterCredentials,
    batch_id: str,
    poll_interval: float = 10.0,
    timeout: float | None = None,
    on_change: Callable[[BatchInfo], None] | None = None,
) -> BatchInfo:
    """Poll until completed, failed, expired or cancelled.

    Any other status (validating, pre_schedule, in_progress, finalizing, cancelling, or
    one this code has never seen) counts as still running. ``on_change`` is called
    whenever the status or counts change.
    """
    logger = get_run_logger()
    deadline = None if timeout is None else time.monotonic() + timeout
    last: tuple[str, str] | None = None
    with credentials.get_client() as client:
        while True:
            batch = BatchInfo.from_sdk(client.batches.retrieve(batch_id))
            seen = (batch.status, batch.progress)
            if seen != last:
                logger.info("Batch %s: %s %s", batch.id, batch.status, batch.progress)
                if on_change is not None:
                    on_change(batch)
                last = seen
            if batch.is_terminal:
                announce_batch(batch, batch.status)
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise BatchWaitTimeout(batch, timeout or 0)
            pause = poll_interval
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0))
            time.sleep(pause)


@task(name="wait-for-batch", **RETRY_OPTIONS)
def wait_for_batch(
    credentials: KlusterCredentials,
    batch: BatchInfo | str,
    poll_interval: float = 10.0,
    timeout: float | None = None,
) -> BatchInfo:
    """Wait for a batch to finish and return its final state (whatever that state is)."""
    batch_id = batch if isinstance(batch, str) else batch.id
    return poll_batch(credentials, batch_id, poll_interval, timeout, on_change=report_progress)
