"""Never pay twice, never lose a line: resume, rounds, faults, cancellation, timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from prefect_kluster.flows import BatchRunError, batch_inference
from prefect_kluster.flows.batch_inference import cancel_remote_batches_hook
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.submit import SHA_KEY
from tests.conftest import TEST_API_KEY
from tests.helpers import grouped, read_jsonl, request, requests, write_jsonl
from tests.server import recorded_task_runs

ROOT = Path(__file__).resolve().parents[1]


def run_flow(
    tmp_path: Path, rows: list[dict], name: str = "o.jsonl", return_state: bool = False, **kwargs
):
    src = tmp_path / "in.jsonl"
    if not src.exists():
        write_jsonl(src, rows)
    kwargs.setdefault("poll_interval", 0.05)
    return batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / name),
        return_state=return_state,
        **grouped(**kwargs),
    )


def task_run_names(state) -> list[str]:
    """The names of a finished flow run's task runs (without their run suffix)."""
    runs = recorded_task_runs(state.state_details.flow_run_id, "join-round")
    return sorted(r.name.rsplit("-", 1)[0] for r in runs)


def shard_batches(emulator) -> list[dict]:
    client = openai.OpenAI(api_key=TEST_API_KEY, base_url=emulator.base_url)
    return [b for b in client.batches.list(limit=100) if (b.metadata or {}).get(SHA_KEY)]


def live_input_files(emulator) -> list[str]:
    client = openai.OpenAI(api_key=TEST_API_KEY, base_url=emulator.base_url)
    return [f.id for f in client.files.list() if f.filename.startswith("shard-")]


def assert_complete(path: Path, rows: list[dict]) -> None:
    joined = read_jsonl(path)
    assert [r["custom_id"] for r in joined] == [r["custom_id"] for r in rows]
    for row, source in zip(joined, rows, strict=True):
        assert row["status"] == "ok", row
        assert source["body"]["messages"][-1]["content"][:40] in row["content"]


def test_transient_line_failures_go_round_again(tmp_path, kluster_env):
    kluster_env.configure(fail_rate=0.3, fail_once=True, fault_seed=5)
    rows = requests(40)
    result = run_flow(tmp_path, rows)
    assert result.status == "completed" and result.rounds == 2
    first, second = (
        [s for s in result.shards if s.round == 1],
        [s for s in result.shards if s.round == 2],
    )
    failed_first = first[0].batch.request_counts.failed
    assert 0 < failed_first < 40
    assert second[0].shard.lines == failed_first
    assert_complete(tmp_path / "o.jsonl", rows)


def test_permanent_errors_are_reported_not_retried(tmp_path, kluster_env):
    rows = requests(3) + [request("bad-model", model="no/such-model")]
    result = run_flow(tmp_path, rows)
    assert result.rounds == 1 and len(result.batch_ids) == 1
    bad = read_jsonl(tmp_path / "o.jsonl")[-1]
    assert bad["status"] == "error" and bad["error"]["status_code"] == 400
    assert result.summary.failed == 1 and result.summary.retryable == 0


def test_rounds_stop_at_max_attempts(tmp_path, kluster_env):
    kluster_env.configure(fail_custom_ids=["req-2"])
    rows = requests(5)
    result = run_flow(tmp_path, rows, max_attempts=3)
    assert result.rounds == 3 and len(result.batch_ids) == 3
    joined = {r["custom_id"]: r for r in read_jsonl(tmp_path / "o.jsonl")}
    assert len(joined) == 5
    assert joined["req-2"]["status"] == "error" and joined["req-2"]["error"]["status_code"] in (
        429,
        500,
    )
    assert all(joined[f"req-{i}"]["status"] == "ok" for i in (0, 1, 3, 4))


def test_rerun_reuses_batches_even_without_the_local_journal(tmp_path, kluster_env):
    rows = requests(12)
    first = run_flow(tmp_path, rows, max_requests_per_file=5)
    stats = kluster_env.stats()
    uploads = stats["requests"]["POST /v1/files"]
    again = run_flow(tmp_path, rows, max_requests_per_file=5, overwrite=True)
    assert again.batch_ids == first.batch_ids
    import shutil

    shutil.rmtree(tmp_path / "o.jsonl.work")  # another machine: only the service remembers
    third = run_flow(tmp_path, rows, max_requests_per_file=5, overwrite=True)
    assert third.batch_ids == first.batch_ids
    after = kluster_env.stats()
    assert after["requests"]["POST /v1/files"] == uploads
    assert after["requests"]["POST /v1/batches"] == 3
    assert_complete(tmp_path / "o.jsonl", rows)
    forced = run_flow(tmp_path, rows, max_requests_per_file=5, overwrite=True, resubmit=True)
    assert set(forced.batch_ids).isdisjoint(first.batch_ids)


