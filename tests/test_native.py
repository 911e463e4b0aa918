"""The compiled passes (native/) against the Python code they stand in for.

The compiled request check may turn down a block the Python check accepts (it is then
checked again in Python, only slower), but it must never accept a line the Python check
refuses, and when both accept they must give the same custom_ids and cost counts. The same
for the join's first pass: a block the compiled pass takes must come out byte for byte as
``JoinedBlock`` makes it (joined lines, ids, kinds, token counts, lengths, models).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_kluster.tasks import _lines as line_work
from prefect_kluster.tasks._lines import (
    BlockCost,
    JoinedBlock,
    ModelNotAllowed,
    check_requests,
    split_lines,
)
from prefect_kluster.tasks.build import RequestFileError, shard_and_tally, shard_request_file
from prefect_kluster.tasks.join import ResultFileError, join_result_files
from tests.helpers import MODEL, request, without_native

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PREFECT_KLUSTER_NATIVE") == "0":  # built without it: make NATIVE=0
    pytest.skip("the compiled passes are turned off", allow_module_level=True)
# `make test` builds them (make native): a run without them would test only the Python code,
# so their absence fails here rather than skipping.
from prefect_kluster.tasks import _native as native  # noqa: E402


def bench_data(*names: str) -> tuple:
    """Functions of benchmarks/data.py, the benchmark's data generators."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import data
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return tuple(getattr(data, name) for name in names)


def mutations(seeds: list[bytes], seed: int, count: int = 6000) -> Iterator[bytes]:
    """``count`` lines, each one of ``seeds`` with one to three bytes deleted, inserted or
    changed and now and then a piece repeated (duplicated keys, deeper nesting); lines the
    edits split in two (a newline) are left out: the passes only see lines split at them."""
    rng = random.Random(seed)
    alphabet = b'{}[]:,"\\ \r\nuU0123456789abcdefe+-.tfnrl\x00\x7f\xc3\xa9\xff\xed\xa0\x80'
    for _ in range(count):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) + 1)
            op = rng.randrange(3)
            if op == 0 and at < len(data):
                del data[at]
            elif op == 1:
                data.insert(at, rng.choice(alphabet))
            elif at < len(data):
                data[at] = rng.choice(alphabet)
            if rng.random() < 0.2:
                end = rng.randrange(at, min(len(data), at + 20) + 1)
                data[at:at] = data[at:end]
        if b"\n" not in data:
            yield bytes(data)


def python_answer(lines: list[bytes]) -> tuple[list[bytes], dict[str, list[int]]] | None:
    cost = BlockCost()
    try:
        ids = check_requests(lines, None, cost)
    except (msgspec.MsgspecError, UnicodeError, ModelNotAllowed):
        return None
    return ids, cost.models


def native_answer(lines: list[bytes]) -> tuple[list[bytes], dict[str, list[int]]] | None:
    # The pass hands either check lines split at newlines: a line never holds one.
    assert not any(b"\n" in one for one in lines)
    answer = native.check_block(b"".join(one + b"\n" for one in lines))
    if answer is None:
        return None
    blob, counts, count, _ = answer
    assert count == len(lines)
    ids = blob.split(b"\n")
    ids.pop()
    return ids, counts


def assert_agrees(lines: list[bytes]) -> bool:
    """Never more lenient, same answers when both accept; True if the native check accepted."""
    ours, reference = native_answer(lines), python_answer(lines)
    if ours is None:
        return False
    assert reference is not None, f"the compiled check accepted what Python refuses: {lines!r}"
    assert ours == reference
    return True


def line(obj: object, ensure_ascii: bool = False) -> bytes:
    return json.dumps(obj, ensure_ascii=ensure_ascii).encode()


GOOD = line(request("r1", "Grüße, 世界! 🎉"))


def test_the_compiled_check_is_built_where_the_makefile_builds_it():
    # `make test` builds it (make native): a test run without it would test only Python.
    assert line_work.native_check_block is not None
    assert line_work.native_join_block is not None


def test_realistic_files_give_the_same_ids_and_counts(tmp_path):
    write_realistic_requests, write_requests = bench_data(
        "write_realistic_requests", "write_requests"
    )
    for name, write in (("real", write_realistic_requests), ("guide", write_requests)):
        path = tmp_path / f"{name}.jsonl"
        write(path, 3000)
        data = line_work.crlf_to_lf(path.read_bytes())
        lines = split_lines(data)
        assert assert_agrees(lines), name
        # the block as read, CRLF kept (JSON whitespace to it): the same answer
        blob, counts, count, hashes = native.check_block(path.read_bytes())
        assert count == len(lines)
        ids = blob.split(b"\n")[:-1]
        assert (ids, counts) == python_answer(lines)
        assert hashes == native.hash_ids(ids) and len(set(array("q", hashes))) == len(ids)


