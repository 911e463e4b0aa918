"""Joining results to requests: order, precedence, missing lines, and a property test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefect_kluster.tasks.build import shard_request_file
from prefect_kluster.tasks.join import OutputExistsError, ResultFileError, join_result_files
from tests.helpers import read_jsonl, request, write_jsonl


def ok_line(custom_id: str, text: str = "hi", prompt: int = 3, completion: int = 2) -> dict:
    return {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": "r",
            "body": {
                "id": "c",
                "object": "chat.completion",
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        },
    }


def error_line(custom_id: str, status: int = 500, code: str = "server_error") -> dict:
    return {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": "r",
            "body": {"error": {"message": "boom"}},
        },
        "error": {"code": code, "message": f"failed with {status}"},
    }


def make_shards(tmp_path: Path, ids: list[str], cap: int = 3):
    src = write_jsonl(tmp_path / "in.jsonl", [request(i) for i in ids])
    return shard_request_file(src, tmp_path / "shards", max_requests_per_file=cap)


def test_output_in_input_order_whatever_the_result_order(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    shards = make_shards(tmp_path, ids)
    shuffled = ids[:]
    random.Random(4).shuffle(shuffled)
    out_file = write_jsonl(
        tmp_path / "out.jsonl", [ok_line(i, f"answer {i}") for i in shuffled[:8]]
    )
    err_file = write_jsonl(
        tmp_path / "err.jsonl", [error_line(shuffled[8], 400, "invalid_request")]
    )
    summary = join_result_files(shards, [str(out_file), str(err_file)], tmp_path / "joined.jsonl")
    rows = read_jsonl(tmp_path / "joined.jsonl")
    assert [r["custom_id"] for r in rows] == ids
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id[shuffled[0]]["content"] == f"answer {shuffled[0]}"
    assert by_id[shuffled[0]]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    assert by_id[shuffled[8]]["status"] == "error"
    assert by_id[shuffled[8]]["error"]["status_code"] == 400
    assert by_id[shuffled[9]]["error"]["code"] == "not_processed"
    assert (summary.requests, summary.succeeded, summary.failed) == (10, 8, 2)
    assert summary.retryable == 1  # the never-processed line; the 400 is permanent
    assert summary.usage.total_tokens == 40
    assert [s.requests for s in summary.shards] == [3, 3, 3, 1]


def test_later_result_files_win(tmp_path):
    shards = make_shards(tmp_path, ["a", "b"])
    first = write_jsonl(
        tmp_path / "r1.jsonl", [ok_line("a"), error_line("b", 429, "rate_limit_exceeded")]
    )
    second = write_jsonl(tmp_path / "r2.jsonl", [ok_line("b", "second try")])
    join_result_files(shards, [str(first), str(second)], tmp_path / "j.jsonl")
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert [(r["custom_id"], r["status"], r["content"]) for r in rows] == [
        ("a", "ok", "hi"),
        ("b", "ok", "second try"),
    ]


BAD_RESULT = {"custom_id": "b", "response": {"status_code": 200, "body": {"choices": "x"}}}
# The join copies each answer's content as raw JSON; a content that is not a string is
# still refused as the typed decoder refuses it.
NUMBER_CONTENT = ok_line("b")
NUMBER_CONTENT["response"]["body"]["choices"][0]["message"]["content"] = 42


@pytest.mark.parametrize(
    ("middle", "line", "reason"),
    [
        # A line with no readable custom_id fails the first pass, ahead of line 2's problem.
        ([BAD_RESULT, b"not json at all"], 3, "not a result line: JSON is malformed"),
        (
            [BAD_RESULT, b'{"id": "no custom_id here"}'],
            3,
            "not a result line: Object missing required field",
        ),
        ([BAD_RESULT], 2, "the result for custom_id 'b' cannot be read: Expected `array`"),
        (
            [NUMBER_CONTENT],
            2,
            "the result for custom_id 'b' cannot be read: Expected `str | null`, got `int`",
        ),
    ],
    ids=["broken-json", "no-custom_id", "bad-result-shape", "content-not-a-string"],
)
def test_unreadable_result_lines_name_the_file_and_line(tmp_path, middle, line, reason):
    shards = make_shards(tmp_path, ["a", "b", "c"])
    res = write_jsonl(tmp_path / "r.jsonl", [ok_line("a"), *middle, ok_line("c")])
    target = tmp_path / "j.jsonl"
    with pytest.raises(ResultFileError) as err:
        join_result_files(shards, [str(write_jsonl(tmp_path / "ok.jsonl", [])), str(res)], target)
    assert (err.value.path, err.value.line) == (str(res), line), str(err.value)
    assert reason in str(err.value) and str(err.value).startswith(f"{res}, line {line}: ")
    assert not target.exists() and not list(tmp_path.glob("j.jsonl*"))


@pytest.mark.parametrize("helper", [False, True])
def test_answers_are_copied_exactly_whatever_their_escapes(tmp_path, monkeypatch, helper):
    """Contents are copied as the service wrote them: escaped or raw UTF-8, quotes,
    backslashes, control characters, astral characters and null all read back the same."""
    if helper:  # the helper process joins some blocks: the same bytes either way
        monkeypatch.setattr("prefect_kluster.tasks._lines.Helper.MIN_BYTES", 0)
        monkeypatch.setattr("prefect_kluster.tasks._lines.BLOCK_BYTES", 512)
    texts = ["Grüße, 世界", 'say "hi" \\ back', "tab\there\nnewline\x01", "\U0001f600 ok", "", None]
    ids = [f"c{i}" for i in range(2 * len(texts))]
    shards = make_shards(tmp_path, ids, cap=100)
    lines = []
    for i, custom_id in enumerate(ids):
        line = ok_line(custom_id, texts[i % len(texts)])
        # half as json.dumps writes by default (\u escapes), half as raw UTF-8
        lines.append(json.dumps(line, ensure_ascii=i % 2 == 0).encode())
    res = tmp_path / "r.jsonl"
    res.write_bytes(b"\n".join(lines) + b"\n")
    join_result_files(shards, [str(res)], tmp_path / "j.jsonl")
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert [r["content"] for r in rows] == [texts[i % len(texts)] for i in range(len(ids))]
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("helper", [False, True])
def test_custom_ids_whose_hashes_collide_are_told_apart(tmp_path, monkeypatch, helper):
    """The index keys results by a 64-bit hash of the custom_id; with a hash that collides
    all the time, each request still gets its own result (or none), in order."""
    from prefect_kluster.tasks import join as join_module

    monkeypatch.setattr(join_module, "_id_hash", lambda json_id: len(json_id) % 3)
    if helper:
        monkeypatch.setattr("prefect_kluster.tasks._lines.Helper.MIN_BYTES", 0)
        monkeypatch.setattr("prefect_kluster.tasks._lines.BLOCK_BYTES", 700)
    ids = [f"id-{i}" for i in range(60)] + ["x", "yy", "zzz", "é"]
    shards = make_shards(tmp_path, ids, cap=25)
    rng = random.Random(7)
    answered = [i for i in ids if i not in ("id-5", "yy")]  # two never processed
    rng.shuffle(answered)
    first = write_jsonl(
        tmp_path / "r1.jsonl",
        [error_line(i, 500) if i in ("id-7", "x") else ok_line(i, f"a {i}") for i in answered],
    )
    # a later file (a retry round) answers id-7 and x again: it wins
    second = write_jsonl(
        tmp_path / "r2.jsonl", [ok_line("x", "retried x"), ok_line("id-7", "retried 7")]
    )
    summary = join_result_files(shards, [str(first), str(second)], tmp_path / "j.jsonl")
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert [r["custom_id"] for r in rows] == ids
    expected = {
        i: ("error", None)
        if i in ("id-5", "yy")
        else ("ok", {"x": "retried x", "id-7": "retried 7"}.get(i, f"a {i}"))
        for i in ids
    }
    assert {r["custom_id"]: (r["status"], r["content"]) for r in rows} == expected
    assert (summary.succeeded, summary.failed, summary.retryable) == (len(ids) - 2, 2, 2)


def test_existing_output_is_not_overwritten_unless_asked(tmp_path):
    shards = make_shards(tmp_path, ["a"])
    res = write_jsonl(tmp_path / "r.jsonl", [ok_line("a")])
    target = tmp_path / "j.jsonl"
    target.write_text("precious\n")
    with pytest.raises(OutputExistsError):
        join_result_files(shards, [str(res)], target)
    assert target.read_text() == "precious\n"
    join_result_files(shards, [str(res)], target, overwrite=True)
    assert read_jsonl(target)[0]["custom_id"] == "a"
    assert not list(tmp_path.glob("j.jsonl.tmp"))


def test_parquet_copy(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    shards = make_shards(tmp_path, ["a", "b"])
    res = write_jsonl(tmp_path / "r.jsonl", [ok_line("b"), error_line("a")])
    summary = join_result_files(shards, [str(res)], tmp_path / "j.jsonl", parquet=True)
    table = pq.read_table(summary.parquet_path).to_pylist()
    assert [(r["custom_id"], r["status"], r["error_status_code"]) for r in table] == [
        ("a", "error", 500),
        ("b", "ok", None),
    ]


ids_strategy = st.lists(
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
    ),
    min_size=1,
    max_size=40,
    unique=True,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=ids_strategy,
    cap=st.integers(min_value=1, max_value=7),
    seed=st.integers(min_value=0, max_value=10_000),
    split=st.integers(min_value=1, max_value=3),
)
def test_every_custom_id_exactly_once_in_input_order(tmp_path_factory, ids, cap, seed, split):
    tmp = tmp_path_factory.mktemp("prop")
    shards = make_shards(tmp, ids, cap)
    rng = random.Random(seed)
    outcomes = {i: rng.choice(["ok", "err", "missing", "retried"]) for i in ids}
    files: list[list[dict]] = [[] for _ in range(split + 1)]
    for custom_id, outcome in outcomes.items():
        if outcome == "ok":
            rng.choice(files[:-1]).append(ok_line(custom_id, f"ans:{custom_id}"))
        elif outcome == "err":
            rng.choice(files[:-1]).append(error_line(custom_id))
        elif outcome == "retried":  # failed first, succeeded in the last round
            files[0].append(error_line(custom_id, 429, "rate_limit_exceeded"))
            files[-1].append(ok_line(custom_id, f"ans:{custom_id}"))
    paths = []
    for n, rows in enumerate(files):
        rng.shuffle(rows)
        paths.append(str(write_jsonl(tmp / f"res{n}.jsonl", rows)))
    summary = join_result_files(shards, paths, tmp / "joined.jsonl")
    rows = read_jsonl(tmp / "joined.jsonl")
    assert [r["custom_id"] for r in rows] == ids
    for row in rows:
        expected = outcomes[row["custom_id"]]
        if expected in ("ok", "retried"):
            assert row["status"] == "ok" and row["content"] == f"ans:{row['custom_id']}"
        else:
            assert row["status"] == "error"
    assert summary.requests == len(ids)
    assert summary.succeeded == sum(o in ("ok", "retried") for o in outcomes.values())
    json.dumps(summary.model_dump())


def test_unreadable_line_deep_in_a_large_file_is_located(tmp_path):
    # Past the first 4 MB block (and possibly sent to the helper process): the line number
    # counts every line before the block the bad one is in.
    shards = make_shards(tmp_path, ["a"])
    good = json.dumps(ok_line("filler-" + "x" * 200)).encode()
    count = (5 << 20) // len(good) + 1
    res = tmp_path / "big.jsonl"
    res.write_bytes(b"\n".join([good] * count + [b"garbage", good]) + b"\n")
    with pytest.raises(ResultFileError) as err:
        join_result_files(shards, [str(res)], tmp_path / "j.jsonl")
    assert err.value.line == count + 1, str(err.value)


@pytest.mark.parametrize("helper", [False, True])
def test_usage_by_model_is_counted_in_the_join(tmp_path, monkeypatch, helper):
    """Per-model usage comes with the summary, from the join's own pass: the same figures
    as reading the joined output back (tasks.cost.usage_by_model), latest result winning,
    errors, missing lines, results without usage or model, and results for no request
    left out; in the helper process too."""
    import prefect_kluster.tasks._lines as lines_module
    from prefect_kluster.tasks.cost import usage_by_model

    if helper:
        monkeypatch.setattr(lines_module.Helper, "MIN_BYTES", 0)
        monkeypatch.setattr(lines_module, "BLOCK_BYTES", 512)
    ids = [f"r{i}" for i in range(60)]
    shards = make_shards(tmp_path, ids, cap=25)
    models = ["llama", "qwen", "деepseek"]

    def with_model(line: dict, model: str | None) -> dict:
        body = line["response"]["body"]
        if model is None:
            del body["model"]
        else:
            body["model"] = model
        return line

    first = []
    for i, custom_id in enumerate(ids[:55]):
        if i % 11 == 0:
            first.append(error_line(custom_id))
        else:
            first.append(with_model(ok_line(custom_id, prompt=i, completion=i % 7), models[i % 3]))
    no_usage = ok_line(ids[1])
    del no_usage["response"]["body"]["usage"]
    first[1] = no_usage
    first[2] = with_model(ok_line(ids[2], prompt=100), None)
    first.append(with_model(ok_line("not-a-request", prompt=10**6), "ghost"))
    retried = [  # a later round wins: one error turned ok, one ok moved to another model
        with_model(ok_line(ids[0], prompt=1000, completion=1), "qwen"),
        with_model(ok_line(ids[4], prompt=2000, completion=2), "llama"),
    ]
    paths = [
        str(write_jsonl(tmp_path / "a.jsonl", first)),
        str(write_jsonl(tmp_path / "b.jsonl", retried)),
    ]
    out = tmp_path / "joined.jsonl"
    summary = join_result_files(shards, paths, out)
    expected = usage_by_model(out)
    got = {name: usage.model_dump() for name, usage in summary.usage_by_model.items()}
    assert got == {name: {f: getattr(u, f) for f in got[name]} for name, u in expected.items()}
    assert set(got) == {"llama", "qwen", "деepseek"}
    assert got["qwen"]["prompt_tokens"] >= 1000 and "ghost" not in got
    totals = [sum(u[f] for u in got.values()) for f in ("prompt_tokens", "total_tokens")]
    assert totals == [summary.usage.prompt_tokens - 100, summary.usage.total_tokens - 102]


def test_a_token_count_beyond_32_bits_is_clamped_not_fatal(tmp_path):
    shards = make_shards(tmp_path, ["a", "b"])
    huge = ok_line("a", prompt=1 << 40, completion=1)
    out = write_jsonl(tmp_path / "out.jsonl", [huge, ok_line("b", prompt=5, completion=1)])
    summary = join_result_files(shards, [str(out)], tmp_path / "joined.jsonl")
    assert summary.succeeded == 2
    assert summary.usage.prompt_tokens == (1 << 31) - 1 + 5
    # The joined line itself keeps the service's figure.
    assert read_jsonl(tmp_path / "joined.jsonl")[0]["usage"]["prompt_tokens"] == 1 << 40


# --- freeing the scratch file as the second pass goes -------------------------------------


def watch_releases(monkeypatch) -> list[tuple[bool, int]]:
    """(release_copied, bytes freed) of each join's index, taken as it closes."""
    from prefect_kluster.tasks import join as join_module

    seen: list[tuple[bool, int]] = []
    close = join_module._ResultIndex.close

    def watched(index) -> None:
        seen.append((index.release_copied, index.released))
        close(index)

    monkeypatch.setattr(join_module._ResultIndex, "close", watched)
    return seen


