"""The batch inference flow: build -> upload -> submit -> wait -> fetch -> join.

Run it from the shell (``python -m flows.batch_inference requests.jsonl``), call it from
Python, or deploy it and trigger it from the Prefect UI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_kluster.blocks import KlusterCredentials, resolve_credentials
from prefect_kluster.flows.pending import check_pending_fits, register_pending
from prefect_kluster.flows.reporting import (
    create_batch_progress,
    publish_run_summary,
    update_batch_progress,
)
from prefect_kluster.tasks.build import build_request_file, validate_and_shard
from prefect_kluster.tasks.download import download_batch_results
from prefect_kluster.tasks.join import JoinSummary, OutputExistsError
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.manage import list_models
from prefect_kluster.tasks.progress import forget_run, summed_counts, watch_progress
from prefect_kluster.tasks.rounds import build_retry_shards, join_round, write_parquet
from prefect_kluster.tasks.submit import (
    find_existing_batches,
    identity_key,
    matches,
    reusable,
    shard_identity,
    submit_shard,
)
from prefect_kluster.tasks.types import (
    DEFAULT_MAX_FILE_BYTES,
    BatchInfo,
    RequestCounts,
    Shard,
    TokenUsage,
)
from prefect_kluster.tasks.upload import clean_up_uploads, upload_shard
from prefect_kluster.tasks.wait import BatchWaitTimeout, poll_pauses, wait_for_batch
from pydantic import BaseModel, Field


class BatchRunError(RuntimeError):
    """A batch ended failed, expired or cancelled. Whatever output existed was kept."""

    def __init__(self, message: str, result: BatchRunResult | None = None):
        self.result = result
        super().__init__(message)


class ShardResult(BaseModel):
    round: int = Field(1, description="1 for the first try, 2+ for failed-line rounds.")
    shard: Shard
    batch: BatchInfo
    output_file: str | None = None
    error_file: str | None = None


class BatchRunResult(BaseModel):
    """What a batch inference run produced."""

    status: str = Field(description="completed, or the final round's worst batch status.")
    batch_ids: list[str]
    rounds: int = 1
    request_counts: RequestCounts
    usage: TokenUsage
    output_path: str
    parquet_path: str | None = None
    output_files: list[str]
    error_files: list[str]
    shards: list[ShardResult]
    summary: JoinSummary | None = Field(
        None, description="Counts over the joined output; None while batches are pending."
    )

    @property
    def batch_id(self) -> str:
        return self.batch_ids[0]


@dataclass
class _Run:
    """Settings every shard of one run shares."""

    credentials: KlusterCredentials
    work: Path
    completion_window: str
    metadata: dict[str, str]
    poll_interval: float
    max_poll_interval: float | None
    deadline: float | None
    max_concurrency: int
    nonce: str | None

    @property
    def journal_path(self) -> str:
        return str(self.work / "journal.jsonl")

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


def _start_shard(
    run: _Run, shard: Shard, round_no: int, existing: BatchInfo | None
) -> tuple[PrefectFuture[BatchInfo], PrefectFuture[tuple[str | None, str | None]], Any]:
    """Chain one shard's upload -> submit -> wait -> download as Prefect task futures."""
    identity = shard_identity(shard, round_no, run.nonce)
    creds, journal = run.credentials, run.journal_path
    uploaded = upload_shard.submit(creds, shard, identity, journal, existing)
    submitted = submit_shard.submit(creds, uploaded, journal, run.completion_window, run.metadata)
    cleaned = clean_up_uploads.submit(creds, shard, submitted, journal, identity_key(identity))
    finished = wait_for_batch.submit(
        creds, submitted, run.poll_interval, run.remaining(), run.max_poll_interval
    )
    results_dir = str(run.work / f"round-{round_no}" / "results")
    downloaded = download_batch_results.submit(creds, finished, results_dir)
    return finished, downloaded, cleaned