# Lines where JSON or msgspec have corners: each must be refused by both, accepted by both
# with the same answer, or refused by the compiled check only (marked "stricter").
BASE = (
    b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions",'
    b'"body":{"model":"m","messages":[{"role":"user","content":"hi"}]%s}}'
)
CORNERS = {
    "unknown number 1e999": (BASE % b',"x":1e999', "stricter"),
    "unknown lone surrogate": (BASE % b',"x":"\\ud800"', "refused"),
    "unknown control character": (BASE % b',"x":"a\x01b"', "refused"),
    "unknown bad escape": (BASE % b',"x":"\\q"', "refused"),
    "unknown leading zero": (BASE % b',"x":01', "refused"),
    "unknown invalid UTF-8": (BASE % b',"x":"\xff"', "stricter"),
    "unknown deep nesting": (BASE % (b',"x":' + b"[" * 200 + b"]" * 200), "stricter"),
    "unknown NaN": (BASE % b',"x":NaN', "refused"),
    "duplicate known key": (BASE % b',"model":"n"', "stricter"),
    "max_tokens -0": (BASE % b',"max_tokens":-0', "stricter"),
    "max_tokens u64 max": (BASE % b',"max_tokens":18446744073709551615', "same"),
    "max_tokens over u64": (BASE % b',"max_tokens":18446744073709551616', "stricter"),
    "max_tokens float": (BASE % b',"max_tokens":1.0', "refused"),
    "max_tokens negative": (BASE % b',"max_tokens":-1', "refused"),
    "max_tokens null, max_completion_tokens set": (
        BASE % b',"max_tokens":null,"max_completion_tokens":7',
        "same",
    ),
    "max_completion_tokens null falls to max_tokens": (
        BASE % b',"max_completion_tokens":null,"max_tokens":9',
        "same",
    ),
    "escaped key and role": (
        BASE.replace(b'"custom_id"', b'"custom\\u005fid"').replace(b'"user"', b'"us\\u0065r"')
        % b"",
        "same",
    ),
    "surrogate pair in content": (
        BASE.replace(b'"hi"', b'"\\ud83d\\ude00 caf\\u00e9"') % b"",
        "same",
    ),
    "lone surrogate in content": (BASE.replace(b'"hi"', b'"\\udc00"') % b"", "refused"),
    "content null": (BASE.replace(b'"hi"', b"null") % b"", "refused"),
    "content empty list": (BASE.replace(b'"hi"', b"[]") % b"", "refused"),
    "content parts, tag last": (
        BASE.replace(
            b'"hi"', b'[{"text":"x","type":"text"},{"image_url":{"url":"u"},"type":"image_url"}]'
        )
        % b"",
        "same",
    ),  # fmt: skip
    "text part with an image_url too": (
        BASE.replace(b'"hi"', b'[{"type":"text","text":"x","image_url":{"url":"u"}}]') % b"",
        "same",
    ),
    "image part with a non-string text": (
        BASE.replace(b'"hi"', b'[{"type":"image_url","image_url":{"url":"u"},"text":5}]') % b"",
        "stricter",
    ),
    "image url empty": (
        BASE.replace(b'"hi"', b'[{"type":"image_url","image_url":{"url":""}}]') % b"",
        "refused",
    ),
    "unknown part type": (BASE.replace(b'"hi"', b'[{"type":"audio","x":1}]') % b"", "refused"),
    "part without type": (BASE.replace(b'"hi"', b'[{"text":"x"}]') % b"", "refused"),
    "messages empty": (BASE.replace(b'[{"role":"user","content":"hi"}]', b"[]") % b"", "refused"),
    "unknown role": (BASE.replace(b'"user"', b'"robot"') % b"", "refused"),
    "model empty": (BASE.replace(b'"m"', b'""') % b"", "refused"),
    "custom_id empty": (BASE.replace(b'"a"', b'""') % b"", "refused"),
    "custom_id a number": (BASE.replace(b'"a"', b"1") % b"", "refused"),
    "method lower case": (BASE.replace(b'"POST"', b'"post"') % b"", "refused"),
    "url of another endpoint": (BASE.replace(b"chat/completions", b"embeddings") % b"", "refused"),
    "body missing": (b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions"}', "refused"),
    "trailing garbage": (BASE % b"" + b"x", "refused"),
    "two objects": (BASE % b"" + BASE % b"", "refused"),
    "byte order mark": (b"\xef\xbb\xbf" + BASE % b"", "refused"),
    "surrounding whitespace and CR": (b" \t" + BASE % b"" + b" \r", "same"),
    "blank": (b"", "refused"),
    "an array": (b"[1]", "refused"),
    "unknown nested values": (
        BASE % b',"temperature":0.5,"x":{"a":[1,-2.5e3,true,false,null,{"b":"\\u00e9"}]}',
        "same",
    ),
}


@pytest.mark.parametrize("name", sorted(CORNERS))
def test_corner_cases(name):
    data, expected = CORNERS[name]
    ours, reference = native_answer([data]), python_answer([data])
    if expected == "refused":
        assert ours is None and reference is None
    elif expected == "stricter":
        assert ours is None and reference is not None
    else:
        assert ours is not None and ours == reference


@pytest.mark.parametrize(
    "custom_id",
    ["plain", 'quote " and \\ backslash', "tab\tnew\nline\x01\x1f\x7f", "é世🎉\u2028/", "\x00"],
)
def test_custom_ids_are_written_as_msgspec_writes_them(custom_id):
    for ensure_ascii in (True, False):
        data = line(request(custom_id), ensure_ascii=ensure_ascii)
        assert assert_agrees([data])
        assert native_answer([data])[0] == [msgspec.json.encode(custom_id)]


@pytest.mark.parametrize("length", [85, 127, 128, 254, 255, 256, 509, 511, 766, 5000])
def test_long_texts_count_their_characters_as_python_does(length):
    """The compiled count of a text's characters goes 255 bytes at a time: characters of one
    to four bytes, split across those runs at every offset, each count once."""
    alphabet = "aé世🎉"
    text = "".join(alphabet[(i * 7 + i // 5) % 4] for i in range(length))
    for shift in range(5):
        data = line(request(f"long-{shift}", text[shift:], max_tokens=7))
        ours = native_answer([data])
        assert ours is not None and ours == python_answer([data])
        (counts,) = ours[1].values()
        other_chars = len(text[shift:])
        assert counts[4] == other_chars, (counts, other_chars)


texts = st.text(st.characters(codec="utf-8"), max_size=40)
parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, texts),
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]),
            "content": st.one_of(texts, st.lists(parts, max_size=3)),
        }
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["m1", "m2", "", "модель"]), "messages": messages},
    optional={
        "max_tokens": st.one_of(st.none(), st.integers(-2, 2**64)),
        "max_completion_tokens": st.one_of(st.none(), st.integers(-2, 2**64)),
        "temperature": st.floats(allow_nan=False, allow_infinity=False),
        "extra": st.recursive(
            st.none() | st.booleans() | st.integers() | texts,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
            max_leaves=6,
        ),
    },
)
requests = st.fixed_dictionaries(
    {
        "custom_id": texts,
        "method": st.sampled_from(["POST", "GET"]),
        "url": st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]),
        "body": bodies,
    }
)


