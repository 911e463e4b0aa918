"""Runs on shared storage: URLs everywhere, write-once state, one batch per shard across runs.

The object store is moto's S3 server over HTTP (s3fs, the standard AWS variables); the
service is the emulator; two runs racing each other share only the Prefect server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from prefect_kluster.flows import batch_inference
from prefect_kluster.tasks import storage
from prefect_kluster.tasks.storage import StorageRootError
from prefect_kluster.tasks.submit import SHA_KEY
from tests.conftest import TEST_API_KEY
from tests.helpers import read_jsonl, requests, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


# --- the storage layer ----------------------------------------------------------------------


@pytest.mark.parametrize("base", ["local", "memory://kluster-storage-test"])
def test_create_once_and_publish(tmp_path, base):
    root = str(tmp_path) if base == "local" else f"{base}/{tmp_path.name}"
    record = storage.join(root, "state", "a.json")
    assert storage.create_once(record, b"first")
    assert not storage.create_once(record, b"second"), "a record is written once"
    assert storage.read_bytes(record) == b"first"

    out = storage.join(root, "out.jsonl")
    with pytest.raises(RuntimeError), storage.published(out) as handle:
        handle.write(b"half")
        raise RuntimeError("crash mid-write")
    assert not storage.exists(out), "a failed write publishes nothing"
    assert [p for p in storage.listdir(root) if p.endswith(".tmp")] == []
    with storage.published(out) as handle:
        handle.write(b"whole\n")
    assert storage.read_bytes(out) == b"whole\n"


def test_storage_roots():
    roots = ["s3://bucket/kluster/", "/data/kluster"]
    storage.check_roots({"output_path": "s3://bucket/kluster/run1/out.jsonl"}, roots)
    storage.check_roots({"work_dir": "/data/kluster/w"}, roots)
    for bad in ("s3://bucket/other/out.jsonl", "s3://bucket/kluster2/x", "/data/kluster/../etc"):
        with pytest.raises(StorageRootError, match="outside the storage roots") as err:
            storage.check_roots({"output_path": bad}, roots)
        assert bad in str(err.value) and "s3://bucket/kluster/" in str(err.value)
    storage.check_roots({"output_path": "/anywhere"}, [])  # no roots: anywhere


def test_a_run_outside_the_roots_reads_and_pays_nothing(tmp_path, kluster_env, monkeypatch):
    monkeypatch.setenv("KLUSTER_STORAGE_ROOTS", str(tmp_path / "allowed"))
    (tmp_path / "allowed").mkdir()
    src = write_jsonl(tmp_path / "allowed" / "in.jsonl", requests(2))
    with pytest.raises(StorageRootError, match="output_path"):
        batch_inference(input_path=str(src), output_path=str(tmp_path / "other" / "o.jsonl"))
    assert kluster_env.stats()["requests"] == {}
    assert not (tmp_path / "other").exists()


# --- one batch per shard across runs ----------------------------------------------------------


def _cli_env(emulator, **extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KLUSTER_", "AWS_"))},
        "KLUSTER_API_KEY": TEST_API_KEY,
        "KLUSTER_BASE_URL": emulator.base_url,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def test_two_identical_runs_at_once_pay_once(tmp_path, kluster_env):
    """Two processes run the same input at the same moment, with separate work dirs and
    outputs (two workers that share only the Prefect server): one batch per shard in
    total, and both outputs complete."""
    # Slow uploads widen the window between looking a shard up and paying for it.
    kluster_env.configure(lines_per_second=40, latency=8, fault_routes=["POST /v1/files"])
    rows = requests(40)
    src = write_jsonl(tmp_path / "in.jsonl", rows)

    def start(name: str) -> subprocess.Popen:
        args = [str(src), "-o", str(tmp_path / name / "out.jsonl")]
        args += ["--max-requests-per-file", "10", "--poll-interval", "0.1"]
        return subprocess.Popen(
            [sys.executable, "-m", "flows.batch_inference", *args],
            cwd=ROOT,
            env=_cli_env(kluster_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start(name) for name in ("a", "b")]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for name in ("a", "b"):
        assert [r["custom_id"] for r in read_jsonl(tmp_path / name / "out.jsonl")] == [
            r["custom_id"] for r in rows
        ]
    created = kluster_env.stats()["requests"]["POST /v1/batches"]
    assert created == 4, f"{created} batches for 4 shards: one per shard, not one per run"


def test_list_scans_stop_when_the_service_ignores_cursors(tmp_path, kluster_env, caplog):
    """A service whose lists ignore `after` would make the SDK's iterator loop forever."""
    import openai

    client = openai.OpenAI(api_key=TEST_API_KEY, base_url=kluster_env.base_url)
    for i in range(3):  # a full first page of batches made by this integration
        file_id = client.files.create(
            file=(f"x{i}.jsonl", write_jsonl(tmp_path / f"x{i}.jsonl", requests(1)).read_bytes()),
            purpose="batch",
        ).id
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={SHA_KEY: f"other-{i}"},
        )
    kluster_env.configure(ignore_after="no_has_more")
    rows = requests(5)
    result = batch_inference(
        input_path=str(write_jsonl(tmp_path / "in.jsonl", rows)),
        output_path=str(tmp_path / "o.jsonl"),
        run={"poll_interval": 0.05},
    )
    assert result.status == "completed"
    assert [r["custom_id"] for r in read_jsonl(tmp_path / "o.jsonl")] == [
        r["custom_id"] for r in rows
    ]
    assert "ignores the 'after' cursor" in caplog.text


