"""Prefect tasks for each step of the kluster.ai batch lifecycle, in the guide's order:
build -> upload -> submit -> wait -> download (-> join), plus cancel and list."""

from tasks.build import (
    LineProblem,
    RequestFileError,
    build_request_file,
    build_request_lines,
    read_prompts,
    shard_request_file,
    validate_and_shard,
    write_request_lines,
)
from tasks.download import download_batch_results, download_file
from tasks.join import JoinSummary, OutputExistsError, join_result_files, join_results
from tasks.manage import cancel_batch, list_batches, list_models
from tasks.retry import is_transient_error
from tasks.submit import submit_batch
from tasks.types import BatchInfo, ModelInfo, RequestCounts, Shard, TokenUsage
from tasks.upload import FileLimitError, check_file_limits, upload_file
from tasks.wait import BatchWaitTimeout, poll_batch, wait_for_batch

__all__ = [
    "BatchInfo",
    "BatchWaitTimeout",
    "FileLimitError",
    "JoinSummary",
    "LineProblem",
    "ModelInfo",
    "OutputExistsError",
    "RequestCounts",
    "RequestFileError",
    "Shard",
    "TokenUsage",
    "build_request_file",
    "build_request_lines",
    "cancel_batch",
    "check_file_limits",
    "download_batch_results",
    "download_file",
    "is_transient_error",
    "join_result_files",
    "join_results",
    "list_batches",
    "list_models",
    "poll_batch",
    "read_prompts",
    "shard_request_file",
    "submit_batch",
    "upload_file",
    "validate_and_shard",
    "wait_for_batch",
    "write_request_lines",
]