@settings(max_examples=400, deadline=None)
@given(st.lists(requests, min_size=1, max_size=4), st.booleans())
def test_generated_requests_agree(objs, ensure_ascii):
    lines = [line(obj, ensure_ascii) for obj in objs]
    assert_agrees(lines)
    for one in lines:
        assert_agrees([one])


def test_mutated_lines_are_never_accepted_when_python_refuses_them():
    seeds = [
        line(request("id-1", "Grüße 世界 🎉 \\ \"q\"", max_tokens=5)),
        line(request("id-2", "plain ascii text", max_completion_tokens=3), ensure_ascii=True),
        BASE.replace(b'"hi"', b'[{"type":"text","text":"t"},{"type":"image_url",'
                     b'"image_url":{"url":"data:image/png;base64,iVBORw0"}}]') % b',"n":[1,{}]',
    ]  # fmt: skip
    accepted = refused = 0
    for data in mutations(seeds, 20261126):
        if assert_agrees([data]):
            accepted += 1
        else:
            refused += 1
    # both kinds were exercised
    assert accepted > 300 and refused > 3000


def test_crlf_to_lf_agrees_with_the_python_one(monkeypatch):
    rng = random.Random(7)
    compiled = line_work.crlf_to_lf
    cases = [b"", b"\r", b"\n", b"\r\n", b"a\r\r\nb\rc\r\n", b"\r\n\r\n", b"x\r"]
    cases += [bytes(rng.choice(b"ab\r\n") for _ in range(rng.randrange(40))) for _ in range(500)]
    expected = []
    monkeypatch.setattr(line_work, "native_crlf_to_lf", None)
    for case in cases:
        expected.append(line_work.crlf_to_lf(case))
    monkeypatch.undo()
    assert [compiled(case) for case in cases] == expected
    assert [native.crlf_to_lf(case) for case in cases] == expected
    # in two parts (a CRLF split between them too), by both: the same as in one
    for case, whole in zip(cases, expected, strict=True):
        cut = rng.randrange(len(case) + 1)
        head, tail = case[:cut], case[cut:]
        assert native.crlf_to_lf(head, tail) == whole, (head, tail)
        assert compiled(head, tail) == whole
        monkeypatch.setattr(line_work, "native_crlf_to_lf", None)
        assert line_work.crlf_to_lf(head, tail) == whole
        monkeypatch.undo()
    assert native.crlf_to_lf(b"a\r", b"\nb\r\n") == b"a\nb\n"


