"""Step 2: upload a request file (purpose "batch")."""

from __future__ import annotations

import contextvars
import hashlib
import mmap
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import openai
from openai import OpenAI
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks import claims, storage
from prefect_kluster.tasks.build import first_lines_pass, shard_stem
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.listing import bounded
from prefect_kluster.tasks.retry import RETRY_OPTIONS, api_error_message, is_transient_error
from prefect_kluster.tasks.submit import ShardUpload, find_batch, identity_key, shard_identity
from prefect_kluster.tasks.types import SERVICE_MAX_FILE_BYTES, BatchInfo, Shard, parse_timestamp

PEEK_BYTES = 1 << 20  # the first lines checked before a file is uploaded ahead of its check
COUNT_BLOCK = 4 << 20  # bytes compared at a time to count lines (a temporary array this big)
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
    client: OpenAI,
    shard: Shard,
    key: str,
    identity: dict[str, str],
    state_dir: str,
    name: str | None = None,
) -> ShardUpload:
    logger = get_run_logger()
    journal = Journal(state_dir)
    name = name or storage.basename(shard.path)
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


def _file_version(path: str) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def as_one_shard(
    path: str,
    max_file_bytes: int = SERVICE_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
) -> Shard | None:
    """The shard a passing check makes of the local file ``path`` when it copies the file
    into one shard byte for byte: no CR anywhere (CRLF line ends are rewritten), a newline
    at the end, within the size and line limits. None if the check would change or split
    it. The file is mapped, not read: the hash is one call that releases the GIL (read in
    blocks beside the check's threads, it waited for the GIL at every block: 4x slower)."""
    size = os.path.getsize(path)
    if not 0 < size <= min(max_file_bytes, SERVICE_MAX_FILE_BYTES):
        return None
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        if view[-1:] != b"\n" or view.find(b"\r") != -1:
            return None
        octets = np.frombuffer(view, dtype=np.uint8)
        lines = sum(
            int(np.count_nonzero(octets[at : at + COUNT_BLOCK] == 10))
            for at in range(0, size, COUNT_BLOCK)
        )
        del octets  # the map cannot close while an array holds it
        if max_requests_per_file is not None and lines > max_requests_per_file:
            return None
        sha256 = hashlib.sha256(view).hexdigest()
    return Shard(
        index=0, path=path, sha256=sha256, lines=lines, bytes=size, first_line=1, ids_path=""
    )


@task(name="upload-ahead", cache_policy=NO_CACHE)
def upload_ahead(
    credentials: KlusterCredentials,
    source: str,
    state_dir: str,
    since: float,
    nonce: str | None = None,
    max_file_bytes: int = SERVICE_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
    allowed_models: list[str] | Future[list[str]] | None = None,
) -> ShardUpload | None:
    """Upload a request file while its lines are checked, when the check will make it one
    shard unchanged: then its batch is made the moment the check passes, not an upload
    later. Sent as that shard (its name, journal records and claim, the claim held for
    ``submit_shard``), so every later step takes it as the shard's own upload.

    Nothing is sent (None, and the run uploads the shard after the check, as usual) when
    the file is not local, its first lines (``PEEK_BYTES``) do not pass the check (with
    ``allowed_models``, once the list comes: a wrong file is never sent), the check would
    change or split it, the journal already knows
    the shard (a rerun reuses what it recorded), another run holds its claim, the service
    has its batch, or the upload fails. The caller deletes the upload (``discard_upload``)
    if the check refuses the file or makes other shards of it."""
    local = storage.local_path(source)
    if local is None:
        return None
    version = _file_version(local)
    shard = as_one_shard(local, max_file_bytes, max_requests_per_file)
    if shard is None:
        return None
    try:
        models = allowed_models.result() if isinstance(allowed_models, Future) else allowed_models
    except Exception:  # the check says why, if it needs the list
        return None
    with open(local, "rb") as handle:
        if not first_lines_pass(handle.read(PEEK_BYTES), models):
            return None
    identity = shard_identity(shard, 1, nonce)
    key = identity_key(identity)
    if Journal(state_dir).events(key):
        return None
    # The claim (a round trip to a Prefect server that is busy with the run's start) is
    # taken beside the upload, which costs nothing: the paid call, the batch, waits for it.
    claiming = _BESIDE.submit(
        contextvars.copy_context().run, _claim_if_free, credentials, key, identity, since
    )
    uploaded = None
    try:
        with credentials.get_client() as client:
            name = f"{shard_stem(shard.index, shard.sha256)}.jsonl"
            uploaded = _upload_once(client, shard, key, identity, state_dir, name)
    except Exception as exc:
        get_run_logger().info(
            "Could not upload %s ahead (%s: %s); it is uploaded once checked",
            storage.basename(local),
            type(exc).__name__,
            api_error_message(exc),
        )
    finally:
        try:
            held = claiming.result()
        except Exception:  # the server is out of reach: the usual path finds out again
            held = False
    if uploaded is not None and held and _file_version(local) == version:
        return uploaded
    # the claim is another run's, the service has the batch, or the file was written to
    # meanwhile (what was sent is unknown)
    if uploaded is not None:
        _delete_file(credentials, uploaded.file_id)
    if held:
        _release(key)
    return None


_BESIDE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kluster-claim")


def _claim_if_free(
    credentials: KlusterCredentials, key: str, identity: dict[str, str], since: float
) -> bool:
    """Take the shard's claim if it is free and the service has no batch for it made since
    ``since`` (by a run that held the claim before); False leaves no claim held."""
    if claims.try_acquire(key) is None:
        return False
    try:
        with credentials.get_client() as client:
            found = find_batch(client, identity, since)
    except BaseException:
        claims.release(key)
        raise
    if found is not None:
        claims.release(key)
        return False
    return True


def _delete_file(credentials: KlusterCredentials, file_id: str | None) -> None:
    """Delete an upload no batch will use. Never raises: it runs on the way out of a refused
    run, whose own error is what matters."""
    if not file_id:
        return
    try:
        with credentials.get_client() as client:
            client.files.delete(file_id)
    except openai.NotFoundError:
        pass
    except Exception as exc:
        get_run_logger().warning(
            "Could not delete file %s, uploaded ahead of a check that did not keep it (%s)",
            file_id,
            type(exc).__name__,
        )


def _release(key: str) -> None:
    try:
        claims.release(key)
    except Exception as exc:  # the run ends soon: its claim is then taken over
        get_run_logger().warning("Could not release a shard's claim (%s)", type(exc).__name__)


def discard_upload(credentials: KlusterCredentials, upload: ShardUpload) -> None:
    """Delete an upload made ahead that no batch will use and give back its claim (held
    since ``upload_ahead``). Never raises."""
    _delete_file(credentials, upload.file_id)
    _release(upload.key)


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
