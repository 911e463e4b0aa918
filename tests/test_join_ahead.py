"""The join's first pass made as result files download (``FirstPassAhead``): the join takes
it instead of reading the files again, and its output is the same to the byte."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import openai
import pytest

import prefect_kluster.tasks._lines as line_work
import prefect_kluster.tasks.join as join_module
from prefect_kluster.blocks import KlusterCredentials
from prefect_kluster.emulator import EmulatorConfig, run_emulator
from prefect_kluster.tasks.download import stream_file_to
from prefect_kluster.tasks.join import FirstPassAhead, ResultFileError, join_result_files
from tests.helpers import requests, write_jsonl
from tests.test_join import error_line, long_answers, make_shards, ok_line, watch_releases
from tests.test_resilience import assert_complete, run_flow

pytestmark = pytest.mark.skipif(
    line_work.native_join_block is None, reason="needs the compiled join (make native)"
)


def encoded(rows: list[dict | bytes], crlf_every: int = 0) -> bytes:
    lines = [row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode()
             for row in rows]  # fmt: skip
    ends = [b"\r\n" if crlf_every and i % crlf_every == 0 else b"\n" for i in range(len(lines))]
    return b"".join(line + end for line, end in zip(lines, ends, strict=True))


def downloaded(path: Path, data: bytes, seed: int, drop_last_newline: bool = False) -> None:
    """``data`` arriving at ``path`` in pieces of random sizes (1 byte to 70 KB, so lines
    are cut anywhere), as ``stream_file_to`` feeds them, then published."""
    if drop_last_newline:
        data = data.rstrip(b"\n")
    ahead = FirstPassAhead.start(str(path))
    assert ahead is not None
    rng = random.Random(seed)
    at = 0
    with open(path, "wb") as handle:
        while at < len(data):
            size = rng.choice([1, 2, 7, 100, 4096, 70_000])
            piece = data[at : at + size]
            handle.write(piece)
            ahead.feed(piece)
            at += size
    ahead.finish()


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every result file the join's own first pass reads."""
    seen: list[str] = []
    original = line_work.map_block_parts

    def recording(path, *args, **kwargs):
        seen.append(os.path.basename(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(line_work, "map_block_parts", recording)
    return seen


def answers(ids: list[str]) -> list[dict]:
    """Long multilingual answers, so a file spans many pieces."""
    words = ["naïve", "日本語の答え", "ответ", "😀", 'a "quoted" one', "back\\slash", "x" * 300]
    return [ok_line(i, " ".join(words[: 1 + n % len(words)]) * 3, n, 2 * n)
            for n, i in enumerate(ids)]  # fmt: skip


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_join_takes_the_pass_made_while_downloading_and_writes_the_same(tmp_path, reads, seed):
    ids = [f"req-{n}" for n in range(400)]
    shards = make_shards(tmp_path, ids, cap=150)
    order = ids[:]
    random.Random(seed).shuffle(order)
    out = encoded(answers(order[:300]) + [b"", b"   "], crlf_every=7)  # blank lines too
    err = encoded([error_line(i, 429, "rate_limit_exceeded") for i in order[300:350]])
    retry = encoded([ok_line(i, f"second try {i}") for i in order[300:320]])
    files = {"out.jsonl": out, "err.jsonl": err, "retry.jsonl": retry}
    paths = [str(tmp_path / "given" / name) for name in files]
    (tmp_path / "given").mkdir()
    for path, data in zip(paths, files.values(), strict=True):
        Path(path).write_bytes(data)
    expected = join_result_files(shards, paths, tmp_path / "expected.jsonl")
    assert sorted(reads) == sorted(files)

    reads.clear()
    (tmp_path / "fetched").mkdir()
    fetched = [str(tmp_path / "fetched" / name) for name in files]
    for n, (path, data) in enumerate(zip(fetched, files.values(), strict=True)):
        downloaded(Path(path), data, seed * 10 + n, drop_last_newline=n == 1)
    summary = join_result_files(shards, fetched, tmp_path / "joined.jsonl")
    assert reads == []  # no result file read again
    assert (tmp_path / "joined.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
    assert summary.model_dump(exclude={"output_path"}) == expected.model_dump(
        exclude={"output_path"}
    )
    assert (summary.succeeded, summary.failed, summary.retryable) == (320, 80, 80)
    # the passes' scratch files are gone with the join
    assert sorted(os.listdir(tmp_path / "fetched")) == sorted(files)


def test_a_pass_for_a_file_written_over_since_is_not_taken(tmp_path, reads):
    shards = make_shards(tmp_path, ["a", "b"])
    path = tmp_path / "out.jsonl"
    downloaded(path, encoded([ok_line("a", "old"), ok_line("b", "old")]), seed=5)
    newer = tmp_path / "newer.jsonl"
    newer.write_bytes(encoded([ok_line("a", "new"), ok_line("b", "new")]))
    os.replace(newer, path)  # the same size, another file
    join_result_files(shards, [str(path)], tmp_path / "joined.jsonl")
    assert reads == ["out.jsonl"]
    contents = [json.loads(line)["content"] for line in open(tmp_path / "joined.jsonl")]
    assert contents == ["new", "new"]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "joined.jsonl", "out.jsonl", "shards"]


def test_a_line_the_pass_cannot_read_is_named_by_the_join_as_before(tmp_path, reads):
    shards = make_shards(tmp_path, ["a", "b", "c"])
    path = tmp_path / "out.jsonl"
    downloaded(path, encoded([ok_line("a"), b"not json at all", ok_line("c")]), seed=6)
    with pytest.raises(ResultFileError) as raised:
        join_result_files(shards, [str(path)], tmp_path / "joined.jsonl")
    assert (raised.value.path, raised.value.line) == (str(path), 2)
    assert "not a result line" in raised.value.reason
    assert reads == ["out.jsonl"]  # the pass was dropped: the join read the file itself
    assert not list(tmp_path.glob("*.tmp"))


def test_a_download_over_http_leaves_its_first_pass_to_the_join(tmp_path, reads):
    """Through the openai SDK against the emulator: the file streamed to disk, its pass
    made on the way, the join reading nothing again; a download cut short leaves no pass."""
    ids = [f"id-{n}" for n in range(3000)]
    shards = make_shards(tmp_path, ids, cap=1000)
    results = tmp_path / "results.jsonl"
    write_jsonl(results, answers(ids[::-1]))
    join_result_files(shards, [str(results)], tmp_path / "expected.jsonl")
    reads.clear()
    with run_emulator(EmulatorConfig()) as emu:
        credentials = KlusterCredentials(api_key="emulator-key", base_url=emu.base_url)
        client = credentials.get_client()
        with open(results, "rb") as handle:
            file_id = client.files.create(file=("r.jsonl", handle), purpose="batch").id
        target = tmp_path / "fetched" / "r.output.jsonl"
        size = stream_file_to(credentials, file_id, str(target), join_ahead=True)
        assert size == results.stat().st_size
        assert str(target) in join_module._AHEAD
        join_result_files(shards, [str(target)], tmp_path / "joined.jsonl")
        assert reads == []
        assert str(target) not in join_module._AHEAD
        assert (tmp_path / "joined.jsonl").read_bytes() == (
            tmp_path / "expected.jsonl"
        ).read_bytes()

        with pytest.raises(openai.NotFoundError):
            stream_file_to(credentials, "file-missing", str(tmp_path / "lost.jsonl"), True)
        assert str(tmp_path / "lost.jsonl") not in join_module._AHEAD
        assert sorted(os.listdir(tmp_path / "fetched")) == ["r.output.jsonl"]
        assert not list(tmp_path.glob("*.tmp"))


def test_the_pass_s_scratch_pages_are_freed_as_its_lines_are_copied(tmp_path, monkeypatch):
    seen = watch_releases(monkeypatch)
    ids = [f"q-{i}" for i in range(3000)]
    shards = make_shards(tmp_path, ids, cap=1000)
    results = long_answers(tmp_path, ids)
    target = tmp_path / "fetched.jsonl"
    downloaded(target, results.read_bytes(), seed=8)
    join_result_files(shards, [str(target)], tmp_path / "j.jsonl")
    if join_module._punch_hole is None:
        pytest.skip("no hole punching on this platform")
    ((released, freed),) = seen
    joined = (tmp_path / "j.jsonl").stat().st_size
    assert released and freed > 0.9 * joined, (freed, joined)


def test_a_run_s_joins_take_the_passes_its_downloads_made(tmp_path, kluster_env, reads):
    """The flow: three shards, some lines failing once, so a second round. Round 1's join
    reads none of its six result files (their passes were made as they downloaded); round
    2's reads round 1's again (each pass is taken once) but not its own; no scratch file
    of a pass is left in the work folder."""
    kluster_env.configure(fail_rate=0.3, fail_once=True, fault_seed=5)
    rows = requests(40)
    result = run_flow(tmp_path, rows, limits={"max_requests_per_file": 15})
    assert result.status == "completed" and result.rounds == 2
    assert_complete(tmp_path / "o.jsonl", rows)
    first = sorted(os.path.basename(p) for p in result.output_files + result.error_files
                   if "round-1" in p)  # fmt: skip
    assert len(first) == 6  # an output and an error file a shard
    assert sorted(reads) == first
    work = tmp_path / "o.jsonl.work"
    assert not [p for p in work.rglob("*") if ".ahead-" in p.name]


def _pass_inode(path: Path) -> int:
    """The inode of the scratch file of the pass made as ``path`` downloaded."""
    return os.stat(join_module._AHEAD[str(path)].scratch_path).st_ino


def _in_order_results(ids: list[str]) -> list[dict]:
    """Results as kluster writes them: in input order, failures (a 429 worth retrying, a
    400 that is not) among the answers, in the one output file."""
    rows = answers(ids)
    for n in range(5, len(ids), 37):
        rows[n] = error_line(ids[n], 429, "rate_limit_exceeded")
    for n in range(11, len(ids), 53):
        rows[n] = error_line(ids[n], 400, "invalid_request")
    return rows


def test_results_complete_and_in_order_are_handed_over_not_copied(tmp_path, reads):
    """One result file, its lines in input order: the scratch file of its pass already is
    the joined output. It becomes the output (the same file: nothing copied), and output,
    counts and retry list are those of the join that copies, to the byte."""
    ids = [f"req-{n}" for n in range(400)]
    shards = make_shards(tmp_path, ids, cap=150)
    data = encoded(_in_order_results(ids) + [b"", b"  "], crlf_every=7)
    given = tmp_path / "given.jsonl"
    given.write_bytes(data)
    expected = join_result_files(
        shards, [str(given)], tmp_path / "expected.jsonl", retry_ids_path=tmp_path / "e.ids"
    )
    reads.clear()
    (tmp_path / "fetched").mkdir()
    fetched = tmp_path / "fetched" / "out.jsonl"
    downloaded(fetched, data, seed=4)
    scratch = _pass_inode(fetched)
    summary = join_result_files(
        shards, [str(fetched)], tmp_path / "joined.jsonl", retry_ids_path=tmp_path / "j.ids"
    )
    assert reads == []
    assert os.stat(tmp_path / "joined.jsonl").st_ino == scratch  # handed over
    assert (tmp_path / "joined.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
    assert (tmp_path / "j.ids").read_bytes() == (tmp_path / "e.ids").read_bytes()
    assert summary.model_dump(exclude={"output_path"}) == expected.model_dump(
        exclude={"output_path"}
    )
    assert (summary.failed, summary.retryable) == (11 + 8, 11)
    assert [s.requests for s in summary.shards] == [150, 150, 100]
    assert os.listdir(tmp_path / "fetched") == ["out.jsonl"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("change", ["swapped", "missing", "extra", "same key, other id"])
def test_results_out_of_order_or_not_the_requests_are_joined_by_copying(
    tmp_path, reads, monkeypatch, change
):
    """The hand-over takes nothing on trust: two lines swapped, one missing, one more than
    the requests, or a line whose custom_id is not its request's though its 64-bit key is
    (a collision, made here): the join copies, and the output is right."""
    ids = [f"req-{n}" for n in range(300)]
    shards = make_shards(tmp_path, ids, cap=1000)
    rows = _in_order_results(ids)
    if change == "swapped":
        rows[40], rows[41] = rows[41], rows[40]
    elif change == "missing":
        del rows[123]
    elif change == "extra":
        rows.append(ok_line("req-7", "a second answer"))
    else:  # "x-9" has the key of "req-9"
        monkeypatch.setattr(
            join_module, "_id_hash", lambda json_id: hash(json_id.replace(b'"x-', b'"req-'))
        )
        rows[9] = ok_line("x-9", "not req-9's")
    data = encoded(rows, crlf_every=5)
    given = tmp_path / "given.jsonl"
    given.write_bytes(data)
    join_result_files(shards, [str(given)], tmp_path / "expected.jsonl")
    fetched = tmp_path / "out.jsonl"
    downloaded(fetched, data, seed=9)
    scratch = _pass_inode(fetched)
    summary = join_result_files(shards, [str(fetched)], tmp_path / "joined.jsonl")
    assert os.stat(tmp_path / "joined.jsonl").st_ino != scratch  # copied
    assert (tmp_path / "joined.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
    joined = [json.loads(line) for line in open(tmp_path / "joined.jsonl", encoding="utf-8")]
    assert [row["custom_id"] for row in joined] == ids
    if change == "missing":
        assert joined[123]["error"]["code"] == "not_processed" and summary.retryable == 9
    if change == "same key, other id":
        assert joined[9]["error"]["code"] == "not_processed"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_hand_over_to_another_file_system_copies_the_scratch_file(tmp_path, monkeypatch):
    """Where the output lies on another file system than the work folder, the scratch file
    cannot be renamed into place: it is copied under a temporary name, then published."""
    ids = [f"req-{n}" for n in range(200)]
    shards = make_shards(tmp_path, ids)
    data = encoded(_in_order_results(ids))
    given = tmp_path / "given.jsonl"
    given.write_bytes(data)
    join_result_files(shards, [str(given)], tmp_path / "expected.jsonl")
    fetched = tmp_path / "out.jsonl"
    downloaded(fetched, data, seed=2)
    moved: list[str] = []
    publish = join_module.storage.publish

    def across_devices(tmp: str, path: str) -> None:
        if ".ahead-" in tmp:
            moved.append(tmp)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        publish(tmp, path)

    monkeypatch.setattr(join_module.storage, "publish", across_devices)
    join_result_files(shards, [str(fetched)], tmp_path / "joined.jsonl")
    assert len(moved) == 1
    assert (tmp_path / "joined.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
