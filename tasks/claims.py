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

A holder renews its claim every ``RENEW_EVERY`` seconds while it holds it. A holder that
died keeps its claim until the next run sees that it is gone: its process is not running
(same host), its flow run is over (crashed, failed, cancelled), or the claim has not been
renewed for ``STALE_AFTER`` seconds (another host); that run then takes over by creating
the next generation of the claim (again create-once, so one taker wins).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from prefect_kluster.tasks._prefect import busy_retried_request, prefect_client
from prefect_kluster.tasks.retry import is_transient_error

CLAIM_PREFIX = "kluster_claim_"
STALE_AFTER = 60.0
SERVER_ATTEMPTS = 6
RENEW_EVERY = 10.0
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
    host: str = ""
    pid: int = 0

    @property
    def mine(self) -> bool:
        return self.owner == owner_id()


def _patiently(call: Callable[[], T]) -> T:
    """A call to the Prefect server, tried again while the server is busy (503) or briefly
    out of reach: many shards claim at once."""
    for attempt in range(SERVER_ATTEMPTS):
        try:
            return call()
        except Exception as exc:
            if attempt + 1 == SERVER_ATTEMPTS or not is_transient_error(exc):
                raise
            time.sleep(min(0.25 * 2**attempt, 4.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _claims(key: str) -> list[Claim]:
    """Every generation of the key's claim on the server, newest last."""
    base = _base(key)
    body = {"variables": {"name": {"like_": f"{base}%"}}, "limit": 50}

    def read() -> list[dict]:
        with prefect_client() as client:
            return client.request("POST", "/variables/filter", json=body).json()

    found = _patiently(read)
    claims = []
    for variable in found:
        value = variable.get("value") or {}
        try:
            generation = int(variable["name"][len(base) :])
        except ValueError:
            continue
        claims.append(
            Claim(
                key,
                variable["name"],
                generation,
                value.get("owner", ""),
                value.get("at", 0),
                value.get("host", ""),
                int(value.get("pid") or 0),
            )
        )
    return sorted(claims, key=lambda c: c.generation)


def _value(key: str) -> dict[str, object]:
    return {
        "owner": owner_id(),
        "at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "key": key,
    }


def _create(key: str, generation: int) -> Claim | None:
    name = f"{_base(key)}{generation}"
    value = _value(key)

    def create() -> bool:
        with prefect_client() as client:
            try:
                client.create_variable(VariableCreate(name=name, value=value))
            except ObjectAlreadyExists:
                return False
        return True

    if not _patiently(create):
        return None
    claim = Claim(key, name, generation, owner_id(), time.time(), socket.gethostname(), os.getpid())
    _Renewer.start(claim)
    return claim


class _Renewer:
    """Renews the claims this process holds, so others can tell a live holder from a
    dead one on another host."""

    _lock = threading.Lock()
    _held: dict[str, Claim] = {}
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, claim: Claim) -> None:
        with cls._lock:
            cls._held[claim.name] = claim
            if cls._thread is None or not cls._thread.is_alive():
                context = contextvars.copy_context()  # the holder's Prefect settings
                cls._thread = threading.Thread(
                    target=context.run, args=(cls._run,), name="kluster-claims", daemon=True
                )
                cls._thread.start()

    @classmethod
    def holding(cls, key: str) -> Claim | None:
        """The key's claim if this process holds it for the current flow run."""
        with cls._lock:
            for claim in cls._held.values():
                if claim.key == key and claim.mine:
                    return claim
        return None

    @classmethod
    def stop(cls, name: str) -> None:
        with cls._lock:
            cls._held.pop(name, None)

    @classmethod
    def _run(cls) -> None:
        while True:
            time.sleep(RENEW_EVERY)
            with cls._lock:
                held = list(cls._held.values())
            if not held:
                continue
            try:
                with prefect_client() as client:
                    for claim in held:
                        client.update_variable(
                            VariableUpdate(name=claim.name, value=_value(claim.key))
                        )
            except Exception:  # the next renewal tries again; a lapse only risks a takeover
                continue


def _holder_gone(claim: Claim) -> bool:
    """The claim's process is gone (same host), its flow run has ended, or it has not
    been renewed for ``STALE_AFTER`` seconds."""
    if time.time() - claim.at > STALE_AFTER:
        return True
    if claim.host == socket.gethostname() and claim.pid and not _alive(claim.pid):
        return True
    try:
        run_id = uuid.UUID(claim.owner)
    except ValueError:
        return False

    def read() -> Any:
        with prefect_client() as client:
            try:
                return client.read_flow_run(run_id).state
            except ObjectNotFound:
                return None

    state = _patiently(read)
    return state is None or state.is_final()


def acquire(key: str, on_wait: Callable[[Claim], None] | None = None) -> Claim:
    """Hold the shard's claim: create it, take it over from a holder that is gone, or
    wait until its holder releases it. Re-entrant for the same flow run."""
    held = _Renewer.holding(key)
    if held is not None:
        return held
    _Releaser.settle(key)  # this run's own release of it, if one is under way
    claim = _create(key, 0)  # the usual case: one call
    if claim is not None:
        return claim
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_DELETING = threading.Lock()


def _delete(name: str) -> None:
    def delete() -> None:
        # One at a time from this process: on SQLite, deletes sent together lock each other
        # out (each reads, then writes) and most are answered 503.
        with _DELETING:
            response = busy_retried_request("DELETE", f"/variables/name/{name}")
        if response.status_code != 404:  # 404: already gone
            response.raise_for_status()

    _Renewer.stop(name)
    _patiently(delete)


_IN_BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kluster_claims_in_background", default=False
)


