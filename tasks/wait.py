"""Step 4: wait for a batch to reach a terminal status.

Polling is adaptive: while the status and counts stay the same (a batch queued for hours
in pre_schedule, say) the pause grows by half each time, up to ``max_poll_interval``; the
first change brings it back to ``poll_interval``. A day-long batch costs a few hundred
status calls instead of thousands, and a moving one is still seen at the rate asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import task
from prefect.logging import get_run_logger
from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks.progress import announce_batch, report_progress
from prefect_kluster.tasks.retry import RETRY_OPTIONS
from prefect_kluster.tasks.types import BatchInfo


class BatchWaitTimeout(RuntimeError):
    """The batch was still running when the wait's timeout ran out (it keeps running)."""

    def __init__(self, batch: BatchInfo, timeout: float):
        self.batch = batch
        super().__init__(
            f"batch {batch.id} still {batch.status} ({batch.progress}) after {timeout:g} s"
        )


BACKOFF_FACTOR = 1.5
DEFAULT_BACKOFF_CAP = 6  # without max_poll_interval: up to 6 x poll_interval


def poll_pauses(
    poll_interval: float, max_poll_interval: float | None = None
) -> tuple[float, float]:
    """The first pause and the longest one: ``max_poll_interval`` is never below
    ``poll_interval`` (equal to it, polling is at a fixed rate)."""
    if poll_interval <= 0 or (max_poll_interval is not None and max_poll_interval <= 0):
        raise ValueError(
            f"poll_interval and max_poll_interval must be positive seconds, got "
            f"{poll_interval:g} and {max_poll_interval}"
        )
    cap = poll_interval * DEFAULT_BACKOFF_CAP if max_poll_interval is None else max_poll_interval
    return poll_interval, max(cap, poll_interval)


def retrieve_batch(credentials: KlusterCredentials, batch_id: str) -> BatchInfo:
    with credentials.get_client() as client:
        return BatchInfo.from_sdk(client.batches.retrieve(batch_id))


def poll_batch(
    credentials: KlusterCredentials,
    batch_id: str,
    poll_interval: float = 10.0,
    timeout: float | None = None,
    on_change: Callable[[BatchInfo], None] | None = None,
    max_poll_interval: float | None = None,
) -> BatchInfo:
    """Poll until completed, failed, expired or cancelled.

    Any other status (validating, pre_schedule, in_progress, finalizing, cancelling, or
    one this code has never seen) counts as still running. ``on_change`` is called
    whenever the status or counts change. The pause between polls starts at
    ``poll_interval`` and grows while nothing changes, up to ``max_poll_interval``
    (default six times ``poll_interval``).
    """
    logger = get_run_logger()
    first_pause, longest_pause = poll_pauses(poll_interval, max_poll_interval)
    deadline = None if timeout is None else time.monotonic() + timeout
    last: tuple[str, str] | None = None
    pause = first_pause
    with credentials.get_client() as client:
        while True:
            batch = BatchInfo.from_sdk(client.batches.retrieve(batch_id))
            seen = (batch.status, batch.progress)
            if seen != last:
                logger.info("Batch %s: %s %s", batch.id, batch.status, batch.progress)
                if on_change is not None:
                    on_change(batch)
                last = seen
                pause = first_pause
            else:
                pause = min(pause * BACKOFF_FACTOR, longest_pause)
            if batch.is_terminal:
                announce_batch(batch, batch.status)
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise BatchWaitTimeout(batch, timeout or 0)
            if deadline is not None:
                time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            else:
                time.sleep(pause)


@task(name="wait-for-batch", **RETRY_OPTIONS)
def wait_for_batch(
    credentials: KlusterCredentials,
    batch: BatchInfo | str,
    poll_interval: float = 10.0,
    timeout: float | None = None,
    max_poll_interval: float | None = None,
) -> BatchInfo:
    """Wait for a batch to finish and return its final state (whatever that state is).

    Polls every ``poll_interval`` seconds while the batch moves, backing off to
    ``max_poll_interval`` while it does not (see the module's note)."""
    batch_id = batch if isinstance(batch, str) else batch.id
    return poll_batch(
        credentials,
        batch_id,
        poll_interval,
        timeout,
        on_change=report_progress,
        max_poll_interval=max_poll_interval,
    )
