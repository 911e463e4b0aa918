"""Step 5: download a batch's output and error files, streamed to disk."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks import storage
from prefect_kluster.tasks._lines import write_all
from prefect_kluster.tasks.join import FirstPassAhead
from prefect_kluster.tasks.retry import RETRY_OPTIONS
from prefect_kluster.tasks.types import BatchInfo

CHUNK_BYTES = 1 << 20


def stream_file_to(
    credentials: KlusterCredentials, file_id: str, path: str, join_ahead: bool = False
) -> int:
    """Stream a file's content to ``path`` (a local path or fsspec URL) under a temporary
    name, published when complete; returns bytes written.

    A crash mid-download leaves only the temporary object, never a truncated ``path``.
    ``join_ahead``: a result file the join will read; its first pass is made from the
    bytes as they arrive (see ``FirstPassAhead``), so the join need not read it again.
    """
    written = 0
    ahead = FirstPassAhead.start(str(path)) if join_ahead else None
    try:
        with credentials.get_client() as client:
            with client.files.with_streaming_response.content(file_id) as response:
                with storage.published(str(path)) as handle:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        write_all(handle, chunk)
                        written += len(chunk)
                        if ahead is not None:
                            ahead.feed(chunk)
    except BaseException:
        if ahead is not None:
            ahead.discard()
        raise
    if ahead is not None:
        ahead.finish()
    return written


@task(name="download-file", **RETRY_OPTIONS)
def download_file(credentials: KlusterCredentials, file_id: str, path: str) -> str:
    """Download one file by id to ``path``."""
    size = stream_file_to(credentials, file_id, path)
    get_run_logger().info("Downloaded file %s (%d bytes) to %s", file_id, size, path)
    return path


@task(name="download-batch-results", **RETRY_OPTIONS)
def download_batch_results(
    credentials: KlusterCredentials, batch: BatchInfo, out_dir: str, join_ahead: bool = False
) -> tuple[str | None, str | None]:
    """Download a finished batch's output file and error file (whichever exist).

    Returns ``(output_path, error_path)``; a file the batch does not have is ``None``.
    Partial output of a failed, expired or cancelled batch is kept too. ``join_ahead``:
    the files are for ``join_result_files`` in this process, which then finds their first
    pass made as they downloaded (a scratch file beside each until it does).
    """
    logger = get_run_logger()
    paths: list[str | None] = []
    for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
        if not file_id:
            paths.append(None)
            continue
        path = storage.join(out_dir, f"{batch.id}.{kind}.jsonl")
        size = stream_file_to(credentials, file_id, path, join_ahead)
        logger.info("Downloaded %s file %s (%d bytes) to %s", kind, file_id, size, path)
        paths.append(path)
    return paths[0], paths[1]