class _Releaser:
    """Deletes released claims one after another in a thread of its own, so a shard's submit
    does not wait on the server for its claim to go (on SQLite, while many task runs write,
    a delete can take seconds). Each deletion runs in the releasing task's context (its
    Prefect server)."""

    _cond = threading.Condition()
    _queue: list[tuple[str, str, contextvars.Context]] = []  # key, claim name, context
    _busy: list[str] = []  # keys queued or being deleted
    _thread: threading.Thread | None = None

    @classmethod
    def put(cls, key: str, name: str) -> None:
        _Renewer.stop(name)
        with cls._cond:
            cls._queue.append((key, name, contextvars.copy_context()))
            cls._busy.append(key)
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(
                    target=cls._run, name="kluster-claim-release", daemon=True
                )
                cls._thread.start()

    @classmethod
    def settle(cls, key: str | None = None, timeout: float | None = None) -> bool:
        """Wait until no deletion (of ``key``, or of any claim) is queued or under way."""
        with cls._cond:
            return cls._cond.wait_for(
                lambda: not cls._busy if key is None else key not in cls._busy, timeout
            )

    @classmethod
    def abandon(cls) -> list[str]:
        """Drop the deletions not yet started (the server is gone, or too slow)."""
        with cls._cond:
            dropped = [name for _, name, _ in cls._queue]
            for key, _, _ in cls._queue:
                cls._busy.remove(key)
            cls._queue.clear()
            cls._cond.notify_all()
            return dropped

    @classmethod
    def _run(cls) -> None:
        while True:
            with cls._cond:
                if not cls._queue:
                    cls._thread = None
                    return
                key, name, context = cls._queue.pop(0)
            try:
                context.run(_delete, name)
            except Exception as exc:  # the claim's run will be over: the next run takes over
                logging.getLogger(__name__).warning(
                    "Could not release claim %s (%s); it is taken over once this run ends",
                    name,
                    type(exc).__name__,
                )
            finally:
                with cls._cond:
                    cls._busy.remove(key)
                    cls._cond.notify_all()


@contextlib.contextmanager
def releasing_in_background(timeout: float = 120.0) -> Iterator[None]:
    """Within the block (and the task runs it submits), ``release`` hands each claim to a
    background deleter; on the way out, waits for every release to be done (so none is
    left to a server that the run's end may stop), giving up after ``timeout`` seconds."""
    token = _IN_BACKGROUND.set(True)
    try:
        yield
    finally:
        _IN_BACKGROUND.reset(token)
        if not _Releaser.settle(timeout=timeout):
            dropped = _Releaser.abandon()
            logging.getLogger(__name__).warning(
                "%d claim(s) not released after %g s; they are taken over once this run ends",
                len(dropped),
                timeout,
            )


def release(key: str) -> None:
    """Drop the key's claim (the batch is on the service now): the first generation this
    run holds with one call, else every generation there is."""
    mine = _Renewer.holding(key)
    if mine is not None and mine.generation == 0:
        if _IN_BACKGROUND.get():
            _Releaser.put(key, mine.name)
        else:
            _delete(mine.name)
        return
    for claim in _claims(key):
        _delete(claim.name)