# --- a whole run on S3 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[object]:
    from tests.production import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto")) as store:
        yield store


def test_cli_run_on_s3_leaves_nothing_on_local_disk(tmp_path, s3, kluster_env):
    bucket = s3.create_bucket("kluster-cli-run")
    rows = requests(30)
    # multilingual text and CRLF line ends, as users' files have them
    rows[3]["body"]["messages"][0]["content"] = "Übersetze: «こんにちは» — ¿qué tal?"
    src = write_jsonl(tmp_path / "in.jsonl", rows, newline=b"\r\n")
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = _cli_env(kluster_env, TMPDIR=str(tmp), **s3.env)
    done = subprocess.run(
        [sys.executable, "-m", "flows.batch_inference", str(src), "-o",
         f"{bucket}/out.jsonl", "--work-dir", f"{bucket}/run1", "--max-requests-per-file",
         "10", "--poll-interval", "0.1"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Results: {bucket}/out.jsonl" in done.stdout
    out = s3.read("kluster-cli-run", "out.jsonl").decode()
    joined = [line for line in out.splitlines()]
    assert [__import__("json").loads(line)["custom_id"] for line in joined] == [
        r["custom_id"] for r in rows
    ]
    keys = s3.list_keys("kluster-cli-run")
    assert sum(k.startswith("run1/shards/") and k.endswith(".jsonl") for k in keys) == 3
    assert any(k.startswith("run1/state/") for k in keys)
    assert not [k for k in keys if k.endswith(".tmp")], "nothing half-written is left"
    left = [p for d in (cwd, tmp) for p in d.rglob("*") if p.is_file()]
    assert left == [], f"files left on local disk: {left}"
    # The join's first pass was made as the results downloaded: none is read back from
    # the bucket (moto's log has each request; a listing GET has a "?" after the bucket).
    results = "/kluster-cli-run/run1/round-1/results/"
    log = s3.process.log.read_text()
    assert log.count(f'"PUT {results}') >= 6  # 3 shards' output files, written and copied
    assert f'"GET {results}' not in log
    assert not Path("s3:").exists() and not (cwd / "s3:").exists()


def test_memory_url_output_and_work_dir(tmp_path, kluster_env):
    rows = requests(6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    base = f"memory://kluster-{tmp_path.name}"
    result = batch_inference(
        input_path=str(src),
        output_path=f"{base}/out.jsonl",
        output={"work_dir": f"{base}/work", "parquet": True},
        run={"poll_interval": 0.05},
    )
    assert result.output_path == f"{base}/out.jsonl"
    with fsspec.open(f"{base}/out.jsonl", "rb") as handle:
        got = [__import__("json").loads(line)["custom_id"] for line in handle]
    assert got == [r["custom_id"] for r in rows]
    assert result.parquet_path == f"{base}/out.parquet" and storage.exists(result.parquet_path)
    assert not list(tmp_path.glob("*.work"))
