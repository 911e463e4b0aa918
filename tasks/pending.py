"""Pending runs (``wait=False``): the state in the work directory, a pointer on the server.

A run that does not wait writes what a collector needs (its parameters, the batch ids of
its pending round, how many shards wait for a slot) into its work directory, as a
write-once object per registration, and leaves on the Prefect server only a Variable
``kluster_pending_<hash of the work dir>`` that points there. Any worker that reaches the
work directory can finish the run; the Variable stays far below Prefect's 5,000-character
limit however many batches the run has.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from prefect.variables import Variable

from prefect_kluster.tasks import storage
from prefect_kluster.tasks._prefect import prefect_client

PENDING_PREFIX = "kluster_pending_"
_PAGE = 200  # the server's default page size for variables


def pending_name(work_dir: str) -> str:
    digest = hashlib.sha256(storage.normalise(work_dir).encode()).hexdigest()[:24]
    return f"{PENDING_PREFIX}{digest}"


def _records_dir(work_dir: str) -> str:
    return storage.join(work_dir, "pending")


def register_pending(
    work_dir: str,
    parameters: dict[str, Any],
    batch_ids: list[str],
    queued: int = 0,
    round_no: int = 1,
    child_runs: list[str] | None = None,
) -> str:
    """Record (or refresh) a pending run; returns its Variable's name. A distributed run
    lists the child flow runs whose groups are still working."""
    record = {
        "parameters": parameters,
        "batch_ids": batch_ids,
        "queued": queued,
        "child_runs": child_runs or [],
        "round": round_no,
        "registered_at": time.time(),
    }
    path = storage.join(_records_dir(work_dir), f"{time.time_ns():020d}.json")
    storage.create_once(path, json.dumps(record).encode())
    name = pending_name(work_dir)
    Variable.set(
        name, {"work_dir": work_dir, "registered_at": record["registered_at"]}, overwrite=True
    )
    return name


def read_pending(work_dir: str) -> dict[str, Any] | None:
    """The run's newest pending record, from its work directory (None if it has none)."""
    records = storage.listdir(_records_dir(work_dir))
    if not records:
        return None
    return json.loads(storage.read_bytes(records[-1]))


def unregister_pending(work_dir: str) -> None:
    """The run is finished: drop its pointer and its pending records.

    The records are written before the pointer and removed after it, so a run with no
    record has no pointer either: a run that never stopped waiting (the usual one) makes
    no call to the Prefect server here."""
    records = _records_dir(work_dir)
    if not storage.listdir(records):
        return
    Variable.unset(pending_name(work_dir))  # False if it was gone already
    storage.remove_tree(records)


def list_pending() -> dict[str, dict[str, Any]]:
    """Every pending run's pointer on the server, by Variable name (all pages)."""
    body: dict[str, Any] = {"variables": {"name": {"like_": f"{PENDING_PREFIX}%"}}}
    found: dict[str, dict[str, Any]] = {}
    with prefect_client() as client:
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
