"""One batch per shard across machines: a create-once claim before the paid call.

Two runs of the same inputs may start at the same moment on different workers, with
different work directories: the only thing they share is the Prefect server. Before a
shard is uploaded and its batch created, the run creates the shard's claim there, a
Prefect Variable named after the shard's identity. Creating a Variable is atomic (the
server's unique name index answers 409 to the second), so one run holds a shard's claim
at a time. The holder looks the shard up on the service once more (the batch metadata
stays the source of truth), pays only if nothing is there, and releases the claim once
the batch is recorded. A run that finds the claim taken waits for its release and then
finds the holder's batch on the service.

A holder that died keeps its claim: once its flow run is over (crashed, failed,
cancelled) or the claim is older than ``STALE_AFTER`` seconds, the next run takes over by
creating the next generation of the claim (again create-once, so one taker wins).
"""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

CLAIM_PREFIX = "kluster_claim_"
STALE_AFTER = 900.0
WAIT_STEP = 0.5
T = TypeVar("T")
_PROCESS_OWNER = f"process-{uuid.uuid4().hex[:12]}"


def owner_id() -> str:
    """Who claims: the flow run (a retry of the same run is the same owner)."""
    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.id)
    return _PROCESS_OWNER


def _base(key: str) -> str:
    return f"{CLAIM_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:40]}_"


@dataclass
class Claim:
    key: str
    name: str
    generation: int
    owner: str
    at: float

    @property
    def mine(self) -> bool:
        return self.owner == owner_id()


def _claims(key: str) -> list[Claim]:
    """Every generation of the key's claim on the server, newest last."""
    base = _base(key)
    with get_client(sync_client=True) as client:
        body = {"variables": {"name": {"like_": f"{base}%"}}, "limit": 50}
        found = client.request("POST", "/variables/filter", json=body).json()
    claims = []
    for variable in found:
        value = variable.get("value") or {}
        try:
            generation = int(variable["name"][len(base) :])
        except ValueError:
            continue
        claims.append(
            Claim(key, variable["name"], generation, value.get("owner", ""), value.get("at", 0))
        )
    return sorted(claims, key=lambda c: c.generation)


def _create(key: str, generation: int) -> Claim | None:
    name = f"{_base(key)}{generation}"
    value = {"owner": owner_id(), "at": time.time(), "host": socket.gethostname(), "key": key}
    with get_client(sync_client=True) as client:
        try:
            client.create_variable(VariableCreate(name=name, value=value))
        except ObjectAlreadyExists:
            return None
    return Claim(key, name, generation, value["owner"], value["at"])


def _holder_gone(claim: Claim) -> bool:
    """The claim's flow run has ended, or the claim is older than ``STALE_AFTER``."""
    if time.time() - claim.at > STALE_AFTER:
        return True
    try:
        run_id = uuid.UUID(claim.owner)
    except ValueError:
        return False
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(run_id).state
        except ObjectNotFound:
            return True
    return state is not None and state.is_final()


def acquire(key: str, on_wait: Callable[[Claim], None] | None = None) -> Claim:
    """Hold the shard's claim: create it, take it over from a holder that is gone, or
    wait until its holder releases it. Re-entrant for the same flow run."""
    while True:
        claims = _claims(key)
        if not claims:
            claim = _create(key, 0)
        else:
            newest = claims[-1]
            if newest.mine:
                return newest
            claim = _create(key, newest.generation + 1) if _holder_gone(newest) else None
            if claim is None and on_wait is not None:
                on_wait(newest)
        if claim is not None:
            return claim
        time.sleep(WAIT_STEP)


def release(key: str) -> None:
    """Drop every generation of the key's claim (the batch is on the service now)."""
    with get_client(sync_client=True) as client:
        for claim in _claims(key):
            try:
                client.delete_variable_by_name(claim.name)
            except ObjectNotFound:
                continue


def held(key: str, work: Callable[[], T], on_wait: Callable[[Claim], None] | None = None) -> T:
    """Run ``work`` while holding the key's claim; release it after, whatever happens
    (a failure leaves nothing paid that the service does not know of)."""
    acquire(key, on_wait)
    try:
        return work()
    finally:
        release(key)