def test_faults_on_every_endpoint_give_the_clean_output(tmp_path, kluster_env):
    rows = requests(60)
    clean_dir, faulty_dir = tmp_path / "clean", tmp_path / "faulty"
    clean_dir.mkdir(), faulty_dir.mkdir()
    kluster_env.configure(lines_per_second=100)
    run_flow(clean_dir, rows, max_requests_per_file=20)
    kluster_env.reset()
    kluster_env.configure(fault_rate=0.2, drop_rate=0.05, latency=0.05, fault_seed=7)
    run_flow(faulty_dir, rows, max_requests_per_file=20)
    assert (faulty_dir / "o.jsonl").read_bytes() == (clean_dir / "o.jsonl").read_bytes()
    stats = kluster_env.stats()
    faults = stats["faults_injected"]
    print(f"\nfault run: injected {faults}, requests {stats['requests']}")
    assert faults["429"] > 0 and faults["500"] > 0 and faults["dropped"] > 0
    kluster_env.configure(fault_rate=0.0, drop_rate=0.0)
    assert len(shard_batches(kluster_env)) == 3


def test_lost_responses_after_paid_calls_make_no_duplicates(tmp_path, kluster_env):
    rows = requests(40)
    # Every upload and every batch create is carried out, and then its answer is lost.
    kluster_env.configure(
        fault_rate=1.0, fault_after_create=True, fault_routes=["POST /v1/files", "POST /v1/batches"]
    )
    run_flow(tmp_path, rows, max_requests_per_file=10)
    stats = kluster_env.stats()
    print(f"\nlost-response run: injected {stats['faults_injected']}, requests {stats['requests']}")
    lost = stats["faults_injected"]["429"] + stats["faults_injected"]["500"]
    assert lost == stats["requests"]["POST /v1/batches"] + stats["requests"]["POST /v1/files"] >= 8
    assert len(shard_batches(kluster_env)) == 4, "one batch per shard despite lost answers"
    assert len(live_input_files(kluster_env)) == 4, "duplicate uploads are cleaned up"
    assert_complete(tmp_path / "o.jsonl", rows)


def test_uploads_answered_at_once_are_not_looked_for_again(tmp_path, kluster_env):
    """The clean-up lists the service's files only when an upload's answer was in doubt: a
    run whose every upload was answered at once makes no files list call (one a shard
    before, each walking every page of the account's files)."""
    rows = requests(30)
    clean = run_flow(tmp_path, rows, max_requests_per_file=10, return_state=True)
    stats = kluster_env.stats()["requests"]
    assert stats["POST /v1/files"] == 3 and stats["POST /v1/batches"] == 3
    assert stats.get("GET /v1/files", 0) == 0
    # Nothing to look for: not even a task run that finds nothing.
    assert "clean-up-uploads" not in task_run_names(clean)
    assert len(live_input_files(kluster_env)) == 3
    assert_complete(tmp_path / "o.jsonl", rows)
    # A shard whose upload was found by a search (its answer lost) is looked for again.
    kluster_env.reset()
    kluster_env.configure(fault_rate=1.0, fault_after_create=True, fault_routes=["POST /v1/files"])
    lost = tmp_path / "lost"
    lost.mkdir()
    in_doubt = run_flow(lost, rows[:10], return_state=True)
    kluster_env.configure(fault_rate=0.0)
    assert task_run_names(in_doubt).count("clean-up-uploads") == 1
    listed = kluster_env.stats()["requests"]["GET /v1/files"]
    assert listed >= 2, "one search for the lost answer, one for the clean-up"
    assert len(live_input_files(kluster_env)) == 1, "the duplicate uploads are deleted"
    assert_complete(lost / "o.jsonl", rows[:10])


