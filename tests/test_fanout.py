"""Fan-out (issue 10) on the production shape: one job's shard groups as child flow runs.

One stack for the module, as in tests/test_production_infra.py: PostgreSQL, a Prefect server
on it, moto's S3 server with one bucket, the emulator as a subprocess, a process work pool and
two workers A and B that share nothing but the server and the bucket. Both workers poll the
pool's default queue with a limit of 3 flow runs each, so a parent and its four children
cannot all fit on one worker: children run on both.

"One batch per shard" is counted where payment happens: the emulator's ``POST /v1/batches``.
The job-wide cap is watched from outside: the emulator's own list of batches, sampled while
the job runs, never shows more batches unfinished than ``max_concurrency``.

Run with ``.venv/bin/python -m pytest -q -s tests/test_fanout.py`` (``-s`` prints timings).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prefect.deployments import run_deployment

from tests.helpers import requests
from tests.production import (
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

BUCKET = "kluster-fanout"
POOL = "kluster-pool"
BATCH_DEPLOYMENT = "kluster-batch-inference/batch"
LINES, PER_SHARD = 36, 3
SHARDS = LINES // PER_SHARD  # 12
GROUPS = 4
CAP = 2  # four children of three shards, two threads each, could run eight at once
RATE = 2.0  # lines per second per batch: a batch runs for 1.5 s, so batches overlap
HOLD_RATE = 0.02  # while a test needs batches still running: 150 s per batch
RUN_TIMEOUT = 180.0  # a parent and four children: fresh Python processes on a shared machine
FINISHED = {"completed", "failed", "expired", "cancelled"}
WORKER = "prefect.worker.name"  # the label a worker gives the runs it takes
HEARTBEAT = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of every flow run (Prefect's minimum)
COLLECT_DEPLOYMENT = "kluster-collect-batches/collect"


@pytest.fixture(scope="session", autouse=True)
def prefect_backend() -> Iterator[None]:
    """These tests talk to their own PostgreSQL-backed server: no SQLite test harness."""
    yield


@dataclass
class Stack:
    base: Path
    server: ProductionServer
    store: S3Store
    emulator_url: str  # ends in /v1
    workers: dict[str, Worker]
    group_deployment_id: str
    timings: dict[str, float] = field(default_factory=dict)

    def emulator(self, method: str, path: str, body: Any = None) -> Any:
        return http_json(method, self.emulator_url.removesuffix("/v1") + path, body)

    def stats(self) -> dict[str, Any]:
        return self.emulator("GET", "/_emulator/stats")

    def calls(self, route: str) -> int:
        return int(self.stats()["requests"].get(route, 0))

    def put_input(self, key: str, prefix: str = "fan-") -> tuple[str, list[str]]:
        rows = requests(LINES, prefix=prefix)
        body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        self.store.client().put_object(Bucket=BUCKET, Key=key, Body=body)
        return f"s3://{BUCKET}/{key}", [r["custom_id"] for r in rows]

    def start(self, parameters: dict[str, Any], deployment: str = BATCH_DEPLOYMENT) -> str:
        return str(run_deployment(deployment, parameters=parameters, timeout=0).id)

    def kluster_variables(self) -> list[str]:
        body = {"variables": {"name": {"like_": "kluster_%"}}, "limit": 200}
        return [v["name"] for v in self.server.api("POST", "/variables/filter", body)]

    def children_of(self, tag: str) -> list[dict[str, Any]]:
        """The child runs recorded in a job's work directory, with the attempt of each."""
        keys = [k for k in self.store.list_keys(BUCKET, f"{tag}/work/fanout/") if "/children/" in k]
        records = [json.loads(self.store.read(BUCKET, k)) for k in keys]
        for record in records:
            record["attempt"] = int(record["key"].rsplit("attempt-", 1)[1])
        return sorted(records, key=lambda r: (r["group"], r["attempt"]))

    def flow_run_process(self, w: Worker, flow_run_id: str) -> int:
        """The pid of the process running ``flow_run_id`` on worker ``w``'s machine (the
        process worker hands each flow run its id in PREFECT__FLOW_RUN_ID)."""
        needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
        for pid in w.pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in environ:
                return pid
        raise AssertionError(f"no process of flow run {flow_run_id} on worker {w.name}")

    def child_runs(self) -> list[dict[str, Any]]:
        """Every flow run of the shard-group deployment on the server."""
        body = {"deployments": {"id": {"any_": [self.group_deployment_id]}}, "limit": 200}
        return self.server.api("POST", "/flow_runs/filter", body)

    def wait_sampling(self, run_id: str) -> int:
        """Wait for the run to complete, sampling the emulator's unfinished batches all the
        while; the most seen at once."""
        most = 0
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            unfinished = [b for b in self.stats()["batches"] if b["status"] not in FINISHED]
            most = max(most, len(unfinished))
            state = self.server.api("GET", f"/flow_runs/{run_id}")["state_type"]
            if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                break
            time.sleep(0.05)
        wait_for_state(self.server, run_id, {"COMPLETED"}, 1)
        return most


