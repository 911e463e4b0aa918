"""The command line as a new user meets it: mistakes are named at once, before Prefect starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import requests, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Run the CLI; returns (the finished process, its CPU seconds, wall seconds).

    The "at once" bounds are on the CLI's own CPU time (user + system, from wait4): what it
    does, whatever else the machine runs (CI runs two test processes on two cores). On a
    quiet machine its wall time is about the same; wall time is bounded only against hangs."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KLUSTER_", "PREFECT_API"))}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.batch_inference", *args],
            stdout=out,
            stderr=err,
            text=True,
            cwd=ROOT,
            env={**base, **(env or {})},
        )
        deadline = started + timeout
        while (reaped := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"the CLI ran over {timeout:g} s")
            time.sleep(0.01)
        _, status, usage = reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    return done, usage.ru_utime + usage.ru_stime, seconds


def test_missing_key_is_refused_at_once_with_no_server(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", requests(2))
    done, cpu, wall = _cli(str(src), "-o", str(tmp_path / "o.jsonl"), env={"HOME": str(tmp_path)})
    assert done.returncode == 1
    assert "no kluster.ai API key" in done.stderr and "KLUSTER_API_KEY" in done.stderr
    assert "temporary server" not in done.stdout + done.stderr, "no Prefect server started"
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr
    assert cpu < 3 and wall < 60, f"took {cpu:.1f} s of CPU, {wall:.1f} s"


def test_missing_input_and_existing_output_are_refused_at_once(tmp_path):
    env = {"KLUSTER_API_KEY": "k", "HOME": str(tmp_path)}
    done, _, _ = _cli(str(tmp_path / "nope.jsonl"), env=env)
    assert done.returncode == 1 and "nope.jsonl does not exist" in done.stderr
    out = tmp_path / "o.jsonl"
    out.write_text("keep\n")
    src = write_jsonl(tmp_path / "in.jsonl", requests(1))
    done, cpu, wall = _cli(str(src), "-o", str(out), env=env)
    assert done.returncode == 1 and "already exists; pass --overwrite" in done.stderr
    assert out.read_text() == "keep\n"
    assert cpu < 10 and wall < 60, f"took {cpu:.1f} s of CPU, {wall:.1f} s (no server is needed)"


def test_bad_flags_are_refused_by_the_parser(tmp_path):
    done, _, _ = _cli("x.jsonl", "--poll-interval", "0")
    assert done.returncode == 2 and "--poll-interval must be a positive" in done.stderr


def test_unreachable_service_names_the_url_and_the_attempts(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    src = write_jsonl(tmp_path / "in.jsonl", requests(1))
    env = {"KLUSTER_API_KEY": "k", "KLUSTER_BASE_URL": url, "HOME": str(tmp_path)}
    done, _, seconds = _cli(str(src), "-o", str(tmp_path / "o.jsonl"), env=env)
    assert done.returncode == 1
    assert f"cannot reach the kluster.ai API at {url}" in done.stderr
    assert "2 attempt(s)" in done.stderr and "Check KLUSTER_BASE_URL" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr
    # Two attempts, 5 s each at most: named well before a run's 27 s of task retries.
    assert seconds < 20, f"took {seconds:.1f} s"


def test_no_wait_then_collect_from_the_shell(tmp_path, kluster_env):
    """`--no-wait` submits and returns; `python -m flows.collect` finishes the run and exits
    0 once nothing is left pending (3 while batches still run)."""
    from prefect.settings import PREFECT_API_URL

    from tests.conftest import TEST_API_KEY
    from tests.helpers import read_jsonl

    kluster_env.configure(lines_per_second=20)
    rows = requests(40)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "later.jsonl"
    env = {
        "KLUSTER_API_KEY": TEST_API_KEY,
        "KLUSTER_BASE_URL": kluster_env.base_url,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }
    done, _, _ = _cli(
        str(src), "-o", str(out), "--no-wait", "--max-requests-per-file", "20", env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not waiting" in done.stdout and "python -m flows.collect" in done.stdout
    assert not out.exists()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KLUSTER_", "PREFECT_API"))}
    codes = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        collect = subprocess.run(
            [sys.executable, "-m", "flows.collect"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**base, **env},
            timeout=180,
        )
        codes.append(collect.returncode)
        assert collect.returncode in (0, 3), collect.stderr[-3000:]
        if collect.returncode == 0:
            break
    assert codes[-1] == 0 and "0 still waiting" in collect.stdout, codes
    assert [r["custom_id"] for r in read_jsonl(out)] == [r["custom_id"] for r in rows]
