"""Step 4: wait for a batch to reach a terminal status.

Inside a flow run, every batch the run waits on is polled by one loop (``RunWatch``): one
list call a cycle reads all their statuses (a retrieve only for a batch the list did not
return), and the run's progress is reported at most once a cycle, and while only counts
move at most once every ``REPORT_EVERY`` seconds. A 50-shard run queued for an hour makes
one call a cycle, not fifty.

Polling is adaptive: while the status and counts stay the same (a batch queued for hours
in pre_schedule, say) the pause grows by half each time, up to ``max_poll_interval``; the
first change brings it back to ``poll_interval``. A day-long batch costs a few hundred
status calls instead of thousands, and a moving one is still seen at the rate asked for.

A running batch's end is foreseen: from how fast its counts have moved since it was first
seen running, the next look is taken when its last line should be done, if that comes
before the next regular poll (``FinishEstimate``). A batch due in 3 s with a 60 s poll is
seen finished about 3 s later, not up to a minute later.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prefect import task
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks.progress import announce_batch, report_many, report_progress
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
# A foreseen end is looked at no sooner than this share of ``poll_interval`` after the last
# look: a guess that keeps coming too early costs at most four times the polls asked for.
EARLIEST_LOOK = 0.25
# A foreseen end is looked at a tenth of its time to come late: a look that comes too soon
# finds the last lines running, and the next one may only come EARLIEST_LOOK later.
FINISH_MARGIN = 1.1


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


class FinishEstimate:
    """When running batches should end, from their counts' pace since each was first seen
    running (``in_progress``). No guess is made before the counts have moved, nor once every
    line is counted (the service is then writing the files: the regular poll finds that)."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[float, int]] = {}

    def update(self, batch: BatchInfo, seen_at: float) -> float | None:
        """The monotonic time ``batch`` should end (None: no guess), as seen at ``seen_at``."""
        counts = batch.request_counts
        done = counts.completed + counts.failed
        if batch.status != "in_progress" or counts.total <= 0:
            self._first.pop(batch.id, None)
            return None
        began_at, done_then = self._first.setdefault(batch.id, (seen_at, done))
        if done <= done_then or seen_at <= began_at or done >= counts.total:
            return None
        pace = (done - done_then) / (seen_at - began_at)
        return seen_at + (counts.total - done) / pace * FINISH_MARGIN

    def next_look(
        self,
        batches: Iterable[BatchInfo],
        seen_at: float,
        regular: float,
        looked_at: float,
        poll_interval: float,
    ) -> float:
        """The time of the next poll, after a look begun at ``looked_at`` that saw
        ``batches`` at ``seen_at``: ``regular``, or a foreseen end before it (never sooner
        than ``EARLIEST_LOOK`` of ``poll_interval`` after the look, so a pace guessed too
        fast costs a few polls, not a storm)."""
        ends = [e for b in batches if (e := self.update(b, seen_at)) is not None]
        if not ends:
            return regular
        return min(regular, max(min(ends), looked_at + poll_interval * EARLIEST_LOOK))


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
    logger = _logger()
    first_pause, longest_pause = poll_pauses(poll_interval, max_poll_interval)
    deadline = None if timeout is None else time.monotonic() + timeout
    last: tuple[str, str] | None = None
    pause = first_pause
    finish = FinishEstimate()
    with credentials.get_client() as client:
        while True:
            began = time.monotonic()
            batch = BatchInfo.from_sdk(client.batches.retrieve(batch_id))
            seen_at = time.monotonic()
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
            look = finish.next_look([batch], seen_at, began + pause, began, first_pause)
            if deadline is not None:
                look = min(look, deadline)
            time.sleep(max(look - time.monotonic(), 0))


LIST_PAGE = 100
MAX_LIST_PAGES = 3
# While only request counts move, the run's progress (a log line a batch and the progress
# artifact) is reported at most this often, whatever the poll interval: a run polled every
# 0.2 s to notice its end at once made five Prefect API calls a second that no one reads.
# A new status (validating, in_progress, completed...) is reported in the cycle that sees it.
REPORT_EVERY = 2.0


