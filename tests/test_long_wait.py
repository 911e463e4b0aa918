"""wait=False: submit, record the pending run on the Prefect server, return; collect later."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from prefect.exceptions import ObjectNotFound
from prefect.variables import Variable

from prefect_kluster.flows import batch_inference, collect_batches
from prefect_kluster.tasks.pending import PENDING_PREFIX, list_pending, read_pending
from tests.conftest import TEST_API_KEY
from tests.helpers import grouped, read_jsonl, requests, write_jsonl


@pytest.fixture(autouse=True)
def no_pending_left():
    """Each test starts and ends with no pending run on the (session-wide) server."""
    for name in list_pending():
        Variable.unset(name)
    yield
    for name in list_pending():
        Variable.unset(name)


def test_submit_then_collect_gives_the_waiting_output(tmp_path, kluster_env):
    rows = requests(40)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    # Held (no progress) until released below: the run must return while they run.
    kluster_env.configure(lines_per_second=1e-6, fail_rate=0.2, fail_once=True, fault_seed=1)
    pending = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "later.jsonl"),
        run={"wait": False},
        limits={"max_requests_per_file": 20},
    )
    assert pending.status == "pending" and len(pending.batch_ids) == 2
    ended = {"completed", "failed", "expired", "cancelled"}
    statuses = [b["status"] for b in kluster_env.stats()["batches"]]
    assert len(statuses) == 2 and not ended & set(statuses), "it returned without waiting"
    assert not (tmp_path / "later.jsonl").exists()
    records = list_pending()
    assert len(records) == 1
    name, pointer = next(iter(records.items()))
    # The Variable only points at the run's state, which lives in its work directory.
    assert set(pointer) == {"work_dir", "registered_at"}
    record = read_pending(pointer["work_dir"])
    assert record["batch_ids"] == pending.batch_ids and "api_key" not in str(record)
    assert TEST_API_KEY not in str(record) and TEST_API_KEY not in str(pointer)

    assert collect_batches() == {name: "running"}
    kluster_env.configure(lines_per_second=40)
    deadline = time.monotonic() + 240
    outcome = None
    while time.monotonic() < deadline:
        outcome = collect_batches()[name]
        if outcome == "completed":
            break
        assert outcome in ("running", "pending")  # pending: a second round was submitted
        time.sleep(0.2)
    assert outcome == "completed"
    assert Variable.get(name) is None, "a finished run is no longer pending"
    later = read_jsonl(tmp_path / "later.jsonl")
    assert [r["custom_id"] for r in later] == [r["custom_id"] for r in rows]
    assert all(r["status"] == "ok" for r in later)

    # The waiting mode over the same inputs reuses the same batches and writes the same file.
    kluster_env.configure(lines_per_second=None)
    waited = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "waited.jsonl"),
        run={"poll_interval": 0.05},
        limits={"max_requests_per_file": 20},
    )
    assert (tmp_path / "waited.jsonl").read_bytes() == (tmp_path / "later.jsonl").read_bytes()
    assert set(pending.batch_ids) <= set(waited.batch_ids)


def start_without_waiting(tmp_path, rows, name: str, **options):
    """Submit ``rows`` with wait=False; returns the pending result and the output path."""
    src = write_jsonl(tmp_path / f"{name}.in.jsonl", rows)
    out = tmp_path / f"{name}.jsonl"
    options.setdefault("poll_interval", 0.05)
    pending = batch_inference(
        input_path=str(src), output_path=str(out), **grouped(wait=False, **options)
    )
    return pending, out


def collect_until_completed(after_each=None, timeout: float = 400) -> str | None:
    """Run the collector until the one pending run completes (or time runs out)."""
    deadline = time.monotonic() + timeout
    outcome = None
    while time.monotonic() < deadline and outcome != "completed":
        (outcome,) = collect_batches().values()
        if after_each is not None:
            after_each()
        time.sleep(0.1)
    return outcome


def test_many_batches_are_collected_from_the_work_dir(tmp_path, kluster_env):
    # 32 one-line shards: their batch ids alone are over 1,000 characters (32 ids of 30
    # characters: 1,088 as JSON), yet the Variable holds only a short pointer (it does not
    # grow with the run; the 5,000-character limit itself is passed by
    # test_parameters_larger_than_a_variable_are_fine) and the state is in the work
    # directory. (160 shards here took 100-200 s of Prefect task runs in CI, 40 took 47 s.)
    rows = requests(32)
    pending, out = start_without_waiting(
        tmp_path, rows, "many", max_requests_per_file=1, max_concurrency=32
    )
    assert pending.status == "pending" and len(pending.batch_ids) == 32
    assert len(json.dumps(pending.batch_ids)) > 1000
    (pointer,) = list_pending().values()
    assert len(json.dumps(pointer)) < 500
    assert sorted(read_pending(pointer["work_dir"])["batch_ids"]) == sorted(pending.batch_ids)
    assert collect_until_completed() == "completed" and list_pending() == {}
    assert [r["custom_id"] for r in read_jsonl(out)] == [r["custom_id"] for r in rows]
    assert kluster_env.stats()["requests"]["POST /v1/batches"] == 32


def test_parameters_larger_than_a_variable_are_fine(tmp_path, kluster_env):
    # Parameters of any size go to the work directory, not into the Variable.
    rows = requests(3)
    pending, out = start_without_waiting(tmp_path, rows, "huge", metadata={"note": "x" * 6000})
    assert pending.status == "pending"
    (pointer,) = list_pending().values()
    assert len(json.dumps(pointer)) < 500
    assert read_pending(pointer["work_dir"])["parameters"]["run"]["metadata"]["note"] == "x" * 6000
    assert collect_until_completed() == "completed"
    assert [r["custom_id"] for r in read_jsonl(out)] == [r["custom_id"] for r in rows]


async def _variables(names: list[str], value: dict | None) -> None:
    """Create (``value``) or delete (None) many Variables over one client, a few at a time:
    one call each instead of Variable.set's read-then-write with a new client per name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate

    async with get_client() as client:
        gate = asyncio.Semaphore(8)

        async def one(name: str) -> None:
            async with gate:
                if value is None:
                    with contextlib.suppress(ObjectNotFound):
                        await client.delete_variable_by_name(name)
                else:
                    await client.create_variable(VariableCreate(name=name, value=value))

        await asyncio.gather(*(one(name) for name in names))


