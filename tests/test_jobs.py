"""KlusterBatchJob / KlusterBatchJobRun (Prefect's JobBlock / JobRun) against the emulator,
over real HTTP through the openai SDK: sync and async forms, every terminal state, the wait's
timeout, the run_kluster_batch_job flow, and Prefect's generic job-runner pattern."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import TEST_API_KEY
from helpers import read_jsonl, requests, write_jsonl
from prefect import flow
from prefect.blocks.abstract import JobBlock
from prefect.client.orchestration import get_client

from prefect_kluster import (
    KlusterBatchJob,
    KlusterBatchJobCancelled,
    KlusterBatchJobExpired,
    KlusterBatchJobFailed,
    KlusterBatchJobIncomplete,
    KlusterBatchJobRun,
    KlusterBatchJobTimedOut,
    KlusterCredentials,
    run_kluster_batch_job,
)

FAST = {"interval_seconds": 0.05, "max_interval_seconds": 0.2}


def _job(tmp_path: Path, credentials: KlusterCredentials, n: int = 5, **options: Any):
    rows = requests(n)
    path = write_jsonl(tmp_path / "requests.jsonl", rows)
    job = KlusterBatchJob(kluster_credentials=credentials, request_file=str(path), **FAST)
    return job.model_copy(update=options), [r["custom_id"] for r in rows]


def _service_batch(emulator, batch_id: str) -> dict:
    return next(b for b in emulator.stats()["batches"] if b["id"] == batch_id)


def test_trigger_wait_fetch(tmp_path, emulator, credentials):
    job, ids = _job(tmp_path, credentials, metadata={"team": "search"})
    run = job.trigger()
    assert isinstance(run, KlusterBatchJobRun) and run.batch_id.startswith("batch")
    created = run.get_batch()
    assert created.metadata == {"team": "search"}
    assert created.completion_window == "24h"

    final = run.wait_for_completion()
    assert final.status == "completed" and final.request_counts.completed == len(ids)

    rows = run.fetch_result()
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)
    assert all(r["response"]["status_code"] == 200 for r in rows)

    out = tmp_path / "results.jsonl"
    assert run.fetch_result(path=str(out)) == str(out)
    assert read_jsonl(out) == rows
    for text in (repr(run), repr(job), str(job)):
        assert TEST_API_KEY not in text


def test_fetch_includes_the_error_file_lines(tmp_path, emulator, credentials):
    emulator.configure(fail_custom_ids=["req-1", "req-3"])
    job, ids = _job(tmp_path, credentials, output_path=str(tmp_path / "out.jsonl"))
    run = job.trigger()
    run.wait_for_completion()
    written = run.fetch_result()  # the job's output_path is the default target
    assert written == str(tmp_path / "out.jsonl")
    rows = read_jsonl(written)
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)
    failed = {r["custom_id"] for r in rows if r["response"]["status_code"] != 200}
    assert failed == {"req-1", "req-3"}


def test_fetch_before_the_end_is_refused(tmp_path, emulator, credentials):
    emulator.configure(lines_per_second=2)
    job, _ = _job(tmp_path, credentials, n=20)
    run = job.trigger()
    with pytest.raises(KlusterBatchJobIncomplete, match="wait_for_completion"):
        run.fetch_result()
    with credentials.get_client() as client:
        client.batches.cancel(run.batch_id)


def test_failed_batch_raises_the_typed_error(tmp_path, emulator, credentials):
    emulator.configure(fail_batches=True)
    job, _ = _job(tmp_path, credentials)
    run = job.trigger()
    with pytest.raises(KlusterBatchJobFailed) as failed:
        run.wait_for_completion()
    assert failed.value.batch.status == "failed"
    assert "fail_batches" in str(failed.value)  # the service's reason is in the message
    assert TEST_API_KEY not in str(failed.value)
    with pytest.raises(KlusterBatchJobFailed):
        run.fetch_result(partial=True)  # a failed batch has nothing to take


def test_wait_times_out_with_the_typed_error_and_the_batch_keeps_running(
    tmp_path, emulator, credentials
):
    emulator.configure(lines_per_second=2)
    job, _ = _job(tmp_path, credentials, n=50, timeout_seconds=0.6)
    run = job.trigger()
    started = time.monotonic()
    with pytest.raises(KlusterBatchJobTimedOut, match="keeps running") as timed_out:
        run.wait_for_completion()
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 5, elapsed
    assert not timed_out.value.batch.is_terminal
    assert _service_batch(emulator, run.batch_id)["status"] == "in_progress"
    with credentials.get_client() as client:
        client.batches.cancel(run.batch_id)


def test_polling_backs_off_while_nothing_changes(tmp_path, emulator, credentials):
    """A batch in validation and in finalizing for 0.8 s each: at a fixed 0.05 s that is over 30
    status calls; backing off by half up to 0.4 s, about a dozen."""
    emulator.configure(stage_delay=0.8)
    job, _ = _job(tmp_path, credentials, max_interval_seconds=0.4)
    run = job.trigger()
    before = _status_calls(emulator)
    run.wait_for_completion()
    calls = _status_calls(emulator) - before
    assert 3 <= calls <= 15, calls


def _status_calls(emulator) -> int:
    requests_by_route = emulator.stats()["requests"]
    return sum(n for route, n in requests_by_route.items() if route.startswith("GET /v1/batches/"))


def test_cancelled_batch_raises_and_partial_fetch_takes_what_ran(tmp_path, emulator, credentials):
    emulator.configure(lines_per_second=10)
    job, ids = _job(tmp_path, credentials, n=40)
    run = job.trigger()
    with credentials.get_client() as client:
        deadline = time.monotonic() + 10
        while run.get_batch().request_counts.completed < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        client.batches.cancel(run.batch_id)
    with pytest.raises(KlusterBatchJobCancelled):
        run.wait_for_completion()
    with pytest.raises(KlusterBatchJobCancelled):
        run.fetch_result()
    rows = run.fetch_result(partial=True)
    done = [r for r in rows if r.get("response", {}).get("status_code") == 200]
    assert 2 <= len(done) < len(ids)
    assert {r["custom_id"] for r in rows} <= set(ids)


def test_expired_batch_raises_the_typed_error(tmp_path, emulator, credentials):
    # One emulated hour passes in 0.25 s; at 4 lines a second most lines never run.
    emulator.configure(time_scale=14_400, lines_per_second=4)
    job, ids = _job(tmp_path, credentials, n=20, completion_window="1h")
    run = job.trigger()
    with pytest.raises(KlusterBatchJobExpired) as expired:
        run.wait_for_completion()
    assert expired.value.batch.status == "expired"
    rows = run.fetch_result(partial=True)
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)
    assert any(r.get("error", {}) and r["error"].get("code") == "batch_expired" for r in rows)


def test_async_forms(tmp_path, emulator, credentials):
    job, ids = _job(tmp_path, credentials)

    async def main() -> tuple[str, list[dict]]:
        run = await job.trigger()
        final = await run.wait_for_completion()
        return final.status, await run.fetch_result()

    status, rows = asyncio.run(main())
    assert status == "completed"
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)


def test_run_kluster_batch_job_flow(tmp_path, emulator, credentials):
    job, ids = _job(tmp_path, credentials)
    state = run_kluster_batch_job(job, return_state=True)
    rows = state.result()
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)
    flow_run_id = state.state_details.flow_run_id
    from tests.server import recorded_task_runs

    task_runs = recorded_task_runs(flow_run_id, "fetch-kluster-batch-job-result")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    # One task run per step, however many polls the wait took.
    assert sorted(t.name.rsplit("-", 1)[0] for t in task_runs) == [
        "fetch-kluster-batch-job-result",
        "trigger-kluster-batch-job",
        "wait-for-kluster-batch-job",
    ]
    assert all(t.state.is_completed() for t in task_runs)
    assert TEST_API_KEY not in repr(flow_run.parameters)
    assert flow_run.parameters["job"]["request_file"] == job.request_file


def test_run_kluster_batch_job_flow_fails_with_the_typed_error(tmp_path, emulator, credentials):
    emulator.configure(fail_batches=True)
    job, _ = _job(tmp_path, credentials)
    state = run_kluster_batch_job(job, return_state=True)
    assert state.is_failed()
    with pytest.raises(KlusterBatchJobFailed):
        state.result()


@flow
def run_any_job(job: JobBlock) -> Any:
    """Prefect's generic pattern: any JobBlock, the same three calls."""
    job_run = job.trigger()
    job_run.wait_for_completion()
    return job_run.fetch_result()


