"""Validation and sharding of request files: limits, boundaries and the bad-input corpus."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from prefect_kluster.tasks.build import (
    RequestFileError,
    balanced_bytes,
    build_request_lines,
    read_prompts,
    shard_request_file,
    write_request_lines,
)
from prefect_kluster.tasks.upload import FileLimitError, check_file_limits
from tests.helpers import MODEL, request, write_jsonl


def same_size_requests(n: int) -> list[bytes]:
    lines = [json.dumps(request(f"r{i:05d}")).encode() for i in range(n)]
    assert len({len(line) for line in lines}) == 1
    return lines


def shard_bytes(shards) -> bytes:
    return b"".join(Path(s.path).read_bytes() for s in shards)


@pytest.mark.parametrize(
    ("cap_lines", "expected"),
    [(3, [3, 3, 3]), (4, [4, 4, 1]), (9, [9]), (8, [8, 1]), (1, [1] * 9)],
)
def test_line_cap_boundaries(tmp_path, cap_lines, expected):
    src = write_jsonl(tmp_path / "in.jsonl", same_size_requests(9))
    shards = shard_request_file(src, tmp_path / "out", max_requests_per_file=cap_lines)
    assert [s.lines for s in shards] == expected
    assert shard_bytes(shards) == src.read_bytes()


def test_byte_cap_exactly_at_and_one_under(tmp_path):
    lines = same_size_requests(6)
    size = len(lines[0]) + 1  # with its newline
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    exact = shard_request_file(src, tmp_path / "a", max_file_bytes=3 * size)
    assert [s.lines for s in exact] == [3, 3]
    assert all(s.bytes == 3 * size for s in exact)
    under = shard_request_file(src, tmp_path / "b", max_file_bytes=3 * size - 1)
    assert [s.lines for s in under] == [2, 2, 2]
    one_line = shard_request_file(src, tmp_path / "c", max_file_bytes=size)
    assert [s.lines for s in one_line] == [1] * 6


def test_a_file_over_the_byte_cap_is_cut_into_equal_shards(tmp_path):
    # Batches run side by side: a run lasts as long as its largest shard, so twelve lines
    # under a five-line cap are three shards of four, not 5 + 5 + 2.
    lines = same_size_requests(12)
    size = len(lines[0]) + 1
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    shards = shard_request_file(src, tmp_path / "out", max_file_bytes=5 * size)
    assert [s.lines for s in shards] == [4, 4, 4]
    assert shard_bytes(shards) == src.read_bytes()
    # The line that reaches the target goes in: never more shards than the cap needs.
    shards = shard_request_file(src, tmp_path / "odd", max_file_bytes=5 * size - 1)
    assert len(shards) == 3 and all(s.bytes <= 5 * size - 1 for s in shards)
    assert [s.lines for s in shards] == [4, 4, 4]
    assert balanced_bytes(338_000_000, 99_000_000) == 84_500_000
    assert balanced_bytes(1000, 1000) == 1000


def test_line_larger_than_the_byte_cap_names_the_line(tmp_path):
    lines = same_size_requests(3)
    big = json.dumps(request("big", "x" * 500)).encode()
    src = write_jsonl(tmp_path / "in.jsonl", [lines[0], big, lines[1]])
    with pytest.raises(RequestFileError) as err:
        shard_request_file(src, tmp_path / "out", max_file_bytes=len(big))
    assert err.value.problems[0].line == 2
    assert "fits in no shard" in str(err.value)
    assert not list((tmp_path / "out").iterdir())


def test_shard_metadata_hash_ids_and_first_line(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", same_size_requests(5))
    shards = shard_request_file(src, tmp_path / "out", max_requests_per_file=2)
    assert [s.first_line for s in shards] == [1, 3, 5]
    for shard in shards:
        data = Path(shard.path).read_bytes()
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
        assert shard.bytes == len(data)
        assert shard.sha256[:16] in Path(shard.path).name
        ids = [json.loads(x) for x in Path(shard.ids_path).read_text().splitlines()]
        assert ids == [json.loads(x)["custom_id"] for x in data.splitlines()]


def test_duplicate_custom_ids_in_different_shards(tmp_path):
    rows = [request(f"id-{i}") for i in range(6)] + [request("id-1")]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(RequestFileError) as err:
        shard_request_file(src, tmp_path / "out", max_requests_per_file=2)
    assert [(p.line, p.reason) for p in err.value.problems] == [
        (7, "duplicate custom_id 'id-1' (first used on line 2)")
    ]
    assert not list((tmp_path / "out").iterdir()), "no shard may be left behind"


@pytest.mark.parametrize(
    "newline,trailing", [(b"\n", True), (b"\r\n", True), (b"\n", False), (b"\r\n", False)]
)
def test_line_ends_the_service_accepts(tmp_path, newline, trailing):
    lines = [json.dumps(r).encode() for r in (request("a"), request("b"))]
    data = newline.join(lines) + (newline if trailing else b"")
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    shards = shard_request_file(src, tmp_path / "out")
    assert shard_bytes(shards) == b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("block_bytes", [97, 256, 1000])
def test_blocks_read_in_two_parts_are_written_without_their_crlf(
    tmp_path, monkeypatch, block_bytes
):
    """Blocks end mid-line and are finished by a second read: written as the two parts
    when neither holds a CRLF, else made LF (a CRLF split between them too): the shards'
    bytes and hashes are the file's with LF line ends, whichever way each block went."""
    import prefect_kluster.tasks._lines as line_work
    import prefect_kluster.tasks.build as build_module

    monkeypatch.setattr(line_work, "REQUEST_BLOCK_BYTES", block_bytes)
    kept_apart = []
    parts = build_module._lf_parts

    def watched(head: bytes, tail: bytes):
        data = parts(head, tail)
        kept_apart.append(isinstance(data, tuple))
        return data

    monkeypatch.setattr(build_module, "_lf_parts", watched)
    lines = [json.dumps(request(f"id-{i}", "ü" * (i % 40))).encode() for i in range(60)]
    ends = [b"\r\n" if i % 7 == 0 else b"\n" for i in range(60)]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(line + end for line, end in zip(lines, ends, strict=True)))
    shards = shard_request_file(src, tmp_path / "out", max_file_bytes=4000)
    assert shard_bytes(shards) == b"\n".join(lines) + b"\n"
    for shard in shards:
        content = Path(shard.path).read_bytes()
        assert shard.sha256 == hashlib.sha256(content).hexdigest()
        assert shard.bytes == len(content)
    assert len(shards) > 1 and any(kept_apart) and not all(kept_apart)


