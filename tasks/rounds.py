"""Failed-line rounds: join what came back, and build the next round from what failed
for a transient reason (429, 5xx, timeouts) or never ran (expired, cancelled, failed)."""

from __future__ import annotations

import msgspec
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from prefect_kluster.tasks import storage
from prefect_kluster.tasks.build import replacing_shards, shard_request_file
from prefect_kluster.tasks.join import JoinSummary, _ParquetSink, join_result_files
from prefect_kluster.tasks.schema import JoinedLine
from prefect_kluster.tasks.types import Shard


@task(name="join-round", cache_policy=NO_CACHE)
def join_round(
    shards: list[Shard], result_paths: list[str], joined_path: str, retry_ids_path: str
) -> JoinSummary:
    """Join every result so far to the original requests; list the lines worth retrying."""
    summary = join_result_files(
        shards, result_paths, joined_path, overwrite=True, retry_ids_path=retry_ids_path
    )
    get_run_logger().info(
        "Joined %d requests: %d ok, %d failed (%d worth another round)",
        summary.requests,
        summary.succeeded,
        summary.failed,
        summary.retryable,
    )
    return summary


@task(name="build-retry-shards", cache_policy=NO_CACHE)
def build_retry_shards(
    shards: list[Shard],
    retry_ids_path: str,
    out_dir: str,
    max_file_bytes: int,
    max_requests_per_file: int | None,
) -> list[Shard]:
    """The original request lines of every custom_id in ``retry_ids_path``, re-sharded."""
    with storage.open_file(retry_ids_path) as handle:
        wanted = {msgspec.json.decode(line) for line in handle}
    requests_path = storage.join(out_dir, "requests.jsonl")
    kept = 0
    with storage.published(requests_path) as dest:
        for shard in shards:
            with storage.open_file(shard.path) as lines, storage.open_file(shard.ids_path) as ids:
                for line, custom_id in zip(lines, ids, strict=True):
                    if msgspec.json.decode(custom_id) in wanted:
                        dest.write(line)
                        kept += 1
    with replacing_shards(out_dir) as written:
        retry = shard_request_file(requests_path, out_dir, max_file_bytes, max_requests_per_file)
        written += retry
    get_run_logger().info("Next round: %d request(s) in %d shard(s)", kept, len(retry))
    return retry


def write_parquet(joined_path: str, parquet_path: str) -> None:
    """A Parquet copy of a joined results file, written in row groups (needs pyarrow)."""
    decoder = msgspec.json.Decoder(JoinedLine)
    sink = _ParquetSink(parquet_path)
    done = False
    try:
        with storage.open_file(joined_path) as handle:
            for line in handle:
                sink.add(decoder.decode(line))
        done = True
    finally:
        sink.close(keep=done)
