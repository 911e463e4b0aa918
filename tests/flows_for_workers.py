"""A tiny flow for the production-shape tests, deployed as ``tests.flows_for_workers.
worker_probe`` (a module path: workers import it, nothing is copied to them).

It records where it ran in an object (through fsspec, so ``s3://`` reaches the test's
object store with the standard AWS environment), and can hold until a release object
exists, so a test can keep a run in flight on a worker while it kills or starts things.
"""

from __future__ import annotations

import json
import os
import socket
import time

import fsspec
from prefect import flow

MACHINE_ENV = "KLUSTER_TEST_MACHINE"  # tests/production.py sets it on each worker machine


@flow(name="worker-probe", log_prints=True)
def worker_probe(
    marker_url: str, release_url: str | None = None, hold_seconds: float = 60.0
) -> dict[str, str]:
    """Write where this run executes to ``marker_url``; then, if ``release_url`` is given,
    wait (at most ``hold_seconds``) until that object exists."""
    where = {
        "hostname": socket.gethostname(),
        "home": os.environ.get("HOME", ""),
        "cwd": os.getcwd(),
        "pid": str(os.getpid()),
        "machine": os.environ.get(MACHINE_ENV, ""),
    }
    with fsspec.open(marker_url, "w") as out:
        json.dump(where, out)
    print(f"worker-probe ran on {where['machine']} in {where['cwd']}")
    if release_url:
        fs, path = fsspec.core.url_to_fs(release_url)
        deadline = time.monotonic() + hold_seconds
        while True:
            fs.invalidate_cache()
            if fs.exists(path):
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{release_url} did not appear within {hold_seconds:g}s")
            time.sleep(0.2)
    return where