def test_timeout_cancels_the_remote_batches(tmp_path, kluster_env):
    kluster_env.configure(lines_per_second=10)
    with pytest.raises(BatchRunError, match="timed out .* cancelled 1 running"):
        run_flow(tmp_path, requests(100), timeout=1.0)
    client = openai.OpenAI(api_key=TEST_API_KEY, base_url=kluster_env.base_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses = {b.status for b in client.batches.list()}
        if statuses == {"cancelled"}:
            break
        time.sleep(0.05)
    assert statuses == {"cancelled"}


def test_cancellation_hook_cancels_running_batches(tmp_path, kluster_env):
    kluster_env.configure(lines_per_second=5)
    client = openai.OpenAI(api_key=TEST_API_KEY, base_url=kluster_env.base_url)
    path = write_jsonl(tmp_path / "r.jsonl", requests(50))
    running = client.batches.create(
        input_file_id=client.files.create(file=open(path, "rb"), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    journal = Journal(str(tmp_path / "out.jsonl.work" / "state"))
    journal.record("submitted", "k1", batch_id=running.id)
    flow_run = SimpleNamespace(parameters={"output_path": str(tmp_path / "out.jsonl")})
    cancel_remote_batches_hook(None, flow_run, None)
    assert client.batches.retrieve(running.id).status in ("cancelling", "cancelled")


# --- kill and rerun ---------------------------------------------------------------------

KILL_POINTS = ["after-upload", "after-submit", "mid-wait", "mid-download"]
KILL_POINT_TIMEOUT = 240  # seconds for the flow process to start and reach the point


def _flow_args(src: Path, out: Path) -> list[str]:
    options = ["--output", str(out), "--poll-interval", "0.1", "--max-requests-per-file", "150"]
    return [str(src), *options]


def _flow_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "flows.batch_inference", *_flow_args(src, out)]


def _env(emulator) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env.update(
        KLUSTER_API_KEY=TEST_API_KEY,
        KLUSTER_BASE_URL=emulator.base_url,
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PYTHONUNBUFFERED="1",
    )
    return env


def _reached(point: str, work: Path, emulator) -> bool:
    journal = Journal(str(work / "state"))
    if point == "after-upload":
        return any(e["event"] == "uploaded" for e in journal.events())
    if point == "after-submit":
        return any(e["event"] == "submitted" for e in journal.events())
    if point == "mid-wait":
        return any(
            b["status"] == "in_progress" and b["completed"] > 0 for b in emulator.stats()["batches"]
        )
    return any(work.rglob("*.output.jsonl.*.tmp"))  # a download under its temporary name


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_and_rerun_pays_once_and_loses_nothing(tmp_path, kluster_env, point, capsys):
    rows = requests(300)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    work = tmp_path / "out.jsonl.work"
    # Slow enough that the point lasts seconds, so a busy machine still sees it; the kill
    # comes as soon as it is seen, so a wider window costs no time.
    if point == "mid-wait":
        kluster_env.configure(lines_per_second=30)
    if point == "mid-download":
        kluster_env.configure(download_chunk_delay=1.0)
    proc = subprocess.Popen(
        _flow_cmd(src, out),
        cwd=ROOT,
        env=_env(kluster_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + KILL_POINT_TIMEOUT
        while not _reached(point, work, kluster_env):
            assert proc.poll() is None, (
                f"flow ended before {point}: {proc.stdout.read().decode()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"never reached {point}"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "no half-written output"
    kluster_env.configure(lines_per_second=None, download_chunk_delay=0.0)
    # The same command again, in this process (a new interpreter would import Prefect
    # again, about 5 s): its main(), the session's server, the same emulator and key.
    from prefect_kluster.cli import main

    rerun = main(_flow_args(src, out))
    printed = capsys.readouterr()
    assert rerun == 0, printed.err[-3000:]
    assert f"Results: {out}" in printed.out
    batches = shard_batches(kluster_env)
    per_shard = {}
    for batch in batches:
        per_shard.setdefault(batch.metadata[SHA_KEY], []).append(batch.id)
    print(f"\nkill {point}: batches per shard {[len(v) for v in per_shard.values()]}")
    assert len(per_shard) == 2 and all(len(ids) == 1 for ids in per_shard.values())
    assert len(live_input_files(kluster_env)) == 2
    assert_complete(out, rows)
