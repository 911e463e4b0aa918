"""Acceptance tests of issue 9 over real processes: runs that live on shared storage.

One stack for the module: PostgreSQL, a Prefect server on it (killable, restartable), moto's
S3 server with one bucket, the emulator as a subprocess, a process work pool and two workers
A and B that share nothing but the server and the bucket (separate working directories,
HOME, TMPDIR). Each worker has KLUSTER_STORAGE_ROOTS=s3://<bucket>/.

Pinning a run to a worker: the pool has one work queue per worker ("a", "b") and each worker
polls only its own queue (``prefect worker start --work-queue``); a run is started on a queue
(``run_deployment(work_queue_name=...)``, or ``work_queue_name`` in the API body as the UI's
custom run sends it). That places every run deterministically, also two at the same moment,
with no dependence on worker limits or on which worker polls first.

"One batch per shard" is counted where payment happens: the emulator's count of
``POST /v1/batches`` (and of ``POST /v1/files``) over the test, against the number of shards.
Runs that must be caught "while waiting" are held by the emulator's ``lines_per_second``
(a live setting: set back to None, the batches finish within one line's pause).

Two runs "at the same moment" are lined up at the paid call: the test process holds every
shard's claim (``tasks.claims``) while both runs start, and releases them once both runs say
they wait for it, so the race on the create-once claim happens every time, not by luck.

Run with ``.venv/bin/python -m pytest -q -s tests/test_production.py`` (``-s`` prints timings).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prefect.deployments import run_deployment

from prefect_kluster.tasks import claims
from prefect_kluster.tasks.build import shard_request_file
from prefect_kluster.tasks.submit import CREATE_ATTEMPTS, identity_key, shard_identity
from tests.helpers import requests
from tests.production import (
    Postgres,
    ProductionServer,
    S3Store,
    Worker,
    create_process_pool,
    deploy,
    flow_run,
    moto_s3,
    postgres,
    prefect_server_on,
    ran_by,
    wait_for_state,
    worker,
)
from tests.server import emulator_process, http_json, prefect_api, wait_for

BUCKET = "kluster-prod"
OTHER_BUCKET = "kluster-elsewhere"
POOL = "kluster-pool"
BATCH_DEPLOYMENT = "kluster-batch-inference/batch"
COLLECT_DEPLOYMENT = "kluster-collect-batches/collect"
LINES, PER_SHARD = 30, 10
SHARDS = LINES // PER_SHARD
HOLD_RATE = 0.02  # lines per second while a test needs a run to be waiting (500 s a batch:
# longer than a server restart on a loaded machine; release() lets them finish at once)
RUN_TIMEOUT = 120.0  # one flow run: worker pick-up, a fresh Python process under load, work
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NO_FAULTS: dict[str, Any] = {"lines_per_second": None, "fault_rate": 0.0, "fault_routes": None}


@pytest.fixture(scope="session", autouse=True)
def prefect_backend() -> Iterator[None]:
    """These tests talk to their own PostgreSQL-backed server: no SQLite test harness."""
    yield


@dataclass
class Stack:
    base: Path
    pg: Postgres
    server: ProductionServer
    store: S3Store
    emulator_url: str  # ends in /v1
    workers: dict[str, Worker]
    timings: dict[str, float] = field(default_factory=dict)

    # --- the emulator ---
    def emulator(self, method: str, path: str, body: Any = None) -> Any:
        return http_json(method, self.emulator_url.removesuffix("/v1") + path, body)

    def calls(self, route: str) -> int:
        """How many times the emulator was asked ``route`` (e.g. "POST /v1/batches")."""
        return int(self.emulator("GET", "/_emulator/stats")["requests"].get(route, 0))

    def batches(self) -> list[dict[str, Any]]:
        return self.emulator("GET", "/_emulator/stats")["batches"]

    def hold(self) -> None:
        self.emulator("POST", "/_emulator/config", {"lines_per_second": HOLD_RATE})

    def release(self) -> None:
        self.emulator("POST", "/_emulator/config", {"lines_per_second": None})

    def fail_creates(self, on: bool) -> None:
        """Every batch create answered 429/500 (``on``), or none."""
        faults = {"fault_rate": 1.0, "fault_routes": ["POST /v1/batches"]}
        self.emulator("POST", "/_emulator/config", faults if on else NO_FAULTS)

    # --- the bucket ---
    def put_input(self, tag: str, lines: int = LINES) -> tuple[str, list[str]]:
        """``lines`` requests (custom ids unique to ``tag``) at s3://BUCKET/tag/in.jsonl."""
        rows = requests(lines, prefix=f"{tag}-")
        body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        self.store.client().put_object(Bucket=BUCKET, Key=f"{tag}/in.jsonl", Body=body)
        return f"s3://{BUCKET}/{tag}/in.jsonl", [r["custom_id"] for r in rows]

    def output(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.store.read(BUCKET, key).splitlines()]

    def assert_complete(self, key: str, ids: list[str]) -> None:
        """The output object holds one answered line per request, in input order."""
        rows = self.output(key)
        assert [r["custom_id"] for r in rows] == ids
        assert {r["status"] for r in rows} == {"ok"}, rows[:3]

    # --- flow runs ---
    def start(self, deployment: str, queue: str, parameters: dict[str, Any] | None = None) -> str:
        """Start a run of ``deployment`` on the worker polling ``queue``; its id."""
        run = run_deployment(
            deployment, parameters=parameters or {}, timeout=0, work_queue_name=queue
        )
        return str(run.id)

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        return wait_for_state(self.server, run_id, {"COMPLETED"}, timeout)

    def flow_run_pids(self, w: Worker) -> list[int]:
        """The processes alive on worker ``w``'s machine other than the worker itself."""
        return [p for p in w.pids() if p != w.process.popen.pid]

    def logged(self, run_id: str, text: str) -> bool:
        """Whether the flow run has sent a log line containing ``text`` to the server."""
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
        return any(text in row["message"] for row in self.server.api("POST", "/logs/filter", body))

    def kluster_variables(self) -> list[str]:
        body = {"variables": {"name": {"like_": "kluster_%"}}, "limit": 200}
        return [v["name"] for v in self.server.api("POST", "/variables/filter", body)]

    def claim_names(self) -> list[str]:
        return [n for n in self.kluster_variables() if n.startswith("kluster_claim_")]

    def attempts(self, run_id: str, task: str) -> int:
        """How many times the flow run's task ``task`` has started running (its run_count)."""
        body = {
            "flow_runs": {"id": {"any_": [run_id]}},
            "task_runs": {"name": {"like_": f"{task}%"}},
        }
        return max(
            (t["run_count"] for t in self.server.api("POST", "/task_runs/filter", body)), default=0
        )


