"""One status call per poll cycle for a whole run, counted by the emulator per endpoint."""

from __future__ import annotations

import importlib
import time
from itertools import pairwise

import pytest

from prefect_kluster.flows import batch_inference
from tests.helpers import read_jsonl, requests, write_jsonl


def test_a_multi_batch_wait_makes_one_list_call_a_cycle(tmp_path, kluster_env):
    shards, poll = 6, 0.05
    # Two quiet seconds a batch (validating, finalizing): a wait of several cycles.
    kluster_env.configure(stage_delay=1.0, lines_per_second=20)
    rows = requests(60)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    started = time.monotonic()
    result = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "o.jsonl"),
        run={"poll_interval": poll, "max_poll_interval": poll},  # a fixed rate: most calls
        limits={"max_requests_per_file": 10, "max_concurrency": shards},
    )
    waited = time.monotonic() - started
    assert len(result.batch_ids) == shards
    assert [r["custom_id"] for r in read_jsonl(result.output_path)] == [
        r["custom_id"] for r in rows
    ]
    calls = kluster_env.stats()["requests"]
    lists = calls.get("GET /v1/batches", 0)
    retrieves = calls.get("GET /v1/batches/{id}", 0)
    print(f"\n{shards} batches over {waited:.1f} s: {lists} list calls, {retrieves} retrieves")
    # A batch the list did not return is retrieved; here the list returns them all.
    assert retrieves <= shards, retrieves
    # One call a cycle for the run: per-batch polling would make about `shards` times more.
    assert lists <= waited / poll + 10, (lists, waited)
    assert lists + retrieves < shards * (4.0 / poll) / 2, "far fewer than one call a batch"


def test_progress_is_reported_every_few_seconds_however_often_the_run_polls(
    tmp_path, kluster_env, monkeypatch
):
    from prefect_kluster.tasks.wait import REPORT_EVERY

    # the module (the package's `batch_inference` attribute is the flow of that name)
    flow_module = importlib.import_module("prefect_kluster.flows.batch_inference")

    poll = 0.05
    kluster_env.configure(lines_per_second=25)  # 150 lines: counts move for about 6 s
    updates: list[tuple[float, int, int]] = []
    original = flow_module.update_batch_progress

    def counted(progress_id, done, total):
        updates.append((time.monotonic(), done, total))
        return original(progress_id, done, total)

    monkeypatch.setattr(flow_module, "update_batch_progress", counted)
    src = write_jsonl(tmp_path / "in.jsonl", requests(150))
    started = time.monotonic()
    result = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "o.jsonl"),
        run={"poll_interval": poll, "max_poll_interval": poll},
    )
    waited = time.monotonic() - started
    assert result.summary.succeeded == 150
    calls = kluster_env.stats()["requests"]
    polls = calls.get("GET /v1/batches", 0) + calls.get("GET /v1/batches/{id}", 0)
    print(f"\nwaited {waited:.1f} s: {polls} status calls, {len(updates)} progress updates")
    # Counts moved at nearly every poll; the run reported them every REPORT_EVERY seconds,
    # plus once for each new status and once at the end (all done).
    assert polls > 4 * len(updates), (polls, updates)
    assert len(updates) <= waited / REPORT_EVERY + 6, updates
    moving = [(t, done) for t, done, total in updates if 0 < done < total]
    assert len(moving) >= 2, updates  # progress was still shown while the batch ran
    assert all(b[0] - a[0] >= REPORT_EVERY * 0.9 for a, b in pairwise(moving)), moving
    assert updates[-1][1:] == (150, 150)


def test_the_progress_artifact_comes_at_once_and_is_updated_only_when_it_would_change(
    tmp_path, kluster_env, monkeypatch
):
    """Made while the batch still waits to be validated (a queue can hold it for hours),
    saying 0 of the file's requests; polls that would say the same (the service has counted
    nothing yet, or 0 of the same total) send no update."""
    flow_module = importlib.import_module("prefect_kluster.flows.batch_inference")
    kluster_env.configure(stage_delay=1.5, lines_per_second=40)  # polls see `validating`
    made: list[tuple[int, list[str]]] = []
    updates: list[tuple[int, int]] = []
    create, update = flow_module.create_batch_progress, flow_module.update_batch_progress

    def creating(total):
        made.append((total, [b["status"] for b in kluster_env.stats()["batches"]]))
        return create(total)

    def updating(progress_id, done, total):
        updates.append((done, total))
        return update(progress_id, done, total)

    monkeypatch.setattr(flow_module, "create_batch_progress", creating)
    monkeypatch.setattr(flow_module, "update_batch_progress", updating)
    src = write_jsonl(tmp_path / "in.jsonl", requests(80))
    result = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "o.jsonl"),
        run={"poll_interval": 0.05, "max_poll_interval": 0.05},
    )
    assert result.summary.succeeded == 80
    assert made == [(80, ["validating"])]  # at the first poll, not once the batch moved
    assert updates and updates[-1] == (80, 80)
    assert all(total == 80 and done > 0 for done, total in updates), updates
    assert len(set(updates)) == len(updates), updates  # never the same thing twice


