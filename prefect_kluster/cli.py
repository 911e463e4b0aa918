"""The command line: ``python -m flows.batch_inference`` (or ``kluster-batch``).

It lives outside the ``flows`` package so it can start without importing Prefect.

What can be checked without Prefect (flags, credentials in the environment, paths, the
service being reachable) is checked first, in a second or two, so a mistake is reported
before a temporary Prefect server starts. Every error is one or two lines a user can act
on, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from typing import Any

# Defaults shared with the flow's option models (kept here so --help needs no Prefect).
DEFAULT_POLL_INTERVAL = 10.0
EMULATOR_POLL_INTERVAL = 0.5
PROBE_ATTEMPTS = 2
PROBE_TIMEOUT = 5.0


class CliError(Exception):
    """A problem the user can fix; printed as ``error: <message>``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.batch_inference",
        description="Run a kluster.ai batch request JSONL file as a Prefect flow and join the "
        "results to the requests.",
    )
    parser.add_argument("input", nargs="?", help="batch request JSONL file (path or fsspec URL)")
    parser.add_argument(
        "-o", "--output", default="results.jsonl", help="joined results JSONL (path or URL)"
    )
    parser.add_argument("--prompts-file", help="CSV or JSONL of prompts instead of requests")
    parser.add_argument("--prompt-column", default="text")
    parser.add_argument("--template", help='str.format template over a prompt row, "Q: {text}"')
    parser.add_argument("--model", help="model for --prompts-file")
    parser.add_argument("--system-prompt")
    parser.add_argument("--max-completion-tokens", type=int)
    parser.add_argument("--credentials-block", help="name of a saved kluster.ai Credentials block")
    parser.add_argument("--completion-window", default="24h")
    parser.add_argument("--max-file-bytes", type=int)
    parser.add_argument("--max-requests-per-file", type=int)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--max-attempts", type=int, default=3, help="rounds for failed lines")
    parser.add_argument(
        "--resubmit", action="store_true", help="new batches even if the service has them"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        help="seconds between status checks",
    )
    parser.add_argument(
        "--max-poll-interval",
        type=float,
        help="longest pause while a batch shows no change (default: 6 x --poll-interval)",
    )
    parser.add_argument("--timeout", type=float, help="seconds to wait for the batches")
    parser.add_argument("--check-models", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--parquet", action="store_true")
    parser.add_argument("--work-dir", help="shards, state and downloads (path or fsspec URL)")
    parser.add_argument(
        "--max-cost",
        type=float,
        help="dollars: refuse the run before any upload if its estimate could exceed this",
    )
    parser.add_argument(
        "--estimate-only",
        action="store_true",
        help="validate and price the requests, pay nothing: print the estimate and stop",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="submit and return; `python -m flows.collect` (or the kluster-collect-batches "
        "deployment) finishes the run when its batches are done",
    )
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="run against an embedded local emulator instead of kluster.ai (offline demo)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.input is None) == (args.prompts_file is None):
        parser.error("give a request file, or --prompts-file with --model")
    if args.prompts_file and not args.model:
        parser.error("--prompts-file needs --model")
    for flag in ("poll_interval", "max_poll_interval", "timeout", "max_cost"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be a positive number")
    for flag in ("max_concurrency", "max_attempts", "max_file_bytes", "max_requests_per_file"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def _env_key() -> str | None:
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class _Key(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="KLUSTER_", env_file=".env", extra="ignore")
        api_key: str | None = None
        base_url: str = "https://api.kluster.ai/v1"

    found = _Key()
    os.environ.setdefault("KLUSTER_BASE_URL", found.base_url)
    return found.api_key or None


def preflight(args: argparse.Namespace) -> None:
    """Refuse what can be refused before Prefect starts: credentials, paths, the service."""
    if not args.credentials_block and not _env_key():
        raise CliError(
            "no kluster.ai API key: set KLUSTER_API_KEY (environment or .env), or name a saved "
            "block with --credentials-block"
        )
    for label, path in (("input file", args.input), ("prompts file", args.prompts_file)):
        if path and not _exists(path):
            raise CliError(f"{label} {path} does not exist")
    if not args.overwrite and _exists(args.output):
        raise CliError(f"{args.output} already exists; pass --overwrite to replace it")
    if not args.credentials_block and not args.emulator:
        probe_service(os.environ["KLUSTER_BASE_URL"], os.environ.get("KLUSTER_API_KEY", ""))


def _exists(path: str) -> bool:
    """Whether a local path or fsspec URL exists (fsspec alone: no Prefect import)."""
    from fsspec.core import url_to_fs

    fs, inner = url_to_fs(path)
    return bool(fs.exists(inner))


def probe_service(base_url: str, api_key: str) -> None:
    """One cheap call (list models) so an unreachable service is named at once."""
    import openai

    started = time.monotonic()
    client = openai.OpenAI(
        api_key=api_key or "unset", base_url=base_url, timeout=PROBE_TIMEOUT, max_retries=0
    )
    last: Exception | None = None
    for attempt in range(PROBE_ATTEMPTS):
        try:
            client.models.list()
            return
        except openai.APIConnectionError as exc:
            last = exc
            if attempt + 1 < PROBE_ATTEMPTS:
                time.sleep(0.5)
        except openai.APIStatusError:
            return  # it answered: what the answer means is the run's business
    raise CliError(unreachable_message(base_url, PROBE_ATTEMPTS, time.monotonic() - started, last))


def unreachable_message(base_url: str, attempts: int, seconds: float, exc: Any) -> str:
    cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
    reason = f"{type(cause).__name__}: {cause}" if cause is not None else "no answer"
    return (
        f"cannot reach the kluster.ai API at {base_url}: {attempts} attempt(s) over "
        f"{seconds:.0f} s failed ({reason}).\n"
        "  Check KLUSTER_BASE_URL (or the block's base_url), the network or proxy, and that "
        "the service is up."
    )


def _flow_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    if args.prompts_file:
        requests = {
            "prompts_path": args.prompts_file,
            "prompt_column": args.prompt_column,
            "template": args.template,
            "model": args.model,
            "system_prompt": args.system_prompt,
        }
        if args.max_completion_tokens:
            requests["completion_params"] = {"max_completion_tokens": args.max_completion_tokens}
    limits: dict[str, Any] = {
        "max_requests_per_file": args.max_requests_per_file,
        "max_concurrency": args.max_concurrency,
        "max_cost": args.max_cost,
    }
    if args.max_file_bytes:
        limits["max_file_bytes"] = args.max_file_bytes
    return {
        "input_path": args.input,
        "output_path": args.output,
        "credentials_block": args.credentials_block,
        "requests": requests,
        "output": {"overwrite": args.overwrite, "parquet": args.parquet, "work_dir": args.work_dir},
        "run": {
            "completion_window": args.completion_window,
            "wait": not args.no_wait,
            "poll_interval": args.poll_interval,
            "max_poll_interval": args.max_poll_interval,
            "timeout": args.timeout,
            "max_attempts": args.max_attempts,
            "check_models": args.check_models,
            "resubmit": args.resubmit,
            "estimate_only": args.estimate_only,
        },
        "limits": limits,
    }


def describe_error(exc: BaseException) -> str:
    """One or two lines for any error a run can end with."""
    import openai

    if isinstance(exc, openai.APIConnectionError):
        base = os.environ.get("KLUSTER_BASE_URL", "the configured base URL")
        return unreachable_message(base, 0, 0, exc).replace(
            "0 attempt(s) over 0 s failed", "every retry failed"
        )
    if isinstance(exc, openai.AuthenticationError):
        return "the service refused the API key (401): check KLUSTER_API_KEY or the block's key"
    text = str(exc).strip() or type(exc).__name__
    return text


def _usd(amount: float) -> str:
    from prefect_kluster.tasks.cost import format_usd

    return format_usd(amount)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``kluster-batch``)."""
    args = parse_args(argv)
    if args.emulator:
        os.environ["KLUSTER_API_KEY"] = "emulator-key"
        args.credentials_block = None
        if args.poll_interval == DEFAULT_POLL_INTERVAL:
            args.poll_interval = EMULATOR_POLL_INTERVAL
    try:
        preflight(args)  # before the emulator starts (it loads its tokenizers, about 1 s)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with ExitStack() as stack:
        if args.emulator:
            from prefect_kluster.emulator import EmulatorConfig, run_emulator

            emu = stack.enter_context(run_emulator(EmulatorConfig()))
            os.environ["KLUSTER_BASE_URL"] = emu.base_url
            print(f"Using the embedded kluster.ai emulator at {emu.base_url}", flush=True)
        from prefect_kluster.flows.batch_inference import batch_inference

        try:
            result = batch_inference(**_flow_kwargs(args))
        except Exception as exc:  # a clear reason, not a traceback
            print(f"error: {describe_error(exc)}", file=sys.stderr)
            return 1
    if result.status == "estimated":
        assert result.estimate is not None
        print(f"\n{result.estimate.to_markdown()}\n\nEstimate only: nothing was uploaded or paid.")
        return 0
    if result.status == "pending":
        print(
            f"\nSubmitted {len(result.batch_ids)} batch(es); not waiting. Collect the results "
            f"with `python -m flows.collect` once they are done.\nResults will be in: "
            f"{result.output_path}"
        )
        return 0
    assert result.summary is not None
    print(
        f"\nBatch {result.status}: {result.summary.requests} requests, "
        f"{result.summary.succeeded} ok, {result.summary.failed} failed, "
        f"{result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} completion "
        f"tokens, cost {_usd(result.cost_usd or 0.0)}\nResults: {result.output_path}"
    )
    return 0