def long_answers(tmp_path: Path, ids: list[str], order_seed: int = 3) -> Path:
    """Results for ``ids`` with answers of about 2 KB, lightly shuffled as a service
    writes them, so that the scratch file spans many pages."""
    rng = random.Random(order_seed)
    rows = [ok_line(i, f"answer for {i}: " + "долгий ответ " * 150) for i in ids]
    for start in range(0, len(rows), 16):
        block = rows[start : start + 16]
        rng.shuffle(block)
        rows[start : start + 16] = block
    return write_jsonl(tmp_path / "results.jsonl", rows)


def test_scratch_pages_are_freed_once_their_lines_are_copied(tmp_path, monkeypatch):
    seen = watch_releases(monkeypatch)
    ids = [f"q-{i}" for i in range(3000)]
    shards = make_shards(tmp_path, ids, cap=1000)
    results = long_answers(tmp_path, [i for i in ids if i != "q-77"])
    summary = join_result_files(shards, [str(results)], tmp_path / "j.jsonl")
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert [r["custom_id"] for r in rows] == ids
    assert all(
        r["content"].startswith(f"answer for {r['custom_id']}:")
        for r in rows
        if r["custom_id"] != "q-77"
    )
    assert summary.succeeded == 2999
    from prefect_kluster.tasks import join as join_module

    if join_module._punch_hole is None:
        pytest.skip("no hole punching on this platform")
    ((released, freed),) = seen
    joined = (tmp_path / "j.jsonl").stat().st_size
    assert released and freed > 0.9 * joined, (freed, joined)