def test_generic_job_runner_pattern_with_a_saved_block(tmp_path, emulator, credentials):
    job, ids = _job(tmp_path, credentials)
    job.save("kluster-test-job", overwrite=True)
    loaded = KlusterBatchJob.load("kluster-test-job")
    assert loaded.kluster_credentials.api_key.get_secret_value() == TEST_API_KEY
    rows = run_any_job(loaded)
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)


def test_the_paid_create_call_is_made_once(tmp_path, emulator, credentials):
    """A failed create is not retried by the SDK: a lost answer must not bill a second batch."""
    emulator.configure(fault_rate=1.0, fault_routes=["POST /v1/batches"], fault_after_create=True)
    job, _ = _job(tmp_path, credentials)
    with pytest.raises(openai.APIStatusError):
        job.trigger()
    assert emulator.stats()["requests"]["POST /v1/batches"] == 1
    assert len(emulator.stats()["batches"]) == 1  # made once, answer lost: look before rerunning


def test_the_wait_outlives_transient_status_errors(tmp_path, emulator, credentials, caplog):
    emulator.configure(lines_per_second=20)  # about a second: several status checks
    job, ids = _job(tmp_path, credentials.model_copy(update={"max_retries": 0}), n=20)
    run = job.trigger()
    emulator.configure(fault_rate=0.5, fault_routes=["GET /v1/batches/{id}"], fault_seed=3)
    assert run.wait_for_completion().status == "completed"
    assert sum(emulator.stats()["faults_injected"].values()) > 0
    assert "checking again later" in caplog.text
    emulator.configure(fault_rate=0.0)
    assert len(run.fetch_result()) == len(ids)


def test_a_wait_on_an_unknown_batch_fails_at_once(tmp_path, emulator, credentials):
    job, _ = _job(tmp_path, credentials, timeout_seconds=30)
    started = time.monotonic()
    with pytest.raises(openai.NotFoundError):
        KlusterBatchJobRun(job, "batch_does_not_exist").wait_for_completion()
    assert time.monotonic() - started < 5
