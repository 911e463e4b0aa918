"""The production shape (issue 9) stands up and behaves: PostgreSQL, a Prefect server on it,
moto's S3 server, and two process workers that share only the server and the store.

Select with ``pytest tests/test_production_infra.py -s`` (``-s`` shows how long each piece
took to start). The acceptance tests of issue 9 build on tests/production.py the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.deployments import run_deployment

from tests.production import (
    Postgres,
    ProductionServer,
    S3Store,
    Worker,
    create_process_pool,
    deploy,
    moto_s3,
    postgres,
    prefect_server_on,
    ran_by,
    wait_for_state,
    worker,
)
from tests.server import prefect_api, wait_for

BUCKET = "kluster-test"
POOL = "production-pool"
DEPLOYMENT = "worker-probe/probe"
RUN_TIMEOUT = 90.0  # one probe run: worker pick-up and a fresh Python process under load


@pytest.fixture(scope="session", autouse=True)
def prefect_backend() -> Iterator[None]:
    """These tests talk to their own PostgreSQL-backed server: no SQLite test harness."""
    yield


@dataclass
class Shape:
    base: Path
    pg: Postgres
    server: ProductionServer
    store: S3Store
    workers: dict[str, Worker]
    timings: dict[str, float]

    def start(self, tag: str, release: str | None = None, hold: float = 60.0) -> str:
        """Start a probe run through the deployment (as the UI or a schedule would)."""
        parameters: dict[str, object] = {"marker_url": f"s3://{BUCKET}/markers/{tag}.json"}
        if release:
            parameters.update(release_url=release, hold_seconds=hold)
        return str(run_deployment(DEPLOYMENT, parameters=parameters, timeout=0).id)

    def marker(self, tag: str, timeout: float = RUN_TIMEOUT) -> dict[str, str]:
        """Where the run tagged ``tag`` executes, once it has written its marker object."""
        return wait_for(
            lambda: json.loads(self.store.read(BUCKET, f"markers/{tag}.json")),
            timeout,
            f"the marker object of run {tag}",
            0.5,
        )

    def worker_of(self, marker: dict[str, str]) -> Worker:
        (found,) = [w for w in self.workers.values() if w.machine_id == marker["machine"]]
        return found


@pytest.fixture(scope="module")
def shape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shape]:
    base = tmp_path_factory.mktemp("production")
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        store = stack.enter_context(moto_s3(base))
        timings["moto s3 server"] = store.started_in
        pg = stack.enter_context(postgres(base))
        timings["postgres (initdb, start, createdb)"] = pg.started_in
        server = stack.enter_context(prefect_server_on(pg.url, base))
        timings["prefect server on postgres (first start, migrations)"] = server.start_times[0]
        store.create_bucket(BUCKET)
        create_process_pool(server, POOL)
        # limit=1: a worker busy with one run leaves the next to the other one.
        workers = {
            name: stack.enter_context(
                worker(server, POOL, name, base, env=store.env, limit=1, wait=False)
            )
            for name in ("a", "b")
        }
        for w in workers.values():
            timings[f"worker {w.name} (both spawned together)"] = w.wait_ready()
        began = time.monotonic()
        deploy(server, "tests.flows_for_workers.worker_probe", "probe", POOL)
        timings["deploy"] = time.monotonic() - began
        stack.enter_context(prefect_api(server.api_url))
        yield Shape(base, pg, server, store, workers, timings)
        print("\nproduction shape start-up, seconds:")
        for what, seconds in timings.items():
            print(f"  {what}: {seconds:.1f}")
        (base / "timings.json").write_text(json.dumps(timings, indent=2))


def test_two_workers_share_only_the_server_and_the_store(shape: Shape) -> None:
    began = time.monotonic()
    release = f"s3://{BUCKET}/release/together"
    runs = {tag: shape.start(tag, release) for tag in ("together-1", "together-2")}
    # Both runs hold until released; with one run per worker, each worker has one.
    markers = {tag: shape.marker(tag) for tag in runs}
    ran_on = {tag: shape.worker_of(marker) for tag, marker in markers.items()}
    assert {w.name for w in ran_on.values()} == {"a", "b"}
    for tag, run_id in runs.items():
        w, marker = ran_on[tag], markers[tag]
        # The server records the worker that took the run as the run's label.
        assert ran_by(shape.server, run_id) == w.name
        # Each run sees only its own machine: HOME, and a workspace under its TMPDIR.
        assert marker["home"] == str(w.home)
        assert Path(marker["cwd"]).is_relative_to(w.tmp_dir), marker
    assert shape.store.list_keys(BUCKET, "markers/") == [
        "markers/together-1.json",
        "markers/together-2.json",
    ]

    shape.store.client().put_object(Bucket=BUCKET, Key="release/together", Body=b"")
    for run_id in runs.values():
        wait_for_state(shape.server, run_id, {"COMPLETED"}, RUN_TIMEOUT)
    shape.timings["two held runs on two workers, to completed"] = time.monotonic() - began


def test_server_killed_and_started_again_on_the_same_database(shape: Shape) -> None:
    server = shape.server
    before = server.api("POST", "/flow_runs/filter", {})
    port = server.port

    server.kill()
    assert not server.healthy()
    shape.timings["prefect server restart on the same database"] = server.start()

    assert server.port == port and server.healthy()
    # Everything recorded before the kill is still there: the database is the state.
    after = server.api("POST", "/flow_runs/filter", {})
    assert {(r["id"], r["state_type"]) for r in after} == {
        (r["id"], r["state_type"]) for r in before
    }
    assert server.api("GET", f"/deployments/name/{DEPLOYMENT}")["work_pool_name"] == POOL
    # Both workers reconnect on their own (heartbeats resume against the new process).
    for w in shape.workers.values():
        wait_for(lambda w=w: w.status() == "ONLINE", 30, f"worker {w.name} ONLINE again")


def test_a_killed_worker_leaves_the_other_serving(shape: Shape) -> None:
    began = time.monotonic()
    # A run that holds (its release never comes) keeps a flow-run process alive on a worker.
    held = shape.start("held", f"s3://{BUCKET}/release/never", hold=300)
    marker = shape.marker("held")
    victim = shape.worker_of(marker)
    (survivor,) = [w for w in shape.workers.values() if w is not victim]
    flow_run_pid = int(marker["pid"])
    assert flow_run_pid in victim.pids()
    assert ran_by(shape.server, held) == victim.name

    killed = victim.kill()

    assert flow_run_pid in killed and victim.process.popen.pid in killed
    assert victim.pids() == [] and not victim.alive()
    assert survivor.alive() and survivor.status() == "ONLINE"
    after = shape.start("after-kill")
    wait_for_state(shape.server, after, {"COMPLETED"}, RUN_TIMEOUT)
    assert ran_by(shape.server, after) == survivor.name
    assert shape.marker("after-kill", timeout=5)["machine"] == survivor.machine_id
    shape.timings["kill -9 a worker with a run in flight, a run on the other"] = (
        time.monotonic() - began
    )
