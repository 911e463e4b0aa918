"""The batch inference flow: build -> upload -> submit -> wait -> fetch -> join.

Run it from the shell (``python -m flows.batch_inference requests.jsonl``), call it from
Python, or deploy it and trigger it from the Prefect UI.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from blocks import KlusterCredentials, resolve_credentials
from tasks.build import build_request_file, validate_and_shard
from tasks.download import download_batch_results
from tasks.join import JoinSummary, OutputExistsError, join_results
from tasks.manage import list_models
from tasks.progress import forget_run, summed_counts
from tasks.submit import submit_batch
from tasks.types import DEFAULT_MAX_FILE_BYTES, BatchInfo, RequestCounts, Shard, TokenUsage
from tasks.upload import upload_file
from tasks.wait import wait_for_batch


class BatchRunError(RuntimeError):
    """A batch ended failed, expired or cancelled. Whatever output existed was kept."""

    def __init__(self, message: str, result: BatchRunResult):
        self.result = result
        super().__init__(message)


class ShardResult(BaseModel):
    shard: Shard
    batch: BatchInfo
    output_file: str | None = None
    error_file: str | None = None


class BatchRunResult(BaseModel):
    """What a batch inference run produced."""

    status: str = Field(description="completed, or the first non-completed final status.")
    batch_ids: list[str]
    request_counts: RequestCounts
    usage: TokenUsage
    output_path: str
    parquet_path: str | None = None
    output_files: list[str]
    error_files: list[str]
    shards: list[ShardResult]
    summary: JoinSummary

    @property
    def batch_id(self) -> str:
        return self.batch_ids[0]


def _start_shard(
    credentials: KlusterCredentials,
    shard: Shard,
    results_dir: str,
    completion_window: str,
    metadata: dict[str, str],
    poll_interval: float,
    timeout: float | None,
) -> tuple[PrefectFuture[BatchInfo], PrefectFuture[tuple[str | None, str | None]]]:
    """Chain one shard's upload -> submit -> wait -> download as Prefect task futures."""
    uploaded = upload_file.submit(credentials, shard.path)
    shard_meta = {**metadata, "shard_sha256": shard.sha256, "shard_index": str(shard.index)}
    submitted = submit_batch.submit(credentials, uploaded, completion_window, shard_meta)
    finished = wait_for_batch.submit(credentials, submitted, poll_interval, timeout)
    downloaded = download_batch_results.submit(credentials, finished, results_dir)
    return finished, downloaded


def run_shards(
    credentials: KlusterCredentials,
    shards: list[Shard],
    results_dir: str,
    completion_window: str,
    metadata: dict[str, str],
    poll_interval: float,
    timeout: float | None,
    max_concurrency: int,
) -> list[ShardResult]:
    """Run every shard's lifecycle, at most ``max_concurrency`` shards at a time."""
    waiting = list(shards)
    running: dict[Any, tuple[Shard, PrefectFuture[BatchInfo]]] = {}
    results: dict[int, ShardResult] = {}
    while waiting or running:
        while waiting and len(running) < max(1, max_concurrency):
            shard = waiting.pop(0)
            finished, downloaded = _start_shard(
                credentials,
                shard,
                results_dir,
                completion_window,
                metadata,
                poll_interval,
                timeout,
            )
            running[downloaded] = (shard, finished)
        done = next(as_completed(list(running)))
        shard, finished = running.pop(done)
        output_file, error_file = done.result()
        results[shard.index] = ShardResult(
            shard=shard, batch=finished.result(), output_file=output_file, error_file=error_file
        )
    return [results[s.index] for s in shards]


def _overall_status(batches: list[BatchInfo]) -> str:
    for status in ("failed", "expired", "cancelled"):
        if any(b.status == status for b in batches):
            return status
    return "completed"