class BatchWaitAborted(RuntimeError):
    """The run stopped waiting for the batch (it is ending: cancelled, or another shard
    failed); the batch itself is left as it is."""


class _Waiter:
    __slots__ = ("batch", "done", "aborted")

    def __init__(self) -> None:
        self.batch: BatchInfo | None = None
        self.done = threading.Event()
        self.aborted = False


class RunWatch:
    """One poll loop for every batch a flow run waits on (see the module's note)."""

    _lock = threading.Lock()
    _watches: dict[tuple[str, str], RunWatch] = {}
    _ended: set[str] = set()  # runs that stopped waiting: a wait they start fails at once

    def __init__(
        self,
        credentials: KlusterCredentials,
        poll_interval: float,
        max_poll: float | None,
        run_key: str = "",
    ):
        self.run_key = run_key
        self.credentials = credentials
        self.first_pause, self.longest_pause = poll_pauses(poll_interval, max_poll)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.waiting: dict[str, list[_Waiter]] = {}
        self.seen: dict[str, tuple[str, str]] = {}
        self.latest: dict[str, BatchInfo] = {}
        self.thread: threading.Thread | None = None
        self.cycles = 0
        # Counts that moved since the run's progress was last reported (see REPORT_EVERY).
        self.unreported: dict[str, BatchInfo] = {}
        self.reported_at = 0.0
        self.finish = FinishEstimate()

    @classmethod
    def for_run(
        cls,
        run_key: str,
        credentials: KlusterCredentials,
        poll_interval: float,
        max_poll: float | None,
    ) -> RunWatch:
        key = (run_key, credentials.base_url)
        with cls._lock:
            watch = cls._watches.get(key)
            if watch is None:
                watch = cls._watches[key] = cls(credentials, poll_interval, max_poll, run_key)
            return watch

    @classmethod
    def abort_run(cls, run_key: str) -> int:
        """Wake every thread waiting on a batch of the run with ``BatchWaitAborted``: the run
        is ending, and its task threads must not keep it alive until its batches end (a
        cancelled run's process would wait for them, until it is killed). Returns how many
        waits were stopped."""
        with cls._lock:
            cls._ended.add(run_key)
            watches = [w for (key, _), w in cls._watches.items() if key == run_key]
        stopped = 0
        for watch in watches:
            with watch.lock:
                waiters = [w for ws in watch.waiting.values() for w in ws]
                watch.waiting.clear()
            for waiter in waiters:
                waiter.aborted = True
                waiter.done.set()
            watch.wake.set()  # its loop sees nothing left to watch and ends
            stopped += len(waiters)
        return stopped

    def wait(self, batch_id: str, timeout: float | None) -> BatchInfo:
        """Block until the batch ends (or ``timeout`` runs out: ``BatchWaitTimeout``; or the
        run stops waiting: ``BatchWaitAborted``)."""
        waiter = _Waiter()
        with self.lock:
            if self.run_key in RunWatch._ended:
                raise BatchWaitAborted(f"not waiting for batch {batch_id}: the run is ending")
            self.waiting.setdefault(batch_id, []).append(waiter)
            if self.thread is None or not self.thread.is_alive():
                context = contextvars.copy_context()  # the run's, for logs and artifacts
                self.thread = threading.Thread(
                    target=context.run, args=(self._loop,), name="kluster-watch", daemon=True
                )
                self.thread.start()
        self.wake.set()  # a new batch is looked at now, not after a long pause
        if waiter.done.wait(timeout) and waiter.aborted:
            raise BatchWaitAborted(f"stopped waiting for batch {batch_id}: the run is ending")
        if waiter.batch is not None:
            return waiter.batch
        with self.lock:
            waiters = self.waiting.get(batch_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self.waiting.pop(batch_id, None)
            latest = self.latest.get(batch_id)
        if waiter.batch is not None:
            return waiter.batch
        if latest is None:
            latest = retrieve_batch(self.credentials, batch_id)
        raise BatchWaitTimeout(latest, timeout or 0)

    def _poll(self, client: Any, ids: set[str]) -> dict[str, BatchInfo]:
        """The watched batches' states: a list call (newest first; more pages only while
        some are missing), then a retrieve for any still missing."""
        found: dict[str, BatchInfo] = {}
        page = client.batches.list(limit=LIST_PAGE)
        for _ in range(MAX_LIST_PAGES):
            for raw in page.data:
                if raw.id in ids:
                    found[raw.id] = BatchInfo.from_sdk(raw)
            if len(found) == len(ids) or len(page.data) < LIST_PAGE or not page.has_next_page():
                break
            page = page.get_next_page()
        for batch_id in ids - found.keys():
            found[batch_id] = BatchInfo.from_sdk(client.batches.retrieve(batch_id))
        return found

    def _loop(self) -> None:
        logger = _logger()
        pause = self.first_pause
        with self.credentials.get_client() as client:
            while True:
                with self.lock:
                    ids = set(self.waiting)
                    if not ids:
                        self.thread = None
                        with RunWatch._lock:  # the run waits on nothing now
                            RunWatch._watches = {
                                k: v for k, v in RunWatch._watches.items() if v is not self
                            }
                        return
                began = time.monotonic()
                try:
                    found = self._poll(client, ids)
                except Exception as exc:  # a failed cycle is tried again after the pause
                    logger.warning("Status check failed (%s); trying again", type(exc).__name__)
                    found = {}
                seen_at = time.monotonic()
                self.cycles += 1
                moved = urgent = False
                for batch in found.values():
                    now = (batch.status, batch.progress)
                    before = self.seen.get(batch.id)
                    if before != now:
                        self.seen[batch.id] = now
                        self.unreported[batch.id] = batch
                        moved = True
                        urgent = urgent or before is None or before[0] != batch.status
                # Waiters on ended batches go on (to their downloads) first: the report
                # below is a Prefect server round trip they need not wait for.
                with self.lock:
                    self.latest.update(found)
                    for batch in found.values():
                        if batch.is_terminal:
                            for waiter in self.waiting.pop(batch.id, []):
                                waiter.batch = batch
                                waiter.done.set()
                if self.unreported and (
                    urgent or time.monotonic() - self.reported_at >= REPORT_EVERY
                ):
                    changed = list(self.unreported.values())
                    self.unreported.clear()
                    self.reported_at = time.monotonic()
                    for batch in changed:
                        logger.info("Batch %s: %s %s", batch.id, batch.status, batch.progress)
                    report_many(changed)
                if moved:
                    pause = self.first_pause
                elif found:
                    pause = min(pause * BACKOFF_FACTOR, self.longest_pause)
                # A batch that starts being watched is looked at within the first pause of
                # the last look, not after a long one; many starting at once share that look.
                # A running batch foreseen to end sooner is looked at then.
                polled_at = began
                deadline = self.finish.next_look(
                    found.values(), seen_at, began + pause, began, self.first_pause
                )
                while (left := deadline - time.monotonic()) > 0:
                    if self.wake.wait(left):
                        self.wake.clear()
                        deadline = min(deadline, polled_at + self.first_pause)


def _run_key() -> str | None:
    ctx = FlowRunContext.get()
    return None if ctx is None or ctx.flow_run is None else str(ctx.flow_run.id)


def stop_waiting() -> int:
    """Stop the current flow run's waits on its batches, and any it starts later (see
    ``RunWatch.abort_run``)."""
    run_key = _run_key()
    return 0 if run_key is None else RunWatch.abort_run(run_key)


def run_is_ending() -> bool:
    """True once ``stop_waiting`` was called in this flow run: start no new shard."""
    run_key = _run_key()
    return run_key is not None and run_key in RunWatch._ended


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # outside a run
        return logging.getLogger("prefect.kluster.wait")


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
    ``max_poll_interval`` while it does not (see the module's note). In a flow run, one
    loop polls every batch the run waits on."""
    batch_id = batch if isinstance(batch, str) else batch.id
    run_key = _run_key()
    if run_key is not None:
        watch = RunWatch.for_run(run_key, credentials, poll_interval, max_poll_interval)
        final = watch.wait(batch_id, timeout)
        announce_batch(final, final.status)
        return final
    return poll_batch(
        credentials,
        batch_id,
        poll_interval,
        timeout,
        on_change=report_progress,
        max_poll_interval=max_poll_interval,
    )
