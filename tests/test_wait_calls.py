"""One status call per poll cycle for a whole run, counted by the emulator per endpoint."""

from __future__ import annotations

import importlib
import time
from itertools import pairwise

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
