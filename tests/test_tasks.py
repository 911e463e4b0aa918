"""Each lifecycle task, driven through the openai SDK over HTTP against the emulator."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prefect import flow

from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.tasks import (
    BatchWaitTimeout,
    build_request_file,
    cancel_batch,
    download_batch_results,
    list_batches,
    list_models,
    submit_batch,
    upload_file,
    wait_for_batch,
)
from prefect_kluster.tasks.retry import is_transient_error
from tests.conftest import TEST_API_KEY
from tests.helpers import read_jsonl, record_prefect_requests, requests, write_jsonl


@flow
def run_task(task, *args, **kwargs):
    """Run one task inside a flow, as users do."""
    return task(*args, **kwargs)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met within timeout")


def test_full_lifecycle_through_tasks(tmp_path, credentials, emulator):
    path = run_task(build_request_file, str(tmp_path / "req.jsonl"), requests=requests(5))
    file_id = run_task(upload_file, credentials, path)
    batch = run_task(submit_batch, credentials, file_id, "24h", {"team": "ml"})
    assert batch.metadata == {"team": "ml"}
    final = run_task(wait_for_batch, credentials, batch.id, poll_interval=0.05, timeout=120)
    assert final.status == "completed"
    assert final.request_counts.total == 5 and final.request_counts.completed == 5
    out, err = run_task(download_batch_results, credentials, final, str(tmp_path / "res"))
    assert err is None
    lines = read_jsonl(out)
    assert sorted(r["custom_id"] for r in lines) == sorted(f"req-{i}" for i in range(5))
    assert all(r["response"]["status_code"] == 200 for r in lines)


def test_list_models_and_batches(credentials, tmp_path):
    models = run_task(list_models, credentials)
    assert "deepseek-ai/DeepSeek-R1" in [m.id for m in models]
    path = write_jsonl(tmp_path / "r.jsonl", requests(1))
    file_id = run_task(upload_file, credentials, str(path))
    ids = [run_task(submit_batch, credentials, file_id).id for _ in range(3)]
    listed = run_task(list_batches, credentials, limit=2)
    assert [b.id for b in listed] == ids[::-1][:2]  # newest first, limited


def test_cancel_batch(credentials, emulator, tmp_path):
    emulator.configure(lines_per_second=20)
    file_id = run_task(
        upload_file, credentials, str(write_jsonl(tmp_path / "r.jsonl", requests(200)))
    )
    batch = run_task(submit_batch, credentials, file_id)
    cancelled = run_task(cancel_batch, credentials, batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    final = run_task(wait_for_batch, credentials, batch.id, poll_interval=0.05, timeout=120)
    assert final.status == "cancelled"
    assert final.request_counts.completed < 200


def test_wait_timeout_names_the_batch(credentials, emulator, tmp_path):
    emulator.configure(lines_per_second=5)
    file_id = run_task(
        upload_file, credentials, str(write_jsonl(tmp_path / "r.jsonl", requests(100)))
    )
    batch = run_task(submit_batch, credentials, file_id)
    with pytest.raises(BatchWaitTimeout, match=batch.id):
        run_task(wait_for_batch, credentials, batch.id, poll_interval=0.05, timeout=0.5)


def test_a_run_that_ends_stops_its_waits_at_once(credentials, emulator, tmp_path):
    """A run that ends early (cancelled, or a shard failed) wakes its task threads still
    waiting on batches: they fail with BatchWaitAborted (not retried), so the run's process
    can exit instead of waiting for batches that run for hours. The batch is left as it is."""
    from prefect.context import FlowRunContext

    from prefect_kluster.tasks.wait import (
        BatchWaitAborted,
        RunWatch,
        run_is_ending,
        stop_waiting,
    )

    emulator.configure(lines_per_second=1e-6)  # held: it would never end during the test
    file_id = run_task(
        upload_file, credentials, str(write_jsonl(tmp_path / "r.jsonl", requests(2)))
    )
    batch = run_task(submit_batch, credentials, file_id)

    @flow
    def ends_while_waiting():
        future = wait_for_batch.submit(credentials, batch.id, poll_interval=0.05)
        run_key = str(FlowRunContext.get().flow_run.id)
        wait_until(
            lambda: any(w.waiting for (k, _), w in RunWatch._watches.items() if k == run_key),
            timeout=60,
        )
        began = time.monotonic()
        assert not run_is_ending()
        stopped = stop_waiting()
        future.wait(30)
        took = time.monotonic() - began
        late = wait_for_batch.submit(credentials, batch.id, poll_interval=0.05)  # after the end
        late.wait(30)
        return stopped, took, future.state, late.state, run_is_ending()

    stopped, took, state, late, ending = ends_while_waiting(return_state=True).result()
    assert stopped == 1 and state.is_failed(), state
    assert took < 10, f"{took:.1f} s to stop waiting"
    with pytest.raises(BatchWaitAborted, match=batch.id):
        state.result()
    assert ending and late.is_failed(), late  # a wait started once the run is ending
    with pytest.raises(BatchWaitAborted, match="not waiting"):
        late.result()
    assert emulator.stats()["batches"][0]["status"] == "in_progress"  # left running


RETRIEVE = "GET /v1/batches/{id}"


def _status_calls_while_waiting(credentials, emulator, tmp_path, max_poll_interval):
    path = write_jsonl(tmp_path / f"r-{max_poll_interval}.jsonl", requests(3))
    batch = run_task(submit_batch, credentials, run_task(upload_file, credentials, str(path)))
    before = _status_calls(emulator)
    final = run_task(
        wait_for_batch,
        credentials,
        batch.id,
        poll_interval=0.05,
        timeout=120,
        max_poll_interval=max_poll_interval,
    )
    assert final.status == "completed" and final.request_counts.completed == 3
    return _status_calls(emulator) - before


def _status_calls(emulator) -> int:
    """Retrieves and lists of batches: a run polls its batches with either."""
    calls = emulator.stats()["requests"]
    return calls.get(RETRIEVE, 0) + calls.get("GET /v1/batches", 0)


def test_polling_backs_off_while_nothing_changes(credentials, emulator, tmp_path):
    # 1 s in "validating" and 1 s in "finalizing" with no change. Polling every 0.05 s
    # makes dozens of status calls; backing off by half each time up to 0.5 s, each quiet
    # second takes about six.
    emulator.configure(stage_delay=1.0)
    fixed = _status_calls_while_waiting(credentials, emulator, tmp_path, 0.05)
    adaptive = _status_calls_while_waiting(credentials, emulator, tmp_path, 0.5)
    print(f"\nstatus calls over two quiet seconds: fixed {fixed}, adaptive {adaptive}")
    assert 4 <= adaptive <= 20, adaptive
    assert adaptive * 1.5 < fixed, (adaptive, fixed)


def test_poll_intervals_must_be_positive(credentials):
    with pytest.raises(ValueError, match="must be positive"):
        run_task(wait_for_batch, credentials, "batch_x", poll_interval=0)
    with pytest.raises(ValueError, match="must be positive"):
        run_task(wait_for_batch, credentials, "batch_x", poll_interval=1, max_poll_interval=-1)


def test_failed_batch_is_a_final_status_not_an_error(credentials, tmp_path):
    # An input the emulator refuses at validation (duplicate ids): upload_file does not
    # validate lines, so this reaches the service and the batch fails there.
    rows = requests(2) + requests(1)
    file_id = run_task(upload_file, credentials, str(write_jsonl(tmp_path / "r.jsonl", rows)))
    batch = run_task(submit_batch, credentials, file_id)
    final = run_task(wait_for_batch, credentials, batch.id, poll_interval=0.05, timeout=120)
    assert final.status == "failed"
    assert final.errors and "line" in " ".join(final.errors).lower()


def test_expired_batch(credentials, emulator, tmp_path):
    emulator.configure(lines_per_second=10, time_scale=86400 * 2)  # a "24h" window = 0.5 s
    file_id = run_task(
        upload_file, credentials, str(write_jsonl(tmp_path / "r.jsonl", requests(50)))
    )
    batch = run_task(submit_batch, credentials, file_id)
    final = run_task(wait_for_batch, credentials, batch.id, poll_interval=0.05, timeout=120)
    assert final.status == "expired"
    out, err = run_task(download_batch_results, credentials, final, str(tmp_path / "res"))
    assert err is not None
    codes = {r["error"]["code"] for r in read_jsonl(err)}
    assert codes == {"batch_expired"}
    done = len(read_jsonl(out)) if out else 0
    assert done + len(read_jsonl(err)) == 50


def test_auth_failure_fails_fast_with_the_service_message(emulator, tmp_path):
    bad = KlusterCredentials(api_key="sk-wrong-key", base_url=emulator.base_url, max_retries=0)
    path = str(write_jsonl(tmp_path / "r.jsonl", requests(1)))
    started = time.monotonic()
    with pytest.raises(openai.AuthenticationError, match="Invalid API key") as err:
        run_task(upload_file, bad, path)
    assert time.monotonic() - started < 5, "a 4xx must not be retried"
    assert "sk-wrong-key" not in str(err.value)
    assert emulator.stats()["requests"].get("POST /v1/files", 0) == 1


def test_storm_of_429_and_500_is_retried_through(credentials, emulator, tmp_path):
    # The SDK itself gives up at once (max_retries=0): only the task's retries get through.
    # Same retries and retry condition, shorter pauses between them: the seeded faults come in
    # request order, not by time, and the upload's 1+2+4+8 s back-off took 15 of the test's
    # 24 s while testing nothing more.
    creds = credentials.model_copy(update={"max_retries": 0})
    emulator.configure(fault_rate=0.6, fault_seed=11, lines_per_second=40)
    path = run_task(build_request_file, str(tmp_path / "req.jsonl"), requests=requests(20))
    quick = {"retry_delay_seconds": 0.1}
    upload = upload_file.with_options(**quick)
    assert upload.retries == upload_file.retries == 4
    assert upload.retry_condition_fn is upload_file.retry_condition_fn
    file_id = run_task(upload, creds, path)
    batch = run_task(submit_batch.with_options(**quick), creds, file_id)
    final = run_task(wait_for_batch, creds, batch.id, poll_interval=0.05, timeout=120)
    assert final.status == "completed"
    faults = emulator.stats()["faults_injected"]
    assert faults["429"] > 0 and faults["500"] > 0
    assert final.request_counts.completed == 20


def test_transient_classification():
    req = httpx.Request("GET", "http://127.0.0.1/")

    def status(code):
        resp = httpx.Response(code, request=req)
        return openai.APIStatusError("x", response=resp, body=None)

    assert is_transient_error(status(429)) and is_transient_error(status(503))
    assert not is_transient_error(status(400)) and not is_transient_error(status(401))
    assert is_transient_error(openai.APIConnectionError(request=req))
    assert not is_transient_error(ValueError("bad input"))


def test_quirky_responses_parse(credentials, emulator, tmp_path):
    emulator.configure(
        pre_schedule=True,
        string_timestamps=True,
        errors_as_list=True,
        list_extras=True,
        capitalised_statuses=True,
        internal_filenames=True,
        lines_per_second=200,
    )
    file_id = run_task(
        upload_file, credentials, str(write_jsonl(tmp_path / "r.jsonl", requests(20)))
    )
    batch = run_task(submit_batch, credentials, file_id, "72h")
    assert batch.completion_window == "72h"
    assert batch.created_at is not None
    final = run_task(wait_for_batch, credentials, batch.id, poll_interval=0.02, timeout=120)
    assert final.status == "completed" and final.errors == []
    assert final.request_counts.completed == 20
    assert run_task(list_batches, credentials, limit=5)[0].id == batch.id
    raw = json.loads(
        Path(run_task(download_batch_results, credentials, final, str(tmp_path))[0])
        .read_text()
        .splitlines()[0]
    )
    assert raw["response"]["status_code"] == 200


def test_credentials_repr_hides_the_key(emulator):
    creds = KlusterCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url)
    assert TEST_API_KEY not in repr(creds) and TEST_API_KEY not in str(creds)
    client = creds.get_client()
    assert client.base_url.host == "127.0.0.1"


def test_submit_releases_the_shard_claim_once_the_batch_is_recorded(tmp_path, credentials):
    """The claim upload_shard takes is held until the batch is recorded, then released:
    no longer renewed by this process and gone from the Prefect server."""
    from prefect_kluster.tasks import claims
    from prefect_kluster.tasks.build import shard_request_file
    from prefect_kluster.tasks.submit import identity_key, shard_identity, submit_shard
    from prefect_kluster.tasks.upload import upload_shard

    source = write_jsonl(tmp_path / "r.jsonl", requests(3, prefix="claim-"))
    [shard] = shard_request_file(source, tmp_path / "shards")
    identity = shard_identity(shard, nonce=f"claims-{time.time_ns()}")
    key = identity_key(identity)
    state_dir = str(tmp_path / "state")

    @flow
    def upload_then_submit():
        uploaded = upload_shard(credentials, shard, identity, state_dir)
        held = claims._Renewer.holding(key)
        batch = submit_shard(credentials, uploaded, state_dir)
        return held, claims._Renewer.holding(key), batch

    held, after, batch = upload_then_submit()
    assert held is not None and held.generation == 0  # upload_shard took it
    assert after is None  # no longer held (or renewed) once the batch is recorded
    assert batch.metadata["kluster_shard_sha256"] == shard.sha256
    wait_until(lambda: not claims._claims(key), timeout=30)  # deleted on the server


def test_a_flow_run_claims_and_reports_through_its_own_prefect_client(tmp_path, monkeypatch):
    """In a flow run (its task threads, and threads started in its context) the run's own
    Prefect client is used: no new client, so no CSRF token fetched before each write, and
    the client is not closed by a claim. Outside a run, and in a thread that outlives the
    run, each use gets a client of its own, closed after it."""
    import contextvars

    from prefect import task
    from prefect.context import SyncClientContext

    from prefect_kluster.tasks import claims
    from prefect_kluster.tasks._prefect import prefect_client

    sent = record_prefect_requests(monkeypatch)
    key = f"own-client-{time.time_ns()}"

    @task
    def claim_and_release() -> bool:
        run_client = SyncClientContext.get().client
        with prefect_client() as client:
            same = client is run_client
        claims.acquire(key, lambda claim: None)
        claims.release(key)
        return same and not run_client._closed

    @flow
    def run() -> tuple[bool, bool, contextvars.Context]:
        sent.clear()
        in_task = claim_and_release.submit().result()
        seen: list[bool] = []
        run_client = SyncClientContext.get().client

        def in_thread() -> None:
            with prefect_client() as client:
                seen.append(client is run_client)

        worker = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
        worker.start()
        worker.join()
        return in_task, seen == [True], contextvars.copy_context()

    in_task, in_thread, run_context = run()
    assert in_task and in_thread
    paths = [path for _, path in sent]
    assert any(p.endswith("/variables/") for p in paths)  # the claim was made over HTTP
    assert not [p for p in paths if p.endswith("/csrf-token")], paths

    def after_the_run() -> tuple[object, bool]:
        with prefect_client() as client:
            assert client.read_variable_by_name(f"{key}-none") is None  # it works
            return client, client._closed

    client, closed_inside = run_context.run(after_the_run)
    assert not closed_inside and client._closed  # its own client, closed after use
    with prefect_client() as first, prefect_client() as second:
        assert first is not second


def test_claims_released_in_the_background_are_all_gone_when_the_block_ends(tmp_path, credentials):
    """Within ``releasing_in_background`` (as a run's shards are), submit hands its claim
    to the background deleter: not held after submit, and gone from the server as soon as
    the block ends, with no waiting by the caller."""
    from prefect_kluster.tasks import claims
    from prefect_kluster.tasks.build import shard_request_file
    from prefect_kluster.tasks.submit import identity_key, shard_identity, submit_shard
    from prefect_kluster.tasks.upload import upload_shard

    source = write_jsonl(tmp_path / "r.jsonl", requests(6, prefix="bg-claim-"))
    shards = shard_request_file(source, tmp_path / "shards", max_requests_per_file=2)
    nonce = f"bg-claims-{time.time_ns()}"
    keys = [identity_key(shard_identity(s, nonce=nonce)) for s in shards]
    state_dir = str(tmp_path / "state")

    @flow
    def three_shards():
        held_after = []
        with claims.releasing_in_background():
            for shard in shards:
                identity = shard_identity(shard, nonce=nonce)
                uploaded = upload_shard(credentials, shard, identity, state_dir)
                submit_shard(credentials, uploaded, state_dir)
                held_after.append(claims._Renewer.holding(identity_key(identity)))
        return held_after, [claims._claims(k) for k in keys]

    held_after, left_on_server = three_shards()
    assert len(shards) == 3 and held_after == [None, None, None]
    assert left_on_server == [[], [], []]  # the block's end waited for every release


@contextlib.contextmanager
def fake_prefect_api(answer):
    """A Prefect API URL on 127.0.0.1 whose DELETEs ``answer(path)`` returns the status of;
    yields the paths asked for."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prefect.settings import PREFECT_API_URL, temporary_settings

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_DELETE(self):  # noqa: N802
            seen.append(self.path)
            self.send_response(answer(self.path))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/api"
        with temporary_settings({PREFECT_API_URL: url}):
            yield seen
    finally:
        server.shutdown()
        server.server_close()


def test_background_releases_give_up_after_the_timeout(caplog):
    """A server too slow to answer does not hold the run's end past the release timeout:
    the releases not yet started are dropped (their claims are taken over later)."""
    from prefect_kluster.tasks import claims

    def slow(path: str) -> int:
        time.sleep(3)
        return 204

    with fake_prefect_api(slow) as seen:
        began = time.monotonic()
        with claims.releasing_in_background(timeout=1.0):
            for n in range(3):  # the first is under way (3 s), two wait behind it
                claims._Releaser.put(f"slow-server-{n}", f"kluster_claim_slow_{n}")
        took = time.monotonic() - began
        assert claims._Releaser.settle(timeout=30)  # the one under way still ends
    assert took < 2.5, f"the block held {took:.1f} s"
    assert "2 claim(s) not released after 1 s" in caplog.text
    assert seen == ["/api/variables/name/kluster_claim_slow_0"]


def test_busy_prefect_server_answers_are_retried_within_milliseconds():
    """Prefect's client sleeps 2 s, then 4 s, ... after each 503; a claim release must not
    (on SQLite, deletes meet 'database is locked' often while task runs write)."""
    from prefect_kluster.tasks._prefect import busy_retried_request

    with fake_prefect_api(lambda path: 503 if len(seen) <= 3 else 204) as seen:
        began = time.monotonic()
        response = busy_retried_request("DELETE", "/variables/name/kluster_claim_x_0")
        took = time.monotonic() - began
    assert response.status_code == 204
    assert seen == ["/api/variables/name/kluster_claim_x_0"] * 4
    assert took < 1.5, f"{took:.2f} s for three busy answers"  # Prefect's own: 2 + 4 + 8 s


def test_a_second_submit_of_one_file_in_a_run_makes_a_second_batch(credentials, emulator, tmp_path):
    """With results persisted (a setting users turn on), Prefect's default cache policy
    would answer the second call from the first one's result: one batch, not two."""
    from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

    path = run_task(build_request_file, str(tmp_path / "req.jsonl"), requests=requests(3))
    file_id = run_task(upload_file, credentials, path)

    @flow
    def submit_twice():
        return submit_batch(credentials, file_id), submit_batch(credentials, file_id)

    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        first, second = submit_twice()
    assert first.id != second.id
    assert len(emulator.stats()["batches"]) == 2


def test_no_task_is_ever_served_from_prefects_cache():
    """Every task of the package runs each time it is called, even with results persisted:
    a second submit_batch of one file in a run makes a second batch, a second listing reads
    the service again, a join reads the files as they are now. (Without a cache policy a
    task run also starts with no cache key to hash and no cache record to look up.)"""
    import importlib
    import pkgutil

    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    found = {}
    for package in ("tasks", "flows"):
        root = importlib.import_module(f"prefect_kluster.{package}")
        for info in pkgutil.iter_modules(root.__path__):
            module = importlib.import_module(f"{root.__name__}.{info.name}")
            for value in vars(module).values():
                if isinstance(value, Task) and value.__module__ == module.__name__:
                    found[value.name] = value.cache_policy
    # the lifecycle's tasks are all there, so the check below covers them
    assert {"upload-shard", "submit-shard", "wait-for-batch", "join-round"} <= set(found)
    cached = sorted(name for name, policy in found.items() if policy is not NO_CACHE)
    assert cached == [], f"tasks with a cache policy: {cached}"
