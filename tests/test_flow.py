"""The batch inference flow end to end against the emulator over real HTTP."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from prefect_kluster.blocks import KlusterCredentials, MissingCredentialsError
from prefect_kluster.flows import (
    BatchRunError,
    batch_inference,
    cancel_batch_flow,
    collect_batches,
    list_batches_flow,
    list_models_flow,
)
from prefect_kluster.tasks import RequestFileError
from tests.conftest import TEST_API_KEY
from tests.helpers import (
    MODEL,
    read_jsonl,
    record_prefect_requests,
    request,
    requests,
    write_jsonl,
)
from tests.server import copy_of, recorded_task_runs, wait_for

ROOT = Path(__file__).resolve().parents[1]


def test_completed_run_joins_results_by_custom_id(tmp_path, kluster_env):
    rows = requests(7)
    rows[3] = request(
        "req-3", "Tell me about the moon", "deepseek-ai/DeepSeek-R1", max_completion_tokens=50
    )
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = batch_inference(
        input_path=str(src), output_path=str(tmp_path / "out.jsonl"), run={"poll_interval": 0.05}
    )
    assert result.status == "completed"
    assert len(result.batch_ids) == 1 and result.batch_id.startswith("batch")
    assert result.request_counts.total == 7 and result.request_counts.completed == 7
    joined = read_jsonl(result.output_path)
    assert [r["custom_id"] for r in joined] == [r["custom_id"] for r in rows]
    moon = joined[3]
    assert moon["status"] == "ok" and moon["model"] == "deepseek-ai/DeepSeek-R1"
    assert "Tell me about the moon" in moon["content"] and "emulator" in moon["content"]
    assert result.usage.prompt_tokens == sum(r["usage"]["prompt_tokens"] for r in joined) > 0
    assert result.usage.completion_tokens > 0
    assert result.output_files and Path(result.output_files[0]).exists()
    assert result.error_files == []


def test_multi_shard_run_with_concurrency_cap(tmp_path, kluster_env):
    rows = requests(23)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "out.jsonl"),
        limits={"max_requests_per_file": 5, "max_concurrency": 2},
        run={"poll_interval": 0.05},
    )
    assert len(result.batch_ids) == 5 == len(set(result.batch_ids))
    assert [s.shard.lines for s in result.shards] == [5, 5, 5, 5, 3]
    assert [r["custom_id"] for r in read_jsonl(result.output_path)] == [
        r["custom_id"] for r in rows
    ]
    assert [s.requests for s in result.summary.shards] == [5, 5, 5, 5, 3]
    stats = kluster_env.stats()
    assert len(stats["batches"]) == 5
    metas = {b["id"] for b in stats["batches"]}
    assert metas == set(result.batch_ids)


def test_shards_send_the_prefect_server_no_task_run_reads_and_claim_first(
    tmp_path, kluster_env, monkeypatch
):
    """Each shard's steps get the step before's result, not its future (Prefect reads an
    unfinished future's task run from the server for every task it is passed to), and the
    run's opening artifacts go to the server after the first shard's claim, not beside it."""
    sent = record_prefect_requests(monkeypatch)
    rows = requests(12)
    result = batch_inference(
        input_path=str(write_jsonl(tmp_path / "in.jsonl", rows)),
        output_path=str(tmp_path / "out.jsonl"),
        limits={"max_requests_per_file": 4},
        run={"poll_interval": 0.05},
    )
    assert result.status == "completed" and len(result.batch_ids) == 3
    assert [r["custom_id"] for r in read_jsonl(result.output_path)] == [
        r["custom_id"] for r in rows
    ]
    assert [p for m, p in sent if m == "GET" and "/task_runs/" in p] == []
    claims = [i for i, (m, p) in enumerate(sent) if m == "POST" and p.endswith("/variables/")]
    artifacts = [i for i, (m, p) in enumerate(sent) if m == "POST" and p.endswith("/artifacts/")]
    assert len(claims) == 3 and len(artifacts) >= 3  # estimate, progress, summary (+ table)
    assert claims[0] < artifacts[0]


def test_the_file_is_checked_while_the_price_list_is_read(tmp_path, kluster_env, monkeypatch):
    """The service's price list (and the client's TLS context) is not on the run's path:
    with the model listing answering 1.6 s late, the file is read before it has come."""
    from prefect_kluster.tasks import build, cost

    # only the models call is delayed: by 1.64 or 1.92 s, seed 27's draws for the run's
    # first two calls (models and batches, whichever comes first)
    kluster_env.configure(latency=2.0, fault_routes=["GET /v1/models"], fault_seed=27)
    marks: dict[str, float] = {}
    fetch, tally = cost.fetch_prices, build.shard_and_tally

    def fetch_prices(client):
        try:
            return fetch(client)
        finally:
            marks["prices came"] = time.monotonic()

    def shard_and_tally(*args, **kwargs):
        marks.setdefault("file read from", time.monotonic())
        return tally(*args, **kwargs)

    monkeypatch.setattr(cost, "fetch_prices", fetch_prices)
    monkeypatch.setattr(build, "shard_and_tally", shard_and_tally)
    result = batch_inference(
        input_path=str(write_jsonl(tmp_path / "in.jsonl", requests(3))),
        output_path=str(tmp_path / "out.jsonl"),
        run={"poll_interval": 0.05},
    )
    assert result.status == "completed" and result.summary.succeeded == 3
    assert result.estimate is not None and result.estimate.prices_from_service
    assert marks["file read from"] < marks["prices came"] - 1.0


def test_a_shard_uploaded_as_the_run_ends_is_not_submitted(tmp_path, kluster_env, monkeypatch):
    """Another shard failed, or the run was cancelled, while this one uploaded: it pays
    for no batch, and the claim its upload took is given back."""
    from prefect import task

    from prefect_kluster.flows import shards as shard_steps
    from prefect_kluster.tasks import claims
    from prefect_kluster.tasks.journal import Journal
    from prefect_kluster.tasks.wait import BatchWaitAborted, stop_waiting

    upload = shard_steps.upload_shard

    @task(name="upload-shard")
    def upload_as_the_run_ends(*args, **kwargs):
        uploaded = upload.fn(*args, **kwargs)
        stop_waiting()  # what the run does when it starts to end
        return uploaded

    monkeypatch.setattr(shard_steps, "upload_shard", upload_as_the_run_ends)
    with pytest.raises(BatchWaitAborted, match="shard 0 not submitted"):
        batch_inference(
            input_path=str(write_jsonl(tmp_path / "in.jsonl", requests(6))),
            output_path=str(tmp_path / "out.jsonl"),
            limits={"max_requests_per_file": 3, "max_concurrency": 1},
            run={"poll_interval": 0.05},
        )
    stats = kluster_env.stats()
    assert stats["files"] == 1 and stats["batches"] == []
    # shard 0's claim, found by the key its upload recorded (the session's Prefect server
    # holds other tests' claims too)
    keys = {e["key"] for e in Journal(str(tmp_path / "out.jsonl.work" / "state")).events()}
    assert len(keys) == 1
    assert claims._claims(keys.pop()) == []


def test_prompts_with_a_model(tmp_path, kluster_env):
    result = batch_inference(
        output_path=str(tmp_path / "o.jsonl"),
        requests={
            "prompts": ["What is 2+2?", "Name a colour."],
            "model": MODEL,
            "system_prompt": "Be brief.",
            "completion_params": {"max_completion_tokens": 3},
        },
        run={"poll_interval": 0.05},
    )
    joined = read_jsonl(result.output_path)
    assert [r["custom_id"] for r in joined] == ["request-1", "request-2"]
    assert all(r["finish_reason"] == "length" for r in joined)


def test_malformed_file_is_refused_before_any_upload(tmp_path, kluster_env):
    src = write_jsonl(
        tmp_path / "in.jsonl", requests(3) + [b'{"custom_id": "x", "method": "POST"}']
    )
    with pytest.raises(RequestFileError, match=r"line 4: .*`url`"):
        batch_inference(input_path=str(src), output_path=str(tmp_path / "o.jsonl"))
    assert kluster_env.stats()["requests"].get("POST /v1/files", 0) == 0
    assert not (tmp_path / "o.jsonl").exists()


def test_a_model_the_service_does_not_offer_is_refused_before_any_upload(tmp_path, kluster_env):
    """check_models: the file is checked while the model list comes (beside it); a line
    naming a model the service does not list is then refused by number, nothing uploaded and
    no shard left, and a file of offered models runs through."""
    rows = requests(3) + [request("other", model="no/such-model")] + requests(2, prefix="b-")
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(RequestFileError, match=r"line 4: unknown model 'no/such-model'"):
        batch_inference(
            input_path=str(src), output_path=str(tmp_path / "o.jsonl"), run={"check_models": True}
        )
    calls = kluster_env.stats()["requests"]
    assert calls.get("GET /v1/models", 0) >= 1 and calls.get("POST /v1/files", 0) == 0
    assert not list((tmp_path / "o.jsonl.work").rglob("*.jsonl"))
    assert not list(tmp_path.glob("kluster-model-check-*"))

    src = write_jsonl(tmp_path / "good.jsonl", requests(4))
    state = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "good-out.jsonl"),
        run={"check_models": True, "poll_interval": 0.05},
        return_state=True,
    )
    assert state.result().summary.succeeded == 4
    names = [r.name for r in recorded_task_runs(state.state_details.flow_run_id, "join-round")]
    assert any(name.startswith("list-models") for name in names), names


def test_existing_output_is_refused_before_any_upload(tmp_path, kluster_env):
    out = tmp_path / "o.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="overwrite"):
        batch_inference(
            input_path=str(write_jsonl(tmp_path / "in.jsonl", requests(2))), output_path=str(out)
        )
    assert out.read_text() == "keep me\n"
    assert kluster_env.stats()["requests"].get("POST /v1/files", 0) == 0


def test_expired_run_fails_clearly_and_keeps_partial_output(tmp_path, kluster_env):
    kluster_env.configure(lines_per_second=20, time_scale=86400 * 2)
    rows = requests(60)
    with pytest.raises(BatchRunError, match="expired") as err:
        batch_inference(
            input_path=str(write_jsonl(tmp_path / "in.jsonl", rows)),
            output_path=str(tmp_path / "o.jsonl"),
            run={"poll_interval": 0.05, "max_attempts": 1},
        )
    result = err.value.result
    assert result.status == "expired"
    joined = read_jsonl(tmp_path / "o.jsonl")
    assert [r["custom_id"] for r in joined] == [r["custom_id"] for r in rows]
    ok = sum(r["status"] == "ok" for r in joined)
    assert 0 < ok < 60
    assert {r["error"]["code"] for r in joined if r["status"] == "error"} == {"batch_expired"}


def test_cancelled_run_fails_clearly_and_keeps_partial_output(tmp_path, kluster_env):
    kluster_env.configure(lines_per_second=50)
    rows = requests(300)
    box: dict = {}

    def run():
        try:
            batch_inference(
                input_path=str(write_jsonl(tmp_path / "in.jsonl", rows)),
                output_path=str(tmp_path / "o.jsonl"),
                run={"poll_interval": 0.05, "max_attempts": 1},
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    client = openai.OpenAI(api_key=TEST_API_KEY, base_url=kluster_env.base_url)
    deadline = time.monotonic() + 120  # generous: a busy machine is slow to start the run
    while time.monotonic() < deadline:
        running = [
            b
            for b in client.batches.list()
            if b.status == "in_progress" and b.request_counts.completed > 0
        ]
        if running:
            client.batches.cancel(running[0].id)
            break
        time.sleep(0.02)
    thread.join(240)
    assert isinstance(box.get("error"), BatchRunError), box
    assert box["error"].result.status == "cancelled"
    joined = read_jsonl(tmp_path / "o.jsonl")
    assert len(joined) == 300
    assert 0 < sum(r["status"] == "ok" for r in joined) < 300


def test_failed_run_fails_with_the_service_errors(tmp_path, kluster_env):
    kluster_env.configure(fail_batches=True)
    with pytest.raises(BatchRunError, match="failed") as err:
        batch_inference(
            input_path=str(write_jsonl(tmp_path / "in.jsonl", requests(3))),
            output_path=str(tmp_path / "o.jsonl"),
            run={"poll_interval": 0.05, "max_attempts": 2},
        )
    assert err.value.result.status == "failed"
    assert err.value.result.rounds == 2 and len(err.value.result.batch_ids) == 2
    assert all(r["error"]["code"] == "not_processed" for r in read_jsonl(tmp_path / "o.jsonl"))


def test_saved_credentials_block_is_used_by_name(tmp_path, emulator, monkeypatch):
    monkeypatch.delenv("KLUSTER_API_KEY", raising=False)
    KlusterCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url).save(
        "test-kluster", overwrite=True
    )
    loaded = KlusterCredentials.load("test-kluster")
    assert loaded.api_key.get_secret_value() == TEST_API_KEY
    models = list_models_flow(credentials_block="test-kluster")
    assert len(models) == 6
    result = batch_inference(
        output_path=str(tmp_path / "o.jsonl"),
        credentials_block="test-kluster",
        requests={"requests": requests(2)},
        run={"poll_interval": 0.05},
    )
    assert result.summary.succeeded == 2


def test_missing_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KLUSTER_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingCredentialsError, match="KLUSTER_API_KEY"):
        list_models_flow()


def test_ui_flows_list_and_cancel(tmp_path, kluster_env):
    kluster_env.configure(lines_per_second=5)
    client = openai.OpenAI(api_key=TEST_API_KEY, base_url=kluster_env.base_url)
    with open(write_jsonl(tmp_path / "r.jsonl", requests(50)), "rb") as handle:
        file_id = client.files.create(file=handle, purpose="batch").id
    batch_id = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    listed = list_batches_flow(limit=5)
    assert [b.id for b in listed] == [batch_id]
    cancelled = cancel_batch_flow(batch_id)
    assert cancelled.status in ("cancelling", "cancelled")


def test_key_never_in_logs_or_result(tmp_path, kluster_env, caplog):
    caplog.set_level(logging.DEBUG)
    result = batch_inference(
        output_path=str(tmp_path / "o.jsonl"),
        requests={"requests": requests(2)},
        run={"poll_interval": 0.05},
    )
    assert TEST_API_KEY not in result.model_dump_json()
    assert TEST_API_KEY not in caplog.text
    assert caplog.records, "logs were captured"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.batch_inference", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        env=env,
    )


def test_cli_help_and_demo_run(tmp_path, prefect_db_template, capsys, monkeypatch):
    from prefect_kluster.cli import main

    for name in ("KLUSTER_BASE_URL", "KLUSTER_API_KEY"):  # --emulator sets them: restored after
        monkeypatch.delenv(name, raising=False)

    # --help and the refusal below run in this process: each `python -m` imports Prefect
    # (about 5 s); the demo run is the real command.
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0 and "--emulator" in capsys.readouterr().out
    out = tmp_path / "demo.jsonl"
    demo = ("deployments/sample-requests.jsonl", "--emulator", "--output", str(out))
    # The CLI still starts its own temporary Prefect server; its database is a copy of the
    # session's migrated one (not ~/.prefect/prefect.db, which a fresh machine would migrate).
    db = copy_of(prefect_db_template, tmp_path / "cli-prefect.db")
    run = _cli(*demo, env={**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": db})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Results: {out}" in run.stdout
    assert ", cost $0." in run.stdout  # the closing summary gives what the run cost
    # `-m flows.batch_inference` must not find the module imported already by `flows`.
    assert "RuntimeWarning" not in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(read_jsonl(out)) == len(read_jsonl(ROOT / "deployments/sample-requests.jsonl"))
    assert main(list(demo)) == 1  # the output exists: refused before any run
    refused = capsys.readouterr()
    assert "already exists" in refused.err
    assert "Using the embedded" not in refused.out  # nor was the emulator started
    json.loads(out.read_text().splitlines()[0])


def test_run_leaves_artifacts_and_events(tmp_path, kluster_env):
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.settings import PREFECT_API_URL

    from prefect_kluster.flows.batch_inference import batch_inference as flow_fn

    state = flow_fn(
        output_path=str(tmp_path / "o.jsonl"),
        requests={"requests": requests(4)},
        run={"poll_interval": 0.05},
        limits={"max_requests_per_file": 2},
        return_state=True,
    )
    result = state.result()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [run_id]}), limit=50
        )
        by_type = {(a.type, a.key) for a in artifacts}
        assert ("markdown", "kluster-batch-summary") in by_type
        assert ("table", "kluster-batch-summary-shards") in by_type
        progress = [a for a in artifacts if a.type == "progress"]
        assert progress and progress[0].data == 100.0
        summary = next(a for a in artifacts if a.key == "kluster-batch-summary")
        assert str(tmp_path / "o.jsonl") in summary.data and "completed" in summary.data
    wanted = {
        (name, f"kluster.batch.{batch_id}")
        for batch_id in result.batch_ids
        for name in ("kluster.batch.submitted", "kluster.batch.completed")
    }

    def all_events_arrived():
        # Events reach the server asynchronously: poll, bounded, until every one is there.
        with httpx.Client(base_url=PREFECT_API_URL.value()) as http:
            found = http.post(
                "/events/filter",
                json={
                    "filter": {
                        "resource": {"id": [f"kluster.batch.{b}" for b in result.batch_ids]}
                    },
                    "limit": 50,
                },
            ).json()["events"]
        seen = {(e["event"], e["resource"]["prefect.resource.id"]) for e in found}
        return found if wanted <= seen else None

    events = wait_for(all_events_arrived, 30, "the run's kluster.batch events")
    completed = next(
        e
        for e in events
        if e["event"] == "kluster.batch.completed"
        and e["resource"]["prefect.resource.name"] in result.batch_ids
    )
    assert completed["payload"]["request_counts"]["total"] == 2


def test_prompts_file_with_a_template_is_streamed_into_requests(tmp_path, kluster_env):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("text,lang\nGood morning,French\nThank you,German\n")
    result = batch_inference(
        output_path=str(tmp_path / "o.jsonl"),
        requests={
            "prompts_path": str(prompts),
            "template": "Translate into {lang}: {text}",
            "model": MODEL,
        },
        run={"poll_interval": 0.05},
    )
    joined = read_jsonl(result.output_path)
    assert [r["custom_id"] for r in joined] == ["request-1", "request-2"]
    assert "Translate into German: Thank you" in joined[1]["content"]


def test_fsspec_url_input(tmp_path, kluster_env):
    import fsspec

    with fsspec.open("memory://kluster-test/in.jsonl", "wb") as handle:
        for row in requests(3):
            handle.write(json.dumps(row).encode() + b"\n")
    result = batch_inference(
        input_path="memory://kluster-test/in.jsonl",
        output_path=str(tmp_path / "o.jsonl"),
        run={"poll_interval": 0.05},
    )
    assert [r["custom_id"] for r in read_jsonl(result.output_path)] == ["req-0", "req-1", "req-2"]


@pytest.mark.parametrize(
    "ui_flow",
    [batch_inference, list_models_flow, list_batches_flow, cancel_batch_flow, collect_batches],
    ids=lambda f: f.name,
)
def test_every_parameter_is_typed_and_described_for_the_ui_form(ui_flow):
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(ui_flow.fn).model_dump()
    for name, prop in schema["properties"].items():
        assert prop.get("description", "").strip(), f"{ui_flow.name}.{name} has no description"
        assert "type" in prop or "anyOf" in prop or "$ref" in prop, f"{ui_flow.name}.{name}"
    assert "api_key" not in schema["properties"], "credentials are never parameters"


class _HeartbeatEngine:
    """What Prefect's flow-run heartbeat context uses of an engine; it counts the beats."""

    heartbeat_seconds = 30

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.beat = threading.Event()
        self.beats = 0
        self.flow_run = SimpleNamespace(state=SimpleNamespace(is_final=lambda: False))
        self.logger = logging.getLogger("tests.heartbeats")

    def _build_heartbeat_event_template(self) -> tuple[dict, list]:
        return {}, []

    def _emit_flow_run_heartbeat(self, resource: dict, related: list) -> None:
        self.beats += 1
        self.beat.set()