def test_a_block_in_two_parts_reads_as_the_whole(tmp_path):
    """The compiled passes take a block as ``read_block_parts`` gives it, the line the two
    parts share put together: the same answers as for the block in one piece."""
    rng = random.Random(3)
    requests = [line(request(f"id-{i}", "Grüße 世界 " * rng.randrange(1, 30))) for i in range(300)]
    results = [line(result(f"id-{i}", response__body__model=f"m{i % 3}")) for i in range(300)]
    for lines, compiled in ((requests, native.check_block), (results, native.join_block)):
        block = b"".join(x + (b"\r\n" if i % 7 == 0 else b"\n") for i, x in enumerate(lines))
        assert compiled(block) is not None
        for cut in [1, 2, *rng.sample(range(3, len(block) - 1), 40), len(block) - 1]:
            head = block[:cut]
            newline = block.find(b"\n", cut - 1)  # readline finishes the line at the cut
            tail = b"" if block[cut - 1] == 10 else block[cut : newline + 1]
            whole, parts = compiled(head + tail), compiled(head, tail)
            assert whole is not None and parts is not None
            if compiled is native.join_block:  # the joined lines come as a buffer
                whole, parts = (bytes(whole[0]), *whole[1:]), (bytes(parts[0]), *parts[1:])
            assert parts == whole, cut
        assert compiled(block[:-1]) is None and compiled(block[:10], block[10:-1]) is None
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(x + b"\n" for x in requests))
    with open(path, "rb") as one, open(path, "rb") as two:
        wholes = list(line_work.read_blocks(one, 1000))
        parts = list(line_work.read_block_parts(two, 1000))
    assert [(o, h + t) for o, h, t in parts] == wholes and any(t for _, _, t in parts)


def shard_files(shards) -> list[tuple[bytes, bytes, int, int]]:
    return [
        (Path(s.path).read_bytes(), Path(s.ids_path).read_bytes(), s.lines, s.first_line)
        for s in shards
    ]


def test_the_shard_pass_writes_the_same_shards_and_tally_either_way(tmp_path, monkeypatch):
    (write_realistic_requests,) = bench_data("write_realistic_requests")
    source = tmp_path / "in.jsonl"
    write_realistic_requests(source, 12000)  # several 2 MB blocks, CRLF lines among them
    compiled = shard_and_tally(source, tmp_path / "compiled", max_file_bytes=3_000_000)
    without_native(monkeypatch)
    python = shard_and_tally(source, tmp_path / "python", max_file_bytes=3_000_000)
    assert shard_files(compiled[0]) == shard_files(python[0])
    assert len(compiled[0]) > 2
    assert compiled[1].model_dump() == python[1].model_dump()


def test_problems_are_named_the_same_either_way(tmp_path, monkeypatch):
    rows = [line(request(f"r{i}", "texte " * 50)) for i in range(9000)]
    rows[4000] = b'{"custom_id": "r4000", "method": "POST"}'
    rows[7000] = line(request("r7000", model="not-allowed"))
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\r\n".join(rows) + b"\r\n")
    messages = []
    for mode in ("compiled", "python"):
        if mode == "python":
            without_native(monkeypatch)
        with pytest.raises(RequestFileError) as caught:
            shard_and_tally(source, tmp_path / mode, allowed_models={MODEL})
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "line 4001" in messages[0] and "line 7001" in messages[0]


def test_duplicate_custom_ids_are_named_the_same_either_way(tmp_path, monkeypatch):
    rows = [line(request(f"r{i}", "texte " * 50)) for i in range(9000)]
    rows[8000] = line(request("r1"))
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(rows) + b"\n")
    messages = []
    for mode in ("compiled", "python"):
        if mode == "python":
            without_native(monkeypatch)
        with pytest.raises(RequestFileError) as caught:
            shard_and_tally(source, tmp_path / mode)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "line 8001: duplicate custom_id 'r1' (first used on line 2)" in messages[0]


# --- the join's first pass ----------------------------------------------------------------


def joined_fields(block: JoinedBlock) -> tuple:
    return (
        bytes(block.data),
        block.id_list(),
        bytes(block.kinds),
        block.tokens.tobytes(),
        block.lengths.tobytes(),
        list(block.models),
        block.codes.tobytes(),
    )


def assert_joins_alike(lines: list[bytes]) -> bool:
    """The compiled pass takes a block only to make what JoinedBlock makes of it; True if
    it took it."""
    data = b"".join(line + b"\n" for line in lines)
    ours = JoinedBlock.joined_natively(data)
    try:
        reference = JoinedBlock(lines)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        assert ours is None, f"the compiled join took a block Python cannot read: {lines!r}"
        return False
    if ours is None:
        return False
    assert joined_fields(ours) == joined_fields(reference), lines
    assert ours.hashes == native.hash_ids(reference.ids)
    return True


def test_realistic_result_files_join_the_same(tmp_path):
    (write_results,) = bench_data("write_results")
    for realistic in (True, False):
        out, err = tmp_path / f"out-{realistic}.jsonl", tmp_path / f"err-{realistic}.jsonl"
        write_results(3000, out, err, realistic=realistic)
        for path in (out, err):
            assert assert_joins_alike(split_lines(path.read_bytes())), (realistic, path)


