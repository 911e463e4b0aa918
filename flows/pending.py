"""Long waits that hold no worker: the ``kluster-collect-batches`` flow finishes each run
submitted with ``wait=False`` once its batches have ended, through the same code path as
a waiting run, on whichever worker it runs (the run's state is in its work directory)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import flow
from prefect.logging import get_run_logger
from prefect.variables import Variable

from prefect_kluster.blocks import resolve_credentials
from prefect_kluster.flows.batch_inference import BatchRunError, batch_inference
from prefect_kluster.flows.fanout import FINAL, child_states
from prefect_kluster.tasks.pending import list_pending, read_pending
from prefect_kluster.tasks.types import BatchInfo


class CollectError(RuntimeError):
    """Some pending runs could not be collected this time (the others were)."""


def _children_ready(child_runs: list[str]) -> tuple[bool, str]:
    """A distributed run is ready when none of its child runs is still working (one read
    of their states); the run itself then joins, or starts a group again. A child gone
    silent with its worker is marked Crashed here, so its group is started again."""
    ids = {i: UUID(run_id) for i, run_id in enumerate(child_runs)}
    working = [g for g, kind, _ in child_states(ids) if kind not in FINAL]
    if not working:
        return True, ""
    return False, f"{len(working)} of {len(child_runs)} shard group run(s) still working"


def _ready(record: dict[str, Any]) -> tuple[bool, str]:
    """Whether the run has work to do now: every batch has ended or, with shards waiting
    for a slot, one has. Stops at the first batch that settles the question."""
    if record.get("child_runs"):
        return _children_ready(record["child_runs"])
    queued = int(record.get("queued") or 0)
    credentials = resolve_credentials(record["parameters"].get("credentials_block"))
    running = []
    with credentials.get_client() as client:
        for batch_id in reversed(record.get("batch_ids") or []):
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
    logger = get_run_logger()
    outcomes: dict[str, str] = {}
    errors: list[str] = []
    for name, pointer in list_pending().items():
        record = read_pending(pointer["work_dir"])
        if record is None:
            logger.warning("%s: no pending state in %s; dropped", name, pointer["work_dir"])
            Variable.unset(name)
            outcomes[name] = "missing"
            continue
        try:
            done, progress = _ready(record)
            if not done:
                logger.info("%s: still running (%s)", name, progress)
                outcomes[name] = "running"
                continue
            result = batch_inference(**record["parameters"])
        except BatchRunError as exc:
            Variable.unset(name)
            logger.warning("%s: finished without completing: %s", name, exc)
            outcomes[name] = exc.result.status if exc.result else "failed"
            continue
        except Exception as exc:  # one run that cannot be collected must not block the rest
            logger.error(
                "%s: not collected (%s: %s); it stays pending for the next collection",
                name, type(exc).__name__, exc,
            )  # fmt: skip
            outcomes[name] = "error"
            errors.append(name)
            continue
        if result.status != "pending":
            logger.info("%s: %s, results in %s", name, result.status, result.output_path)
        outcomes[name] = result.status
    if errors:  # the others were collected; this run shows Failed, naming what was not
        raise CollectError(
            f"{len(errors)} of {len(outcomes)} pending run(s) could not be collected: "
            f"{', '.join(errors)} (see the log; they stay pending)"
        )
    return outcomes