def shard_keys(input_bytes: bytes, work: Path) -> list[str]:
    """The claim keys of the input's shards (round 1), as a run computes them."""
    local = work / "in.jsonl"
    local.write_bytes(input_bytes)
    shards = shard_request_file(local, work / "shards", max_requests_per_file=PER_SHARD)
    return [identity_key(shard_identity(s)) for s in shards]


def batch_parameters(tag: str, input_url: str, **run: Any) -> dict[str, Any]:
    """The flow's parameters for a run whose output and state are under s3://BUCKET/tag/."""
    return {
        "input_path": input_url,
        "output_path": f"s3://{BUCKET}/{tag}/out.jsonl",
        "output": {"work_dir": f"s3://{BUCKET}/{tag}/work"},
        "run": {"poll_interval": 0.5, "max_poll_interval": 1.0, **run},
        "limits": {"max_requests_per_file": PER_SHARD},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("production")
    timings: dict[str, float] = {}
    began = time.monotonic()
    api_key = secrets.token_hex(16)
    with ExitStack() as stack:
        store = stack.enter_context(moto_s3(base))
        pg = stack.enter_context(postgres(base))
        server = stack.enter_context(prefect_server_on(pg.url, base))
        emulator_url, _ = stack.enter_context(emulator_process(base / "logs", "--api-key", api_key))
        store.create_bucket(BUCKET)
        store.create_bucket(OTHER_BUCKET)
        create_process_pool(server, POOL)
        for queue in ("a", "b"):
            server.api("POST", f"/work_pools/{POOL}/queues", {"name": queue})
        env = {
            **store.env,
            "KLUSTER_API_KEY": api_key,
            "KLUSTER_BASE_URL": emulator_url,
            "KLUSTER_STORAGE_ROOTS": f"s3://{BUCKET}/",
        }
        workers = {
            name: stack.enter_context(
                worker(server, POOL, name, base, env=env, wait=False, work_queues=[name])
            )
            for name in ("a", "b")
        }
        for w in workers.values():
            w.wait_ready()
        deploy(server, "prefect_kluster.flows.batch_inference.batch_inference", "batch", POOL)
        deploy(server, "prefect_kluster.flows.pending.collect_batches", "collect", POOL)
        stack.enter_context(prefect_api(server.api_url))
        timings["stack start-up"] = time.monotonic() - began
        yield Stack(base, pg, server, store, emulator_url, workers, timings)
        print("\nproduction acceptance, seconds:")
        for what, seconds in timings.items():
            print(f"  {what}: {seconds:.1f}")


@pytest.fixture(autouse=True)
def fresh(stack: Stack, request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with an empty emulator at full speed and no kluster Variables."""
    stack.emulator("POST", "/_emulator/reset")
    stack.emulator("POST", "/_emulator/config", NO_FAULTS)
    for name in stack.kluster_variables():
        stack.server.api("DELETE", f"/variables/name/{name}")
    began = time.monotonic()
    yield
    stack.timings[request.node.name] = time.monotonic() - began


# The order matters only for the worker crash: it kills worker A (for good), so it is last.


def test_long_wait_finishes_on_another_machine(stack: Stack) -> None:
    a, b = stack.workers["a"], stack.workers["b"]
    input_url, ids = stack.put_input("longwait")
    first = stack.start(BATCH_DEPLOYMENT, "a", batch_parameters("longwait", input_url, wait=False))
    stack.wait(first)
    assert ran_by(stack.server, first) == "a"
    assert stack.calls("POST /v1/batches") == SHARDS
    (pending,) = [n for n in stack.kluster_variables() if n.startswith("kluster_pending_")]
    pointer = stack.server.api("GET", f"/variables/name/{pending}")["value"]
    assert pointer["work_dir"] == f"s3://{BUCKET}/longwait/work"
    assert stack.store.list_keys(BUCKET, "longwait/work/pending/"), "the state is in the bucket"
    # Nothing of the run is on A's disk: no file there holds any request of it.
    marker = b"longwait-"
    assert [p for p in a.local_files() if marker in p.read_bytes()] == []
    # A's local disk is gone (its worker keeps only its own Prefect settings).
    for path in (a.work_dir, a.home, a.tmp_dir):
        for child in path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    wait_for(
        lambda: all(x["status"] == "completed" for x in stack.batches()) and stack.batches(),
        60,
        "the emulator to finish the batches",
    )

    collector = stack.start(COLLECT_DEPLOYMENT, "b")
    stack.wait(collector)

    assert ran_by(stack.server, collector) == "b"
    stack.assert_complete("longwait/out.jsonl", ids)
    assert stack.calls("POST /v1/batches") == SHARDS, "one batch per shard"
    assert stack.calls("POST /v1/files") == SHARDS
    assert [n for n in stack.kluster_variables() if n.startswith("kluster_pending_")] == []
    assert [p for p in b.local_files() if marker in p.read_bytes()] == []


def test_two_identical_runs_at_once_on_two_workers_pay_once(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    input_url, ids = stack.put_input("twins")
    # Line the two runs up at the paid call: while a third party (this test process) holds
    # every shard's claim, both runs get past their scan of the service (nothing there yet)
    # and wait at the claim; released at once, they race to create the claims.
    keys = shard_keys(stack.store.read(BUCKET, "twins/in.jsonl"), tmp_path)
    assert len(keys) == SHARDS
    # No renewal from here: its thread would not see this test's Prefect settings (and
    # start a server of its own); the claims are held for well under claims.STALE_AFTER.
    monkeypatch.setattr(claims, "RENEW_EVERY", 3600.0)
    began = time.monotonic()
    for key in keys:
        claims.acquire(key)
    try:
        runs = {
            queue: stack.start(
                BATCH_DEPLOYMENT, queue, batch_parameters(f"twins-{queue}", input_url)
            )
            for queue in ("a", "b")
        }
        stack.timings["twins: both runs started"] = time.monotonic() - began
        for run_id in runs.values():
            wait_for(
                lambda run_id=run_id: stack.logged(run_id, "is being submitted by flow run"),
                RUN_TIMEOUT,
                f"flow run {run_id} to wait at a shard's claim",
            )
        assert stack.calls("POST /v1/files") == 0
        stack.timings["twins: both runs wait at the claims"] = time.monotonic() - began
    finally:
        for key in keys:
            claims.release(key)
    for queue, run_id in runs.items():
        stack.wait(run_id)
        assert ran_by(stack.server, run_id) == queue

    assert len(stack.batches()) == SHARDS, "one batch per shard in total"
    assert stack.calls("POST /v1/batches") == SHARDS
    assert stack.calls("POST /v1/files") == SHARDS
    for queue in runs:
        stack.assert_complete(f"twins-{queue}/out.jsonl", ids)
    assert [n for n in stack.kluster_variables() if n.startswith("kluster_claim_")] == []


def test_ui_run_outside_the_storage_roots_is_refused(stack: Stack, tmp_path: Path) -> None:
    input_url, _ = stack.put_input("refused")
    local_out = tmp_path / "anywhere" / "x.jsonl"
    outside = {"a": f"s3://{OTHER_BUCKET}/x.jsonl", "b": str(local_out)}
    deployment = stack.server.api("GET", f"/deployments/name/{BATCH_DEPLOYMENT}")
    runs = {}
    for queue, output_path in outside.items():
        # What the UI's "Custom run" sends.
        body = {
            "parameters": {"input_path": input_url, "output_path": output_path},
            "work_queue_name": queue,
            "state": {"type": "SCHEDULED"},
        }
        created = stack.server.api("POST", f"/deployments/{deployment['id']}/create_flow_run", body)
        runs[queue] = created["id"]
    for queue, run_id in runs.items():
        run = wait_for_state(stack.server, run_id, FINAL, RUN_TIMEOUT)
        message = run["state"]["message"] or ""
        assert run["state_type"] == "FAILED", run["state"]
        assert outside[queue] in message and f"s3://{BUCKET}/" in message, message
    # Nothing read, uploaded or paid; nothing written where it was refused.
    assert stack.emulator("GET", "/_emulator/stats")["requests"] == {}
    assert stack.store.list_keys(OTHER_BUCKET) == []
    assert not local_out.exists() and not local_out.parent.exists()
    assert stack.store.list_keys(BUCKET, "refused/") == ["refused/in.jsonl"]


def test_server_killed_and_restarted_while_a_run_waits(stack: Stack) -> None:
    b = stack.workers["b"]
    input_url, ids = stack.put_input("restart")
    parameters = batch_parameters("restart", input_url)
    stack.hold()
    run_id = stack.start(BATCH_DEPLOYMENT, "b", parameters)
    wait_for(lambda: stack.calls("POST /v1/batches") == SHARDS, RUN_TIMEOUT, "the run's batches")
    assert flow_run(stack.server, run_id)["state_type"] == "RUNNING"

    stack.server.kill()
    stack.timings["prefect server restart"] = stack.server.start()
    # The run waited through the outage: its batches are still running.
    assert all(x["status"] in ("validating", "in_progress") for x in stack.batches())
    stack.release()

    def over() -> dict[str, Any] | None:
        """The run's final state, or its state once its process is gone without one."""
        run = flow_run(stack.server, run_id)
        if run["state_type"] in FINAL or not stack.flow_run_pids(b):
            return run
        return None

    run = wait_for(over, RUN_TIMEOUT, f"flow run {run_id} to end")
    print(f"\n  the run across the server restart ended {run['state_type']}")
    if run["state_type"] != "COMPLETED":  # Prefect gave up on it: a rerun attaches
        rerun = stack.start(BATCH_DEPLOYMENT, "b", parameters)
        stack.wait(rerun)
    stack.assert_complete("restart/out.jsonl", ids)
    assert stack.calls("POST /v1/batches") == SHARDS, "nothing paid twice"
    assert stack.calls("POST /v1/files") == SHARDS


def test_a_retried_submit_waits_for_a_claim_another_run_holds(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flaky service (creates answered 429/500 for a while) makes a run's submit-shard
    fail and retry; meanwhile another run of the same inputs takes the shard's claim. The
    retry must wait for that claim, not create a batch beside it."""
    monkeypatch.setattr(claims, "RENEW_EVERY", 3600.0)  # see the twin runs' test
    input_url, ids = stack.put_input("retry", PER_SHARD)  # one shard
    (key,) = shard_keys(stack.store.read(BUCKET, "retry/in.jsonl"), tmp_path)
    stack.fail_creates(True)
    run_id = stack.start(BATCH_DEPLOYMENT, "b", batch_parameters("retry", input_url))
    try:
        # The first attempt of submit-shard gives up after CREATE_ATTEMPTS creates and
        # lets the claim go; another run (this test process) takes the shard now.
        wait_for(
            lambda: stack.calls("POST /v1/batches") >= CREATE_ATTEMPTS and not stack.claim_names(),
            RUN_TIMEOUT,
            "the first submit attempt to fail and release the shard's claim",
        )
        claims.acquire(key)
        held = stack.claim_names()
        creates = stack.calls("POST /v1/batches")
        wait_for(
            lambda: stack.attempts(run_id, "submit-shard") >= 2, 30, "the retry of submit-shard"
        )
        try:  # the retry must do nothing while another run holds the claim
            wait_for(
                lambda: stack.calls("POST /v1/batches") > creates or stack.claim_names() != held,
                10,
                "the retried submit to act on the shard",
            )
        except TimeoutError:
            pass
        assert stack.calls("POST /v1/batches") == creates, (
            "a create while another run held the claim"
        )
        assert stack.claim_names() == held, "the other run's claim is left alone"
    finally:
        stack.fail_creates(False)
        claims.release(key)
        run = wait_for_state(stack.server, run_id, FINAL, RUN_TIMEOUT)
    assert run["state_type"] == "COMPLETED", run["state"]
    stack.assert_complete("retry/out.jsonl", ids)
    assert len(stack.batches()) == 1


def test_worker_killed_while_a_run_waits_rerun_on_the_other_attaches(stack: Stack) -> None:
    a = stack.workers["a"]
    input_url, ids = stack.put_input("crash")
    parameters = batch_parameters("crash", input_url)
    stack.hold()
    first = stack.start(BATCH_DEPLOYMENT, "a", parameters)
    wait_for(lambda: stack.calls("POST /v1/batches") == SHARDS, RUN_TIMEOUT, "the run's batches")
    # Waiting: every batch made and recorded, no shard claim held any more.
    wait_for(
        lambda: not [n for n in stack.kluster_variables() if n.startswith("kluster_claim_")],
        30,
        "the shard claims to be released",
    )
    assert ran_by(stack.server, first) == "a"
    flow_run_pids = stack.flow_run_pids(a)
    assert flow_run_pids, "the flow run's process is alive on A"
    assert all(x["status"] in ("validating", "in_progress") for x in stack.batches())

    killed = a.kill()

    assert set(flow_run_pids) <= set(killed) and a.pids() == []
    stack.release()
    rerun = stack.start(BATCH_DEPLOYMENT, "b", parameters)
    stack.wait(rerun)
    assert ran_by(stack.server, rerun) == "b"
    stack.assert_complete("crash/out.jsonl", ids)
    assert stack.calls("POST /v1/batches") == SHARDS, "the rerun attached to A's batches"
    assert stack.calls("POST /v1/files") == SHARDS
