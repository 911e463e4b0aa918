"""Long waits that hold no worker: pending runs are recorded on the Prefect server (as
Variables), and the ``kluster-collect-batches`` flow finishes each run once its batches
have ended, through the same code path as a waiting run."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.logging import get_run_logger
from prefect.types import MAX_VARIABLE_VALUE_LENGTH
from prefect.variables import Variable
from prefect_kluster.blocks import resolve_credentials
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.types import BatchInfo

PENDING_PREFIX = "kluster_pending_"
_PAGE = 200  # the server's default page size for variables


class PendingRecordTooLarge(ValueError):
    """The run's parameters do not fit in a Prefect Variable (raised before any upload)."""


def pending_name(output_path: str, work_dir: str) -> str:
    digest = hashlib.sha256(f"{output_path}\0{work_dir}".encode()).hexdigest()[:24]
    return f"{PENDING_PREFIX}{digest}"


def _fits(value: dict[str, Any]) -> bool:
    return len(json.dumps(value)) < MAX_VARIABLE_VALUE_LENGTH


def pending_record(
    parameters: dict[str, Any], batch_ids: list[str] | None, queued: int = 0, round_no: int = 1
) -> dict[str, Any]:
    """What the Variable holds: the run's parameters (names and paths, never a key), how
    many shards wait for a free slot and, when they fit in a Variable (5,000 characters),
    its batch ids; otherwise the collector reads them from the run's journal."""
    given = {k: v for k, v in parameters.items() if v is not None}
    record = {
        "parameters": given,
        "batch_ids": batch_ids,
        "queued": queued,
        "round": round_no,
        "registered_at": time.time(),
    }
    if batch_ids is not None and not _fits(record):
        record.update(batch_ids=None, batch_count=len(batch_ids))
    return record


def check_pending_fits(parameters: dict[str, Any]) -> None:
    """Refuse, before anything is paid for, a run whose pending record could not be saved."""
    record = pending_record(parameters, None)
    record["batch_count"] = 0
    if not _fits(record):
        raise PendingRecordTooLarge(
            f"wait=False keeps the run's parameters in a Prefect Variable (under "
            f"{MAX_VARIABLE_VALUE_LENGTH:,} characters) and these take "
            f"{len(json.dumps(record)):,}: shorten metadata or paths, or wait=True"
        )


def register_pending(
    parameters: dict[str, Any], batch_ids: list[str], queued: int = 0, round_no: int = 1
) -> str:
    """Record (or refresh) a pending run on the Prefect server; returns its variable name."""
    name = pending_name(parameters["output_path"], parameters["work_dir"])
    record = pending_record(parameters, batch_ids, queued, round_no)
    Variable.set(name, record, overwrite=True)
    return name


def list_pending() -> dict[str, dict[str, Any]]:
    """Every pending run on the server, by variable name (all pages)."""
    body: dict[str, Any] = {"variables": {"name": {"like_": f"{PENDING_PREFIX}%"}}}
    found: dict[str, dict[str, Any]] = {}
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            page = client.request(
                "POST", "/variables/filter", json={**body, "offset": offset, "limit": _PAGE}
            ).json()
            for variable in page:
                if variable["name"].startswith(PENDING_PREFIX):
                    found[variable["name"]] = variable["value"]
            if len(page) < _PAGE:
                return found
            offset += len(page)


def _batch_ids(record: dict[str, Any]) -> list[str]:
    """The pending round's batch ids: from the record, or from the run's journal."""
    if record.get("batch_ids") is not None:
        return list(record["batch_ids"])
    work_dir = record["parameters"].get("work_dir")
    if not work_dir:
        return []
    journal = Journal(Path(work_dir) / "journal.jsonl")
    return journal.batch_ids(round_no=record.get("round"))


def _ready(record: dict[str, Any]) -> tuple[bool, str]:
    """Whether the run has work to do now: every batch has ended or, with shards waiting
    for a slot, one has. Stops at the first batch that settles the question.

    With no batch ids to hand (neither in the record nor in a journal on this machine),
    the run is handed to the batch flow, which finds its batches on the service and, if
    any still runs, records the run as pending again."""
    queued = int(record.get("queued") or 0)
    credentials = resolve_credentials(record["parameters"].get("credentials_block"))
    running = []
    with credentials.get_client() as client:
        for batch_id in reversed(_batch_ids(record)):  # the newest round first
            batch = BatchInfo.from_sdk(client.batches.retrieve(batch_id))
            if batch.is_terminal and queued:
                return True, ""
            if not batch.is_terminal:
                running.append(f"{batch.id} {batch.status} {batch.progress}")
                if not queued:
                    break
    waiting = f"; {queued} shard(s) waiting for a slot" if queued else ""
    return not running, ", ".join(running) + waiting


@flow(name="kluster-collect-batches")
def collect_batches() -> dict[str, str]:
    """Finish every run submitted with ``wait=False`` whose batches have all ended.

    Schedule it (every few minutes) next to runs that do not wait. A run still waiting is
    left for the next collection; a run that needs another round of failed lines submits
    it and stays pending. Returns each pending run's outcome by variable name.
    """
    from prefect_kluster.flows.batch_inference import BatchRunError, batch_inference

    logger = get_run_logger()
    outcomes: dict[str, str] = {}
    for name, record in list_pending().items():
        done, progress = _ready(record)
        if not done:
            logger.info("%s: still running (%s)", name, progress)
            outcomes[name] = "running"
            continue
        try:
            result = batch_inference(**record["parameters"])
        except BatchRunError as exc:
            Variable.unset(name)
            logger.warning("%s: finished without completing: %s", name, exc)
            outcomes[name] = exc.result.status if exc.result else "failed"
            continue
        if result.status != "pending":
            Variable.unset(name)
            logger.info("%s: %s, results in %s", name, result.status, result.output_path)
        outcomes[name] = result.status
    return outcomes
