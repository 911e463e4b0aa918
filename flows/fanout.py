"""Fan-out: one large job over many workers (``limits.distribute``).

The parent run (``batch_inference``) validates and shards once into the shared work
directory, as always. With ``limits.distribute`` set, each round's shards are split into
groups and every group is run by a child flow run of the ``kluster-shard-group``
deployment on the work pool, so the uploads, waits and downloads spread over the workers
the user already runs. Tens of child runs, not one per shard; a child takes its shards
through the same lifecycle a run takes them through alone (``run_shards``).

What ties them together lives in the work directory (write-once objects, readable by any
worker): the group manifest, one record per child run started, and each child's results.
A child run is started with an idempotency key made from the job and the group, so a
retried or rerun parent finds the children it started instead of starting them twice.
The parent waits by reading its children's states from the Prefect API (one call a cycle
for all of them), then joins their results in input order on the usual path.

The cap on batches running at once (``limits.max_concurrency``) holds for the whole job:
a Prefect global concurrency limit named after the job, one slot held by each shard from
its submit until its batch has ended and been downloaded, in whichever child it runs.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Cancelling, Crashed
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_kluster.blocks import resolve_credentials
from prefect_kluster.flows.options import Limits, RunOptions, StorageSettings
from prefect_kluster.flows.shards import (
    TASK_THREADS,
    ShardResult,
    ShardRun,
    cancel_running_batches,
    run_shards,
    run_work_dir,
)
from prefect_kluster.tasks import storage
from prefect_kluster.tasks._prefect import prefect_client
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.submit import find_existing_batches, identity_key, shard_identity
from prefect_kluster.tasks.types import BatchInfo, Shard
from prefect_kluster.tasks.wait import run_is_ending, stop_waiting

SHARD_GROUP_FLOW = "kluster-shard-group"
SHARD_GROUP_DEPLOYMENT = f"{SHARD_GROUP_FLOW}/kluster-shard-group"
AUTO_SHARDS_PER_GROUP = 4
AUTO_MAX_GROUPS = 32
MAX_CHILD_ATTEMPTS = 4  # child runs per group over every try of the parent (crashes restart)
WAIT_CYCLE_MAX = 10.0  # seconds between reads of the children's states, at most
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STALE_MARGIN = 15.0  # seconds beyond two missed heartbeats before a child counts as gone
EVENTS_PAGE = 50  # the most events the server returns at once
HEARTBEAT_CHUNK = 12  # children per heartbeat read: at most 3 beats each fit in one page
LEASE_SECONDS = 60.0  # the job limit's slot lease (the server's minimum), renewed while held


class ShardGroupError(RuntimeError):
    """A group of shards could not be finished by its child runs."""


def group_count(distribute: int | str, shards: int) -> int:
    """How many groups: as asked (never more than the shards), or ``auto``."""
    if distribute == "auto":
        wanted = min(AUTO_MAX_GROUPS, math.ceil(shards / AUTO_SHARDS_PER_GROUP))
    else:
        wanted = int(distribute)
    return max(1, min(wanted, shards))


def split(shards: list[Shard], groups: int) -> list[list[Shard]]:
    """Contiguous groups of nearly equal size, in input order."""
    size, extra = divmod(len(shards), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (1 if g < extra else 0)
        out.append(shards[start:end])
        start = end
    return out


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def fanout_dir(work: str) -> str:
    return storage.join(work, "fanout")


def limit_name(work: str, nonce: str | None) -> str:
    """The job's global concurrency limit (one per work directory and run label)."""
    return f"kluster-job-{_digest(storage.normalise(work), nonce or '')[:24]}"


# --- the child ---------------------------------------------------------------------------------