def result(custom_id: str = "a", **fields: object) -> dict:
    body = {
        "model": "m",
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    line: dict = {"custom_id": custom_id, "response": {"status_code": 200, "body": body}}
    for path, value in fields.items():
        *parents, leaf = path.split("__")
        node = line
        for key in parents:
            node = node[key]
        if value is DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return line


DROP = object()
RESULT_CORNERS: dict[str, tuple[bytes, str]] = {
    name: (json.dumps(obj, ensure_ascii=False).encode(), expected)
    for name, obj, expected in [
        ("ok", result(), "same"),
        ("no usage", result(response__body__usage=DROP), "same"),
        ("usage null", result(response__body__usage=None), "same"),
        ("usage partial", result(response__body__usage={"prompt_tokens": 4}), "same"),
        ("usage negative", result(response__body__usage={"prompt_tokens": -4}), "same"),
        ("usage over 32 bits", result(response__body__usage={"total_tokens": 2**40}), "same"),
        ("usage over 64 bits", result(response__body__usage={"total_tokens": 2**70}), "python"),
        ("usage float", result(response__body__usage={"total_tokens": 1.5}), "python"),
        ("no model", result(response__body__model=DROP), "same"),
        ("model null", result(response__body__model=None), "same"),
        ("model a number", result(response__body__model=5), "python"),
        ("no choices", result(response__body__choices=[]), "same"),
        ("choices null", result(response__body__choices=None), "python"),
        ("choice without message", result(response__body__choices=[{"index": 0}]), "same"),
        ("message null", result(response__body__choices=[{"message": None}]), "same"),
        ("message without content", result(response__body__choices=[{"message": {}}]), "same"),
        ("content null", result(response__body__choices=[{"message": {"content": None}}]), "same"),
        (
            "content a number",
            result(response__body__choices=[{"message": {"content": 5}}]),
            "python",
        ),
        (
            "second choice's content an object",
            result(
                response__body__choices=[
                    {"message": {"content": "x"}},
                    {"message": {"content": {}}},
                ]
            ),
            "python",
        ),
        ("finish_reason null", result(response__body__choices=[{"finish_reason": None}]), "same"),
        ("status 201", result(response__status_code=201), "same"),
        ("status missing", result(response__status_code=DROP), "same"),
        ("status null", result(response__status_code=None), "python"),
        ("request_id a number", result(response__request_id=5), "python"),
        ("response null", result(response=None), "same"),
        ("no response", result(response=DROP), "same"),
        ("body null", result(response__body=None), "same"),
        ("line error", result(error={"code": "server_error", "message": "down"}), "same"),
        ("line error empty", result(error={}), "same"),
        ("line error null", result(error=None), "same"),
        ("line error code a number", result(error={"code": 5}), "python"),
        (
            "body error dict",
            result(
                response__status_code=400,
                response__body__error={"message": "bad", "type": "t"},
            ),
            "same",
        ),
        (
            "body error dict, code over type",
            result(response__status_code=400, response__body__error={"code": "c", "type": "t"}),
            "same",
        ),
        (
            "body error empty strings",
            result(
                response__status_code=400,
                response__body__error={"message": "", "code": "", "type": ""},
                response__body__message="",
            ),
            "same",
        ),
        (
            "body error string",
            result(response__status_code=429, response__body__error="slow down"),
            "same",
        ),
        ("body error empty dict", result(response__body__error={}), "same"),
        (
            "body error message a number",
            result(response__body__error={"message": 5}),
            "python",
        ),
        ("body error a list", result(response__body__error=[1]), "python"),
        ("body message", result(response__status_code=503, response__body__message="m"), "same"),
        ("status 500 no body", result(response__status_code=500, response__body=None), "same"),
        ("transient code", result(error={"code": "rate_limit_exceeded"}), "same"),
        ("not transient 404", result(response__status_code=404), "same"),
        ("not transient 499", result(response__status_code=499), "same"),
        ("transient 429", result(response__status_code=429), "same"),
        ("no custom_id", {"response": None}, "python"),
        ("custom_id a number", {"custom_id": 5}, "python"),
        ("odd custom_id", result('q"\\\x01é🎉\u2028'), "same"),
    ]
}
RESULT_CORNERS["lone surrogate in content"] = (
    json.dumps(result()).encode().replace(b'"hi"', b'"\\udc00"'),
    "python",
)
RESULT_CORNERS["surrogate pair in content"] = (
    json.dumps(result()).encode().replace(b'"hi"', b'"\\ud83d\\ude00 \\u00e9"'),
    "same",
)
RESULT_CORNERS["duplicate key"] = (
    json.dumps(result()).encode().replace(b'"model": "m"', b'"model": "m", "model": "n"'),
    "python",
)
RESULT_CORNERS["unknown 1e999"] = (json.dumps(result()).encode()[:-1] + b', "x": 1e999}', "python")
RESULT_CORNERS["CR at the end"] = (json.dumps(result()).encode() + b"\r", "same")
RESULT_CORNERS["not json"] = (b"not json", "python")


@pytest.mark.parametrize("name", sorted(RESULT_CORNERS))
def test_result_corner_cases(name):
    data, expected = RESULT_CORNERS[name]
    lines = [json.dumps(result("before")).encode(), data, b"", b"  "]
    took = assert_joins_alike(lines)
    assert took == (expected == "same")


results = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=4,
)
strings = st.one_of(st.none(), texts)
result_lines = st.fixed_dictionaries(
    {"custom_id": texts},
    optional={
        "response": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "status_code": st.sampled_from([200, 201, 299, 300, 400, 429, 500, 503]),
                    "request_id": strings,
                    "body": st.one_of(
                        st.none(),
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "model": strings,
                                "choices": st.lists(
                                    st.fixed_dictionaries(
                                        {},
                                        optional={
                                            "message": st.one_of(
                                                st.none(),
                                                st.fixed_dictionaries(
                                                    {}, optional={"content": strings}
                                                ),
                                            ),
                                            "finish_reason": strings,
                                        },
                                    ),
                                    max_size=2,
                                ),
                                "usage": st.one_of(
                                    st.none(),
                                    st.fixed_dictionaries(
                                        {},
                                        optional={
                                            "prompt_tokens": st.integers(-5, 2**33),
                                            "completion_tokens": st.integers(0, 99),
                                            "total_tokens": st.integers(0, 99),
                                        },
                                    ),
                                ),
                                "error": st.one_of(
                                    strings,
                                    st.fixed_dictionaries(
                                        {},
                                        optional={
                                            "message": strings,
                                            "code": strings,
                                            "type": strings,
                                            "param": results,
                                        },
                                    ),
                                ),
                                "message": strings,
                                "extra": results,
                            },
                        ),
                    ),
                },
            ),
        ),
        "error": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "code": st.one_of(strings, st.sampled_from(["timeout", "batch_expired"])),
                    "message": strings,
                },
            ),
        ),
    },
)


