"""One kluster.ai batch as a Prefect job: ``KlusterBatchJob`` (a ``JobBlock``) and
``KlusterBatchJobRun`` (a ``JobRun``), so a batch runs wherever Prefect users already run
dbt Cloud or Glue jobs, plus the ``run_kluster_batch_job`` flow that wraps each step in a task.

This is the plain one-file path: no sharding, no joining to inputs, no create-once record
(``batch_inference`` does all of that). Each method has a sync and an async form: called from
async code (or an async flow or task) it returns a coroutine, otherwise it runs at once.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import time
from collections.abc import Iterator
from typing import Any

import fsspec
from prefect import flow, task
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.abstract import JobBlock, JobRun
from prefect.cache_policies import NO_CACHE
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from pydantic import Field

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks.retry import RETRY_OPTIONS, api_error_message, is_transient_error
from prefect_kluster.tasks.types import BatchInfo
from prefect_kluster.tasks.wait import BACKOFF_FACTOR, FinishEstimate

CHAT_COMPLETIONS_ENDPOINT = "/v1/chat/completions"

JobResult = list[dict[str, Any]] | str


class KlusterBatchJobError(RuntimeError):
    """A kluster.ai batch job did not give results; ``batch`` is the service's last word."""

    def __init__(self, message: str, batch: BatchInfo) -> None:
        super().__init__(message)
        self.batch = batch


class KlusterBatchJobFailed(KlusterBatchJobError):
    """The service failed the batch (e.g. its input was refused at validation)."""


class KlusterBatchJobCancelled(KlusterBatchJobError):
    """The batch was cancelled before it finished; finished lines can still be fetched."""


class KlusterBatchJobExpired(KlusterBatchJobError):
    """The completion window ran out; finished lines can still be fetched."""


class KlusterBatchJobTimedOut(KlusterBatchJobError):
    """The wait's own timeout ran out while the batch was still running (it keeps running)."""


class KlusterBatchJobIncomplete(KlusterBatchJobError):
    """Results were asked for before the batch finished: wait for completion first."""


_TERMINAL_ERRORS: dict[str, type[KlusterBatchJobError]] = {
    "failed": KlusterBatchJobFailed,
    "cancelled": KlusterBatchJobCancelled,
    "expired": KlusterBatchJobExpired,
}


def _describe(batch: BatchInfo) -> str:
    errors = f": {'; '.join(batch.errors[:3])}" if batch.errors else ""
    return f"kluster.ai batch {batch.id} is {batch.status} ({batch.progress} requests){errors}"


def _raise_if_unfinished(batch: BatchInfo, partial: bool = False) -> None:
    """Map a batch that has no complete results to its typed error."""
    if batch.status == "completed":
        return
    error = _TERMINAL_ERRORS.get(batch.status)
    if error is None:
        raise KlusterBatchJobIncomplete(
            f"{_describe(batch)}: call wait_for_completion() before fetch_result()", batch
        )
    if partial and error is not KlusterBatchJobFailed:
        return
    raise error(_describe(batch), batch)


class _Pacer:
    """Adaptive polling: the pause grows by half while nothing changes (a batch queued for
    hours costs a few calls, not thousands), drops back on any change, is cut short when a
    running batch's counts say it ends sooner, and never passes the deadline."""

    def __init__(self, job: KlusterBatchJob) -> None:
        self.interval = job.interval_seconds
        self.max_interval = max(job.max_interval_seconds, job.interval_seconds)
        self.timeout = job.timeout_seconds
        self.deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self.pause = self.interval
        self.last: BatchInfo | None = None
        self.finish = FinishEstimate()  # a running batch is looked at when due to end

    def next_pause(self, batch: BatchInfo | None, run: KlusterBatchJobRun) -> float | None:
        """Seconds to sleep before the next poll, or None once the batch is terminal.
        ``batch`` is None when the poll failed for a transient reason: the wait goes on."""
        changed = batch is not None and (
            self.last is None
            or (batch.status, batch.request_counts) != (self.last.status, self.last.request_counts)
        )
        if changed:
            run.logger.info("%s", _describe(batch))
            self.pause = self.interval
        else:
            self.pause = min(self.pause * BACKOFF_FACTOR, self.max_interval)
        self.last = batch or self.last
        if batch is not None and batch.is_terminal:
            return None
        pause = self.pause
        if batch is not None:
            now = time.monotonic()
            pause = self.finish.next_look([batch], now, now + pause, now, self.interval) - now
        if self.deadline is None:
            return pause
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            last = self.last or BatchInfo(id=run.batch_id, status="unknown")
            raise KlusterBatchJobTimedOut(
                f"{_describe(last)} after waiting {self.timeout:g} s; it keeps running on the "
                "service (cancel it there, or wait again with this run's batch id)",
                last,
            )
        return min(pause, remaining)