def _batch_half_done(client, path, lines: int) -> str:
    """A batch of ``path`` made through the SDK, returned once it has run for a while."""
    with open(path, "rb") as handle:
        file_id = client.files.create(file=handle, purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while True:  # counting (the pace is known from here); about 3 s of lines left
        seen = client.batches.retrieve(batch.id)
        if seen.request_counts is not None and seen.request_counts.completed >= lines // 2:
            return batch.id
        time.sleep(0.05)


@pytest.mark.parametrize("waiter", ["run-watch", "poll-batch", "batch-job"])
def test_a_batch_is_looked_at_when_its_counts_say_it_ends(
    tmp_path, kluster_env, credentials, waiter
):
    """Polled every 2 s, a batch due 3 s after the wait starts is seen ended at once, not at
    the look 4 s in: the second look sees the pace and the third is taken at the foreseen end."""
    from prefect import flow

    from prefect_kluster import KlusterBatchJob, KlusterBatchJobRun
    from prefect_kluster.tasks.wait import poll_batch, wait_for_batch

    poll, lines = 2.0, 120
    kluster_env.configure(lines_per_second=20)  # 3 s for the second half
    src = write_jsonl(tmp_path / "in.jsonl", requests(lines))
    with credentials.get_client() as client:
        batch_id = _batch_half_done(client, src, lines)
    before = kluster_env.stats()["requests"]
    fixed = {"poll_interval": poll, "max_poll_interval": poll}

    returned: list[float] = []

    @flow
    def waiting() -> str:
        status = wait_for_batch(credentials, batch_id, **fixed).status
        returned.append(time.monotonic())  # not counting the flow run's own ending
        return status

    started = time.monotonic()
    if waiter == "run-watch":
        status = waiting()
    elif waiter == "poll-batch":
        status = poll_batch(credentials, batch_id, **fixed).status
    else:
        job = KlusterBatchJob(
            kluster_credentials=credentials,
            request_file=str(src),
            interval_seconds=poll,
            max_interval_seconds=poll,
        )
        status = KlusterBatchJobRun(job, batch_id).wait_for_completion().status
    returned.append(time.monotonic())
    assert status == "completed"
    ended = next(b for b in kluster_env.stats()["batches"] if b["id"] == batch_id)
    lag = returned[0] - ended["finished_mono"]
    after = kluster_env.stats()["requests"]
    looks = sum(
        after.get(k, 0) - before.get(k, 0) for k in ("GET /v1/batches", "GET /v1/batches/{id}")
    )
    ended_in = ended["finished_mono"] - started
    print(f"\nended {ended_in:.2f} s in; seen {lag:.2f} s later; {looks} looks")
    # Every 2 s alone, the end (about 3 s in) is first seen by the look at 4 s: 1 s late.
    assert 2.2 < ended_in < 3.8
    assert lag < 0.7, lag  # (the look a tenth late; the regular one would be 1 s late)
    assert looks <= 6, looks  # at 0, 2, the foreseen end, and a few close to it at most


def test_a_foreseen_end_never_brings_looks_closer_than_a_quarter_poll():
    from prefect_kluster.tasks.types import BatchInfo, RequestCounts
    from prefect_kluster.tasks.wait import FinishEstimate

    def seen(status: str, done: int, total: int = 100) -> BatchInfo:
        return BatchInfo(
            id="b", status=status, request_counts=RequestCounts(total=total, completed=done)
        )

    finish = FinishEstimate()
    regular, poll = 1000.0, 2.0  # looks every 2 s: a foreseen end no sooner than 0.5 s after

    def look(status: str, done: int, at: float, regular: float = regular) -> float:
        return finish.next_look([seen(status, done)], at, regular, at, poll)

    assert look("validating", 0, 0.0) == regular
    assert look("in_progress", 10, 10.0) == regular
    # 10 lines a second since first seen running: 40 left, due 4 s on (a tenth late: 4.4)
    assert look("in_progress", 60, 15.0) == 19.4
    assert look("in_progress", 60, 15.0, regular=17.0) == 17.0
    # the last line stalls: the guess is near, but no look comes before a quarter poll
    assert look("in_progress", 99, 19.0) == 19.5
    assert look("in_progress", 100, 20.0) == regular
    assert look("finalizing", 100, 21.0) == regular
    # running again (a new batch with the same id would start from scratch)
    assert look("in_progress", 0, 30.0) == regular
