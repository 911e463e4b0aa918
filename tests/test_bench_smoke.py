"""The benchmark runs end to end at a tiny size, and the helper-process paths it relies on
for speed give exactly what the single-process paths give.

Correctness only: no wall-time assertions (timings on shared machines are noise).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import prefect_kluster.tasks._lines as lines_module
from prefect_kluster.tasks.build import RequestFileError, shard_request_file
from prefect_kluster.tasks.join import join_result_files
from tests.helpers import request, without_native, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_bench_prints_every_figure(tmp_path):
    """Every section at a tiny size, its steps in bench.py's own process (``--in-process``):
    a fresh interpreter per step imports Prefect each time, which took most of this test's
    100-150 s. ``test_bench_step_runs_in_a_fresh_process`` checks that path."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench.py"),
            "--quick",
            "--in-process",
            # the session's server, not a temporary one for each flow step
            "--prefect-api-url",
            PREFECT_API_URL.value(),
            # (f) starts PostgreSQL, a server and two workers: the stack tests/test_fanout.py
            # already runs; `benchmarks/fanout_bench.py --quick` checks that section alone.
            "--skip-fanout",
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for figure in (
        "(a) validate + shard",
        "(b) join N=2,000 results",
        "(c) end to end, 500 requests",
        "(c') end to end, 500 requests (0.2 MB), emulator in a process of its own",
        "peak RSS growth N=200 -> N=2,000",
        "emulator (flow run, 1 batch(es)): validation",
        "time beyond the emulator's own: flow",
        "turn 1: guide's script",
        "(d) validate + shard + cost tally, real-world text",
        "(e) join N=2,000 real-world results",
        "the cost estimate's throughput cost:",
        "(g) 10 batches waiting one hour on a queued service",
        "retrieves, ",
    ):
        assert figure in out
    table = out[out.index("step          impl") :]
    for step, impl in [
        ("a shard", "ours"),
        ("a shard", "baseline"),
        ("b join", "ours"),
        ("b join", "baseline"),
        ("c e2e", "ours"),
        ("c e2e", "baseline"),
        ("c' e2e", "ours"),
        ("c' e2e", "baseline"),
        ("d real shard", "plain read"),
        ("d real shard", "ours"),
        ("d real shard", "no estimate"),
        ("e real join", "plain read"),
        ("e real join", "ours"),
        ("c2 e2e parts", "baseline"),
        ("c2 e2e parts", "ours"),
    ]:
        assert any(line.startswith(step) and impl in line for line in table.splitlines())
    for target in ("shard", "join", "e2e flow", "real-world shard", "real-world join", "hour"):
        assert f"target {target}" in out
    # Each real-world target names its figure, the plain read it is measured against, and
    # the target itself.
    assert re.search(
        r"target real-world shard [\d.]+ MB/s = [\d.]+ of a plain read .* >= 0\.35", out
    )
    assert re.search(
        r"target real-world join [\d.]+ MB/s = [\d.]+ of a plain read .* >= 0\.25", out
    )
    # Issue 13's end-to-end targets: against the guide's script, and past the 100 MB limit
    # against its way applied to each part in turn (the quick run cuts four parts).
    assert re.search(r"target e2e flow [\d.]+x the guide's script \(same run\) >= 1\.0x", out)
    assert re.search(
        r"target e2e flow, emulator in a subprocess, [\d.]+x the guide's script \(same run\)"
        r" >= 1\.0x",
        out,
    )
    assert re.search(r"target e2e in parts [\d.]+x the guide's way part by part >= 3x", out)
    assert re.search(r"the guide's way: [2-9] part\(s\), one after the other", out)
    assert out.count("MB/s") >= 7 and "peak RSS" in out
    # (c)'s timelines: the guide's steps, and the flow's task runs as Prefect recorded them,
    # in the lifecycle's order (each step starts after the one it waits on has ended).
    assert re.search(
        r"the guide's script, s from its start to the end of each step: client [\d.]+, upload "
        r"[\d.]+, create [\d.]+, poll until done [\d.]+, download \(\.content\) [\d.]+",
        out,
    )
    flow_line = next(line for line in out.splitlines() if "the flow's task runs" in line)
    runs = {
        name: (float(start), float(end or start))
        for name, start, end in re.findall(
            r"([a-z][a-z -]+?) ([\d.]+)(?:-([\d.]+))?(?:,|$)", flow_line
        )
    }
    lifecycle = [
        "validate-shard-and-estimate",
        "upload-shard",
        "submit-shard",
        "wait-for-batch",
        "download-batch-results",
        "join-round",
        "flow run end",
    ]
    assert set(lifecycle) <= set(runs), flow_line
    for before, after in zip(lifecycle, lifecycle[1:], strict=False):
        assert runs[before][1] <= runs[after][0], (before, after, flow_line)
    # The page-cache probe: the three writes timed.
    probe = re.search(
        r"page cache: 20 MiB in 1 MiB writes took ([\d.]+) s after 0\.5 s in which nothing "
        r"was freed, ([\d.]+) s into the pages just freed \([\d.]+x\); in 256 KiB pieces, "
        r"as our steps write, ([\d.]+) s after 0\.5 s",
        out,
    )
    assert probe, out[:2000]
    assert all(float(seconds) > 0 for seconds in probe.groups())
    warmed = re.search(r"memory warm-up: 64 MiB taken and given back in ([\d.]+) s", out)
    assert warmed and float(warmed.group(1)) > 0, out[:2000]
    # The real-world data has the shapes it claims.
    data = (tmp_path / "work" / "real-requests.jsonl").read_bytes()
    lines = data.split(b"\n")[:-1]
    assert 0 < sum(line.endswith(b"\r") for line in lines) < len(lines)
    assert b'"image_url"' in data and "Объясни".encode() in data and b"\\u" not in data
    assert max(map(len, lines)) > 1500  # long system prompts