@flow(
    name="kluster-batch-inference",
    task_runner=ThreadPoolTaskRunner(max_workers=64),
    log_prints=True,
)
def batch_inference(
    input_path: str | None = None,
    output_path: str = "results.jsonl",
    requests: list[dict[str, Any]] | None = None,
    prompts: list[str] | None = None,
    model: str | None = None,
    system_prompt: str | None = None,
    completion_params: dict[str, Any] | None = None,
    credentials_block: str | None = None,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
    max_concurrency: int = 4,
    poll_interval: float = 10.0,
    timeout: float | None = None,
    check_models: bool = False,
    overwrite: bool = False,
    parquet: bool = False,
    work_dir: str | None = None,
) -> BatchRunResult:
    """Run chat-completion requests as kluster.ai batch jobs and join the results.

    Args:
        input_path: A batch request JSONL file (local path or fsspec URL). Or give
            `requests`, or `prompts` with `model`.
        output_path: Where the joined results go (JSONL, one line per request, in input
            order). Refused if it exists, unless `overwrite`.
        requests: Request dicts in the batch format (custom_id, method, url, body).
        prompts: Plain user prompts; each becomes one request for `model`.
        model: The model for `prompts`, e.g. klusterai/Meta-Llama-3.3-70B-Instruct-Turbo.
        system_prompt: Optional system message put before each prompt.
        completion_params: Extra body fields for `prompts`, e.g. max_completion_tokens.
        credentials_block: Name of a saved kluster.ai Credentials block; without one,
            KLUSTER_API_KEY and KLUSTER_BASE_URL are read from the environment.
        completion_window: Passed to the service as given ("24h", "48h", "72h").
        metadata: Key-value strings stored on each batch.
        max_file_bytes: Largest shard file (the service takes at most 100 MB).
        max_requests_per_file: Most lines per shard (the free tier takes under 1000).
        max_concurrency: How many shards run at once.
        poll_interval: Seconds between status checks.
        timeout: Seconds to wait for each batch before failing the run (None: no limit).
        check_models: Refuse lines whose model is not in the service's model list.
        overwrite: Replace an existing output file.
        parquet: Also write a Parquet copy (needs pyarrow).
        work_dir: Where shards and downloaded files go (default: beside the output).
    """
    logger = get_run_logger()
    output = Path(output_path)
    for existing in (output, output.with_suffix(".parquet") if parquet else None):
        if existing is not None and existing.exists() and not overwrite:
            raise OutputExistsError(f"{existing} already exists; pass overwrite=True to replace it")
    work = Path(work_dir) if work_dir else output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    credentials = resolve_credentials(credentials_block)

    given = [x is not None for x in (input_path, requests, prompts)]
    if sum(given) != 1:
        raise ValueError("give exactly one of input_path, requests or prompts")
    source = input_path
    if source is None:
        source = build_request_file(
            str(work / "requests.jsonl"),
            requests=requests,
            prompts=prompts,
            model=model,
            system_prompt=system_prompt,
            completion_params=completion_params,
        )
    allowed = [m.id for m in list_models(credentials)] if check_models else None
    shards = validate_and_shard(
        source, str(work / "shards"), max_file_bytes, max_requests_per_file, allowed
    )
    try:
        shard_results = run_shards(
            credentials,
            shards,
            str(work / "results"),
            completion_window,
            metadata or {},
            poll_interval,
            timeout,
            max_concurrency,
        )
    finally:
        forget_run()
    result_files = [path for r in shard_results for path in (r.output_file, r.error_file) if path]
    summary = join_results(shards, result_files, str(output), overwrite, parquet)
    batches = [r.batch for r in shard_results]
    result = BatchRunResult(
        status=_overall_status(batches),
        batch_ids=[b.id for b in batches],
        request_counts=summed_counts(batches),
        usage=summary.usage,
        output_path=summary.output_path,
        parquet_path=summary.parquet_path,
        output_files=[r.output_file for r in shard_results if r.output_file],
        error_files=[r.error_file for r in shard_results if r.error_file],
        shards=shard_results,
        summary=summary,
    )
    logger.info(
        "Batch run %s: %d requests, %d ok, %d failed; %d prompt + %d completion tokens; "
        "results in %s",
        result.status,
        summary.requests,
        summary.succeeded,
        summary.failed,
        summary.usage.prompt_tokens,
        summary.usage.completion_tokens,
        summary.output_path,
    )
    if result.status != "completed":
        bad = [b for b in batches if b.status != "completed"]
        details = "; ".join(
            f"batch {b.id} {b.status} ({b.progress})"
            + (f": {', '.join(b.errors)}" if b.errors else "")
            for b in bad
        )
        raise BatchRunError(
            f"{len(bad)} of {len(batches)} batch(es) did not complete: {details}. "
            f"Partial results kept in {summary.output_path}",
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
    parser.add_argument("--poll-interval", type=float, default=10.0)
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
            from emulator import EmulatorConfig, run_emulator

            emu = stack.enter_context(run_emulator(EmulatorConfig()))
            os.environ["KLUSTER_BASE_URL"] = emu.base_url
            os.environ["KLUSTER_API_KEY"] = "emulator-key"
            args.credentials_block = None
            if args.poll_interval == 10.0:
                args.poll_interval = 0.5
            print(f"Using the embedded kluster.ai emulator at {emu.base_url}", flush=True)
        kwargs: dict[str, Any] = {}
        if args.prompts_file:
            from tasks.build import read_prompts

            kwargs["prompts"] = list(
                read_prompts(args.prompts_file, args.prompt_column, args.template)
            )
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
                poll_interval=args.poll_interval,
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
    sys.exit(main())
