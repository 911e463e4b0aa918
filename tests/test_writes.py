"""Large writes go out in pieces (tasks._lines.write_all): the shards, the join's scratch
and output files and the downloads, each byte once and in order."""

from __future__ import annotations

import builtins
import io
import random
from pathlib import Path
from typing import Any

import pytest

from prefect_kluster.tasks import _lines, storage
from prefect_kluster.tasks import join as join_module
from prefect_kluster.tasks._lines import WRITE_PIECE_BYTES, write_all
from prefect_kluster.tasks.build import shard_request_file
from prefect_kluster.tasks.join import join_result_files
from tests.helpers import read_jsonl, request, without_native, write_jsonl
from tests.test_join import ok_line


class Recorder(io.BytesIO):
    """A file that keeps what was written and the size of every write."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data: Any) -> int:
        self.sizes.append(len(data))
        return super().write(data)


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        WRITE_PIECE_BYTES - 1,
        WRITE_PIECE_BYTES,
        WRITE_PIECE_BYTES + 1,
        3 * WRITE_PIECE_BYTES + 5,
    ],
)
def test_write_all_writes_every_byte_in_pieces(size):
    data = random.Random(size).randbytes(size)
    handle = Recorder()
    write_all(handle, data)
    assert handle.getvalue() == data
    assert max(handle.sizes) <= WRITE_PIECE_BYTES
    expected_writes = max(1, -(-size // WRITE_PIECE_BYTES))
    assert len(handle.sizes) == expected_writes


def test_write_all_takes_bytearrays_and_memoryviews():
    data = bytearray(random.Random(7).randbytes(2 * WRITE_PIECE_BYTES + 3))
    for given in (data, memoryview(data)):
        handle = Recorder()
        write_all(handle, given)
        assert handle.getvalue() == bytes(data) and len(handle.sizes) == 3


def watch_write_sizes(monkeypatch) -> dict[str, list[int]]:
    """The size of every write to files the shard step and the join open, by file name."""
    sizes: dict[str, list[int]] = {}

    class Watched:
        def __init__(self, handle: Any, name: str) -> None:
            self._handle, self._sizes = handle, sizes.setdefault(name, [])

        def write(self, data: Any) -> int:
            self._sizes.append(len(data))
            return self._handle.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handle, name)

        def __enter__(self) -> Watched:
            return self

        def __exit__(self, *exc: Any) -> None:
            self._handle.close()

    open_file = storage.open_file

    def watched_open_file(path: str, mode: str = "rb") -> Any:
        handle = open_file(path, mode)
        return Watched(handle, Path(path).name) if "w" in mode else handle

    def watched_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(path, mode, *args, **kwargs)
        return Watched(handle, Path(path).name) if "w" in mode else handle

    monkeypatch.setattr(storage, "open_file", watched_open_file)
    monkeypatch.setattr(join_module, "open", watched_open, raising=False)
    return sizes


@pytest.mark.parametrize("native", [True, False])
def test_shards_scratch_and_output_are_written_in_pieces(tmp_path, monkeypatch, native):
    """Requests and answers of about 2 KB: the shard step's blocks (2 MiB) and the join's
    (4 MiB) hold many pieces' worth, and every file still comes out whole and in order."""
    if not native:
        without_native(monkeypatch)
    elif _lines.native_join_block is None:
        pytest.skip("the compiled module is not built")
    sizes = watch_write_sizes(monkeypatch)
    ids = [f"w-{i}" for i in range(1500)]
    source = write_jsonl(
        tmp_path / "in.jsonl", [request(i, "переведи это, пожалуйста " * 80) for i in ids]
    )
    shards = shard_request_file(source, tmp_path / "shards")
    assert b"".join(Path(s.path).read_bytes() for s in shards) == source.read_bytes()
    results = write_jsonl(
        tmp_path / "results.jsonl", [ok_line(i, f"ответ {i} " + "слово " * 300) for i in ids]
    )
    summary = join_result_files(shards, [str(results)], tmp_path / "joined.jsonl")
    rows = read_jsonl(tmp_path / "joined.jsonl")
    assert [r["custom_id"] for r in rows] == ids and summary.succeeded == len(ids)
    assert all(r["content"].startswith(f"ответ {r['custom_id']} ") for r in rows)
    written = {name: sum(s) for name, s in sizes.items()}
    shard_files = [n for n in sizes if n.startswith("part-") and ".jsonl." in n]
    scratch = [n for n in sizes if ".scratch-" in n]
    joined = [n for n in sizes if n.startswith("joined.jsonl") and ".scratch-" not in n]
    assert shard_files and scratch and joined, sorted(sizes)
    assert sum(written[n] for n in shard_files) == source.stat().st_size > 4 * WRITE_PIECE_BYTES
    assert sum(written[n] for n in joined) == (tmp_path / "joined.jsonl").stat().st_size
    assert sum(written[n] for n in scratch) >= 4 * WRITE_PIECE_BYTES
    largest = {name: max(s) for name, s in sizes.items() if s}
    assert max(largest.values()) <= WRITE_PIECE_BYTES, largest


def test_a_download_is_written_whole_in_pieces(tmp_path, monkeypatch, credentials):
    """A 3 MB file from the service (the emulator, over HTTP): the SDK hands it over in
    1 MiB chunks, written in pieces, every byte once and in order."""
    from prefect_kluster.tasks.download import stream_file_to

    lines = [f'{{"custom_id": "d-{i}", "text": "{"ж" * 300}"}}\n' for i in range(4500)]
    payload = "".join(lines).encode()
    with credentials.get_client() as client:
        file_id = client.files.create(file=("big.jsonl", payload), purpose="batch").id
    sizes = watch_write_sizes(monkeypatch)
    target = tmp_path / "download.jsonl"
    assert stream_file_to(credentials, file_id, str(target)) == len(payload)
    assert target.read_bytes() == payload
    ((name, written),) = sizes.items()
    assert name.startswith("download.jsonl.") and sum(written) == len(payload)
    assert max(written) <= WRITE_PIECE_BYTES < len(payload) // 4
