"""One status call per poll cycle for a whole run, counted by the emulator per endpoint."""

from __future__ import annotations

import time

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