@settings(max_examples=400, deadline=None)
@given(st.lists(result_lines, min_size=1, max_size=4), st.booleans())
def test_generated_results_join_alike(objs, ensure_ascii):
    assert_joins_alike([line(obj, ensure_ascii) for obj in objs])


def test_mutated_result_lines_join_alike_or_go_to_python():
    seeds = [
        line(result("id-1", response__body__choices=[{"message": {"content": "Grüße 世界 🎉"}}])),
        line(result("id-2", response__status_code=500, response__body__error={"message": "x"})),
        line(result("id-3", error={"code": "timeout", "message": "late"}), ensure_ascii=True),
        line(result("id-4", response__body__usage={"prompt_tokens": 2**31 - 1, "total_tokens": 5})),
        line(result("id-5", response__body__error="slow down", response__body__message="m")),
    ]
    took = sum(assert_joins_alike([data]) for data in mutations(seeds, 20261127))
    assert took > 500


def test_the_join_writes_the_same_file_either_way(tmp_path, monkeypatch):
    realistic_ids, write_results = bench_data("realistic_ids", "write_results")
    n = 9000
    requests_path = tmp_path / "in.jsonl"
    requests_path.write_bytes(
        b"".join(line(request(custom_id)) + b"\n" for custom_id, _ in realistic_ids(n))
    )
    shards = shard_request_file(requests_path, tmp_path / "shards", max_file_bytes=400_000)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    write_results(n, out, err, realistic=True)
    # a later round for some lines, and an unreadable line no request needs
    retry = tmp_path / "retry.jsonl"
    first_ids = [json.loads(x)["custom_id"] for x in out.read_bytes().splitlines()[:50]]
    retry.write_bytes(
        b"".join(line(result(i, response__status_code=500)) + b"\n" for i in first_ids)
        + b'{"custom_id": "ghost", "response": 5}\n'
    )
    # the same unreadable line for a request that needs it: the join fails naming it
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"custom_id": "' + first_ids[0].encode() + b'", "response": 5}\n')
    paths = [str(out), str(err), str(retry)]
    outputs = []
    for mode in ("compiled", "python"):
        if mode == "python":
            without_native(monkeypatch)
        target = tmp_path / f"{mode}.jsonl"
        summary = join_result_files(shards, paths, target, retry_ids_path=tmp_path / f"{mode}.ids")
        with pytest.raises(ResultFileError) as caught:
            join_result_files(shards, [*paths, str(broken)], tmp_path / f"{mode}-broken.jsonl")
        outputs.append(
            (
                summary.model_dump(exclude={"output_path"}),
                target.read_bytes(),
                (tmp_path / f"{mode}.ids").read_bytes(),
                str(caught.value),
            )
        )
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["requests"] == n and outputs[0][0]["retryable"] >= 50
    assert "broken.jsonl, line 1" in outputs[0][3]