def cancel_group_batches_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation hook of a child: cancel the batches of its own shards that are still
    running (also one submitted after the parent's hook cancelled the job's batches)."""
    params = flow_run.parameters or {}
    manifest = json.loads(storage.read_bytes(params["manifest_path"]))
    run = RunOptions.model_validate(params.get("run") or {})
    journal = Journal(storage.join(manifest["work_dir"], "state"))
    ids = []
    for raw in manifest["groups"][int(params["group"])]:
        identity = shard_identity(Shard.model_validate(raw), int(manifest["round"]), run.run_label)
        batch_id = journal.latest(identity_key(identity), "batch_id")
        if batch_id:
            ids.append(batch_id)
    if not ids:
        return
    cancelled = cancel_running_batches(resolve_credentials(params.get("credentials_block")), ids)
    logging.getLogger(__name__).warning(
        "Shard group cancelled: cancelled %d running batch(es): %s", len(cancelled),
        ", ".join(cancelled) or "none",
    )  # fmt: skip


@flow(
    name=SHARD_GROUP_FLOW,
    task_runner=ThreadPoolTaskRunner(max_workers=TASK_THREADS),
    on_cancellation=[cancel_group_batches_hook],
)
def shard_group(
    manifest_path: str,
    group: int,
    credentials_block: str | None = None,
    run: RunOptions = RunOptions(),
    limits: Limits = Limits(),
    started: float | None = None,
) -> str:
    """Take one group of a distributed job's shards through upload -> submit -> wait ->
    download (started by the parent run; not meant to be started by hand).

    Args:
        manifest_path: The job's group manifest in its work directory.
        group: Which group of the manifest this run takes.
        credentials_block: As for the parent run.
        run: The parent's run options (its run label and remaining timeout).
        limits: The parent's limits; max_concurrency holds for the whole job.
        started: When the parent run started (uploads since then are its own).

    Returns the path of the group's results object."""
    logger = get_run_logger()
    roots = StorageSettings().roots
    storage.check_roots({"manifest_path": manifest_path}, roots)
    manifest = json.loads(storage.read_bytes(manifest_path))
    work, round_no = manifest["work_dir"], int(manifest["round"])
    storage.check_roots({"work_dir": work}, roots)
    shards = [Shard.model_validate(s) for s in manifest["groups"][group]]
    result_path = storage.join(storage.parent(manifest_path), f"group-{group}.result.json")
    if storage.exists(result_path):  # a rerun of a finished group: nothing left to do
        return result_path
    credentials = resolve_credentials(credentials_block)
    state = ShardRun(
        credentials=credentials,
        work=work,
        run=run,
        limits=limits,
        deadline=None if run.timeout is None else time.monotonic() + run.timeout,
        nonce=run.run_label,
        started=started or time.time(),
        joins_results=False,  # the parent joins them
    )
    known = find_existing_batches(credentials, since=None) if not run.resubmit else []
    name = manifest.get("concurrency_limit")
    # Each shard holds one slot of the job's limit from its submit to its download, so no
    # more than max_concurrency batches run at once over all children and workers.
    threads = max(1, min(len(shards), limits.max_concurrency))

    def one(shard: Shard) -> list[ShardResult]:
        if name is None:
            return run_shards(state, [shard], round_no, known)[0]
        # A short lease (renewed while the slot is held): a child killed with its worker
        # gives its slots back within a minute, not the default five.
        with concurrency(
            name, occupy=1, timeout_seconds=state.remaining(), lease_duration=LEASE_SECONDS
        ):
            if run_is_ending():  # cancelled while this shard waited for a slot
                raise ShardGroupError(f"group {group} is ending; shard {shard.index} not started")
            return run_shards(state, [shard], round_no, known)[0]

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard")
    try:
        # Task submissions need the flow run's context: each thread gets its own copy.
        futures = [pool.submit(contextvars.copy_context().run, one, s) for s in shards]
        results = [r for f in futures for r in f.result()]
    except BaseException:
        # Cancelled (SIGTERM lands in this thread) or a shard failed: start no other shard
        # and wake the shard threads waiting on batches, so the process can exit now.
        pool.shutdown(wait=False, cancel_futures=True)
        stop_waiting()
        raise
    finally:
        pool.shutdown(wait=True)
    body = json.dumps([r.model_dump(mode="json") for r in results]).encode()
    storage.create_once(result_path, body)  # write-once: a racing twin wrote the same
    logger.info(
        "Group %d of round %d: %d shard(s), %d batch(es) done", group, round_no, len(shards),
        len(results),
    )  # fmt: skip
    return result_path


