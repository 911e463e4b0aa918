"""Step 3: create a batch from an uploaded file, at most once per shard.

Batches carry their shard's identity (content hash and round) in metadata, so the
service itself answers "was this already submitted?", even after a crash that lost the
batch id. Creates are sent without the SDK's own retries: a retried POST after a lost
response is one more way to pay twice, so after a transient failure the service is
searched first and the create repeated only if nothing was made.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from openai import OpenAI
from prefect import task
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks import claims
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.listing import bounded
from prefect_kluster.tasks.progress import announce_batch
from prefect_kluster.tasks.retry import RETRY_OPTIONS, is_transient_error
from prefect_kluster.tasks.schema import CHAT_COMPLETIONS_URL
from prefect_kluster.tasks.types import BatchInfo, Shard

SHA_KEY = "kluster_shard_sha256"
ROUND_KEY = "kluster_round"
NONCE_KEY = "kluster_nonce"
MAX_SCAN = 5000
CREATE_ATTEMPTS = 5


class ShardUpload(BaseModel):
    """A shard on the service: its uploaded file, or the batch already made from it."""

    key: str
    identity: dict[str, str]
    file_id: str | None = None
    batch: BatchInfo | None = None
    sole_upload: bool = Field(
        False,
        description="file_id is the shard's only upload, sent once by this call and answered "
        "at once: once its batch is made from it, no unused upload of the shard can exist.",
    )


def shard_identity(shard: Shard, round_no: int = 1, nonce: str | None = None) -> dict[str, str]:
    """The metadata that names a shard's batch on the service."""
    identity = {SHA_KEY: shard.sha256, ROUND_KEY: str(round_no)}
    if nonce:
        identity[NONCE_KEY] = nonce
    return identity


def identity_key(identity: dict[str, str]) -> str:
    return ":".join(identity[k] for k in (SHA_KEY, ROUND_KEY, NONCE_KEY) if k in identity)


def matches(batch: BatchInfo, identity: dict[str, str]) -> bool:
    meta = batch.metadata
    return all(meta.get(k) == v for k, v in identity.items()) and (
        NONCE_KEY in identity or NONCE_KEY not in meta
    )


def scan_batches(
    client: OpenAI, since: float | None = None, max_scan: int = MAX_SCAN
) -> Iterator[BatchInfo]:
    """Batches newest first, following pages (a bounded walk), back to ``since``."""
    for raw in bounded(client.batches.list(limit=100), "batch", max_scan):
        batch = BatchInfo.from_sdk(raw)
        if since is not None and batch.created_at and batch.created_at.timestamp() < since:
            return
        yield batch


def reusable(batch: BatchInfo) -> bool:
    """A failed batch produced nothing: it is replaced, not reused. Every other batch,
    running or ended, is real work already paid for; its missing lines go round again."""
    return batch.status != "failed"


@task(name="find-existing-batches", **RETRY_OPTIONS)
def find_existing_batches(
    credentials: KlusterCredentials, since: float | None = None
) -> list[BatchInfo]:
    """One pass over the service's batch list (newest first, back to ``since``): every
    batch this integration made, to be matched to shards by their metadata."""
    with credentials.get_client() as client:
        found = [b for b in scan_batches(client, since) if SHA_KEY in b.metadata]
    if found:
        get_run_logger().info("The service holds %d batch(es) made from shards", len(found))
    return found


def find_batch(client: OpenAI, identity: dict[str, str], since: float) -> BatchInfo | None:
    """The shard's reusable batch made since ``since`` (allowing for clock skew), if any."""
    for batch in scan_batches(client, since - 120):
        if matches(batch, identity) and reusable(batch):
            return batch
    return None


@task(name="submit-shard", **RETRY_OPTIONS)
def submit_shard(
    credentials: KlusterCredentials,
    upload: ShardUpload,
    state_dir: str,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
) -> BatchInfo:
    """Create the shard's batch unless it exists; record the intent first. Releases the
    shard's claim (taken by ``upload_shard``) once the batch is recorded, or on failure."""
    if upload.batch is not None:
        return upload.batch
    assert upload.file_id is not None
    try:
        # Held already on a first attempt; a retry (after a failure released it) takes it
        # again, or waits for the run that took it meanwhile and then finds its batch.
        claims.acquire(upload.key)
        return _create_recorded(credentials, upload, state_dir, completion_window, metadata)
    finally:
        claims.release(upload.key)


def _create_recorded(
    credentials: KlusterCredentials,
    upload: ShardUpload,
    state_dir: str,
    completion_window: str,
    metadata: dict[str, str] | None,
) -> BatchInfo:
    journal = Journal(state_dir)
    logger = get_run_logger()
    with credentials.get_client() as client:
        since = journal.first_intent_time(upload.key)
        if since is not None and any(
            e["event"] == "submit_intent" for e in journal.events(upload.key)
        ):
            found = find_batch(client, upload.identity, since)
            if found is not None:
                logger.info("Found batch %s from an earlier attempt", found.id)
                journal.record(
                    "submitted", upload.key, batch_id=found.id, file_id=found.input_file_id
                )
                return found
        once = client.with_options(max_retries=0)
        for attempt in range(1, CREATE_ATTEMPTS + 1):
            journal.record("submit_intent", upload.key, file_id=upload.file_id)
            started = time.time()
            try:
                batch = once.batches.create(
                    input_file_id=upload.file_id,
                    endpoint=CHAT_COMPLETIONS_URL,
                    completion_window=completion_window,  # type: ignore[arg-type]
                    metadata={**(metadata or {}), **upload.identity},
                )
            except Exception as exc:
                if not is_transient_error(exc) or attempt == CREATE_ATTEMPTS:
                    raise
                found = find_batch(client, upload.identity, started)
                if found is not None:
                    info = found
                    break
                logger.warning("Batch create failed (%s); retrying", type(exc).__name__)
                time.sleep(min(2**attempt * 0.25, 8))
                continue
            info = BatchInfo.from_sdk(batch)
            break
    journal.record("submitted", upload.key, batch_id=info.id, file_id=info.input_file_id)
    logger.info("Submitted batch %s for file %s (%s)", info.id, upload.file_id, info.status)
    announce_batch(info, "submitted")
    return info


@task(name="submit-batch", **RETRY_OPTIONS)
def submit_batch(
    credentials: KlusterCredentials,
    input_file_id: str,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
    endpoint: str = CHAT_COMPLETIONS_URL,
) -> BatchInfo:
    """Create a batch job. ``completion_window`` is passed through as given ("24h", "48h",
    "72h", ...): the accepted values have changed over time, so the service decides."""
    with credentials.get_client() as client:
        batch = client.batches.create(
            input_file_id=input_file_id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window=completion_window,  # type: ignore[arg-type]
            metadata=metadata or None,
        )
    info = BatchInfo.from_sdk(batch)
    get_run_logger().info(
        "Submitted batch %s for file %s (%s)", info.id, input_file_id, info.status
    )
    return info


__all__ = [
    "ShardUpload",
    "find_existing_batches",
    "identity_key",
    "shard_identity",
    "submit_batch",
    "submit_shard",
]