def submit_round(
    run: _Run, shards: list[Shard], round_no: int, known: list[BatchInfo]
) -> tuple[list[BatchInfo], int]:
    """Upload and submit a round's shards without waiting, reusing the batches that exist
    and keeping at most ``max_concurrency`` running, as the waiting mode does. Returns the
    round's batches so far and how many shards still wait for a free slot."""
    found = {}
    for shard in shards:
        identity = shard_identity(shard, round_no, run.nonce)
        found[shard.index] = next((b for b in known if matches(b, identity) and reusable(b)), None)
    batches = [b for b in found.values() if b is not None]
    free = max(1, run.max_concurrency) - sum(not b.is_terminal for b in batches)
    futures = []
    for shard in shards:
        if found[shard.index] is not None or free <= 0:
            continue
        free -= 1
        identity = shard_identity(shard, round_no, run.nonce)
        uploaded = upload_shard.submit(run.credentials, shard, identity, run.journal_path)
        futures.append(
            submit_shard.submit(
                run.credentials, uploaded, run.journal_path, run.completion_window, run.metadata
            )
        )
    batches += [future.result() for future in futures]
    return batches, len(shards) - len(batches)


def run_shards(
    run: _Run, shards: list[Shard], round_no: int, known: list[BatchInfo]
) -> list[ShardResult]:
    """Run every shard's lifecycle, at most ``max_concurrency`` shards at a time."""
    waiting = list(shards)
    running: dict[Any, tuple[Shard, PrefectFuture[BatchInfo]]] = {}
    cleanups: list[Any] = []
    results: dict[int, ShardResult] = {}
    while waiting or running:
        while waiting and len(running) < max(1, run.max_concurrency):
            shard = waiting.pop(0)
            identity = shard_identity(shard, round_no, run.nonce)
            existing = next((b for b in known if matches(b, identity) and reusable(b)), None)
            finished, downloaded, cleaned = _start_shard(run, shard, round_no, existing)
            running[downloaded] = (shard, finished)
            cleanups.append(cleaned)
        done = next(as_completed(list(running)))
        shard, finished = running.pop(done)
        outcome = finished.result(raise_on_failure=False)
        if isinstance(outcome, BatchWaitTimeout):
            raise outcome
        output_file, error_file = done.result()
        results[shard.index] = ShardResult(
            round=round_no,
            shard=shard,
            batch=outcome,
            output_file=output_file,
            error_file=error_file,
        )
    for cleaned in cleanups:  # unused uploads are tidied, but never fail the run
        if isinstance(cleaned.result(raise_on_failure=False), BaseException):
            get_run_logger().warning("Could not delete an unused upload; it stays on the service")
    return [results[s.index] for s in shards]


def _overall_status(batches: list[BatchInfo]) -> str:
    for status in ("failed", "expired", "cancelled"):
        if any(b.status == status for b in batches):
            return status
    return "completed"


def default_work_dir(output_path: str, work_dir: str | None = None) -> Path:
    """Where a run keeps shards, its journal and downloads: stable across reruns."""
    if work_dir:
        return Path(work_dir)
    output = Path(output_path)
    return output.with_name(output.name + ".work")


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


