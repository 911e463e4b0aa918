"""Prefect tasks for each step of the kluster.ai batch lifecycle, in the guide's order:
build -> upload -> submit -> wait -> download (-> join), plus cancel and list."""

from prefect_kluster.tasks.build import (
    LineProblem,
    RequestFileError,
    build_request_file,
    build_request_lines,
    read_prompts,
    shard_request_file,
    validate_and_shard,
    write_request_lines,
)
from prefect_kluster.tasks.download import download_batch_results, download_file
from prefect_kluster.tasks.join import (
    JoinSummary,
    OutputExistsError,
    ResultFileError,
    join_result_files,
    join_results,
)
from prefect_kluster.tasks.manage import cancel_batch, list_batches, list_models
from prefect_kluster.tasks.retry import is_transient_error
from prefect_kluster.tasks.rounds import build_retry_shards, join_round
from prefect_kluster.tasks.submit import (
    ShardUpload,
    find_existing_batches,
    submit_batch,
    submit_shard,
)
from prefect_kluster.tasks.types import BatchInfo, ModelInfo, RequestCounts, Shard, TokenUsage
from prefect_kluster.tasks.upload import (
    FileLimitError,
    check_file_limits,
    clean_up_uploads,
    upload_file,
    upload_shard,
)
from prefect_kluster.tasks.wait import (
    BatchWaitAborted,
    BatchWaitTimeout,
    poll_batch,
    wait_for_batch,
)

__all__ = [
    "BatchInfo",
    "BatchWaitAborted",
    "BatchWaitTimeout",
    "FileLimitError",
    "JoinSummary",
    "LineProblem",
    "ModelInfo",
    "OutputExistsError",
    "RequestCounts",
    "RequestFileError",
    "ResultFileError",
    "Shard",
    "ShardUpload",
    "TokenUsage",
    "build_request_file",
    "build_request_lines",
    "build_retry_shards",
    "cancel_batch",
    "check_file_limits",
    "clean_up_uploads",
    "download_batch_results",
    "download_file",
    "find_existing_batches",
    "is_transient_error",
    "join_result_files",
    "join_results",
    "join_round",
    "list_batches",
    "list_models",
    "poll_batch",
    "read_prompts",
    "shard_request_file",
    "submit_batch",
    "submit_shard",
    "upload_file",
    "upload_shard",
    "validate_and_shard",
    "wait_for_batch",
    "write_request_lines",
]