def _line(**changes) -> bytes:
    row = request("x")
    for dotted, value in changes.items():
        target = row
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return json.dumps(row).encode()


_DROP = object()
GOOD = json.dumps(request("good-1")).encode()
GOOD2 = json.dumps(request("good-2")).encode()

# (case, file content, line, words in the reason)
BAD_INPUTS = [
    ("broken json", GOOD + b"\n" + b'{"custom_id": "x",', 2, "not valid JSON"),
    ("not an object", b"[1, 2, 3]", 1, "not a JSON object"),
    ("a bare string", b'"hello"', 1, "not a JSON object"),
    ("trailing garbage", GOOD + b" xyz", 1, "not valid JSON"),
    ("missing custom_id", _line(custom_id=_DROP), 1, "missing required field `custom_id`"),
    ("empty custom_id", _line(custom_id=""), 1, "custom_id"),
    ("custom_id not a string", _line(custom_id=7), 1, "Expected `str`, got `int`"),
    ("duplicate custom_id", GOOD + b"\n" + GOOD2 + b"\n" + GOOD, 3, "duplicate custom_id"),
    ("wrong method", _line(method="GET"), 1, "'GET'"),
    ("lower-case method", _line(method="post"), 1, "'post'"),
    ("wrong url", _line(url="/v1/completions"), 1, "only /v1/chat/completions"),
    ("missing body", _line(body=_DROP), 1, "missing required field `body`"),
    ("body not an object", _line(body="hi"), 1, "Expected `object`, got `str`"),
    ("missing model", _line(body__model=_DROP), 1, "missing required field `model`"),
    ("empty model", _line(body__model=""), 1, "body.model"),
    ("missing messages", _line(body__messages=_DROP), 1, "`messages`"),
    ("empty messages", _line(body__messages=[]), 1, "body.messages"),
    ("messages not a list", _line(body__messages="hi"), 1, "Expected `array`"),
    ("message without role", _line(body__messages=[{"content": "hi"}]), 1, "`role`"),
    ("unknown role", _line(body__messages=[{"role": "robot", "content": "x"}]), 1, "'robot'"),
    ("content wrong type", _line(body__messages=[{"role": "user", "content": 5}]), 1, "content"),
    ("empty content parts", _line(body__messages=[{"role": "user", "content": []}]), 1, "content"),
    (
        "unknown content part",
        _line(body__messages=[{"role": "user", "content": [{"type": "video", "v": 1}]}]),
        1,
        "'video'",
    ),
    (
        "image part without url",
        _line(
            body__messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
        ),
        1,
        "`url`",
    ),
    ("non-UTF-8 bytes", GOOD + b"\n" + GOOD2.replace(b"Say", b"S\xff\xfey"), 2, "not valid UTF-8"),
    ("byte-order mark", b"\xef\xbb\xbf" + GOOD, 1, "byte-order mark"),
    ("blank line", GOOD + b"\n\n" + GOOD2, 2, "blank line"),
    ("whitespace-only line", GOOD + b"\n  \n" + GOOD2, 2, "not valid JSON"),
    ("empty file", b"", 1, "empty"),
    ("line over the cap", GOOD + b"\n" + _line(body__pad="y" * 5000), 2, "fits in no shard"),
]


