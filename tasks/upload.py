"""Step 2: upload a request file (purpose "batch")."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from blocks import KlusterCredentials
from tasks.retry import RETRY_OPTIONS
from tasks.types import SERVICE_MAX_FILE_BYTES


class FileLimitError(ValueError):
    """The file breaks a service limit; it was not uploaded."""


def check_file_limits(
    path: str | os.PathLike[str],
    max_file_bytes: int = SERVICE_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
) -> None:
    """Refuse, before any upload, a file the service would refuse anyway."""
    size = Path(path).stat().st_size
    if size > max_file_bytes:
        raise FileLimitError(
            f"{path} is {size:,} bytes, over the {max_file_bytes:,}-byte limit per file; "
            "shard it with validate_and_shard"
        )
    if max_requests_per_file is not None:
        with open(path, "rb") as handle:
            lines = sum(1 for _ in handle)
        if lines > max_requests_per_file:
            raise FileLimitError(
                f"{path} has {lines:,} request lines, over the limit of "
                f"{max_requests_per_file:,} per file; shard it with validate_and_shard"
            )


@task(name="upload-file", **RETRY_OPTIONS)
def upload_file(
    credentials: KlusterCredentials,
    path: str,
    max_file_bytes: int = SERVICE_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
) -> str:
    """Upload a batch request file and return its file id.

    The service has no file-status endpoint to wait on: the id is usable at once.
    """
    check_file_limits(path, max_file_bytes, max_requests_per_file)
    with credentials.get_client() as client, open(path, "rb") as handle:
        uploaded = client.files.create(file=(Path(path).name, handle), purpose="batch")
    get_run_logger().info("Uploaded %s as file %s", Path(path).name, uploaded.id)
    return uploaded.id