def cancel_remote_batches_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation hook: a cancelled flow run cancels its batches still running."""
    params = flow_run.parameters or {}
    work = default_work_dir(params.get("output_path", "results.jsonl"), params.get("work_dir"))
    batch_ids = Journal(work / "journal.jsonl").batch_ids()
    if not batch_ids:
        return
    credentials = resolve_credentials(params.get("credentials_block"))
    cancelled = cancel_running_batches(credentials, batch_ids)
    logging.getLogger(__name__).warning(
        "Flow run cancelled: cancelled %d running batch(es): %s",
        len(cancelled),
        ", ".join(cancelled) or "none",
    )


def _publish_final(output: Path, joined: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass overwrite=True to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(joined, output)


@flow(
    name="kluster-batch-inference",
    task_runner=ThreadPoolTaskRunner(max_workers=64),
    on_cancellation=[cancel_remote_batches_hook],
)
def batch_inference(
    input_path: str | None = None,
    output_path: str = "results.jsonl",
    requests: list[dict[str, Any]] | None = None,
    prompts: list[str] | None = None,
    prompts_path: str | None = None,
    prompt_column: str = "text",
    template: str | None = None,
    model: str | None = None,
    system_prompt: str | None = None,
    completion_params: dict[str, Any] | None = None,
    credentials_block: str | None = None,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
    max_concurrency: int = 4,
    max_attempts: int = 3,
    poll_interval: float = 10.0,
    max_poll_interval: float | None = None,
    timeout: float | None = None,
    check_models: bool = False,
    overwrite: bool = False,
    parquet: bool = False,
    resubmit: bool = False,
    run_label: str | None = None,
    wait: bool = True,
    work_dir: str | None = None,
) -> BatchRunResult:
    """Run chat-completion requests as kluster.ai batch jobs and join the results.

    Rerunning with the same inputs after a crash reuses the uploads and batches already
    made (found on the service by the shard hash in their metadata): nothing is paid twice.

    Args:
        input_path: A batch request JSONL file (local path or fsspec URL). Or give
            `requests`, or `prompts` or `prompts_path` with `model`.
        output_path: Where the joined results go (JSONL, one line per request, in input
            order). Refused if it exists, unless `overwrite`.
        requests: Request dicts in the batch format (custom_id, method, url, body).
        prompts: Plain user prompts; each becomes one request for `model`.
        prompts_path: A CSV (with a header row) or JSONL file of prompts, streamed; each
            row becomes one request for `model`.
        prompt_column: The column (CSV) or field (JSONL) holding the prompt text.
        template: A str.format template over a row's fields, e.g. "Summarise: {text}".
        model: The model for `prompts`, e.g. klusterai/Meta-Llama-3.3-70B-Instruct-Turbo.
        system_prompt: Optional system message put before each prompt.
        completion_params: Extra body fields for `prompts`, e.g. max_completion_tokens.
        credentials_block: Name of a saved kluster.ai Credentials block; without one,
            KLUSTER_API_KEY and KLUSTER_BASE_URL are read from the environment.
        completion_window: Passed to the service as given ("24h", "48h", "72h").
        metadata: Key-value strings stored on each batch.
        max_file_bytes: Largest shard file (the service takes at most 100 MB).
        max_requests_per_file: Most lines per shard (the free tier takes under 1000).
        max_concurrency: How many batches run at once, in both modes (a cap keeps a
            rate-limited tier from expiring batches that wait in its queue).
        max_attempts: Rounds for lines that failed for a transient reason (429, 5xx,
            timeout) or never ran (expired, cancelled); 1 means no retry round.
        poll_interval: Seconds between status checks while a batch is moving.
        max_poll_interval: Longest pause between status checks while a batch shows no
            change, e.g. queued for hours (default: six times `poll_interval`).
        timeout: Seconds the whole run may wait for its batches; when it runs out, the
            batches still running are cancelled and the run fails (None: no limit).
        check_models: Refuse lines whose model is not in the service's model list.
        overwrite: Replace an existing output file.
        parquet: Also write a Parquet copy (needs pyarrow).
        resubmit: Make new batches even if the service has batches for these inputs.
        run_label: Tells apart runs of the same inputs that must not share batches (set
            automatically by `resubmit`).
        wait: False: submit, record the pending batches on the Prefect server and return
            at once; the `kluster-collect-batches` flow finishes the run when they are done.
        work_dir: Where shards, the journal and downloads go (default: beside the output).
    """
    logger = get_run_logger()
    output = Path(output_path)
    parquet_output = output.with_suffix(".parquet") if parquet else None
    for existing in (output, parquet_output):
        if existing is not None and existing.exists() and not overwrite:
            raise OutputExistsError(f"{existing} already exists; pass overwrite=True to replace it")
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    poll_pauses(poll_interval, max_poll_interval)  # refuses non-positive intervals now
    given = [x is not None for x in (input_path, requests, prompts, prompts_path)]
    if sum(given) != 1:
        raise ValueError("give exactly one of input_path, requests, prompts or prompts_path")
    work = default_work_dir(output_path, work_dir)
    work.mkdir(parents=True, exist_ok=True)
    credentials = resolve_credentials(credentials_block)
    ctx = FlowRunContext.get()
    run = _Run(
        credentials=credentials,
        work=work,
        completion_window=completion_window,
        metadata=dict(metadata or {}),
        poll_interval=poll_interval,
        max_poll_interval=max_poll_interval,
        deadline=None if timeout is None else time.monotonic() + timeout,
        max_concurrency=max_concurrency,
        nonce=run_label or (str(ctx.flow_run.id) if resubmit and ctx and ctx.flow_run else None),
    )

    source = input_path
    if source is None:
        source = build_request_file(
            str(work / "requests.jsonl"),
            requests=requests,
            prompts=prompts,
            model=model,
            system_prompt=system_prompt,
            completion_params=completion_params,
            prompts_path=prompts_path,
            prompt_column=prompt_column,
            template=template,
        )
    # What a collector needs to finish the run: names and paths, no secret.
    pending_params = dict(
        input_path=source,
        output_path=output_path,
        credentials_block=credentials_block,
        completion_window=completion_window,
        metadata=metadata,
        max_file_bytes=max_file_bytes,
        max_requests_per_file=max_requests_per_file,
        max_concurrency=max_concurrency,
        max_attempts=max_attempts,
        poll_interval=poll_interval,
        max_poll_interval=max_poll_interval,
        check_models=check_models,
        overwrite=overwrite,
        parquet=parquet,
        run_label=run.nonce,
        wait=False,
        work_dir=str(work),
    )
    if not wait:
        check_pending_fits(pending_params)
    allowed = [m.id for m in list_models(credentials)] if check_models else None
    shards = validate_and_shard(
        source, str(work / "shards"), max_file_bytes, max_requests_per_file, allowed
    )
    journal = Journal(run.journal_path)
    total_lines = sum(s.lines for s in shards)
    progress_id = create_batch_progress(total_lines)

    def show_progress(board: dict[str, BatchInfo]) -> None:
        counts = summed_counts(board.values())
        update_batch_progress(progress_id, counts.completed + counts.failed, counts.total)

    watch_progress(show_progress)
    known = find_existing_batches(credentials, since=None) if not resubmit else []
    all_results: list[ShardResult] = []
    result_files: list[str] = []
    round_shards, round_no = shards, 1
    try:
        while True:
            if not wait:
                submitted, queued = submit_round(run, round_shards, round_no, known)
                seen = {b.id for b in known}
                known = known + [b for b in submitted if b.id not in seen]
                running = [b for b in submitted if not b.is_terminal]
                if running or queued:
                    name = register_pending(
                        pending_params, [b.id for b in submitted], queued, round_no
                    )
                    logger.info(
                        "%d batch(es) running, %d shard(s) waiting for a free slot (round "
                        "%d); not waiting. The kluster-collect-batches flow goes on with this "
                        "run (pending as %s).",
                        len(running),
                        queued,
                        round_no,
                        name,
                    )
                    return BatchRunResult(
                        status="pending",
                        batch_ids=[b.id for b in submitted],
                        rounds=round_no,
                        request_counts=summed_counts(submitted),
                        usage=TokenUsage(),
                        output_path=str(output),
                        output_files=[],
                        error_files=[],
                        shards=[],
                    )
            round_results = run_shards(run, round_shards, round_no, known)
            all_results += round_results
            result_files += [p for r in round_results for p in (r.output_file, r.error_file) if p]
            joined = work / f"round-{round_no}" / "joined.jsonl"
            retry_ids = work / f"round-{round_no}" / "retry.ids"
            summary = join_round(shards, result_files, str(joined), str(retry_ids))
            if summary.retryable == 0 or round_no >= max_attempts:
                break
            round_no += 1
            round_shards = build_retry_shards(
                shards,
                str(retry_ids),
                str(work / f"round-{round_no}" / "shards"),
                max_file_bytes,
                max_requests_per_file,
            )
            if not resubmit:
                known = known + find_existing_batches(
                    credentials, since=journal.first_intent_time_any()
                )
    except BatchWaitTimeout as exc:
        cancelled = cancel_running_batches(credentials, journal.batch_ids())
        raise BatchRunError(
            f"timed out after {timeout:g} s waiting for batch {exc.batch.id} "
            f"({exc.batch.status} {exc.batch.progress}); cancelled {len(cancelled)} running "
            "batch(es). Rerun with the same inputs to collect what finished."
        ) from exc
    finally:
        forget_run()

    _publish_final(output, joined, overwrite)
    summary.output_path = str(output)
    if parquet_output is not None:
        write_parquet(output, parquet_output)
        summary.parquet_path = str(parquet_output)
    last_round = [r.batch for r in all_results if r.round == round_no]
    batches = [r.batch for r in all_results]
    result = BatchRunResult(
        status=_overall_status(last_round),
        batch_ids=[b.id for b in batches],
        rounds=round_no,
        request_counts=summed_counts(batches),
        usage=summary.usage,
        output_path=str(output),
        parquet_path=summary.parquet_path,
        output_files=[r.output_file for r in all_results if r.output_file],
        error_files=[r.error_file for r in all_results if r.error_file],
        shards=all_results,
        summary=summary,
    )
    update_batch_progress(progress_id, summary.requests, summary.requests)
    publish_run_summary(batches, summary, result.status)
    logger.info(
        "Batch run %s after %d round(s): %d requests, %d ok, %d failed; %d prompt + %d "
        "completion tokens; results in %s",
        result.status,
        round_no,
        summary.requests,
        summary.succeeded,
        summary.failed,
        summary.usage.prompt_tokens,
        summary.usage.completion_tokens,
        output,
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
            f"results kept in {output}",
            result,
        )
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flows.batch_inference",
        description="Run a kluster.ai batch request JSONL file as a Prefect flow and join the "
        "results to the requests.",
    )
    parser.add_argument("input", nargs="?", help="batch request JSONL file (path or fsspec URL)")
    parser.add_argument("-o", "--output", default="results.jsonl", help="joined results JSONL")
    parser.add_argument("--prompts-file", help="CSV or JSONL of prompts instead of requests")
    parser.add_argument("--prompt-column", default="text")
    parser.add_argument("--template", help='str.format template over a prompt row, "Q: {text}"')
    parser.add_argument("--model", help="model for --prompts-file")
    parser.add_argument("--system-prompt")
    parser.add_argument("--max-completion-tokens", type=int)
    parser.add_argument("--credentials-block", help="name of a saved kluster.ai Credentials block")
    parser.add_argument("--completion-window", default="24h")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES)
    parser.add_argument("--max-requests-per-file", type=int)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--max-attempts", type=int, default=3, help="rounds for failed lines")
    parser.add_argument(
        "--resubmit", action="store_true", help="new batches even if the service has them"
    )
    parser.add_argument(
        "--poll-interval", type=float, default=10.0, help="seconds between status checks"
    )
    parser.add_argument(
        "--max-poll-interval",
        type=float,
        help="longest pause while a batch shows no change (default: 6 x --poll-interval)",
    )
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--check-models", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--parquet", action="store_true")
    parser.add_argument("--work-dir")
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="run against an embedded local emulator instead of kluster.ai (offline demo)",
    )
    args = parser.parse_args(argv)
    if (args.input is None) == (args.prompts_file is None):
        parser.error("give a request file, or --prompts-file with --model")
    if args.prompts_file and not args.model:
        parser.error("--prompts-file needs --model")
    return args


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``kluster-batch``)."""
    args = _parse_args(argv)
    with ExitStack() as stack:
        if args.emulator:
            from prefect_kluster.emulator import EmulatorConfig, run_emulator

            emu = stack.enter_context(run_emulator(EmulatorConfig()))
            os.environ["KLUSTER_BASE_URL"] = emu.base_url
            os.environ["KLUSTER_API_KEY"] = "emulator-key"
            args.credentials_block = None
            if args.poll_interval == 10.0:
                args.poll_interval = 0.5
            print(f"Using the embedded kluster.ai emulator at {emu.base_url}", flush=True)
        kwargs: dict[str, Any] = {}
        if args.prompts_file:
            kwargs["prompts_path"] = args.prompts_file
            kwargs["prompt_column"] = args.prompt_column
            kwargs["template"] = args.template
            kwargs["model"] = args.model
            kwargs["system_prompt"] = args.system_prompt
            if args.max_completion_tokens:
                kwargs["completion_params"] = {"max_completion_tokens": args.max_completion_tokens}
        else:
            kwargs["input_path"] = args.input
        try:
            result = batch_inference(
                output_path=args.output,
                credentials_block=args.credentials_block,
                completion_window=args.completion_window,
                max_file_bytes=args.max_file_bytes,
                max_requests_per_file=args.max_requests_per_file,
                max_concurrency=args.max_concurrency,
                max_attempts=args.max_attempts,
                resubmit=args.resubmit,
                poll_interval=args.poll_interval,
                max_poll_interval=args.max_poll_interval,
                timeout=args.timeout,
                check_models=args.check_models,
                overwrite=args.overwrite,
                parquet=args.parquet,
                work_dir=args.work_dir,
                **kwargs,
            )
        except Exception as exc:  # a clear one-line reason, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(
        f"\nBatch {result.status}: {result.summary.requests} requests, "
        f"{result.summary.succeeded} ok, {result.summary.failed} failed, "
        f"{result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion "
        f"tokens\nResults: {result.output_path}"
    )
    return 0


if __name__ == "__main__":
    # `python -m flows.batch_inference` from a checkout runs this file as __main__: hand over
    # to the installed package's copy, so the flow, its hooks and its error types are the
    # ones every other module uses.
    from prefect_kluster.flows.batch_inference import main as package_main

    sys.exit(package_main())