def test_the_latest_entry_table_finds_what_the_sorted_keys_find():
    import numpy as np

    rng = np.random.default_rng(5)
    keys = rng.integers(-50, 50, size=2000, dtype=np.int64)  # many repeats: later ones win
    keys[::7] = rng.integers(-(2**63), 2**63 - 1, size=len(keys[::7]), dtype=np.int64)
    wanted = np.concatenate([keys[::3], rng.integers(-100, 100, size=500, dtype=np.int64)])
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.searchsorted(sorted_keys, wanted, side="right") - 1
    clipped = np.maximum(pos, 0)
    expected = np.where((pos >= 0) & (sorted_keys[clipped] == wanted), order[clipped], -1)
    table = native.LatestEntries(keys.tobytes())
    found = np.frombuffer(table.find(wanted.tobytes()), dtype=np.int64)
    assert (found == expected).all() and (found == -1).any() and (found >= 0).any()
    assert np.frombuffer(native.LatestEntries(b"").find(wanted.tobytes()), np.int64).max() == -1


def test_gathering_a_window_agrees_with_the_python_check(tmp_path):
    """The second pass's copy: the lines in the order asked, and per line whether it
    starts with its own id (what ``join._lines_start_with`` answers), collisions included;
    lines outside the buffer are refused, not read. The same check without the copy, on a
    memory map, answers the same."""
    import numpy as np

    from prefect_kluster.tasks.join import _lines_start_with

    rng = random.Random(11)
    ids = [json.dumps(f"id-{i}-{'é' * (i % 3)}", ensure_ascii=False).encode() for i in range(300)]
    lines = [b'{"custom_id":' + custom_id + b',"status":"ok"}\n' for custom_id in ids]
    lines[7] = b'{"custom_id":' + ids[7] + b"}\n"  # no comma after the id
    lines[8] = lines[8].replace(b"id-8", b"id-9")  # another id
    lines[9] = b'{"custom_id": ' + ids[9] + b',"a":1}\n'  # not as the join writes it
    lines[10] = b'{"custom_id":"id-10-"\n'  # cut short
    buffer = b"".join(lines)
    ends = np.cumsum([len(x) for x in lines])
    at, sizes = ends - [len(x) for x in lines], np.array([len(x) for x in lines])
    order = list(range(len(lines)))
    rng.shuffle(order)
    order += [3, 3, 299]  # a line asked twice, and the last one
    picked = np.array(order)
    wanted = [ids[i] for i in picked]
    wanted[0] = ids[picked[1]]  # a line checked against another line's id
    data, same = native.gather_lines(buffer, at[picked].tobytes(), sizes[picked].tobytes(), wanted)
    assert data == b"".join(lines[i] for i in picked)
    expected = _lines_start_with(buffer, at[picked], wanted)
    assert (np.frombuffer(same, dtype=bool) == expected).all()
    assert 1 <= (~expected).sum() <= 5 and expected.sum() > 280
    with pytest.raises(ValueError):
        native.gather_lines(
            buffer, array("q", [len(buffer) - 2]).tobytes(), array("q", [5]).tobytes(), [ids[0]]
        )
    with pytest.raises(ValueError):
        native.gather_lines(buffer, at[:2].tobytes(), sizes[:2].tobytes(), [ids[0]])

    # the check alone, on a memory map of the lines as a file (the join's hand-over)
    path = tmp_path / "joined.jsonl"
    path.write_bytes(buffer)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        checked = native.lines_start_with(m, at[picked].tobytes(), wanted)
        assert (np.frombuffer(checked, dtype=bool) == expected).all()
        # offsets past the end (or before the start) are lines that are not there
        far = array("q", [len(buffer) - 3, len(buffer) + 10, -1]).tobytes()
        assert native.lines_start_with(m, far, [ids[299]] * 3) == b"\x00\x00\x00"
        with pytest.raises(ValueError):
            native.lines_start_with(m, at[:2].tobytes(), [ids[0]])
    assert native.lines_start_with(buffer, at[:1].tobytes(), [ids[0]]) == b"\x01"


def test_the_joined_lines_come_as_a_read_only_buffer(tmp_path):
    """The first pass hands its joined lines over without a copy: a buffer that writes and
    measures as the bytes would, and cannot be written to."""
    lines = [line(result(f"id-{i}")) for i in range(5)]
    block = JoinedBlock.joined_natively(b"".join(x + b"\n" for x in lines))
    assert block is not None
    expected = JoinedBlock(lines).data
    assert len(block.data) == len(expected) and bytes(block.data) == expected
    view = memoryview(block.data)
    assert view.readonly and view.format == "B" and view.nbytes == len(expected)
    target = tmp_path / "out"
    with open(target, "wb") as handle:
        handle.write(block.data)
    assert target.read_bytes() == expected
    with open(target, "rb") as handle, pytest.raises(TypeError):  # no writable view of it
        handle.readinto(block.data)


