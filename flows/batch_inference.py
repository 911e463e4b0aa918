"""The batch inference flow: build -> upload -> submit -> wait -> fetch -> join.

Run it from the shell (``python -m flows.batch_inference requests.jsonl``), call it from
Python, or deploy it and trigger it from the Prefect UI.
"""

from __future__ import annotations

if __name__ == "__main__":  # the command line checks what it can before importing Prefect
    import sys

    from prefect_kluster.cli import main

    sys.exit(main())

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from prefect_kluster.blocks import KlusterCredentials, resolve_credentials
from prefect_kluster.flows import fanout
from prefect_kluster.flows.options import (
    BudgetSettings,
    Limits,
    OutputOptions,
    RequestOptions,
    RunOptions,
    StorageSettings,
)
from prefect_kluster.flows.reporting import (
    create_batch_progress,
    emit_run_cost,
    publish_cost_estimate,
    publish_run_summary,
    update_batch_progress,
)
from prefect_kluster.flows.shards import (
    TASK_THREADS,
    ShardResult,
    ShardRun,
    cancel_running_batches,
    default_work_dir,
    run_work_dir,
)
from prefect_kluster.tasks import budget, storage
from prefect_kluster.tasks.build import build_request_file, validate_shard_and_estimate
from prefect_kluster.tasks.cost import (
    WINDOWS,
    ActualCost,
    CostEstimate,
    PriceTable,
    actual_cost,
    check_budget,
    format_usd,
    load_prices,
)
from prefect_kluster.tasks.join import JoinSummary, OutputExistsError, parquet_path_for
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.manage import list_models
from prefect_kluster.tasks.pending import register_pending, unregister_pending
from prefect_kluster.tasks.progress import forget_run, summed_counts, watch_progress
from prefect_kluster.tasks.rounds import build_retry_shards, join_round, write_parquet
from prefect_kluster.tasks.submit import (
    find_existing_batches,
)
from prefect_kluster.tasks.types import BatchInfo, RequestCounts, TokenUsage
from prefect_kluster.tasks.wait import BatchWaitTimeout, poll_pauses


class BatchRunError(RuntimeError):
    """A batch ended failed, expired or cancelled. Whatever output existed was kept."""

    def __init__(self, message: str, result: BatchRunResult | None = None):
        self.result = result
        super().__init__(message)


class BatchRunResult(BaseModel):
    """What a batch inference run produced."""

    status: str = Field(description="completed, pending, or the final round's worst status.")
    batch_ids: list[str]
    rounds: int = 1
    request_counts: RequestCounts
    usage: TokenUsage
    output_path: str
    work_dir: str = ""
    parquet_path: str | None = None
    estimate: CostEstimate | None = Field(
        None, description="The cost estimate per model and window, made before any upload."
    )
    cost_usd: float | None = Field(
        None, description="Dollars spent: the results' usage times the window's prices."
    )
    cost: ActualCost | None = None
    output_files: list[str]
    error_files: list[str]
    shards: list[ShardResult]
    summary: JoinSummary | None = Field(
        None, description="Counts over the joined output; None while batches are pending."
    )

    @property
    def batch_id(self) -> str:
        return self.batch_ids[0]


def _overall_status(batches: list[BatchInfo]) -> str:
    for status in ("failed", "expired", "cancelled"):
        if any(b.status == status for b in batches):
            return status
    return "completed"