def test_a_request_id_twice_keeps_the_scratch_whole(tmp_path, monkeypatch):
    """The same shard joined twice asks for every line twice: the scratch is not freed
    (else the second copy would read holes) and both copies are whole."""
    seen = watch_releases(monkeypatch)
    ids = [f"q-{i}" for i in range(2000)]
    shards = make_shards(tmp_path, ids, cap=2000)
    results = long_answers(tmp_path, ids)
    join_result_files([*shards, *shards], [str(results)], tmp_path / "j.jsonl")
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert [r["custom_id"] for r in rows] == ids + ids
    assert all(r["content"].startswith(f"answer for {r['custom_id']}:") for r in rows)
    assert seen == [(False, 0)]


def test_freeing_stops_where_holes_cannot_be_punched(tmp_path, monkeypatch):
    from prefect_kluster.tasks import join as join_module

    seen = watch_releases(monkeypatch)
    monkeypatch.setattr(join_module, "_punch_hole", lambda fd, offset, size: False)
    ids = [f"q-{i}" for i in range(2000)]
    shards = make_shards(tmp_path, ids, cap=2000)
    join_result_files(shards, [str(long_answers(tmp_path, ids))], tmp_path / "j.jsonl")
    rows = read_jsonl(tmp_path / "j.jsonl")
    assert [r["custom_id"] for r in rows] == ids
    assert all(r["content"].startswith(f"answer for {r['custom_id']}:") for r in rows)
    assert seen == [(False, 0)]