def test_pending_runs_are_listed_past_one_page():
    names = [f"{PENDING_PREFIX}paging-{i:03d}" for i in range(205)]
    try:
        asyncio.run(_variables(names, {"parameters": {}, "batch_ids": []}))
        Variable.set("kluster_other", {"x": 1}, overwrite=True)
        assert set(list_pending()) == set(names)
    finally:
        asyncio.run(_variables([*names, "kluster_other"], None))


def _running(emulator) -> int:
    ended = {"completed", "failed", "expired", "cancelled"}
    return sum(b["status"] not in ended for b in emulator.stats()["batches"])


def test_max_concurrency_holds_while_not_waiting(tmp_path, kluster_env):
    # Four shards, at most two batches running: the first call submits two and ends; each
    # collection that sees a slot free submits the next, never more than two at once.
    # (Six shards took 23 s of collections; four still leave two waiting for a slot.)
    kluster_env.configure(lines_per_second=10)
    rows = requests(20)
    pending, out = start_without_waiting(
        tmp_path, rows, "capped", max_requests_per_file=5, max_concurrency=2
    )
    assert pending.status == "pending" and len(pending.batch_ids) == 2
    (pointer,) = list_pending().values()
    record = read_pending(pointer["work_dir"])
    assert record["queued"] == 2 and record["batch_ids"] == pending.batch_ids
    seen = [_running(kluster_env)]
    outcome = collect_until_completed(lambda: seen.append(_running(kluster_env)))
    assert outcome == "completed" and list_pending() == {}
    assert max(seen) <= 2, seen
    assert kluster_env.stats()["requests"]["POST /v1/batches"] == 4
    assert [r["custom_id"] for r in read_jsonl(out)] == [r["custom_id"] for r in rows]
    assert all(r["status"] == "ok" for r in read_jsonl(out))


def test_a_run_that_cannot_be_collected_does_not_block_the_others(tmp_path, kluster_env):
    """One pending run whose state is broken (a batch the service does not know): the
    collector still finishes the other, keeps the broken one pending, and fails naming it."""
    from prefect_kluster.flows.pending import CollectError
    from prefect_kluster.tasks.pending import pending_name, register_pending

    rows = {tag: requests(6, prefix=f"{tag}-") for tag in ("good", "bad")}
    runs = {
        tag: batch_inference(
            input_path=str(write_jsonl(tmp_path / f"{tag}.jsonl", rows[tag])),
            output_path=str(tmp_path / f"{tag}-out.jsonl"),
            run={"wait": False},
        )
        for tag in rows
    }
    assert {r.status for r in runs.values()} == {"pending"}
    bad = read_pending(runs["bad"].work_dir)
    register_pending(runs["bad"].work_dir, bad["parameters"], ["batch_unknown_to_the_service"])
    bad_name = pending_name(runs["bad"].work_dir)

    deadline = time.monotonic() + 120
    while not (tmp_path / "good-out.jsonl").exists():
        assert time.monotonic() < deadline, "the good run was never collected"
        with pytest.raises(CollectError) as raised:
            collect_batches()
        assert bad_name in str(raised.value) and "1 of 2" in str(raised.value)
        time.sleep(0.5)
    assert [r["custom_id"] for r in read_jsonl(tmp_path / "good-out.jsonl")] == [
        r["custom_id"] for r in rows["good"]
    ]
    assert set(list_pending()) == {bad_name}, "the broken run stays pending, the good one is done"
    assert not (tmp_path / "bad-out.jsonl").exists()


def test_a_run_that_never_went_pending_asks_the_server_nothing_when_it_ends(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_kluster.tasks.pending import pending_name, register_pending, unregister_pending

    work = str(tmp_path / "out.jsonl.work")
    # No server at this address: any call to it would fail the finished run.
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        unregister_pending(work)
    register_pending(work, {"input_path": "in.jsonl"}, ["batch_1"])
    assert pending_name(work) in list_pending()
    unregister_pending(work)
    assert pending_name(work) not in list_pending() and read_pending(work) is None
    unregister_pending(work)  # twice: nothing left, nothing asked
