"""Step 2: upload a request file (purpose "batch")."""

from __future__ import annotations

import os
import time

import openai
from openai import OpenAI
from prefect import task
from prefect.logging import get_run_logger

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks import claims, storage
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.listing import bounded
from prefect_kluster.tasks.retry import RETRY_OPTIONS, is_transient_error
from prefect_kluster.tasks.submit import ShardUpload, find_batch, identity_key
from prefect_kluster.tasks.types import SERVICE_MAX_FILE_BYTES, BatchInfo, Shard, parse_timestamp

RATE_LIMIT_PAUSES = (0.5, 1.0, 2.0)  # seconds before sending a refused (429) upload again
ANSWERED = "answered"  # journal field: the file id is the service's answer to a single send


class FileLimitError(ValueError):
    """The file breaks a service limit; it was not uploaded."""


def check_file_limits(
    path: str | os.PathLike[str],
    max_file_bytes: int = SERVICE_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
) -> None:
    """Refuse, before any upload, a file the service would refuse anyway."""
    size = storage.size(os.fspath(path))
    if size > max_file_bytes:
        raise FileLimitError(
            f"{path} is {size:,} bytes, over the {max_file_bytes:,}-byte limit per file; "
            "shard it with validate_and_shard"
        )
    if max_requests_per_file is not None:
        with storage.open_file(os.fspath(path)) as handle:
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
    name = storage.basename(path)
    with credentials.get_client() as client, storage.open_file(path) as handle:
        uploaded = client.files.create(file=(name, handle), purpose="batch")
    get_run_logger().info("Uploaded %s as file %s", name, uploaded.id)
    return uploaded.id


def _find_upload(client: OpenAI, filename: str, since: float) -> str | None:
    """The newest upload under this shard's name since ``since`` (an answer that got lost).
    A service that stores files under internal names can't be searched this way."""
    for item in bounded(client.files.list(purpose="batch"), "file"):
        created = parse_timestamp(item.created_at)
        if item.filename == filename and (created is None or created.timestamp() >= since - 120):
            return item.id
    return None


def _all_answered(events: list[dict]) -> bool:
    """Every upload intent of a shard has its answer, each the service's own to one send."""
    intents = sum(e["event"] == "upload_intent" for e in events)
    answers = [e for e in events if e["event"] == "uploaded"]
    return len(answers) == intents and all(e.get(ANSWERED) for e in answers)


def _orphans(client: OpenAI, filename: str, recorded: set[str]) -> list[str]:
    """Uploads of this shard that no batch uses: recorded by this run, or listed under the
    shard's name (the name carries its hash; a service that renames files hides these)."""
    candidates = set(recorded)
    for item in bounded(client.files.list(purpose="batch"), "file"):
        if item.filename == filename:
            candidates.add(item.id)
    return sorted(candidates)


@task(name="upload-shard", **RETRY_OPTIONS)
def upload_shard(
    credentials: KlusterCredentials,
    shard: Shard,
    identity: dict[str, str],
    state_dir: str,
    existing: BatchInfo | None = None,
    since: float | None = None,
) -> ShardUpload:
    """Upload a shard once: reuse its batch or an earlier upload when the service has one.

    Before anything is sent, the run takes the shard's claim on the Prefect server (see
    ``tasks.claims``), so two runs of the same inputs never both pay for it; holding it,
    it looks on the service once more for a batch made since ``since`` (the run's start)
    by a run that held the claim before. ``submit_shard`` releases the claim."""
    key = identity_key(identity)
    logger = get_run_logger()
    if existing is not None:
        logger.info("Shard %d already has batch %s (%s)", shard.index, existing.id, existing.status)
        return ShardUpload(key=key, identity=identity, batch=existing)

    def waiting(claim: claims.Claim) -> None:
        logger.info("Shard %d is being submitted by flow run %s; waiting", shard.index, claim.owner)

    claims.acquire(key, waiting)
    try:
        with credentials.get_client() as client:
            if since is not None and (batch := find_batch(client, identity, since)) is not None:
                claims.release(key)
                logger.info("Shard %d has batch %s (%s)", shard.index, batch.id, batch.status)
                return ShardUpload(key=key, identity=identity, batch=batch)
            return _upload_once(client, shard, key, identity, state_dir)
    except BaseException:
        claims.release(key)
        raise


