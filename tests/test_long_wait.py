"""wait=False: submit, record the pending run on the Prefect server, return; collect later."""

from __future__ import annotations

import time

from prefect.variables import Variable

from flows import batch_inference, collect_batches
from flows.pending import list_pending
from tests.helpers import read_jsonl, requests, write_jsonl


def test_submit_then_collect_gives_the_waiting_output(tmp_path, kluster_env):
    rows = requests(40)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    kluster_env.configure(lines_per_second=4, fail_rate=0.2, fail_once=True, fault_seed=1)
    started = time.monotonic()
    pending = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "later.jsonl"),
        wait=False,
        max_requests_per_file=20,
    )
    assert pending.status == "pending" and len(pending.batch_ids) == 2
    assert time.monotonic() - started < 15, "a run that does not wait returns at once"
    assert not (tmp_path / "later.jsonl").exists()
    records = list_pending()
    assert len(records) == 1
    name, record = next(iter(records.items()))
    assert record["batch_ids"] == pending.batch_ids and "api_key" not in str(record)

    assert collect_batches() == {name: "running"}
    deadline = time.monotonic() + 60
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
        poll_interval=0.05,
        max_requests_per_file=20,
    )
    assert (tmp_path / "waited.jsonl").read_bytes() == (tmp_path / "later.jsonl").read_bytes()
    assert set(pending.batch_ids) <= set(waited.batch_ids)