def test_bench_step_runs_in_a_fresh_process(tmp_path, monkeypatch):
    """The way ``make bench`` runs each step: data made by processes side by side, then a
    step in its own interpreter whose last output line is its JSON result, with its own
    peak RSS."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench

    monkeypatch.setattr(bench, "IN_PROCESS", False)
    source = tmp_path / "requests.jsonl"
    made = bench.run_parallel(
        [
            ("gen-requests", {"path": str(source), "n": 300}),
            ("gen-real-requests", {"path": str(tmp_path / "real.jsonl"), "n": 30}),
        ]
    )
    assert made[0]["bytes"] == source.stat().st_size > 0
    assert made[1]["bytes"] == (tmp_path / "real.jsonl").stat().st_size > 0
    result = bench.run_step("ours-shard", source=str(source), out_dir=str(tmp_path / "shards"))
    assert [s["lines"] for s in result["shards"]] == [300]
    assert result["seconds"] > 0 and result["load"] >= 0
    assert result["own_rss_mb"] > 20  # a Python process that imported Prefect
    assert "steps" not in sys.modules  # the step ran in its own process, not in this one


@pytest.fixture
def always_helper(monkeypatch):
    """Use the helper process even for tiny inputs, in tiny blocks (the Python check: the
    compiled one runs on threads, without the helper)."""
    without_native(monkeypatch)
    monkeypatch.setattr(lines_module.Helper, "MIN_BYTES", 0)
    monkeypatch.setattr(lines_module, "BLOCK_BYTES", 256)
    monkeypatch.setattr(lines_module, "REQUEST_BLOCK_BYTES", 256)


HELPER_MODES = ["works", "dies at start", "fails every block"]


def _break_helper(monkeypatch, mode: str) -> None:
    if mode == "dies at start":
        monkeypatch.setattr(lines_module, "_BOOT", "raise SystemExit(3)")
    elif mode == "fails every block":
        broken = (
            "import prefect_kluster.tasks._lines as m; "
            "m.JoinedBlock = m.check_requests = None; serve("
        )
        monkeypatch.setattr(lines_module, "_BOOT", lines_module._BOOT.replace("serve(", broken))


def _ids(n: int) -> list[str]:
    return [random.Random(i).choice([f"r{i}", f"é-{i}", f'q"{i}']) for i in range(n)]


def _shards(path: Path, out: Path, **kw):
    shards = shard_request_file(path, out, **kw)
    return [(s.lines, s.bytes, s.first_line, s.sha256) for s in shards], shards


@pytest.mark.parametrize("mode", HELPER_MODES)
def test_helper_gives_the_same_shards(tmp_path, monkeypatch, always_helper, mode):
    _break_helper(monkeypatch, mode)
    src = write_jsonl(tmp_path / "in.jsonl", [request(i) for i in _ids(300)])
    helped, _ = _shards(src, tmp_path / "a", max_requests_per_file=70)
    monkeypatch.setattr(lines_module.Helper, "MIN_BYTES", 1 << 40)
    alone, _ = _shards(src, tmp_path / "b", max_requests_per_file=70)
    assert helped == alone and sum(x[0] for x in helped) == 300


def test_helper_blocks_with_problems_name_the_same_lines(tmp_path, always_helper):
    rows: list[dict | str] = [request(i) for i in _ids(200)]
    rows[150] = "not json"
    rows[170] = request(_ids(200)[3])  # a duplicate: not reported beside other problems
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(RequestFileError) as err:
        shard_request_file(src, tmp_path / "out")
    assert [p.line for p in err.value.problems] == [151]
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("mode", HELPER_MODES)
def test_helper_gives_the_same_join(tmp_path, monkeypatch, always_helper, mode):
    _break_helper(monkeypatch, mode)
    ids = _ids(400)
    src = write_jsonl(tmp_path / "in.jsonl", [request(i) for i in ids])
    shards = shard_request_file(src, tmp_path / "shards", max_requests_per_file=150)
    rng = random.Random(7)
    order = ids[:]
    rng.shuffle(order)
    results = []
    for n, custom_id in enumerate(order[:-5]):
        ok = n % 9 != 0
        body = (
            {
                "model": "m",
                "choices": [{"message": {"content": f"a{n}"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1},
            }
            if ok
            else {"error": {"message": "boom"}}
        )
        status = 200 if ok else rng.choice([400, 429, 500])
        results.append({"custom_id": custom_id, "response": {"status_code": status, "body": body}})
    out_file = write_jsonl(tmp_path / "out.jsonl", results)
    retried = [  # a later round: these win
        {"custom_id": r["custom_id"], "response": {"status_code": 200, "body": {"choices": []}}}
        for r in results[:40]
    ]
    retry_file = write_jsonl(tmp_path / "retry.jsonl", retried)

    def join(name: str):
        summary = join_result_files(
            shards,
            [str(out_file), str(retry_file)],
            tmp_path / f"{name}.jsonl",
            retry_ids_path=tmp_path / f"{name}.retry",
        )
        return (
            summary.model_dump(exclude={"output_path"}),
            (tmp_path / f"{name}.jsonl").read_bytes(),
            (tmp_path / f"{name}.retry").read_bytes(),
        )

    helped = join("helped")
    monkeypatch.setattr(lines_module.Helper, "MIN_BYTES", 1 << 40)
    alone = join("alone")
    assert helped == alone
    rows = [json.loads(line) for line in helped[1].splitlines()]
    assert [r["custom_id"] for r in rows] == ids
    assert helped[0]["requests"] == 400


@pytest.mark.parametrize("mode", HELPER_MODES)
def test_helper_takes_crlf_and_long_contents_with_the_same_tally(tmp_path, monkeypatch, mode):
    """Real-world shapes (CRLF on some lines, a long system prompt repeated, non-ASCII text,
    image parts) go to the helper too, and the shards and the cost tally do not change."""
    from prefect_kluster.tasks._lines import BlockCost
    from prefect_kluster.tasks.build import shard_and_tally
    from prefect_kluster.tasks.schema import request_decoder

    without_native(monkeypatch)
    monkeypatch.setattr(lines_module.Helper, "MIN_BYTES", 0)
    monkeypatch.setattr(lines_module, "REQUEST_BLOCK_BYTES", 4096)
    _break_helper(monkeypatch, mode)
    system = "Réponds brièvement. 回答要简洁。\n" * 40  # long, repeated, with an escape
    rows = []
    for i, custom_id in enumerate(_ids(120)):
        row = request(custom_id, f"Объясни {i} 🎉", max_completion_tokens=i)
        if i % 3 == 0:
            row["body"]["messages"].insert(0, {"role": "system", "content": system})
        if i % 5 == 0:
            row["body"]["messages"][-1]["content"] = [
                {"type": "text", "text": f"Décris {i}"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ]
        rows.append(json.dumps(row, ensure_ascii=i % 2 == 0).encode() + (b"\r" if i % 4 else b""))
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    expected = BlockCost()
    for raw in src.read_bytes().splitlines():
        expected.add(request_decoder.decode(raw).body)

    def run(name: str):
        shards, tally = shard_and_tally(src, tmp_path / name, max_requests_per_file=50)
        data = b"".join(open(s.path, "rb").read() for s in shards)
        return [(s.lines, s.sha256) for s in shards], tally, data

    helped = run("helped")
    monkeypatch.setattr(lines_module.Helper, "MIN_BYTES", 1 << 40)
    alone = run("alone")
    assert helped == alone
    assert b"\r" not in helped[2] and helped[2].count(b"\n") == 120
    assert helped[1] == type(helped[1]).from_block_cost(expected)