def _seconds_to_leave(send_heartbeats) -> tuple[float, int]:
    """How long leaving the heartbeat context takes right after the first beat, and how
    many beats were sent."""
    engine = _HeartbeatEngine()
    context = send_heartbeats(engine)
    context.__enter__()
    try:
        assert engine.beat.wait(30), "no heartbeat was sent"
    finally:
        started = time.monotonic()
        context.__exit__(None, None, None)
    return time.monotonic() - started, engine.beats


def test_a_flow_run_returns_without_waiting_for_its_heartbeat_thread():
    """Prefect's synchronous engine joins its heartbeat thread, which sleeps in one-second
    steps: each flow call returned up to a second after its body. Wrapped (when
    prefect_kluster.flows is imported), the run's heartbeat context is left at once, and the
    beat is still sent."""
    import prefect.flow_engine as flow_engine

    from prefect_kluster.flows import _heartbeats

    assert _heartbeats.install() and _heartbeats.PREFECT_SEND_HEARTBEATS is not None
    assert flow_engine._send_heartbeats is not _heartbeats.PREFECT_SEND_HEARTBEATS
    waited, beats = _seconds_to_leave(_heartbeats.PREFECT_SEND_HEARTBEATS)
    assert waited > 0.5 and beats == 1, "Prefect's own context waits for the thread's sleep"
    left, beats = _seconds_to_leave(flow_engine._send_heartbeats)
    assert left < 0.5 and beats == 1, f"left after {left:.2f} s"