class KlusterBatchJobRun(JobRun[JobResult]):  # not a block
    """A batch submitted to kluster.ai: wait for it, then fetch its result lines.

    Only the batch id is needed to pick a run up again, e.g. in another process:
    ``KlusterBatchJobRun(job, batch_id)``.
    """

    def __init__(self, job: KlusterBatchJob, batch_id: str) -> None:
        self.job = job
        self.batch_id = batch_id

    def __repr__(self) -> str:  # the job holds credentials: show only the id
        return f"KlusterBatchJobRun(batch_id={self.batch_id!r})"

    def get_batch(self) -> BatchInfo:
        """The batch as the service reports it now (one status call)."""
        with self.job.kluster_credentials.get_client() as client:
            return BatchInfo.from_sdk(client.batches.retrieve(self.batch_id))

    def _poll(self) -> BatchInfo | None:
        """One status call; None when it failed for a transient reason (429, 5xx, connection)
        after the SDK's own retries, so an hours-long wait outlives a brief outage."""
        try:
            return self.get_batch()
        except Exception as exc:
            if not is_transient_error(exc):
                raise
            self.logger.warning(
                "Status check of batch %s failed (%s: %s); checking again later",
                self.batch_id,
                type(exc).__name__,
                api_error_message(exc),
            )
            return None

    async def await_for_completion(self) -> BatchInfo:
        """Async form of ``wait_for_completion``: cancellable between polls."""
        pacer = _Pacer(self.job)
        while True:
            batch = await run_sync_in_worker_thread(self._poll)
            pause = pacer.next_pause(batch, self)
            if pause is None and batch is not None:
                _raise_if_unfinished(batch)
                return batch
            await asyncio.sleep(pause)

    @async_dispatch(await_for_completion)
    def wait_for_completion(self) -> BatchInfo:  # type: ignore[override]
        """Poll until the batch ends; return it when completed.

        Raises KlusterBatchJobFailed, ...Cancelled or ...Expired when it ended otherwise, and
        KlusterBatchJobTimedOut when the job's ``timeout_seconds`` ran out first.
        """
        pacer = _Pacer(self.job)
        while True:
            batch = self._poll()
            pause = pacer.next_pause(batch, self)
            if pause is None and batch is not None:
                _raise_if_unfinished(batch)
                return batch
            time.sleep(pause)

    async def afetch_result(self, path: str | None = None, partial: bool = False) -> JobResult:
        """Async form of ``fetch_result`` (the download runs in a worker thread)."""
        return await run_sync_in_worker_thread(self._fetch, path, partial)

    @async_dispatch(afetch_result)
    def fetch_result(  # type: ignore[override]
        self, path: str | None = None, partial: bool = False
    ) -> JobResult:
        """The batch's result lines: output file first, then error file, as the service wrote
        them (join on ``custom_id``; order is not promised).

        With ``path`` (or the job's ``output_path``) the lines are streamed to that JSONL file
        (local path or fsspec URL, overwritten) and the path is returned; otherwise they are
        returned as a list of dicts. ``partial=True`` also takes the finished lines of an
        expired or cancelled batch; otherwise those raise like ``wait_for_completion``.
        """
        return self._fetch(path, partial)

    def _fetch(self, path: str | None, partial: bool) -> JobResult:
        batch = self.get_batch()
        _raise_if_unfinished(batch, partial=partial)
        file_ids = [f for f in (batch.output_file_id, batch.error_file_id) if f]
        target = path or self.job.output_path
        with self.job.kluster_credentials.get_client() as client:
            if target is None:
                rows = [json.loads(line) for line in self._lines(client, file_ids)]
                self.logger.info("Fetched %d result lines of batch %s", len(rows), batch.id)
                return rows
            count = 0
            with fsspec.open(target, "wb") as out:
                for line in self._lines(client, file_ids):
                    out.write(line + b"\n")
                    count += 1
        self.logger.info("Wrote %d result lines of batch %s to %s", count, batch.id, target)
        return target

    @staticmethod
    def _lines(client: Any, file_ids: list[str]) -> Iterator[bytes]:
        """Non-empty lines of each file, streamed (no whole file held in memory)."""
        for file_id in file_ids:
            with client.files.with_streaming_response.content(file_id) as response:
                pending = b""
                for chunk in response.iter_bytes(1 << 16):
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    yield from (line for line in complete if line.strip())
                if pending.strip():
                    yield pending