# --- the parent --------------------------------------------------------------------------------


def run_round(
    state: ShardRun,
    shards: list[Shard],
    round_no: int,
    known: list[BatchInfo],
    credentials_block: str | None,
) -> tuple[list[ShardResult], list[BatchInfo], int]:
    """One round of the parent: its own shards as always, or (``limits.distribute`` set) its
    groups by child runs. Same answer as ``run_shards``: not waiting, the shards of groups
    still running count as queued, and their child runs are noted in ``state.children``."""
    if state.limits.distribute is None:
        return run_shards(state, shards, round_no, known)
    job = GroupJob.prepare(state, shards, round_no, credentials_block)
    job.find_children()
    if not state.run.wait:
        job.check()  # one look, no sleep: the collector looks again later
        if job.waiting:
            state.children = [str(job.children[g].id) for g in sorted(job.waiting)]
            return [], [], sum(len(job.groups[g]) for g in job.waiting)
        return job.results(), [], 0
    cycle = min(max(state.run.poll_interval, 1.0), WAIT_CYCLE_MAX)
    while job.waiting:  # one read of every child's state a cycle
        remaining = state.remaining()
        if remaining is not None and remaining <= 0:
            raise ShardGroupError(f"timed out waiting for {len(job.waiting)} group(s)")
        time.sleep(cycle if remaining is None else min(cycle, remaining))
        job.check()
    return job.results(), [], 0


