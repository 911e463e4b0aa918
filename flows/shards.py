"""The shard lifecycle every run shares: upload -> submit -> wait -> download, for the shards
of one round, at most ``max_concurrency`` batches at once.

``batch_inference`` runs it for its own shards; with ``limits.distribute`` each child run of
the ``kluster-shard-group`` deployment runs it for its group (flows/fanout.py). Both find a
run's state in its work directory, so any worker can take over.
"""

from __future__ import annotations

import contextvars
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.flows.options import MAX_CONCURRENCY, Limits, RunOptions
from prefect_kluster.tasks import claims, storage
from prefect_kluster.tasks.download import download_batch_results
from prefect_kluster.tasks.submit import (
    identity_key,
    matches,
    reusable,
    shard_identity,
    submit_shard,
)
from prefect_kluster.tasks.types import BatchInfo, Shard
from prefect_kluster.tasks.upload import clean_up_uploads, upload_shard
from prefect_kluster.tasks.wait import (
    BatchWaitAborted,
    run_is_ending,
    stop_waiting,
    wait_for_batch,
)

# A shard in flight holds a thread for its steps and one of the task runner's for its
# clean-up; both pools are sized for MAX_CONCURRENCY shards and the downloads of batches a
# rerun finds ended. Threads are started only as they are needed.
TASK_THREADS = 2 * MAX_CONCURRENCY + 16


class ShardResult(BaseModel):
    round: int = Field(1, description="1 for the first try, 2+ for failed-line rounds.")
    shard: Shard
    batch: BatchInfo
    output_file: str | None = None
    error_file: str | None = None


def default_work_dir(output_path: str, work_dir: str | None = None) -> str:
    """Where a run keeps shards, its state and downloads: stable across reruns, so a rerun
    (or the collector, on any worker that reaches it) finds the run's state there."""
    return work_dir or f"{output_path}.work"


@dataclass
class ShardRun:
    """What every shard of one run shares."""

    credentials: KlusterCredentials
    work: str
    run: RunOptions
    limits: Limits
    deadline: float | None
    nonce: str | None
    started: float
    children: list[str] = field(default_factory=list)  # fan-out: child runs still working
    # The results are joined by this process (not a fan-out child's): each download makes
    # the join's first pass as the bytes arrive (``tasks.join.FirstPassAhead``).
    joins_results: bool = True

    @property
    def state_dir(self) -> str:
        return storage.join(self.work, "state")

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def known_batch(self, shard: Shard, round_no: int, known: list[BatchInfo]) -> BatchInfo | None:
        identity = shard_identity(shard, round_no, self.nonce)
        return next((b for b in known if matches(b, identity) and reusable(b)), None)


def run_shards(
    run: ShardRun, shards: list[Shard], round_no: int, known: list[BatchInfo]
) -> tuple[list[ShardResult], list[BatchInfo], int]:
    """See ``_run_shards``. The shards' claims are released in the background, and all of
    them before this returns. If it ends early (cancelled, or a shard failed), the threads
    still waiting on batches stop, so they do not hold the run's process open."""
    with claims.releasing_in_background():
        return _run_shards(run, shards, round_no, known)