@pytest.mark.parametrize(
    ("case", "content", "line", "reason"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_corpus(tmp_path, case, content, line, reason):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    with pytest.raises(RequestFileError) as err:
        shard_request_file(src, tmp_path / "out", max_file_bytes=4000)
    first = err.value.problems[0]
    assert first.line == line, str(err.value)
    assert reason in first.reason, str(err.value)
    assert f"line {line}:" in str(err.value)
    assert not list((tmp_path / "out").iterdir())


def test_unknown_model_when_models_are_checked(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [request("a"), request("b", model="no/such-model")])
    with pytest.raises(RequestFileError, match=r"line 2: unknown model 'no/such-model'"):
        shard_request_file(src, tmp_path / "out", allowed_models=[MODEL])
    assert shard_request_file(src, tmp_path / "ok", allowed_models=None)


def test_many_problems_are_listed_then_cut(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [b"nope"] * 50)
    with pytest.raises(RequestFileError) as err:
        shard_request_file(src, tmp_path / "out")
    assert len(err.value.problems) == 20
    assert "further problems not listed" in str(err.value)


def test_oversize_and_overlong_files_are_refused_before_upload(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", same_size_requests(5))
    with pytest.raises(FileLimitError, match="over the 100-byte limit"):
        check_file_limits(src, max_file_bytes=100)
    with pytest.raises(FileLimitError, match="over the limit of 4 per file"):
        check_file_limits(src, max_requests_per_file=4)
    check_file_limits(src, max_requests_per_file=5)


def test_images_and_mixed_models_are_valid(tmp_path):
    image = request("img", model="Qwen/Qwen2.5-VL-7B-Instruct")
    image["body"]["messages"] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Who can park here?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/p.jpg"}},
            ],
        }
    ]
    src = write_jsonl(tmp_path / "in.jsonl", [request("a"), image, request("c", model="x/y")])
    assert shard_request_file(src, tmp_path / "out")[0].lines == 3


def test_build_from_prompts_and_templates(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("text,lang\nhello,fr\nbye,de\n")
    prompts = list(read_prompts(csv_path, template="Translate to {lang}: {text}"))
    assert prompts == ["Translate to fr: hello", "Translate to de: bye"]
    lines = list(build_request_lines(prompts, MODEL, "Be brief.", {"max_completion_tokens": 50}))
    out = tmp_path / "req.jsonl"
    assert write_request_lines(lines, out) == 2
    shards = shard_request_file(out, tmp_path / "out")
    row = json.loads(Path(shards[0].path).read_text().splitlines()[1])
    assert row["custom_id"] == "request-2"
    assert row["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert row["body"]["max_completion_tokens"] == 50


def test_a_rerun_replaces_its_shards_in_place_and_removes_only_the_others(tmp_path, monkeypatch):
    """A rerun checks the input again while a child run of the earlier attempt may still be
    uploading one of its shards: the same shards are published over the old ones, none is
    ever missing meanwhile, and only shards not made again are removed, after."""
    from prefect import flow

    from prefect_kluster.tasks import build, storage

    @flow
    def validate(source: str, out: str) -> list:
        return build.validate_and_shard(source, out, max_requests_per_file=3)

    source = str(write_jsonl(tmp_path / "in.jsonl", [request(f"r{i}") for i in range(9)]))
    out = tmp_path / "shards"
    first = validate(source, str(out))
    assert len(first) == 3
    earlier = [out / "shard-00009-0123456789abcdef.jsonl", out / "shard-00009-0123456789abcdef.ids"]
    for path in earlier:  # an earlier input's shard, not made again
        path.write_text("{}\n")
    missing: list[str] = []
    publish = storage.publish

    def publish_checking(tmp: str, path: str) -> None:
        paths = [p for s in first for p in (s.path, s.ids_path)] + [str(p) for p in earlier]
        missing.extend(p for p in paths if not Path(p).exists())
        publish(tmp, path)

    monkeypatch.setattr(storage, "publish", publish_checking)
    again = validate(source, str(out))
    assert missing == []
    assert again == first
    made = {Path(p).name for s in again for p in (s.path, s.ids_path)}
    assert {p.name for p in out.iterdir()} == made

    bad = write_jsonl(tmp_path / "bad.jsonl", [request("r0"), request("r0")])
    with pytest.raises(RequestFileError, match="duplicate custom_id"):
        validate(str(bad), str(out))
    assert list(out.iterdir()) == []  # a failed check leaves no shard