# Raw JSON string pieces, each placed after 0 to 17 plain bytes, so that it falls at every
# place of the 8-byte steps the string scan takes (native/serde_json-swar.patch): what
# either pass reads differently there, a test below sees.
STRING_PIECES = [
    b'\\"',  # escaped quote
    b"\\\\",  # escaped backslash
    b"\\u00e9\\ud83c\\udf89",  # escapes, a surrogate pair
    b"\\ud800",  # a lone surrogate, escaped
    "é世🎉".encode(),  # multi-byte UTF-8 across a step
    b"\x7f ~",  # the bytes at the edges of what needs no escape
    b"\x00",  # control characters: refused inside a string
    b"\x01",
    b"\x1f",
    b"\t",
    b"\xc3",  # a cut UTF-8 sequence
]


def in_string_field(template: bytes, marker: bytes, skip: int, piece: bytes) -> bytes:
    return template.replace(marker, b"x" * skip + piece + b"y" * (skip % 5))


@pytest.mark.parametrize("skip", range(34))  # every place in four 8-byte (SWAR) steps
def test_strings_read_alike_wherever_an_escape_falls(skip):
    """Requests (the custom_id, a message, an unknown field) and results (the custom_id,
    the answer copied raw, an unknown field) with each piece at each place in a step:
    both passes give the same answer, or the compiled one declines; a string cut off by
    the end of the line is refused by both."""
    request_template = line({**request("ID@", "TEXT@"), "note": "NOTE@"})
    answer = result("ID@")
    answer["response"]["body"]["choices"][0]["message"]["content"] = "TEXT@"
    result_template = line({"note": "NOTE@", **answer})
    took = 0
    for piece in STRING_PIECES:
        for marker in (b"ID@", b"TEXT@", b"NOTE@"):
            data = in_string_field(request_template, marker, skip, piece)
            took += assert_agrees([data])
            data = in_string_field(result_template, marker, skip, piece)
            took += assert_joins_alike([data])
        cut = request_template[: request_template.index(b"TEXT@")] + b"x" * skip + piece
        assert native_answer([cut]) is None and python_answer([cut]) is None
    assert took >= 3 * 2 * 5  # the valid pieces, in every field, by both passes


def _mapped_kb() -> int:
    """This process's resident file-backed memory (mapped files' pages), in kB."""
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("RssFile:")).split()[1])


def test_a_mapped_file_gives_the_blocks_a_read_gives(tmp_path):
    """``map_block_parts`` (the join's reader of local result files) cuts a file where
    ``read_block_parts`` does, with no copy: the compiled passes read its views as they read
    bytes, a view that is not one piece is refused, and the mapping holds a few blocks at a
    time, not the file."""
    rng = random.Random(5)
    rows = [line(result(f"id-{i}", response__body__content="Grüße 世界 " * rng.randrange(1, 90)))
            for i in range(2000)]  # fmt: skip
    cases = {
        "plain": b"".join(x + b"\n" for x in rows),
        "crlf, no last newline": b"".join(x + b"\r\n" for x in rows)[:-2],
        "a line longer than a block": b"x" * 5000 + b"\n" + rows[1] + b"\n",
        "one newline": b"\n",
        "empty": b"",
    }
    for name, content in cases.items():
        path = tmp_path / f"{len(name)}.jsonl"
        path.write_bytes(content)
        with open(path, "rb") as handle:
            read = [(o, h + t) for o, h, t in line_work.read_block_parts(handle, 1000)]
        mapped = [(o, bytes(v), t) for o, v, t in line_work.map_block_parts(str(path), 1000)]
        assert [(o, v) for o, v, _ in mapped] == read, name
        assert all(t == b"" for _, _, t in mapped), name
    path = tmp_path / "results.jsonl"
    path.write_bytes(cases["plain"])
    with open(path, "rb") as handle:
        blocks = list(line_work.read_blocks(handle, 4096))
    views = list(line_work.map_block_parts(str(path), 4096))
    assert len(views) == len(blocks) > 10
    for (_, view, _), (_, block) in zip(views, blocks, strict=True):
        assert isinstance(view, memoryview)
        joined, from_bytes = native.join_block(view), native.join_block(block)
        assert (bytes(joined[0]), *joined[1:]) == (bytes(from_bytes[0]), *from_bytes[1:])
    for unfit in (memoryview(cases["plain"])[::2], bytearray(cases["plain"])):
        with pytest.raises(ValueError, match="read-only contiguous"):
            native.join_block(unfit)

    big = tmp_path / "big.jsonl"  # 48 MB read in 1 MB blocks, every page of each touched
    big.write_bytes((b"x" * 1023 + b"\n") * (48 << 10))
    before, most = _mapped_kb(), 0
    for _, view, _ in line_work.map_block_parts(str(big), 1 << 20):
        assert sum(view[::4096]) == 120 * len(view[::4096])
        most = max(most, _mapped_kb() - before)
    assert most < (line_work.MAPPED_BEHIND + 4) * 1024, most  # kB: not the 48 MB file