def _run_shards(
    run: ShardRun, shards: list[Shard], round_no: int, known: list[BatchInfo]
) -> tuple[list[ShardResult], list[BatchInfo], int]:
    """Take every shard of a round as far as it goes, at most ``max_concurrency`` batches
    running at once: upload -> submit -> wait -> download.

    Waiting (``run.wait``), it returns when every shard is done. Not waiting, it takes
    each shard only as far as it goes now: an ended batch is downloaded, a running one is
    left running, and a shard with no batch is submitted while a slot is free. Returns the
    results of the finished shards, the batches left running, and how many shards still
    wait for a slot."""
    results_dir = storage.join(run.work, f"round-{round_no}", "results")
    results: dict[int, ShardResult] = {}
    # a shard's steps -> the shard, and whether they hold a slot (a download alone does not)
    in_flight: dict[Future[_Taken], tuple[Shard, bool]] = {}
    left_running: list[BatchInfo] = []
    todo: list[tuple[Shard, BatchInfo | None]] = []
    cleanups: list[Any] = []
    # Each shard's steps run one after the other in a thread of their own, each step called
    # with the one before's result, not its future: Prefect reads an unfinished future's
    # state from the server for every task it is passed to (four reads a shard, at the
    # moment its claim is taken on the same server).
    steps = ThreadPoolExecutor(max_workers=TASK_THREADS, thread_name_prefix="kluster-shard")

    def start(fn: Any, *args: Any) -> Future[_Taken]:
        return steps.submit(contextvars.copy_context().run, fn, *args)

    try:
        for shard in shards:
            existing = run.known_batch(shard, round_no, known)
            if existing is not None and existing.is_terminal:  # ended: download, no slot
                in_flight[start(_download, run, existing, results_dir)] = (shard, False)
            elif existing is not None and not run.run.wait:
                left_running.append(existing)
            else:
                todo.append((shard, existing))
        slots = max(1, run.limits.max_concurrency) - len(left_running)
        holding = 0
        while todo or in_flight:
            while todo and holding < slots:
                shard, existing = todo.pop(0)
                taken = start(_take_shard, run, shard, existing, round_no, results_dir, cleanups)
                in_flight[taken] = (shard, True)
                holding += 1
            if not in_flight:
                break
            done = next(as_completed(in_flight))
            shard, held = in_flight.pop(done)
            holding -= held
            batch, files = done.result()  # raises why the shard stopped, if it did
            if files is None:  # not waiting: the batch keeps its slot until collected
                left_running.append(batch)
                slots -= 1
                continue
            results[shard.index] = ShardResult(
                round=round_no, shard=shard, batch=batch, output_file=files[0], error_file=files[1]
            )
    except BaseException:
        # The waits end now (before the claims' releases are waited for, not after) and no
        # other shard pays for a batch (``_take_shard``); what the steps were doing ends
        # before the run does, as Prefect's task runner would.
        stop_waiting()
        steps.shutdown(wait=True, cancel_futures=True)
        raise
    steps.shutdown(wait=False)
    for cleaned in cleanups:  # unused uploads are tidied, but never fail the run
        try:
            failed = isinstance(cleaned.result(raise_on_failure=False), BaseException)
        except Exception:  # never ran
            failed = True
        if failed:
            get_run_logger().warning("Could not delete an unused upload; it stays on the service")
    return [results[s.index] for s in shards if s.index in results], left_running, len(todo)


# A shard's batch, and its (output, error) files once downloaded; None: left running.
_Taken = tuple[BatchInfo, tuple[str | None, str | None] | None]


def _take_shard(
    run: ShardRun,
    shard: Shard,
    existing: BatchInfo | None,
    round_no: int,
    results_dir: str,
    cleanups: list[Any],
) -> _Taken:
    """One shard's lifecycle: upload -> submit (-> wait -> download, when waiting)."""
    identity = shard_identity(shard, round_no, run.nonce)
    uploaded = upload_shard(run.credentials, shard, identity, run.state_dir, existing, run.started)
    if run_is_ending():  # another shard failed, or the run was cancelled, meanwhile
        if uploaded.batch is None:
            claims.release(uploaded.key)  # taken by upload_shard, for the submit
        raise BatchWaitAborted(f"shard {shard.index} not submitted: the run is ending")
    batch = submit_shard(
        run.credentials, uploaded, run.state_dir, run.run.completion_window, run.run.metadata
    )
    if not (uploaded.sole_upload and batch.input_file_id == uploaded.file_id):
        # An upload in doubt (a lost answer, a crash, an earlier run's): look for unused
        # ones. The usual shard, uploaded once and answered, has none: no task run for it.
        cleanups.append(
            clean_up_uploads.submit(
                run.credentials, shard, batch, run.state_dir, identity_key(identity)
            )
        )
    if not run.run.wait:
        return batch, None
    finished = wait_for_batch(
        run.credentials, batch, run.run.poll_interval, run.remaining(), run.run.max_poll_interval
    )
    return _download(run, finished, results_dir)


def _download(run: ShardRun, batch: BatchInfo, results_dir: str) -> _Taken:
    return batch, download_batch_results(
        run.credentials, batch, results_dir, join_ahead=run.joins_results
    )


def cancel_running_batches(credentials: KlusterCredentials, batch_ids: list[str]) -> list[str]:
    """Cancel each batch that is still running; returns the ids asked to cancel."""
    cancelled = []
    with credentials.get_client() as client:
        for batch_id in batch_ids:
            try:
                batch = BatchInfo.from_sdk(client.batches.retrieve(batch_id))
                if not batch.is_terminal and batch.status != "cancelling":
                    client.batches.cancel(batch_id, extra_body={})
                    cancelled.append(batch_id)
            except Exception as exc:  # keep going: cancel as many as possible
                logging.getLogger(__name__).warning(
                    "Could not cancel batch %s: %s", batch_id, type(exc).__name__
                )
    return cancelled


def run_work_dir(parameters: dict[str, Any]) -> str:
    """The work directory of a run, from its parameters (as Prefect stores them)."""
    output = parameters.get("output") or {}
    if isinstance(output, BaseModel):
        output = output.model_dump()
    return default_work_dir(parameters.get("output_path", "results.jsonl"), output.get("work_dir"))
