"""Long waits that hold no worker: pending runs are recorded on the Prefect server (as
Variables), and the ``kluster-collect-batches`` flow finishes each run once its batches
have ended, through the same code path as a waiting run."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.logging import get_run_logger
from prefect.variables import Variable

from blocks import resolve_credentials
from tasks.types import BatchInfo

PENDING_PREFIX = "kluster_pending_"


def pending_name(output_path: str, work_dir: str) -> str:
    digest = hashlib.sha256(f"{output_path}\0{work_dir}".encode()).hexdigest()[:24]
    return f"{PENDING_PREFIX}{digest}"


def register_pending(parameters: dict[str, Any], batch_ids: list[str]) -> str:
    """Record (or refresh) a pending run on the Prefect server; returns its variable name."""
    name = pending_name(parameters["output_path"], parameters["work_dir"])
    given = {k: v for k, v in parameters.items() if v is not None}
    Variable.set(
        name,
        {"parameters": given, "batch_ids": batch_ids, "registered_at": time.time()},
        overwrite=True,
    )
    return name


def list_pending() -> dict[str, dict[str, Any]]:
    with get_client(sync_client=True) as client:
        found = client.read_variables()
    return {v.name: v.value for v in found if v.name.startswith(PENDING_PREFIX)}


def _batches_done(record: dict[str, Any]) -> tuple[bool, str]:
    credentials = resolve_credentials(record["parameters"].get("credentials_block"))
    with credentials.get_client() as client:
        batches = [BatchInfo.from_sdk(client.batches.retrieve(b)) for b in record["batch_ids"]]
    running = [b for b in batches if not b.is_terminal]
    progress = ", ".join(f"{b.id} {b.status} {b.progress}" for b in running)
    return not running, progress


@flow(name="kluster-collect-batches")
def collect_batches() -> dict[str, str]:
    """Finish every run submitted with ``wait=False`` whose batches have all ended.

    Schedule it (every few minutes) next to runs that do not wait. A run still waiting is
    left for the next collection; a run that needs another round of failed lines submits
    it and stays pending. Returns each pending run's outcome by variable name.
    """
    from flows.batch_inference import BatchRunError, batch_inference

    logger = get_run_logger()
    outcomes: dict[str, str] = {}
    for name, record in list_pending().items():
        done, progress = _batches_done(record)
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