def test_freed_lines_are_not_read_again_past_a_hash_collision(tmp_path, monkeypatch):
    """Requests' keys distinct, so lines are freed as copied; results for ids no request
    has ("ghost-...") share their keys, and some come after the real ones (the lookup
    finds the ghost first and goes back through the key's other lines): each request
    still gets its own answer."""
    from prefect_kluster.tasks import join as join_module

    seen = watch_releases(monkeypatch)
    monkeypatch.setattr(
        join_module, "_id_hash", lambda json_id: hash(json_id.replace(b'"ghost-', b'"'))
    )
    ids = [f"q-{i}" for i in range(1500)]
    shards = make_shards(tmp_path, ids, cap=500)
    rows = [ok_line(i, f"answer for {i}: " + "x" * 1500) for i in ids]
    rng = random.Random(5)
    ghosts = [ok_line(f"ghost-{i}", "a ghost " + "y" * 1500) for i in rng.sample(ids, 300)]
    results = write_jsonl(tmp_path / "r.jsonl", ghosts[:150] + rows + ghosts[150:])
    join_result_files(shards, [str(results)], tmp_path / "j.jsonl")
    joined = read_jsonl(tmp_path / "j.jsonl")
    assert [r["custom_id"] for r in joined] == ids
    assert all(r["content"].startswith(f"answer for {r['custom_id']}:") for r in joined)
    if join_module._punch_hole is not None:
        ((released, freed),) = seen
        assert released and freed > 0