def cancel_remote_batches_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation hook: a cancelled flow run cancels its batches still running and
    gives back its budget reservation."""
    params = flow_run.parameters or {}
    work = run_work_dir(params)
    reservation_path = _reservation_path(work)
    if storage.exists(reservation_path):
        budget.release(budget.Reservation.model_validate_json(storage.read_bytes(reservation_path)))
        storage.remove(reservation_path)
    batch_ids = Journal(storage.join(work, "state")).batch_ids()
    if not batch_ids:
        return
    credentials = resolve_credentials(params.get("credentials_block"))
    cancelled = cancel_running_batches(credentials, batch_ids)
    logging.getLogger(__name__).warning(
        "Flow run cancelled: cancelled %d running batch(es): %s",
        len(cancelled),
        ", ".join(cancelled) or "none",
    )


def check_paths(
    input_path: str | None,
    output_path: str,
    requests: RequestOptions,
    output: OutputOptions,
    roots: list[str],
) -> None:
    """Everything about paths that can be refused before anything is read or paid."""
    work = default_work_dir(output_path, output.work_dir)
    parquet = parquet_path_for(output_path)
    storage.check_roots(
        {
            "input_path": input_path,
            "prompts_path": requests.prompts_path,
            "output_path": output_path,
            "work_dir": work,
            "parquet copy": parquet if output.parquet else None,
        },
        roots,
    )
    for path in (output_path, parquet if output.parquet else None):
        if path and not output.overwrite and storage.exists(path):
            raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it")


@flow(
    name="kluster-batch-inference",
    task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS),
    on_cancellation=[fanout.cancel_child_runs_hook, cancel_remote_batches_hook],
)
def batch_inference(
    input_path: str | None = None,
    output_path: str = "results.jsonl",
    credentials_block: str | None = None,
    requests: RequestOptions = RequestOptions(),
    output: OutputOptions = OutputOptions(),
    run: RunOptions = RunOptions(),
    limits: Limits = Limits(),
) -> BatchRunResult:
    """Run chat-completion requests as kluster.ai batch jobs and join the results.

    Rerunning with the same inputs after a crash, on any worker that reaches the work
    directory, reuses the uploads and batches already made (found on the service by the
    shard hash in their metadata): nothing is paid twice.

    Args:
        input_path: A batch request JSONL file (local path or fsspec URL such as
            s3://bucket/requests.jsonl). Or give request dicts or prompts under `requests`.
        output_path: Where the joined results go (JSONL, one line per request, in input
            order; local path or fsspec URL). Refused if it exists, unless overwrite.
        credentials_block: Name of a saved kluster.ai Credentials block; without one,
            KLUSTER_API_KEY and KLUSTER_BASE_URL are read from the environment.
        requests: What to run when it is not a request file: request dicts, or prompts
            (a list or a CSV/JSONL file) with a model.
        output: Where results go besides output_path: overwrite, a Parquet copy, the
            work directory.
        run: How to run it: completion window, metadata, waiting or not, polling,
            timeout, retry rounds.
        limits: Shard sizes and how many batches run at once.
    """
    logger = get_run_logger()
    roots = StorageSettings().roots
    check_paths(input_path, output_path, requests, output, roots)
    poll_pauses(run.poll_interval, run.max_poll_interval)  # refuses bad intervals now
    given = [input_path is not None, requests.requests is not None]
    given += [requests.prompts is not None, requests.prompts_path is not None]
    if sum(given) != 1:
        raise ValueError(
            "give exactly one of input_path, requests.requests, requests.prompts or "
            "requests.prompts_path"
        )
    work = default_work_dir(output_path, output.work_dir)
    credentials = resolve_credentials(credentials_block)
    ctx = FlowRunContext.get()
    state = ShardRun(
        credentials=credentials,
        work=work,
        run=run,
        limits=limits,
        deadline=None if run.timeout is None else time.monotonic() + run.timeout,
        nonce=run.run_label
        or (str(ctx.flow_run.id) if run.resubmit and ctx and ctx.flow_run else None),
        started=time.time(),
    )

    # build
    source = input_path
    if source is None:
        source = build_request_file(
            storage.join(work, "requests.jsonl"),
            requests=requests.requests,
            prompts=requests.prompts,
            model=requests.model,
            system_prompt=requests.system_prompt,
            completion_params=requests.completion_params,
            prompts_path=requests.prompts_path,
            prompt_column=requests.prompt_column,
            template=requests.template,
        )
    windows = list(dict.fromkeys([run.completion_window, *WINDOWS]))
    # The service's models, prices and batch list (a rerun's batches, to reuse) are read
    # while the file is checked: their round trips and the first client's TLS context
    # (40-55 ms of CPU) are not on the run's path. The models are checked once it is read.
    allowed = None
    if run.check_models:
        allowed = _PRICES.submit(contextvars.copy_context().run, _model_ids, credentials)
    prices = _PRICES.submit(_service_prices, credentials, run.prices)  # a future
    existing = None
    if not run.resubmit and not run.estimate_only:
        existing = find_existing_batches.submit(credentials, since=None)
    try:
        shards, estimate = validate_shard_and_estimate(
            source,
            storage.join(work, "shards"),
            prices,
            limits.max_file_bytes,
            limits.max_requests_per_file,
            allowed,
            windows,
        )
    finally:
        if allowed is not None:  # its task run ends before this run does, whatever happens
            allowed.exception()
    opening = _OpeningReports(estimate, sum(s.lines for s in shards))
    reports = opening.futures
    try:
        check_budget(estimate, limits.max_cost, run.completion_window)  # refused before paying
        if run.estimate_only:
            logger.info("Estimate only, nothing paid:\n%s", estimate.to_markdown())
            _reported(reports())
            return _estimate_result(estimate, output_path, work)
        upper = estimate.upper_usd(run.completion_window)
        reservation = _reserve_budget(work, upper, output_path)
    except BaseException:
        _reported(reports())
        raise

    # what the progress artifact says (it is made saying 0 of the file's requests), so a
    # poll that changes nothing in it sends nothing: a batch seen validating (the service
    # has counted none yet) or starting (0 of the same total) is no update
    shown: list[tuple[int, int]] = [(0, opening.total_lines)]

    def show_progress(board: dict[str, BatchInfo]) -> None:
        progress_made = opening.progress()  # the opening reports go now, if not yet
        counts = summed_counts(board.values())
        done, total = counts.completed + counts.failed, counts.total
        if total == 0 or [(done, total)] == shown:
            return
        progress = progress_made.result()
        shown[:] = [(done, total)] if update_batch_progress(progress, done, total) else []

    watch_progress(show_progress)
    if limits.distribute is not None:
        reports()  # child runs take the shards: no claim of this process to make way for
    journal = Journal(state.state_dir)
    all_results: list[ShardResult] = []
    result_files: list[str] = []
    round_shards, round_no = shards, 1
    # upload -> submit -> wait -> download, round after round of failed lines; not
    # waiting, the same path stops at the first round with batches still running.
    try:
        known = existing.result() if existing is not None else []
        while True:
            finished, running, queued = fanout.run_round(
                state, round_shards, round_no, known, credentials_block
            )  # limits.distribute: the round's shard groups run as child flow runs
            reports()  # sent by now, even if no batch was polled (a rerun found them ended)
            seen = {b.id for b in known}
            known = known + [r.batch for r in finished if r.batch.id not in seen]
            known = known + [b for b in running if b.id not in seen]
            if running or queued:
                _reported(reports())
                pending = _pending_result(
                    state, output_path, credentials_block, input_path, source, requests,
                    output, limits, running, finished, queued, round_no,
                )  # fmt: skip
                pending.estimate = estimate
                return pending
            all_results += finished
            result_files += [p for r in finished for p in (r.output_file, r.error_file) if p]
            joined = storage.join(work, f"round-{round_no}", "joined.jsonl")
            retry_ids = storage.join(work, f"round-{round_no}", "retry.ids")
            summary = join_round(shards, result_files, joined, retry_ids)
            if summary.retryable == 0 or round_no >= run.max_attempts:
                break
            round_no += 1
            round_shards = build_retry_shards(
                shards,
                retry_ids,
                storage.join(work, f"round-{round_no}", "shards"),
                limits.max_file_bytes,
                limits.max_requests_per_file,
            )
            if not run.resubmit:
                known = known + find_existing_batches(
                    credentials, since=journal.first_intent_time_any()
                )
    except BatchWaitTimeout as exc:
        _reported(reports())
        _release_budget(work, reservation)
        cancelled = cancel_running_batches(credentials, journal.batch_ids())
        raise BatchRunError(
            f"timed out after {run.timeout:g} s waiting for batch {exc.batch.id} "
            f"({exc.batch.status} {exc.batch.progress}); cancelled {len(cancelled)} running "
            "batch(es). Rerun with the same inputs to collect what finished."
        ) from exc
    except BaseException:
        _reported(reports())
        _release_budget(work, reservation)
        raise
    finally:
        forget_run()

    # fetch: publish the joined output (and its Parquet copy)
    if not output.overwrite and storage.exists(output_path):
        raise OutputExistsError(f"{output_path} already exists; pass overwrite=True to replace it")
    storage.publish(joined, output_path)
    summary.output_path = output_path
    if output.parquet:
        parquet_path = parquet_path_for(output_path)
        write_parquet(output_path, parquet_path)
        summary.parquet_path = parquet_path
    cost = actual_cost(summary.usage_by_model, prices.result(), run.completion_window)
    if reservation is not None:
        budget.settle(reservation, cost.total_usd)
        storage.remove(_reservation_path(work))
    last_round = [r.batch for r in all_results if r.round == round_no]
    batches = [r.batch for r in all_results]
    result = BatchRunResult(
        status=_overall_status(last_round),
        batch_ids=[b.id for b in batches],
        rounds=round_no,
        request_counts=summed_counts(batches),
        usage=summary.usage,
        output_path=output_path,
        work_dir=work,
        parquet_path=summary.parquet_path,
        output_files=[r.output_file for r in all_results if r.output_file],
        error_files=[r.error_file for r in all_results if r.error_file],
        shards=all_results,
        summary=summary,
        estimate=estimate,
        cost_usd=cost.total_usd,
        cost=cost,
    )
    closing = []
    if shown != [(summary.requests, summary.requests)]:  # not already all done
        progress = opening.progress().result()
        closing.append(_beside(update_batch_progress, progress, summary.requests, summary.requests))
    cost_rows = [
        ("Estimated cost", estimate.summary_line(run.completion_window)),
        ("Actual cost", f"{format_usd(cost.total_usd)} ({cost.window}; {cost.price_source})"),
    ]
    closing.append(
        _beside(publish_run_summary, batches, summary, result.status, extra_rows=cost_rows)
    )
    emit_run_cost(estimate, cost, output_path)
    unregister_pending(work)
    _reported(reports() + closing)
    logger.info(
        "Batch run %s after %d round(s): %d requests, %d ok, %d failed; %d prompt + %d "
        "completion tokens; cost %s (estimated %s); results in %s",
        result.status,
        round_no,
        summary.requests,
        summary.succeeded,
        summary.failed,
        summary.usage.prompt_tokens,
        summary.usage.completion_tokens,
        format_usd(cost.total_usd),
        estimate.summary_line(run.completion_window),
        output_path,
    )
    if result.status != "completed":
        bad = [b for b in last_round if b.status != "completed"]
        details = "; ".join(
            f"batch {b.id} {b.status} ({b.progress})"
            + (f": {', '.join(b.errors)}" if b.errors else "")
            for b in bad
        )
        raise BatchRunError(
            f"{len(bad)} of {len(last_round)} batch(es) did not complete: {details}. "
            f"{summary.failed} of {summary.requests} requests have no answer; partial "
            f"results kept in {output_path}",
            result,
        )
    return result


# Artifacts go to the Prefect server beside the run's own work: each is a server round trip
# (or two) that the run need not wait for before going on. Every one has ended before the
# run returns (or raises); a report that fails only logs a warning (flows/reporting.py).
_REPORTING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kluster-report")


def _beside(report: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
    """Start ``report`` in a reporting thread, in this run's context (its artifacts are
    the run's)."""
    return _REPORTING.submit(contextvars.copy_context().run, report, *args, **kwargs)


# Its own threads, not the reporting ones: a slow model listing (up to the client's
# timeout and retries) holds up no run's artifacts.
_PRICES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kluster-prices")


def _model_ids(credentials: KlusterCredentials) -> list[str]:
    """The ids of the models the service offers (the list-models task run)."""
    return [model.id for model in list_models(credentials)]


def _service_prices(
    credentials: KlusterCredentials, overrides: dict[str, dict[str, dict[str, float]]] | None
) -> PriceTable:
    with credentials.get_client() as client:
        return load_prices(client, overrides)


class _OpeningReports:
    """The cost estimate and the progress artifact of a run, sent to the Prefect server when
    the run first shows progress (its first batch is made and polled), its first round
    ends, or it stops, whichever comes first (at once when child runs take the shards).
    Sent as soon as the estimate was made, their round trips met the first shard's claim
    on the same server and held it up (0.05-0.1 s of the run's critical path here); a
    batch job loses nothing by showing them a moment later."""

    def __init__(self, estimate: CostEstimate, total_lines: int):
        self._estimate = estimate
        self.total_lines = total_lines
        self._context = contextvars.copy_context()  # the run's: its artifacts are the run's
        self._lock = threading.Lock()
        self._sent: list[Future[Any]] = []

    def futures(self) -> list[Future[Any]]:
        """Both reports, sent now if they were not yet."""
        with self._lock:
            if not self._sent:
                for report, arg in (
                    (publish_cost_estimate, self._estimate),
                    (create_batch_progress, self.total_lines),
                ):
                    self._sent.append(_REPORTING.submit(self._context.copy().run, report, arg))
            return list(self._sent)

    def progress(self) -> Future[Any]:
        """The progress artifact's id (a future)."""
        return self.futures()[1]


def _reported(reports: list[Future[Any]]) -> None:
    """Wait for the run's reports to reach the server."""
    for report in reports:
        report.exception()


def _reservation_path(work: str) -> str:
    return storage.join(work, "budget", "reservation.json")


def _reserve_budget(work: str, amount_usd: float, label: str) -> budget.Reservation | None:
    """Hold the run's upper estimate of the shared budget (if one is set) before paying.
    A rerun or the collector of the same run finds its reservation in the work directory
    instead of reserving twice."""
    limit = BudgetSettings().limit()
    if limit is None:
        return None
    path = _reservation_path(work)
    if storage.exists(path):
        return budget.Reservation.model_validate_json(storage.read_bytes(path))
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    reservation = budget.reserve(limit, amount_usd, label, run_id)
    storage.write_bytes(path, reservation.model_dump_json().encode())
    get_run_logger().info(
        "Reserved %s of the %s budget %r", format_usd(amount_usd), limit.period, limit.name
    )
    return reservation


def _release_budget(work: str, reservation: budget.Reservation | None) -> None:
    """The run failed or was cancelled: give its reservation back."""
    if reservation is None:
        return
    try:
        budget.release(reservation)
        storage.remove(_reservation_path(work))
    except Exception as exc:  # the failure that got here matters more
        get_run_logger().warning("Could not release the budget reservation: %s", exc)


def _estimate_result(estimate: CostEstimate, output_path: str, work: str) -> BatchRunResult:
    return BatchRunResult(
        status="estimated",
        batch_ids=[],
        rounds=0,
        request_counts=RequestCounts(),
        usage=TokenUsage(),
        output_path=output_path,
        work_dir=work,
        output_files=[],
        error_files=[],
        shards=[],
        estimate=estimate,
    )


def _pending_result(
    state: ShardRun,
    output_path: str,
    credentials_block: str | None,
    input_path: str | None,
    source: str,
    requests: RequestOptions,
    output: OutputOptions,
    limits: Limits,
    running: list[BatchInfo],
    finished: list[ShardResult],
    queued: int,
    round_no: int,
) -> BatchRunResult:
    """Record the run as pending (its parameters in the work directory, a pointer on the
    Prefect server) and say so; the collector goes on with it from any worker."""
    parameters = {
        "input_path": source,
        "output_path": output_path,
        "credentials_block": credentials_block,
        "output": output.model_copy(update={"work_dir": state.work}).model_dump(),
        "run": state.run.model_copy(update={"run_label": state.nonce}).model_dump(),
        "limits": limits.model_dump(),
    }
    name = register_pending(
        state.work, parameters, [b.id for b in running], queued, round_no, state.children
    )
    if state.children:
        waiting = f"{queued} shard(s) in {len(state.children)} child run(s) still working"
    else:
        waiting = f"{len(running)} batch(es) running, {queued} shard(s) waiting for a free slot"
    get_run_logger().info(
        "%s (round %d); not waiting. The kluster-collect-batches flow goes on with this run "
        "(pending as %s).",
        waiting,
        round_no,
        name,
    )
    batches = running + [r.batch for r in finished]
    return BatchRunResult(
        status="pending",
        batch_ids=[b.id for b in batches],
        rounds=round_no,
        request_counts=summed_counts(batches),
        usage=TokenUsage(),
        output_path=output_path,
        work_dir=state.work,
        output_files=[],
        error_files=[],
        shards=[],
    )


if __name__ != "prefect_kluster.flows.batch_inference":
    # Loaded by path, as a deployment's entrypoint (flows/batch_inference.py:batch_inference):
    # every name here becomes the package module's, so each class and flow exists once (the
    # tasks and the fan-out build the package's ShardResult, which a second copy refuses).
    import importlib as _importlib

    _package = _importlib.import_module("prefect_kluster.flows.batch_inference")
    globals().update((k, v) for k, v in vars(_package).items() if not k.startswith("__"))