def _upload_once(
    client: OpenAI, shard: Shard, key: str, identity: dict[str, str], state_dir: str
) -> ShardUpload:
    logger = get_run_logger()
    journal = Journal(state_dir)
    name = storage.basename(shard.path)
    known = journal.latest(key, "file_id")
    if known:
        try:
            client.files.retrieve(known)
        except openai.NotFoundError:
            known = None
        else:
            logger.info("Reusing upload %s of shard %d", known, shard.index)
            return ShardUpload(key=key, identity=identity, file_id=known)
    intent = journal.first_intent_time(key)
    found = _find_upload(client, name, intent) if intent is not None else None
    # The service's own answer to our one upload, sent once: then no other upload of this
    # intent can exist, and the clean-up need not look for any (see ``clean_up_uploads``).
    answered = False
    if found is None:
        check_file_limits(shard.path, SERVICE_MAX_FILE_BYTES)
        journal.record("upload_intent", key, shard=name)
        started = time.time()
        try:
            found, sends = _create_file(client, name, shard.path)
            answered = sends == 1
        except Exception as exc:
            found = _find_upload(client, name, started) if is_transient_error(exc) else None
            if found is None:
                raise
            logger.info("Upload answer was lost; found the file %s", found)
    journal.record("uploaded", key, file_id=found, **({ANSWERED: True} if answered else {}))
    logger.info("Uploaded shard %d as file %s", shard.index, found)
    return ShardUpload(
        key=key, identity=identity, file_id=found, sole_upload=answered and intent is None
    )


def _create_file(client: OpenAI, name: str, path: str) -> tuple[str, int]:
    """Upload the shard: its file id and how many times it was sent. No SDK retry: a
    retried upload after a lost answer leaves a duplicate. A 429 is different: the service
    refused before storing anything, so it is sent again here after a short pause (a
    rate-limit storm would otherwise use up the task's retries on one shard)."""
    once = client.with_options(max_retries=0)
    for sends, pause in enumerate((*RATE_LIMIT_PAUSES, None), start=1):
        try:
            with storage.open_file(path) as handle:
                return once.files.create(file=(name, handle), purpose="batch").id, sends
        except openai.RateLimitError:
            if pause is None:
                raise
            time.sleep(pause)
    raise AssertionError("unreachable")  # the last pass returns or raises


@task(name="clean-up-uploads", **RETRY_OPTIONS)
def clean_up_uploads(
    credentials: KlusterCredentials, shard: Shard, batch: BatchInfo, state_dir: str, key: str
) -> list[str]:
    """Delete this shard's uploads that ended up with no batch (lost responses, crashes).

    When the journal shows each upload of the shard answered by the service at once and
    that file in the batch, there is none: no listing of the service's files (pages of
    them, per shard) and no reading of every shard's journal."""
    journal = Journal(state_dir)
    events = journal.events(key)
    recorded = {e["file_id"] for e in events if e.get("file_id")}
    if _all_answered(events) and recorded == {batch.input_file_id}:
        return []
    in_use = {e["file_id"] for e in journal.events() if e["event"] == "submitted"}
    in_use.add(batch.input_file_id or "")
    deleted = []
    with credentials.get_client() as client:
        for file_id in _orphans(client, storage.basename(shard.path), recorded):
            if file_id in in_use:
                continue
            try:
                client.files.delete(file_id)
            except openai.NotFoundError:
                continue
            deleted.append(file_id)
    if deleted:
        get_run_logger().info("Deleted %d unused upload(s) of shard %d", len(deleted), shard.index)
    return deleted