def test_lines_a_later_window_needs_are_kept_between_freed_ones(tmp_path, monkeypatch):
    """Results of two shards alternate in the file: the first shard's lines are freed
    page by page as copied (10 KB answers: whole pages inside each), the second shard's
    lines between them are kept for its turn."""
    seen = watch_releases(monkeypatch)
    ids = [f"q-{i}" for i in range(400)]
    shards = make_shards(tmp_path, ids, cap=200)
    first, second = ids[:200], ids[200:]
    rows = []
    for a, b in zip(first, second, strict=True):
        rows += [ok_line(a, f"answer for {a}: " + "z" * 10_000), ok_line(b, f"answer for {b}: ")]
    join_result_files(shards, [str(write_jsonl(tmp_path / "r.jsonl", rows))], tmp_path / "j.jsonl")
    joined = read_jsonl(tmp_path / "j.jsonl")
    assert [r["custom_id"] for r in joined] == ids
    assert all(r["content"].startswith(f"answer for {r['custom_id']}:") for r in joined)
    from prefect_kluster.tasks import join as join_module

    if join_module._punch_hole is not None:
        ((released, freed),) = seen
        assert released and freed >= 200 * 4096


def test_request_keys_whatever_the_shards_say_of_their_lines(tmp_path):
    """The check reads the ids files, not the counts: shards that say they hold no lines
    are read in full, and an id in two of them is found; kept in order, the keys are the
    ids' in input order."""
    from prefect_kluster.tasks.join import _hash_ids, _request_keys
    from prefect_kluster.tasks.types import Shard

    def shard(index: int, ids: list[str]) -> Shard:
        path = tmp_path / f"{index}.ids"
        path.write_text("".join(json.dumps(i) + "\n" for i in ids))
        return Shard(index=index, path="-", sha256="-", lines=0, bytes=0, first_line=1,
                     ids_path=str(path))  # fmt: skip

    first = shard(0, [f"id-{i}" for i in range(5000)])
    second = shard(1, [f"id-{i}" for i in range(9000, 5000, -1)])
    assert _request_keys([first], False) == (True, None)
    distinct, ordered = _request_keys([first, second], True)
    expected = [json.dumps(f"id-{i}").encode() for i in [*range(5000), *range(9000, 5000, -1)]]
    assert distinct and ordered.tobytes() == _hash_ids(expected)
    assert not _request_keys([first, shard(2, ["id-9000", "id-4999"])], False)[0]
    assert _request_keys([], True)[0]