@dataclass
class GroupJob:
    """One round's shard groups and the child runs that take them, as found in (and
    recorded to) the work directory."""

    state: ShardRun
    shards: list[Shard]
    round_no: int
    groups: list[list[Shard]]
    job: str  # digest of the work dir, round, run label and shard hashes
    job_dir: str
    limit: str
    parameters: dict[str, Any]
    attempts: dict[int, int] = field(default_factory=dict)
    children: dict[int, FlowRun] = field(default_factory=dict)
    waiting: set[int] = field(default_factory=set)

    @classmethod
    def prepare(
        cls, state: ShardRun, shards: list[Shard], round_no: int, credentials_block: str | None
    ) -> GroupJob:
        """Split the shards, write the group manifest once and make the job's limit."""
        groups = split(shards, group_count(state.limits.distribute or 1, len(shards)))
        job = _digest(
            storage.normalise(state.work), str(round_no), state.nonce or "",
            *(s.sha256 for s in shards),
        )  # fmt: skip
        job_dir = storage.join(fanout_dir(state.work), f"round-{round_no}-{job[:16]}")
        name = limit_name(state.work, state.nonce)
        manifest_path = storage.join(job_dir, "manifest.json")
        manifest = {
            "work_dir": state.work,
            "round": round_no,
            "concurrency_limit": name,
            "groups": [[s.model_dump(mode="json") for s in g] for g in groups],
        }
        storage.create_once(manifest_path, json.dumps(manifest).encode())  # same job, same bytes
        _ensure_limit(name, state.limits.max_concurrency)
        # A child always waits for its shards (a parent that does not wait leaves that to
        # its children and the collector).
        child_run = state.run.model_copy(
            update={"run_label": state.nonce, "timeout": state.remaining(), "wait": True}
        )
        parameters = {
            "manifest_path": manifest_path,
            "credentials_block": credentials_block,
            "run": child_run.model_dump(mode="json"),
            "limits": state.limits.model_dump(mode="json"),
            "started": state.started,
        }
        return cls(state, shards, round_no, groups, job, job_dir, name, parameters)

    def result_path(self, group: int) -> str:
        return storage.join(self.job_dir, f"group-{group}.result.json")

    def start(self, group: int) -> FlowRun:
        """The group's child run of its current attempt: made now, or found by its key."""
        attempt = self.attempts[group]
        key = f"{SHARD_GROUP_FLOW}:{self.job}:group-{group}:attempt-{attempt}"
        child = run_deployment(
            SHARD_GROUP_DEPLOYMENT,
            parameters={**self.parameters, "group": group},
            timeout=0,
            idempotency_key=key,
            flow_run_name=f"shard-group-{group}-r{self.round_no}-{self.job[:8]}",
        )
        record = json.dumps({"flow_run_id": str(child.id), "group": group, "key": key})
        storage.create_once(
            storage.join(self.job_dir, "children", f"group-{group}-attempt-{attempt}.json"),
            record.encode(),
        )
        self.children[group] = child
        return child

    def find_children(self) -> None:
        """Each group's live child: an idempotency key returns the run already made for it
        (by this parent, a crashed one or a collection); a child that ended without results
        is followed by the next attempt's key."""
        for g in range(len(self.groups)):
            self.attempts[g] = 1
            while True:
                child = self.start(g)
                kind = child.state_type.value if child.state_type else "SCHEDULED"
                if kind not in FINAL or storage.exists(self.result_path(g)):
                    break
                self._next_attempt(g, kind, child.state.message if child.state else "")
        self.waiting = {g for g in self.children if not storage.exists(self.result_path(g))}
        get_run_logger().info(
            "Round %d: %d shard(s) in %d group(s), run by child flow runs %s",
            self.round_no, len(self.shards), len(self.groups),
            ", ".join(str(c.id) for c in self.children.values()),
        )  # fmt: skip

    def _next_attempt(self, group: int, kind: str, message: str | None) -> None:
        child = self.children[group]
        if kind == "CANCELLED":
            raise ShardGroupError(f"child run {child.id} of group {group} was cancelled")
        self.attempts[group] += 1
        if self.attempts[group] > MAX_CHILD_ATTEMPTS:
            raise ShardGroupError(
                f"group {group} ended {kind} in {MAX_CHILD_ATTEMPTS} child runs: {message or ''}"
            )

    def check(self) -> None:
        """One look at the children still waiting: a finished group leaves ``waiting``; a
        child that crashed, failed or went silent is followed by the next attempt."""
        if not self.waiting:
            return
        for g, kind, message in child_states({g: self.children[g].id for g in self.waiting}):
            if kind not in FINAL:
                continue
            if kind == "COMPLETED" and storage.exists(self.result_path(g)):
                self.waiting.discard(g)
                continue
            self._next_attempt(g, kind, message)
            get_run_logger().warning("Child run of group %d ended %s; starting it again", g, kind)
            self.start(g)

    def results(self) -> list[ShardResult]:
        """Every group's results, in input order; the job's limit is no longer needed."""
        paths = [self.result_path(g) for g in range(len(self.groups))]
        found = storage.read_many(paths)
        results = [ShardResult.model_validate(r) for p in paths for r in json.loads(found[p])]
        _delete_limit(self.limit)
        by_index = {r.shard.index: r for r in results}
        return [by_index[s.index] for s in self.shards if s.index in by_index]


def child_states(ids: dict[int, UUID]) -> list[tuple[int, str, str]]:
    """(group, state type, state message) of each child, read in one API call; a child gone
    silent with its worker is first marked Crashed (``silent_children``), so it reads so."""
    silent_children(ids)
    by_id = {str(i): g for g, i in ids.items()}
    with prefect_client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(ids.values()))),
            limit=len(ids),
        )
    return [
        (
            by_id[str(r.id)],
            r.state_type.value if r.state_type else "SCHEDULED",
            (r.state.message or "") if r.state else "",
        )
        for r in runs
    ]