class KlusterBatchJob(JobBlock):
    """One kluster.ai batch: upload a JSONL request file, run it, fetch the result lines.

    Attributes:
        kluster_credentials: Credentials block for kluster.ai.
        request_file: JSONL request file (one request a line), a local path or fsspec URL.
        completion_window: How long the service may take; longer windows cost less.
        metadata: Labels stored on the batch (service options under "@kluster.ai").
        interval_seconds: First pause between status checks.
        max_interval_seconds: Longest pause while the batch shows no change.
        timeout_seconds: Longest wait for the batch; None waits until it ends.
        output_path: Where ``fetch_result`` writes the result lines by default.

    Examples:
        Load a configured kluster.ai batch job block:
        ```python
        from prefect_kluster import KlusterBatchJob

        kluster_batch_job = KlusterBatchJob.load("BLOCK_NAME")
        ```

        Trigger a batch, wait for it and fetch its results in a flow:
        ```python
        from prefect import flow
        from prefect_kluster import KlusterBatchJob, KlusterCredentials

        @flow
        def my_batch_flow() -> list[dict]:
            job = KlusterBatchJob(
                kluster_credentials=KlusterCredentials.load("BLOCK_NAME"),
                request_file="s3://bucket/requests.jsonl",
            )
            run = job.trigger()
            run.wait_for_completion()
            return run.fetch_result()
        ```
    """

    _block_type_name = "kluster.ai Batch Job"
    _block_type_slug = "kluster-ai-batch-job"
    _logo_url = "https://avatars.githubusercontent.com/u/39270045?s=200&v=4"
    _description = "One kluster.ai batch: a request file to run, and how to wait for it."
    _documentation_url = "https://docs.kluster.ai/"

    kluster_credentials: KlusterCredentials = Field(
        title="kluster.ai Credentials",
        description="The kluster.ai credentials block used to reach the service.",
    )
    request_file: str = Field(
        description="JSONL request file (one request a line): a local path or fsspec URL.",
    )
    endpoint: str = Field(
        default=CHAT_COMPLETIONS_ENDPOINT,
        description="The API endpoint every request line targets.",
    )
    completion_window: str = Field(
        default="24h",
        description="How long the service may take (e.g. 24h, 48h, 72h); longer costs less.",
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Labels stored on the batch; kluster options go under '@kluster.ai'.",
    )
    interval_seconds: float = Field(
        default=10.0, gt=0, description="Seconds between status checks while the batch moves."
    )
    max_interval_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Longest pause between status checks while the batch shows no change.",
    )
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Longest wait for the batch, in seconds; None waits until it ends.",
    )
    output_path: str | None = Field(
        default=None,
        description="JSONL file (path or fsspec URL) fetch_result writes; None returns rows.",
    )

    async def atrigger(self) -> KlusterBatchJobRun:
        """Async form of ``trigger`` (the upload runs in a worker thread)."""
        return await run_sync_in_worker_thread(self._trigger)

    @async_dispatch(atrigger)
    def trigger(self) -> KlusterBatchJobRun:  # type: ignore[override]
        """Upload the request file (purpose "batch") and create the batch: this is the paid
        call, made once (no retry). Returns the run that tracks the batch by its id."""
        return self._trigger()

    def _trigger(self) -> KlusterBatchJobRun:
        name = posixpath.basename(self.request_file.rstrip("/")) or "requests.jsonl"
        with self.kluster_credentials.get_client() as client:
            with fsspec.open(self.request_file, "rb") as handle:
                uploaded = client.files.create(file=(name, handle), purpose="batch")
            options: dict[str, Any] = {"metadata": self.metadata} if self.metadata else {}
            # No SDK retry of the paid call: a retried create whose first answer was lost
            # would make (and bill) a second batch. An error here means "look before rerunning".
            batch = client.with_options(max_retries=0).batches.create(
                input_file_id=uploaded.id,
                endpoint=self.endpoint,  # type: ignore[arg-type]
                completion_window=self.completion_window,  # type: ignore[arg-type]
                **options,
            )
        self.logger.info(
            "Created kluster.ai batch %s from %s (file %s)", batch.id, name, uploaded.id
        )
        return KlusterBatchJobRun(self, batch.id)


# Each step is a task: no result persistence (the run object holds the credentials block),
# no cache (a cached trigger would skip a batch the caller means to pay for).
_STEP_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="trigger-kluster-batch-job", **_STEP_OPTIONS)
def trigger_kluster_batch_job(job: KlusterBatchJob) -> KlusterBatchJobRun:
    """Upload and create the batch (no retries: creating it is the paid call)."""
    return job.trigger()


@task(name="wait-for-kluster-batch-job", **_STEP_OPTIONS)
def wait_for_kluster_batch_job(run: KlusterBatchJobRun) -> BatchInfo:
    """Poll inside one task run (not one task run per poll) until the batch ends."""
    return run.wait_for_completion()


@task(name="fetch-kluster-batch-job-result", **{**RETRY_OPTIONS, **_STEP_OPTIONS})
def fetch_kluster_batch_job_result(run: KlusterBatchJobRun) -> JobResult:
    """Download the result lines (retried on transient errors: it only reads)."""
    return run.fetch_result()


@flow(name="run-kluster-batch-job")
def run_kluster_batch_job(job: KlusterBatchJob) -> JobResult:
    """Trigger one kluster.ai batch, wait for it and fetch its result lines.

    Args:
        job: The kluster.ai batch job block: request file, credentials and how to wait.

    Returns:
        The result rows, or the path written when the job has an ``output_path``.

    Example:
        ```python
        from prefect_kluster import KlusterBatchJob, run_kluster_batch_job

        rows = run_kluster_batch_job(KlusterBatchJob.load("BLOCK_NAME"))
        ```
    """
    run = trigger_kluster_batch_job(job)
    wait_for_kluster_batch_job(run)
    return fetch_kluster_batch_job_result(run)