def job(tag: str, input_url: str, **limits: Any) -> dict[str, Any]:
    return {
        "input_path": input_url,
        "output_path": f"s3://{BUCKET}/{tag}/out.jsonl",
        "output": {"work_dir": f"s3://{BUCKET}/{tag}/work", "overwrite": True},
        "run": {"poll_interval": 0.5, "max_poll_interval": 1.0},
        "limits": {"max_requests_per_file": PER_SHARD, "max_concurrency": CAP, **limits},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("fanout")
    began = time.monotonic()
    api_key = secrets.token_hex(16)
    with ExitStack() as stack:
        store = stack.enter_context(moto_s3(base))
        pg = stack.enter_context(postgres(base))
        server = stack.enter_context(prefect_server_on(pg.url, base))
        emulator_url, _ = stack.enter_context(emulator_process(base / "logs", "--api-key", api_key))
        store.create_bucket(BUCKET)
        create_process_pool(server, POOL)
        env = {
            **store.env,
            "KLUSTER_API_KEY": api_key,
            "KLUSTER_BASE_URL": emulator_url,
            "KLUSTER_STORAGE_ROOTS": f"s3://{BUCKET}/",
            # Prefect's least: a child gone with its worker is seen silent after 75 s.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT),
        }
        workers = {
            name: stack.enter_context(
                worker(server, POOL, name, base, env=env, limit=3, wait=False)
            )
            for name in ("a", "b")
        }
        for w in workers.values():
            w.wait_ready()
        deploy(server, "prefect_kluster.flows.batch_inference.batch_inference", "batch", POOL)
        deploy(server, "prefect_kluster.flows.pending.collect_batches", "collect", POOL)
        group_id = deploy(
            server, "prefect_kluster.flows.fanout.shard_group", "kluster-shard-group", POOL
        )
        stack.enter_context(prefect_api(server.api_url))
        timings = {"stack start-up": time.monotonic() - began}
        handle = Stack(base, server, store, emulator_url, workers, group_id, timings)
        yield handle
        print("\nfan-out on the production shape, seconds:")
        for what, seconds in handle.timings.items():
            print(f"  {what}: {seconds:.1f}")


def test_shard_groups_run_as_child_runs_on_both_workers(stack: Stack) -> None:
    stack.emulator("POST", "/_emulator/reset")
    stack.emulator("POST", "/_emulator/config", {"lines_per_second": RATE})
    input_url, ids = stack.put_input("shared/in.jsonl")

    began = time.monotonic()
    parent = stack.start(job("fan", input_url, distribute=GROUPS))
    most_running = stack.wait_sampling(parent)
    stack.timings["fan-out job (12 shards, 4 groups, cap 2)"] = time.monotonic() - began

    children = stack.child_runs()
    assert len(children) == GROUPS
    assert {c["state_type"] for c in children} == {"COMPLETED"}
    assert {ran_by(stack.server, c["id"]) for c in children} == {"a", "b"}
    assert all(c["parent_task_run_id"] for c in children), "children show under the parent"
    assert stack.calls("POST /v1/batches") == SHARDS  # one batch per shard
    fanned = stack.store.read(BUCKET, "fan/out.jsonl")
    rows = [json.loads(line) for line in fanned.splitlines()]
    assert [r["custom_id"] for r in rows] == ids
    assert {r["status"] for r in rows} == {"ok"}
    # The job-wide cap: never more batches unfinished at once than max_concurrency, though
    # four children of two threads each could run eight.
    print(f"\nmost batches unfinished at once: {most_running} (cap {CAP})")
    assert 1 <= most_running <= CAP
    # The children's results are write-once objects in the shared work dir; the job's
    # concurrency limit is gone once it is joined.
    keys = stack.store.list_keys(BUCKET, "fan/work/fanout/")
    assert len([k for k in keys if k.endswith(".result.json")]) == GROUPS
    assert len([k for k in keys if "/children/" in k]) == GROUPS
    limits = stack.server.api("POST", "/v2/concurrency_limits/filter", {})
    assert [cl["name"] for cl in limits if cl["name"].startswith("kluster-job-")] == []

    # The parent run again (a retry or a rerun of the same job): it finds its children by
    # their idempotency keys, starts no second copy of any group and pays nothing twice.
    # Meanwhile, on a fresh service, the same job without fan-out: the same output.
    stack.emulator("POST", "/_emulator/reset")
    began = time.monotonic()
    again = stack.start(job("fan", input_url, distribute=GROUPS))
    plain = stack.start(job("plain", input_url))
    wait_for_state(stack.server, again, {"COMPLETED"}, RUN_TIMEOUT)
    wait_for_state(stack.server, plain, {"COMPLETED"}, RUN_TIMEOUT)
    stack.timings["the same parent again, and the job without fan-out"] = time.monotonic() - began
    assert len(stack.child_runs()) == GROUPS
    assert stack.calls("POST /v1/batches") == SHARDS  # all of them the plain run's
    assert stack.store.read(BUCKET, "fan/out.jsonl") == fanned
    assert stack.store.read(BUCKET, "plain/out.jsonl") == fanned


@pytest.mark.timeout(480)  # a cancellation's hooks start late on a loaded machine
def test_cancelling_the_parent_cancels_its_children_and_their_batches(stack: Stack) -> None:
    stack.emulator("POST", "/_emulator/reset")
    stack.emulator("POST", "/_emulator/config", {"lines_per_second": HOLD_RATE})
    input_url, _ = stack.put_input("cancel/in.jsonl", prefix="cancel-")
    began = time.monotonic()
    parent = stack.start(job("cancel", input_url, distribute=GROUPS))

    def children_started() -> list[str] | None:
        records = [
            k for k in stack.store.list_keys(BUCKET, "cancel/work/fanout/") if "/children/" in k
        ]
        running = [b for b in stack.stats()["batches"] if b["status"] == "in_progress"]
        if len(records) < GROUPS or not running:
            return None
        return [json.loads(stack.store.read(BUCKET, k))["flow_run_id"] for k in records]

    children = wait_for(children_started, RUN_TIMEOUT, "four children and a running batch", 0.5)
    stack.server.api(
        "POST", f"/flow_runs/{parent}/set_state", {"state": {"type": "CANCELLING"}, "force": True}
    )

    wait_for_state(stack.server, parent, {"CANCELLED"}, RUN_TIMEOUT)
    for child in children:
        wait_for_state(stack.server, child, {"CANCELLED"}, RUN_TIMEOUT)

    def batches_ended() -> list[dict[str, Any]] | None:
        batches = stack.stats()["batches"]
        return batches if all(b["status"] in FINISHED for b in batches) else None

    batches = wait_for(batches_ended, 60, "every batch of the job to end", 0.5)
    stack.timings["cancel a fan-out job"] = time.monotonic() - began
    assert batches and {b["status"] for b in batches} == {"cancelled"}


def test_long_wait_fan_out_is_joined_by_the_collector(stack: Stack) -> None:
    """``wait=False`` with ``distribute``: the parent starts its children and returns; once
    every group has finished, one collection joins the job."""
    stack.emulator("POST", "/_emulator/reset")
    stack.emulator("POST", "/_emulator/config", {"lines_per_second": HOLD_RATE})
    input_url, ids = stack.put_input("later/in.jsonl", prefix="later-")
    began = time.monotonic()
    parameters = job("later", input_url, distribute=GROUPS)
    parameters["run"]["wait"] = False
    parent = stack.start(parameters)
    wait_for_state(stack.server, parent, {"COMPLETED"}, RUN_TIMEOUT)
    assert not stack.store.list_keys(BUCKET, "later/out.jsonl"), "the parent did not wait"
    children = stack.children_of("later")
    assert [c["group"] for c in children] == list(range(GROUPS))
    pending = [n for n in stack.kluster_variables() if n.startswith("kluster_pending_")]
    assert len(pending) == 1

    # A collection while the groups still work leaves the job pending, nothing joined ...
    collect = stack.start({}, COLLECT_DEPLOYMENT)
    wait_for_state(stack.server, collect, {"COMPLETED"}, RUN_TIMEOUT)
    assert not stack.store.list_keys(BUCKET, "later/out.jsonl")
    assert [n for n in stack.kluster_variables() if n.startswith("kluster_pending_")] == pending
    assert stack.calls("POST /v1/batches") < SHARDS, "batches still wait for the cap"
    # ... and once every group has finished, the next one joins the job.
    stack.emulator("POST", "/_emulator/config", {"lines_per_second": RATE})
    for child in children:
        wait_for_state(stack.server, child["flow_run_id"], {"COMPLETED"}, RUN_TIMEOUT)
    collect = stack.start({}, COLLECT_DEPLOYMENT)
    wait_for_state(stack.server, collect, {"COMPLETED"}, RUN_TIMEOUT)
    stack.timings["long-wait fan-out job, collected"] = time.monotonic() - began
    rows = [json.loads(line) for line in stack.store.read(BUCKET, "later/out.jsonl").splitlines()]
    assert [r["custom_id"] for r in rows] == ids
    assert {r["status"] for r in rows} == {"ok"}
    assert stack.calls("POST /v1/batches") == SHARDS
    assert len(stack.children_of("later")) == GROUPS, "the collection started no group again"
    assert not [n for n in stack.kluster_variables() if n.startswith("kluster_pending_")]


@pytest.mark.timeout(900)  # two missed heartbeats, a lease to expire, fresh processes
def test_worker_and_parent_killed_while_children_wait(stack: Stack) -> None:
    """``kill -9`` a worker running children, and the parent's own process on the other one:
    the parent run again finds its groups by their keys, starts again only the children that
    died with their worker (on the worker left), and they attach to the same batches.
    Runs last: worker B (or A) stays dead."""
    stack.emulator("POST", "/_emulator/reset")
    stack.emulator("POST", "/_emulator/config", {"lines_per_second": HOLD_RATE})
    input_url, ids = stack.put_input("crash/in.jsonl", prefix="crash-")
    parameters = job("crash", input_url, distribute=GROUPS)
    began = time.monotonic()
    parent = stack.start(parameters)

    def all_children_running() -> list[dict[str, Any]] | None:
        children = stack.children_of("crash")
        if len(children) < GROUPS:
            return None
        states = {c["flow_run_id"]: flow_run(stack.server, c["flow_run_id"]) for c in children}
        running = [b for b in stack.stats()["batches"] if b["status"] == "in_progress"]
        if any(s["state_type"] != "RUNNING" for s in states.values()) or len(running) < CAP:
            return None
        return children

    children = wait_for(all_children_running, RUN_TIMEOUT, "four running children", 0.5)
    parent_worker = ran_by(stack.server, parent)
    assert parent_worker in stack.workers
    survivor = stack.workers[parent_worker]
    victim = next(w for name, w in stack.workers.items() if name != parent_worker)
    lost = {c["group"] for c in children if ran_by(stack.server, c["flow_run_id"]) == victim.name}
    assert lost, "the other worker runs some of the children"
    batches_before = {b["id"] for b in stack.stats()["batches"]}

    victim.kill()
    os.kill(stack.flow_run_process(survivor, parent), signal.SIGKILL)
    wait_for_state(stack.server, parent, {"CRASHED"}, RUN_TIMEOUT)
    stack.emulator("POST", "/_emulator/config", {"lines_per_second": RATE})
    again = stack.start(parameters)
    wait_for_state(stack.server, again, {"COMPLETED"}, 600)
    stack.timings["fan-out job, a worker and the parent killed"] = time.monotonic() - began

    after = stack.children_of("crash")
    attempts = {g: [c for c in after if c["group"] == g] for g in range(GROUPS)}
    for g, runs in attempts.items():
        if g not in lost:
            ended = [flow_run(stack.server, c["flow_run_id"]) for c in runs[:-1]]
            how = [
                (r["state_type"], r["state"]["message"], (r.get("labels") or {}).get(WORKER))
                for r in ended
            ]
            assert len(runs) == 1, f"group {g} was started again: {runs} after {how}; lost {lost}"
            continue
        assert [c["attempt"] for c in runs] == [1, 2], runs
        first, second = (flow_run(stack.server, c["flow_run_id"]) for c in runs)
        assert first["state_type"] == "CRASHED" and "heartbeat" in first["state"]["message"]
        assert second["state_type"] == "COMPLETED"
        assert ran_by(stack.server, second["id"]) == survivor.name
    assert stack.calls("POST /v1/batches") == SHARDS, "one batch per shard, the dead's reused"
    assert batches_before <= {b["id"] for b in stack.stats()["batches"]}
    rows = [json.loads(line) for line in stack.store.read(BUCKET, "crash/out.jsonl").splitlines()]
    assert [r["custom_id"] for r in rows] == ids
    assert {r["status"] for r in rows} == {"ok"}