def silent_children(ids: dict[int, UUID]) -> dict[UUID, str]:
    """Children that run but have stopped sending heartbeats (their worker or machine is
    gone: ``kill -9``, a lost node), each marked Crashed so the next attempt can start.

    A flow run sends a ``prefect.flow-run.heartbeat`` event every
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds; Prefect itself leaves a run whose process
    vanished Running for ever. Silent for two beats and a margin counts as gone. No call while
    no child has run that long; a failed check is logged and tried again next cycle."""
    beat = get_current_settings().flows.heartbeat_frequency
    if beat is None or not ids:
        return {}
    silence = 2 * max(beat, 30) + STALE_MARGIN
    try:
        return _mark_silent(list(ids.values()), silence)
    except Exception as exc:  # the children's own states still tell the rest
        logging.getLogger(__name__).warning("Could not read the children's heartbeats: %s", exc)
        return {}


def _mark_silent(ids: list[UUID], silence: float) -> dict[UUID, str]:
    now = datetime.now(timezone.utc)
    silent: dict[UUID, str] = {}
    with prefect_client() as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            ),
            limit=len(ids),
        )
        # Only a run that has been running longer than the silence can have gone silent.
        old = [r for r in runs if r.start_time and (now - r.start_time).total_seconds() > silence]
        for start in range(0, len(old), HEARTBEAT_CHUNK):
            chunk = old[start : start + HEARTBEAT_CHUNK]
            page = client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(
                        since=now - timedelta(seconds=silence), until=now + timedelta(hours=1)
                    ),  # a later bound: clocks of other machines may run ahead
                    event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                    resource=EventResourceFilter(id=[f"prefect.flow-run.{r.id}" for r in chunk]),
                ),
                limit=EVENTS_PAGE,
            )
            beating = {e.resource.id.removeprefix("prefect.flow-run.") for e in page.events}
            for r in chunk:
                if str(r.id) in beating:
                    continue
                message = f"no heartbeat for {silence:.0f}s: its worker or machine is gone"
                client.set_flow_run_state(r.id, Crashed(message=message), force=True)
                silent[r.id] = message
    return silent


def _ensure_limit(name: str, limit: int) -> None:
    """The job's global concurrency limit at ``limit`` slots (made, or set again)."""
    with prefect_client() as client:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
            )
        except ObjectAlreadyExists:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
            )


def _delete_limit(name: str) -> None:
    try:
        with prefect_client() as client:
            client.delete_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        pass
    except Exception as exc:  # a leftover limit costs nothing; the results matter
        get_run_logger().warning("Could not delete concurrency limit %s: %s", name, exc)


def cancel_child_runs_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation hook of the parent: cancel every child run it recorded in its work
    directory (their own hooks cancel their batches)."""
    work = run_work_dir(flow_run.parameters or {})
    rounds = storage.listdir(fanout_dir(work))
    records = [p for d in rounds for p in storage.listdir(storage.join(d, "children"))]
    if not records:
        return
    ids = [json.loads(raw)["flow_run_id"] for raw in storage.read_many(records).values()]
    cancelled = []
    with prefect_client() as client:
        for run_id in ids:
            try:
                child = client.read_flow_run(UUID(run_id))
                kind = child.state_type.value if child.state_type else "SCHEDULED"
                if kind in FINAL or kind == "CANCELLING":
                    continue
                # A run not started yet is cancelled at once; a running one is stopped by
                # its worker, which runs the child's own cancellation hooks.
                new = Cancelled() if kind in {"SCHEDULED", "PENDING"} else Cancelling()
                client.set_flow_run_state(child.id, new, force=True)
                cancelled.append(run_id)
            except Exception as exc:  # keep going: cancel as many as possible
                logging.getLogger(__name__).warning(
                    "Could not cancel child run %s: %s", run_id, type(exc).__name__
                )
    logging.getLogger(__name__).warning(
        "Flow run cancelled: cancelled %d child run(s): %s", len(cancelled),
        ", ".join(cancelled) or "none",
    )  # fmt: skip
