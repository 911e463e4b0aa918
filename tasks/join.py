"""Step 6: join results back to their requests, in input order.

The service does not promise output order, so the join takes two passes. The first
decodes every result line once and writes its joined line to a scratch file, keeping an
index of about 40 bytes a result (a 64-bit hash of the custom_id, where the joined line
is, its kind and token counts): on two threads by the compiled pass when it is built, else
here, with a helper process on a second core for part of a large input. A result file
downloaded by this process has had its first pass made as its bytes arrived
(``FirstPassAhead``): the join takes that instead of reading the file again. The second pass
reads the custom_ids of the requests a window at a time and copies their joined lines into
the output, in input order, checking that each is its request's (the compiled module's
``gather_lines`` does both in one pass); when the results came in about input order, as they
usually do, the reads are sequential. When no two requests share a key, each joined line
is read once, so the scratch pages of lines copied out are freed as the pass goes (the
output's new pages then reuse them). When a single result file came complete and in input
order (kluster's do) and its first pass was made as it downloaded, that pass's scratch file
already is the output: each line is checked against its request's custom_id on the bytes,
and the file is renamed into place; no line is copied (``_ResultIndex.in_place``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import mmap
import os
import shutil
import sys
import tempfile
import threading
import uuid
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from itertools import compress
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

# to_joined, is_transient_failure and the codes are defined in tasks._lines, which imports no
# Prefect, so that the join's helper process can run them; they are this module's API too.
from prefect_kluster.tasks import _lines as line_work
from prefect_kluster.tasks import storage
from prefect_kluster.tasks._lines import (
    DECODE_ERRORS,
    NOT_PROCESSED,
    OK,
    TRANSIENT,
    TRANSIENT_CODES,
    UNREAD,
    Helper,
    JoinedBlock,
    hash_ids,
    is_transient_failure,
    read_blocks,
    split_lines,
    to_joined,
)
from prefect_kluster.tasks.schema import (
    JoinedLine,
    ResultLine,
    custom_id_decoder,
    joined_encoder,
    result_decoder,
)
from prefect_kluster.tasks.types import Shard, TokenUsage

CHUNK_LINES = 65536
__all__ = [
    "NOT_PROCESSED",
    "TRANSIENT_CODES",
    "JoinSummary",
    "OutputExistsError",
    "ResultFileError",
    "ShardSummary",
    "is_transient_failure",
    "join_result_files",
    "join_results",
    "parquet_available",
    "to_joined",
]


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


class ResultFileError(ValueError):
    """A line of a downloaded output or error file cannot be read; names the file and line."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = path, line, reason
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


class ShardSummary(BaseModel):
    index: int
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    usage: TokenUsage = Field(default_factory=TokenUsage)


class JoinSummary(BaseModel):
    """Counts over a joined results file."""

    output_path: str
    parquet_path: str | None = None
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    retryable: int = Field(0, description="Failed lines whose failure was transient.")
    usage: TokenUsage = Field(default_factory=TokenUsage)
    usage_by_model: dict[str, TokenUsage] = Field(
        default_factory=dict,
        description="Token usage of the ok lines per model (as the results name it), "
        "counted in the join's own pass.",
    )
    shards: list[ShardSummary] = Field(default_factory=list)


# The index's one offset space: scratch file k's lines at k << _SLOT_BITS on (0: the
# first pass's own, 1: the helper's, 2 on: passes made as result files downloaded).
_SLOT_BITS = 56
_HELPER_SCRATCH = 1 << _SLOT_BITS
# Custom_ids are joined a window at a time: about 4,000 to 8,000 (a few MB of joined lines).
# Measured on 200k real-world results (answers of about 900 bytes): 512 KB windows of ids
# raised the join's peak RSS by 63 MB, 128 KB windows by 10 MB.
_WINDOW_BYTES = 1 << 17
# Blocks of the first pass that may wait, in order, for the helper's answers.
_MAX_PENDING = 64
# Lines of a window nearer than this in the scratch files are read with one read.
_READ_GAP = 8192
_CUSTOM_ID_PREFIX = b'{"custom_id":'
# The index's key for a JSON custom_id is 64 bits (``hash_ids``), so two ids may share one;
# every lookup checks the joined line it finds against the id it looked for. A test sets
# ``_id_hash`` to a function of one id to make keys collide.
_id_hash: Callable[[bytes], int] | None = None


def _hash_ids(json_ids: list[bytes]) -> bytes:
    """The index keys of JSON custom_ids, as an ``array("q")``'s bytes."""
    if _id_hash is None:
        return hash_ids(json_ids)
    return array("q", map(_id_hash, json_ids)).tobytes()


class _Pending:
    """A block of result lines the helper was asked to join (read again if it fails)."""

    __slots__ = ("file_no", "offset", "size")

    def __init__(self, file_no: int, offset: int, size: int):
        self.file_no = file_no
        self.offset = offset
        self.size = size


class _ResultIndex:
    """JSON custom_id -> joined line, over several result files; later files take precedence.

    One pass decodes every result line and writes its joined line to a scratch file (a
    helper process does part of it, into a second scratch file). The index keeps per result
    only a 64-bit hash of the JSON custom_id, where its joined line is, its kind (ok,
    failed, transient), token counts and model: about 40 bytes a result, in arrays. The join then
    reads joined lines back a window of requests at a time.
    """

    def __init__(
        self,
        paths: Sequence[str],
        scratch_stem: Path,
        ahead: Sequence[FirstPassAhead | None] = (),
        lookups_now: bool = True,
    ):
        self.paths = list(paths)
        self._scratch_paths = [
            scratch_stem.with_name(f"{scratch_stem.name}.scratch-{i}.tmp") for i in (0, 1)
        ]
        # per file, the pass made as it downloaded (None: the join makes its own); this
        # index owns them from here and removes their scratch files when it closes
        self._ahead = list(ahead) + [None] * (len(self.paths) - len(ahead))
        self._files: list[BinaryIO | None] = []
        self._hashes, self._starts, self._lengths = array("q"), array("q"), array("q")
        self._kinds, self._tokens = bytearray(), array("i")
        # Join-wide model codes (-1: none) and the names they stand for.
        self._codes = array("i")
        self.model_names: list[str] = []
        self._model_codes: dict[str, int] = {}
        # (first entry, file number) for each file that has entries, in file order.
        self._file_runs: list[tuple[int, int]] = []
        # (slot, scratch path) of each pass made as its file downloaded that was taken
        self._adopted: list[tuple[int, str]] = []
        try:
            self._files += [open(self._scratch_paths[0], "w+b"), None]  # noqa: SIM115
            self._scratch_end = 0
            self._helper_end = 0  # bytes the helper has written to its scratch file
            self._writer = _Writer(self._files[0])
            try:
                self._index_all()
            finally:
                self._writer.close()
            self._files[0].flush()
            if self._helper_end:  # the helper answered for some blocks
                self._files[1] = open(self._scratch_paths[1], "rb")  # noqa: SIM115
        except BaseException:
            self.close()
            raise
        self._fds = [-1 if f is None else f.fileno() for f in self._files]
        self._file_keys = np.frombuffer(self._hashes, dtype=np.int64)
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None
        # Each key's latest entry in a hash table (the compiled module's), when it is built:
        # one probe a lookup, where the sorted keys take a binary search. Made here (beside
        # the join's check of the requests' keys) unless ``lookups_now`` is False: then at
        # the first lookup, and a join that hands over a pass's scratch file makes none.
        self._latest: Any = None
        if lookups_now:
            self._lookups()
        # Set by the join when no two requests share a key: then each joined line is read
        # once at most, and the scratch pages of lines copied out can be freed at once.
        self.release_copied = False
        self.released = 0  # bytes of scratch freed so far
        self.starts = np.frombuffer(self._starts, dtype=np.int64)
        self.lengths = np.frombuffer(self._lengths, dtype=np.int64)
        self.kinds = np.frombuffer(self._kinds, dtype=np.int8)
        self.tokens = np.frombuffer(self._tokens, dtype=np.int32).reshape(-1, 3)
        self.codes = np.frombuffer(self._codes, dtype=np.int32)

    def close(self) -> None:
        for handle in self._files:
            if handle is not None:
                handle.close()
        for path in self._scratch_paths:
            path.unlink(missing_ok=True)
        for ahead in self._ahead:
            if ahead is not None:
                ahead.discard()

    # --- first pass ---------------------------------------------------------------------

    def _index_all(self) -> None:
        if line_work.native_join_block is not None:
            self._index_all_natively()
            return
        # The helper's join reads every file; passes made ahead go when the index closes.
        helper = Helper.start(self.paths, scratch=str(self._scratch_paths[1]))
        pending: deque[tuple[int, JoinedBlock | _Pending]] = deque()
        try:
            for file_no, path in enumerate(self.paths):
                with storage.open_file(path) as handle:
                    for offset, data in read_blocks(handle):
                        if (
                            helper is not None
                            and data[-1] == 10
                            and helper.can_take()
                            and helper.send(file_no, offset, len(data))
                        ):
                            pending.append((file_no, _Pending(file_no, offset, len(data))))
                        else:
                            pending.append((file_no, self._join_here(data, file_no, offset)))
                        # Waiting blocks hold no lines, so many may queue behind a slow
                        # answer while this process goes on joining the next blocks.
                        self._take(pending, helper, wait=len(pending) > _MAX_PENDING)
            self._take(pending, helper, wait=True)
        finally:
            if helper is not None:
                helper.close()

    def _index_all_natively(self) -> None:
        """The first pass with the compiled join (``native/``): it releases the GIL, so
        blocks are joined on two threads while this one reads ahead, writes the joined
        lines and indexes them in order; no helper process. A block it does not take
        (an unreadable line, a shape it is not sure of) is joined by ``JoinedBlock``. A
        file whose pass was made as it downloaded is not read: its entries are taken, in
        their place in file order."""
        run: list[int] = []  # files to read, one after another
        for file_no, ahead in enumerate(self._ahead):
            if ahead is None:
                run.append(file_no)
                continue
            self._index_files_natively(run)
            run = []
            self._adopt(ahead, file_no)
        self._index_files_natively(run)

    def _index_files_natively(self, file_nos: list[int]) -> None:
        if not file_nos:
            return

        def read() -> Iterator[tuple[int, int, Any, bytes]]:
            for file_no in file_nos:
                path = self.paths[file_no]
                local = storage.local_path(path)
                if local is not None:  # read from the page cache in place
                    for offset, head, tail in line_work.map_block_parts(local):
                        yield file_no, offset, head, tail
                    continue
                with storage.open_file(path) as handle:
                    for offset, head, tail in line_work.read_block_parts(handle):
                        yield file_no, offset, head, tail

        blocks = line_work.in_order_on_threads(
            read(),
            lambda item: (item[3] or item[2])[-1] == 10,
            lambda item: JoinedBlock.joined_natively(item[2], item[3]),
            "kluster-join",
        )
        with closing(blocks):
            for (file_no, offset, head, tail), block in blocks:
                if block is None:
                    block = self._join_here(bytes(head) + tail, file_no, offset)
                else:
                    self._place(block)
                self._add(block, file_no, block.start)

    def _adopt(self, ahead: FirstPassAhead, file_no: int) -> None:
        """Index a file from the pass made as it downloaded: its scratch file becomes one
        of this index's."""
        base = len(self._files) << _SLOT_BITS
        self._files.append(open(ahead.scratch_path, "r+b"))  # noqa: SIM115 - r+: freed as read
        self._adopted.append((len(self._files) - 1, ahead.scratch_path))
        blocks = deque(ahead.blocks)
        ahead.blocks = []
        while blocks:  # each block let go once its arrays are the index's: held once
            block = blocks.popleft()
            self._add(block, file_no, base + block.start)

    def _place(self, block: JoinedBlock) -> None:
        """Write a block's joined lines to the scratch file; ``start`` says where."""
        block.start = self._scratch_end
        self._scratch_end += len(block.data)
        self._writer.write(block.data)
        block.data = b""

    def _join_here(self, data: bytes, file_no: int, offset: int) -> JoinedBlock:
        try:
            block = JoinedBlock(split_lines(data))
        except DECODE_ERRORS as exc:  # a line with no readable custom_id
            raise self._unreadable_line(data, file_no, offset, exc) from None
        self._place(block)
        return block

    def _unreadable_line(
        self, data: bytes, file_no: int, offset: int, exc: Exception
    ) -> ResultFileError:
        """The error for the first line of a block that has no readable custom_id."""
        path = self.paths[file_no]
        with storage.open_file(path) as handle:
            before = sum(chunk.count(b"\n") for chunk in _chunks(handle, offset))
        for number, line in enumerate(split_lines(data), start=before + 1):
            if not line.strip():
                continue
            try:
                result_decoder.decode(line)
            except DECODE_ERRORS:
                try:
                    custom_id_decoder.decode(line)
                except DECODE_ERRORS as problem:
                    return ResultFileError(path, number, f"not a result line: {problem}")
        return ResultFileError(path, None, f"not a results file: {exc}")

    def _take(
        self,
        pending: deque[tuple[int, JoinedBlock | _Pending]],
        helper: Helper | None,
        wait: bool,
    ) -> None:
        """Add finished blocks to the index, in file order."""
        while pending:
            file_no, item = pending[0]
            if isinstance(item, _Pending):
                assert helper is not None
                if not wait and not helper.ready():
                    return
                answer = helper.reply()
                block = None
                if answer is not None:
                    try:
                        block = JoinedBlock.unpack(answer)
                    except ValueError:
                        block = None
                if block is None:
                    with storage.open_file(self.paths[item.file_no]) as handle:
                        handle.seek(item.offset)
                        data = handle.read(item.size)
                    block = self._join_here(data, item.file_no, item.offset)
                    start = block.start
                else:
                    start = _HELPER_SCRATCH + self._helper_end
                    self._helper_end += sum(block.lengths)
            else:
                block = item
                start = block.start
            pending.popleft()
            self._add(block, file_no, start)

    def _add(self, block: JoinedBlock, file_no: int, start: int) -> None:
        """Index a block whose joined lines begin at ``start``."""
        if not block.lengths:
            return
        if not self._file_runs or self._file_runs[-1][1] != file_no:
            self._file_runs.append((len(self._hashes), file_no))
        hashes = block.hashes
        if hashes is None or _id_hash is not None:
            hashes = _hash_ids(block.id_list())
        self._hashes.frombytes(hashes)
        # each line's start: ``start`` plus the lengths before it (numpy: 20x a generator)
        lengths = np.frombuffer(block.lengths, dtype=np.int64)
        self._starts.frombytes((np.cumsum(lengths) - lengths + start).tobytes())
        self._lengths.extend(block.lengths)
        self._kinds.extend(block.kinds)
        self._tokens.extend(block.tokens)
        self._add_codes(block)

    def _add_codes(self, block: JoinedBlock) -> None:
        """The block's model codes, turned into join-wide ones."""
        if not block.models:
            self._codes.extend(array("i", [-1]) * len(block.codes))
            return
        known = self._model_codes
        table = []
        for name in block.models:
            code = known.get(name)
            if code is None:
                code = known[name] = len(self.model_names)
                self.model_names.append(name)
            table.append(code)
        table.append(-1)  # a block code of -1 picks this one
        codes = np.asarray(table, dtype=np.int32)[np.frombuffer(block.codes, dtype=np.int32)]
        self._codes.frombytes(codes.tobytes())

    # --- lookups ------------------------------------------------------------------------

    def _read(self, start: int, size: int) -> bytes:
        slot = start >> _SLOT_BITS
        return os.pread(self._fds[slot], size, start - (slot << _SLOT_BITS))

    def _by_key(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, keys): the entries sorted by key, made when first needed. Stable: equal
        keys stay in file order, so the last of a run is the latest result."""
        if self._sorted is None:
            order = np.argsort(self._file_keys, kind="stable")
            self._sorted = (order, self._file_keys[order])
        return self._sorted

    def _lookups(self) -> None:
        if self._latest is None and line_work.native_latest_entries is not None:
            self._latest = line_work.native_latest_entries(self._hashes.tobytes())

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The index entry of each key's latest result, -1 where there is none."""
        self._lookups()
        if self._latest is not None:
            return np.frombuffer(self._latest.find(keys.tobytes()), dtype=np.int64)
        order, sorted_keys = self._by_key()
        if not len(sorted_keys):
            return np.full(len(keys), -1, dtype=np.int64)
        by_key = np.argsort(keys)  # searching in order is kinder to the cache
        pos = np.empty(len(keys), dtype=np.int64)
        pos[by_key] = np.searchsorted(sorted_keys, keys[by_key], side="right") - 1
        clipped = np.maximum(pos, 0)
        hit = (pos >= 0) & (sorted_keys[clipped] == keys)
        return np.where(hit, order[clipped], -1)

    def fetch(self, entries: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
        """The scratch lines of ``entries`` (all >= 0): one buffer holding them, and each
        one's offset in it and length, in the order given. Lines near each other in the
        scratch files come in one read."""
        count = len(entries)
        if not count:
            empty = np.zeros(0, dtype=np.int64)
            return b"", empty, empty
        starts = self.starts[entries]
        sizes = self.lengths[entries]
        ends = starts + sizes
        if (starts[1:] == ends[:-1]).all():  # one run, in order
            low = int(starts[0])
            return self._read(low, int(ends[-1]) - low), starts - low, sizes
        order = np.argsort(starts, kind="stable")
        first, reach = starts[order], np.maximum.accumulate(ends[order])
        breaks = np.flatnonzero(first[1:] > reach[:-1] + _READ_GAP) + 1
        run_first = np.concatenate(([0], breaks))
        run_last = np.concatenate((breaks - 1, [count - 1]))
        run_starts, run_ends = first[run_first], reach[run_last]
        pieces = [
            self._read(a, b - a)
            for a, b in zip(run_starts.tolist(), run_ends.tolist(), strict=True)
        ]
        buf = b"".join(pieces) if len(pieces) > 1 else pieces[0]
        run_base = np.cumsum(run_ends - run_starts) - (run_ends - run_starts)
        run_of = np.repeat(np.arange(len(run_first)), np.diff(np.append(run_first, count)))
        at = np.empty(count, dtype=np.int64)
        at[order] = first - run_starts[run_of] + run_base[run_of]
        return buf, at, sizes

    def release(self, entries: np.ndarray) -> None:
        """Free the scratch pages that hold only lines of ``entries``, which were copied out
        and will not be read again (``release_copied``): fresh pages for the output's lines
        cost this machine's kernel up to twice what pages just freed do, and the scratch
        file's lines never go to disk. A no-op where holes cannot be punched."""
        if not self.release_copied or not len(entries) or _punch_hole is None:
            return
        starts = self.starts[entries]
        order = np.argsort(starts)
        starts = starts[order]
        ends = starts + self.lengths[entries][order]
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        firsts = starts[np.concatenate(([0], breaks))]
        lasts = ends[np.append(breaks - 1, len(starts) - 1)]
        # whole pages inside each run of lines that follow each other (in the main scratch
        # file: the helper's is read-only here)
        lows = -(-firsts // _PAGE) * _PAGE
        highs = lasts // _PAGE * _PAGE
        for low, high in zip(lows.tolist(), highs.tolist(), strict=True):
            slot = low >> _SLOT_BITS  # a run of lines is within one scratch file
            if high > low and slot != 1:  # (the helper's file is read-only here)
                if not _punch_hole(self._fds[slot], low - (slot << _SLOT_BITS), high - low):
                    self.release_copied = False  # not on this file system: keep it all
                    return
                self.released += high - low

    def in_place(self, shards: Sequence[Shard], keys: np.ndarray) -> str | None:
        """The scratch file that already is the joined output, or None.

        It is when a single result file had its pass made as it downloaded and its results
        came complete and in input order (kluster's do): ``keys`` (the requests' keys, in
        order) are the index's keys in file order, every line readable, the joined lines
        one after another from the file's start to its end, and each line's custom_id is
        its request's (checked on the bytes, a window at a time: no hash is trusted)."""
        if len(self._adopted) != 1 or self._helper_end or self._scratch_end or not len(keys):
            return None
        slot, path = self._adopted[0]
        if not np.array_equal(self._file_keys, keys) or (self.kinds == UNREAD).any():
            return None
        at = self.starts - (slot << _SLOT_BITS)
        ends = np.cumsum(self.lengths)
        if at[0] != 0 or not np.array_equal(at[1:], ends[:-1]):
            return None
        fd = self._fds[slot]
        if int(ends[-1]) != os.fstat(fd).st_size:
            return None
        check = line_work.native_lines_start_with
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:  # only lines' heads read
            done = 0
            for shard in shards:
                for json_ids, _ in _read_ids(shard.ids_path):
                    window = at[done : done + len(json_ids)]
                    if len(window) < len(json_ids):
                        return None
                    if check is not None:
                        if b"\x00" in check(mapped, window.tobytes(), json_ids):
                            return None
                    elif not _lines_start_with(mapped, window, json_ids).all():
                        return None
                    done += len(json_ids)
        return path if done == len(keys) else None

    def slow_find(self, json_id: bytes) -> int:
        """The latest entry really for the custom_id ``json_id`` (past hash collisions)."""
        custom_id = msgspec.json.decode(json_id)
        key = array("q", _hash_ids([json_id]))[0]
        order, sorted_keys = self._by_key()
        pos = int(np.searchsorted(sorted_keys, key, side="right")) - 1
        while pos >= 0 and sorted_keys[pos] == key:
            entry = int(order[pos])
            line = self._read(int(self.starts[entry]), int(self.lengths[entry]))
            if custom_id_decoder.decode(line).custom_id == custom_id:
                return entry
            pos -= 1
        return -1

    def result(self, entry: int) -> ResultLine:
        """Decode an entry the first pass could not: raises ``ResultFileError`` naming the
        file and line it came from."""
        line = self._read(int(self.starts[entry]), int(self.lengths[entry]))
        try:
            return result_decoder.decode(line)
        except DECODE_ERRORS as exc:
            custom_id = custom_id_decoder.decode(line).custom_id
            firsts = [first for first, _ in self._file_runs]
            file_no = self._file_runs[bisect_right(firsts, entry) - 1][1]
            path = self.paths[file_no]
            raise ResultFileError(
                path,
                _last_line_of(path, custom_id),
                f"the result for custom_id {custom_id!r} cannot be read: {exc}",
            ) from None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _hole_puncher() -> Callable[[int, int, int], bool] | None:
    """``punch(fd, offset, size)``: free a range of a file's pages, keeping its size
    (Linux's fallocate with FALLOC_FL_PUNCH_HOLE); True if done. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    # fallocate64 where the C library has it (glibc); fallocate itself where off_t is 64 bits
    fallocate = getattr(libc, "fallocate64", None)
    if fallocate is None and ctypes.sizeof(ctypes.c_long) == 8:
        fallocate = getattr(libc, "fallocate", None)
    if fallocate is None:
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    keep_size, punch_hole = 0x01, 0x02

    def punch(fd: int, offset: int, size: int) -> bool:
        return fallocate(fd, punch_hole | keep_size, offset, size) == 0

    return punch


_punch_hole = _hole_puncher()


class FirstPassAhead:
    """The join's first pass over one result file, made from its bytes as they download.

    The download hands each piece to ``feed``; a single thread joins the whole lines of
    each piece natively (the GIL released: on a second core, while the download thread
    receives) and writes their joined lines to a scratch file of its own. Once the file is
    published, ``finish`` lists the pass for the join, which then takes its index entries
    and scratch lines instead of reading the result file again (for a result file in a
    bucket, that read is a second download). One thread only: measured here, a second one
    slowed the download by as much as it gained. Anything unusual (a line with no readable
    custom_id, a failed write, the file changed since) drops the pass, and the join makes
    its own as before, which names the line and the reason."""

    def __init__(self, path: str):
        self.path = path
        local = storage.local_path(path)
        folder = os.path.dirname(os.path.abspath(local)) if local else tempfile.gettempdir()
        name = f"{storage.basename(path)}.ahead-{uuid.uuid4().hex[:12]}.tmp"
        self.scratch_path = os.path.join(folder, name)
        self.blocks: list[JoinedBlock] = []
        self.identity: tuple[Any, ...] | None = None
        self.lines = 0
        self._handle: BinaryIO | None = None
        self._end = 0  # bytes of joined lines written
        self._fed = 0  # bytes of the result file seen
        self._rest: list[bytes] = []  # the start of a line not yet whole
        self._pending: deque[Future[None]] = deque()
        self._failed = False

    @classmethod
    def start(cls, path: str) -> FirstPassAhead | None:
        """A pass for the result file to be published at ``path``, or None where the
        compiled join is not built (the helper-process join does not take one)."""
        if line_work.native_join_block is None:
            return None
        ahead = cls(path)
        try:
            os.makedirs(os.path.dirname(ahead.scratch_path), exist_ok=True)
            ahead._handle = open(ahead.scratch_path, "wb")  # noqa: SIM115
        except OSError:
            return None
        return ahead

    def feed(self, piece: bytes) -> None:
        """The next piece of the file, as received (it may end in the middle of a line)."""
        self._fed += len(piece)
        cut = piece.rfind(b"\n") + 1
        if not cut:
            self._rest.append(piece)
            return
        head = b"".join(self._rest) if self._rest else None
        self._rest = [piece[cut:]] if cut < len(piece) else []
        self._submit(head, memoryview(piece)[:cut] if cut < len(piece) else piece)

    def _submit(self, head: bytes | None, lines: bytes | memoryview) -> None:
        self._pending.append(_AHEAD_THREAD.submit(self._join, head, lines))
        while len(self._pending) > _AHEAD_PIECES:  # hold a few pieces, not the file
            self._pending.popleft().result()

    def _join(self, head: bytes | None, lines: bytes | memoryview) -> None:
        """On the pass's thread: join one run of whole lines (``head`` + ``lines``)."""
        if self._failed:
            return
        try:
            block = (
                JoinedBlock.joined_natively(head, lines)
                if head
                else JoinedBlock.joined_natively(lines)
            )
            if block is None:  # a shape the compiled pass leaves to this module's
                block = JoinedBlock(split_lines((head or b"") + bytes(lines)))
            block.start = self._end
            assert self._handle is not None
            line_work.write_all(self._handle, block.data)
            self._end += len(block.data)
            block.data = b""
            self.blocks.append(block)
        except Exception:  # noqa: BLE001 - the join's own pass will name the problem
            self._failed = True

    def finish(self) -> None:
        """The file is complete and published: wait for the pass and list it for the join
        (or drop it if anything went wrong)."""
        try:
            if self._rest:  # a last line with no newline
                last = b"".join(self._rest)
                self._rest = []
                if last.strip():
                    self._submit(None, last)
            while self._pending:
                self._pending.popleft().result()
            assert self._handle is not None
            self._handle.close()
            identity = _identity(self.path)
        except Exception:  # noqa: BLE001 - no pass then; the join makes its own
            self._failed = True
            identity = None
        if self._failed or identity is None or identity[0] != self._fed:
            self.discard()
            return
        self.identity = identity
        self.lines = sum(len(block.lengths) for block in self.blocks)
        dropped = []
        with _AHEAD_LOCK:
            older = _AHEAD.pop(self.path, None)
            if older is not None:
                dropped.append(older)
            _AHEAD[self.path] = self
            # Passes waiting for their join hold about 45 bytes a line: past the budget,
            # the oldest are dropped (their join reads those files itself).
            while sum(ahead.lines for ahead in _AHEAD.values()) > _AHEAD_MAX_LINES:
                dropped.append(_AHEAD.pop(next(iter(_AHEAD))))
        for ahead in dropped:
            ahead.discard()

    def discard(self) -> None:
        """Drop the pass and its scratch file (the download failed, or nothing took it)."""
        while self._pending:
            try:
                self._pending.popleft().result()
            except Exception:  # noqa: BLE001, S110 - dropping it anyway
                pass
        self._failed = True
        self.blocks = []
        if self._handle is not None:
            self._handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.scratch_path)


# The passes' one thread (started at the first piece), and the pieces of a download
# (1 MiB each) that may wait for it.
_AHEAD_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kluster-ahead")
_AHEAD_PIECES = 8
# Finished passes no join has taken yet, by result path, oldest first: of at most
# _AHEAD_MAX_LINES result lines in all (about 90 MB).
_AHEAD: dict[str, FirstPassAhead] = {}
_AHEAD_LOCK = threading.Lock()
_AHEAD_MAX_LINES = 2_000_000


# What object stores say changes when an object is written again (S3, GCS, Azure, ...).
_CHANGE_MARKERS = ("ETag", "etag", "LastModified", "last_modified", "mtime", "updated",
                   "generation", "md5Hash", "created")  # fmt: skip


def _identity(path: str) -> tuple[Any, ...]:
    """What tells a result file from one written over it later: size first, then the local
    file's inode and modification time, or what the object store gives (ETag, times)."""
    local = storage.local_path(path)
    if local is not None:
        status = os.stat(local)
        return (status.st_size, status.st_ino, status.st_mtime_ns)
    fs, inner = storage.filesystem(path)
    info = fs.info(inner)
    return (int(info["size"]), *(str(info.get(key)) for key in _CHANGE_MARKERS))


def take_first_pass_ahead(path: str) -> FirstPassAhead | None:
    """The pass made while ``path`` downloaded, if the file is still the one it read."""
    with _AHEAD_LOCK:
        ahead = _AHEAD.pop(path, None)
    if ahead is None:
        return None
    try:
        same = _identity(path) == ahead.identity
    except OSError:
        same = False
    if not same:
        ahead.discard()
        return None
    return ahead


@atexit.register
def _discard_passes_ahead() -> None:
    with _AHEAD_LOCK:
        left = list(_AHEAD.values())
        _AHEAD.clear()
    for ahead in left:
        ahead.discard()


def _request_keys(shards: Sequence[Shard], keep_order: bool) -> tuple[bool, np.ndarray | None]:
    """Whether no two of the shards' custom_ids share an index key (the same id twice, or a
    collision): the condition for the join to free each line's scratch once copied. And,
    if ``keep_order``, the keys in input order (for ``_ResultIndex.in_place``)."""
    every = np.empty(sum(shard.lines for shard in shards), dtype=np.int64)
    filled = 0
    for shard in shards:
        for json_ids, _ in _read_ids(shard.ids_path):
            keys = np.frombuffer(_hash_ids(json_ids), dtype=np.int64)
            if filled + len(keys) > len(every):  # more ids than the shards say: grow
                grown = np.empty(max(2 * len(every), filled + len(keys)), dtype=np.int64)
                grown[:filled] = every[:filled]
                every = grown
            every[filled : filled + len(keys)] = keys
            filled += len(keys)
    every = every[:filled]
    ordered = every.copy() if keep_order else None
    every.sort()
    return not bool((every[1:] == every[:-1]).any()), ordered


class _ParquetSink:
    """Optional Parquet copy of the joined output, written in row groups (needs pyarrow)."""

    COLUMNS = (
        "custom_id",
        "status",
        "content",
        "finish_reason",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "error_code",
        "error_message",
        "error_status_code",
    )

    def __init__(self, path: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self.path = path
        self.tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        self._handle = storage.open_file(self.tmp, "wb")
        self.schema = pa.schema(
            [
                (c, pa.int64() if c.endswith(("tokens", "status_code")) else pa.string())
                for c in self.COLUMNS
            ]
        )
        self.writer = pq.ParquetWriter(self._handle, self.schema)
        self.rows: dict[str, list[Any]] = {c: [] for c in self.COLUMNS}

    def add(self, line: JoinedLine) -> None:
        rows = self.rows
        usage, error = line.usage, line.error
        for name, value in (
            ("custom_id", line.custom_id),
            ("status", line.status),
            ("content", line.content),
            ("finish_reason", line.finish_reason),
            ("model", line.model),
            ("prompt_tokens", usage.prompt_tokens if usage else None),
            ("completion_tokens", usage.completion_tokens if usage else None),
            ("total_tokens", usage.total_tokens if usage else None),
            ("error_code", error.code if error else None),
            ("error_message", error.message if error else None),
            ("error_status_code", error.status_code if error else None),
        ):
            rows[name].append(value)
        if len(rows["custom_id"]) >= CHUNK_LINES:
            self.flush()

    def flush(self) -> None:
        if self.rows["custom_id"]:
            self.writer.write_table(self._pa.table(self.rows, schema=self.schema))
            self.rows = {c: [] for c in self.COLUMNS}

    def close(self, keep: bool) -> None:
        self.flush()
        self.writer.close()
        self._handle.close()
        if keep:
            storage.publish(self.tmp, self.path)
        else:
            storage.remove(self.tmp)


def _chunks(handle: BinaryIO, limit: int) -> Iterator[bytes]:
    """The first ``limit`` bytes of a file, a block at a time."""
    while limit > 0 and (chunk := handle.read(min(1 << 20, limit))):
        limit -= len(chunk)
        yield chunk


def _last_line_of(path: str, custom_id: str) -> int | None:
    """The number of the last line of ``path`` whose custom_id is ``custom_id``."""
    found = None
    with storage.open_file(path) as handle:
        for number, line in enumerate(handle, start=1):
            try:
                if custom_id_decoder.decode(line).custom_id == custom_id:
                    found = number
            except DECODE_ERRORS:
                continue
    return found


def parquet_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _read_ids(path: str) -> Iterator[tuple[list[bytes], list[str] | None]]:
    """A shard's custom_ids in order, a window at a time, as canonical JSON strings (what
    msgspec encodes), with the decoded ids when they had to be decoded to get those."""
    decode, encode = msgspec.json.decode, msgspec.json.encode
    with storage.open_file(path) as handle:
        for _, block in read_blocks(handle, _WINDOW_BYTES):
            lines = split_lines(block)
            if _canonical(block):
                yield lines, None
            else:
                ids = list(map(decode, lines))
                yield list(map(encode, ids)), ids


def _canonical(block: bytes) -> bool:
    """Every line of ``block`` is a quoted string with no escapes: such a line, if it is
    valid JSON at all, is exactly what msgspec encodes for it."""
    if block[-1:] != b"\n" or b"\\" in block:
        return False
    chars = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(chars == 10)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return bool(
        (ends - starts >= 2).all() and (chars[starts] == 34).all() and (chars[ends - 1] == 34).all()
    )


class _Counts:
    """Running counts of one shard's joined lines (tokens per model in ``by_model``, one row
    per join-wide model code)."""

    def __init__(self, models: int) -> None:
        self.succeeded = self.failed = self.retryable = 0
        self.tokens = np.zeros(3, dtype=np.int64)
        self.by_model = np.zeros((models, 3), dtype=np.int64)
        self.seen = np.zeros(models, dtype=bool)


def _lines_start_with(buf: bytes, at: np.ndarray, json_ids: list[bytes]) -> np.ndarray:
    """Per joined line (at offset ``at[i]`` of ``buf``), whether it is the one for
    ``json_ids[i]``: it starts with ``{"custom_id":<the id>,``. Checked for a whole window
    at once on the buffer's bytes (a startswith a line took a third of the second pass)."""
    if not len(at):
        return np.ones(0, dtype=bool)
    chars = np.frombuffer(buf, dtype=np.uint8)
    last = len(chars) - 1  # offsets past the buffer (a shorter line at its end) are clipped
    head = len(_CUSTOM_ID_PREFIX)
    lengths = np.fromiter(map(len, json_ids), dtype=np.int64, count=len(json_ids))
    commas = at + head + lengths
    same = (commas <= last) & (chars[np.minimum(commas, last)] == ord(","))
    for k, byte in enumerate(_CUSTOM_ID_PREFIX):
        same &= chars[np.minimum(at + k, last)] == byte
    expected = np.frombuffer(b"".join(json_ids), dtype=np.uint8)
    # where each id's bytes should be: its line's start + head, one after another (a JSON
    # id is at least two bytes, so every line has some)
    firsts = np.cumsum(lengths) - lengths
    where = np.repeat(at + head - firsts, lengths) + np.arange(len(expected))
    same &= np.logical_and.reduceat(chars[np.minimum(where, last)] == expected, firsts)
    return same


def _gathered(
    index: _ResultIndex, entries: np.ndarray, hit: np.ndarray, json_ids: list[bytes]
) -> tuple[bytes, np.ndarray]:
    """The joined lines of a window's requests that have a result, one after another,
    and per line whether it is its request's (its custom_id is the request's)."""
    buf, at, sizes = index.fetch(entries[hit])
    wanted = json_ids if len(at) == len(json_ids) else list(compress(json_ids, hit.tolist()))
    if line_work.native_gather_lines is not None:
        data, same = line_work.native_gather_lines(buf, at.tobytes(), sizes.tobytes(), wanted)
        return data, np.frombuffer(same, dtype=bool)
    # Runs of lines that follow each other in the buffer are copied in one piece.
    ends = at + sizes
    first = np.concatenate(([0], np.flatnonzero(at[1:] != ends[:-1]) + 1)) if len(at) else at
    last = np.append(first[1:] - 1, len(at) - 1) if len(at) else at
    pieces = map(buf.__getitem__, map(slice, at[first].tolist(), ends[last].tolist()))
    return b"".join(pieces), _lines_start_with(buf, at, wanted)


def _join_window(
    index: _ResultIndex,
    json_ids: list[bytes],
    ids: list[str] | None,
    counts: _Counts,
    out: _Writer | None,
    sink: _ParquetSink | None,
    retry_handle: BinaryIO | None,
    first: int = 0,
) -> None:
    """Write the joined lines of one window of custom_ids, in their order. ``out`` None:
    they are in place already (``_ResultIndex.in_place``), entries ``first`` on; only
    counted."""
    count = len(json_ids)
    if out is None:
        entries = np.arange(first, first + count, dtype=np.int64)
        hit = np.ones(count, dtype=bool)
    else:
        entries = index.find(np.frombuffer(_hash_ids(json_ids), dtype=np.int64))
        hit = entries >= 0
        data, same = _gathered(index, entries, hit, json_ids)
        if not same.all():  # a 64-bit hash can collide: look those lines up again
            entries = entries.copy()
            for position in np.flatnonzero(hit)[~same].tolist():
                entries[position] = index.slow_find(json_ids[position])
            hit = entries >= 0
            data, same = _gathered(index, entries, hit, json_ids)
    kinds = np.full(count, -1, dtype=np.int8)
    kinds[hit] = index.kinds[entries[hit]]
    unread = np.flatnonzero(kinds == UNREAD)
    if len(unread):
        index.result(int(entries[unread[0]]))  # raises that line's decode error
    index.release(entries[hit])
    ok = kinds == OK
    succeeded = int(np.count_nonzero(ok))
    counts.succeeded += succeeded
    counts.failed += count - succeeded
    if succeeded:
        ok_entries = entries[ok]
        counts.tokens += index.tokens[ok_entries].sum(axis=0)
        codes = index.codes[ok_entries]
        named = codes >= 0
        named_codes = codes[named]
        if len(named_codes):
            tokens = index.tokens[ok_entries[named]]
            models = len(counts.seen)
            # Sums per model code (as float64: exact, a window's sums stay below 2**53).
            for column in range(3):
                sums = np.bincount(named_codes, weights=tokens[:, column], minlength=models)
                counts.by_model[:, column] += sums.astype(np.int64)
            counts.seen[named_codes] = True
    transient = (kinds == TRANSIENT) | ~hit
    counts.retryable += int(np.count_nonzero(transient))
    if retry_handle is not None and transient.any():
        retry_handle.write(
            b"".join(json_ids[i] + b"\n" for i in np.flatnonzero(transient).tolist())
        )
    if out is None:
        return

    # The output: requests with no result are joined as not processed, between the lines
    # of the others.
    pieces: list[bytes | memoryview] = [data]
    if not hit.all():
        encode = joined_encoder.encode
        decode = msgspec.json.decode
        missing = np.flatnonzero(~hit)
        ends = np.cumsum(index.lengths[entries[hit]])
        # where each one goes in ``data``: after the lines of the requests before it
        cuts = np.concatenate(([0], ends))[missing - np.arange(len(missing))].tolist()
        view, done, pieces = memoryview(data), 0, []
        for i, cut in zip(missing.tolist(), cuts, strict=True):
            custom_id = ids[i] if ids is not None else decode(json_ids[i])
            pieces += (view[done:cut], encode(to_joined(custom_id, None)) + b"\n")
            done = cut
        pieces.append(view[done:])
    out.write(pieces)
    if sink is not None:
        decode_line = _joined_decoder.decode
        for line in b"".join(pieces).split(b"\n")[:-1]:
            sink.add(decode_line(line))


class _Writer:
    """Writes to a file from a helper thread (file writes release the GIL), a few
    blocks behind; errors come back on the next call."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="join-writer")
        self._pending: deque[Future[Any]] = deque()

    def write(self, data: bytes | list[bytes | memoryview]) -> None:
        """Write ``data``, or each of a list of pieces in turn."""
        pieces = data if isinstance(data, list) else [data]
        self._pending.append(self._pool.submit(self._write, pieces))
        while len(self._pending) > 4:
            self._pending.popleft().result()

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        for piece in pieces:
            line_work.write_all(self._handle, piece)

    def close(self) -> None:
        """Wait for every write; then the file can be closed."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


_joined_decoder = msgspec.json.Decoder(JoinedLine)


def _join_all(
    shards: Sequence[Shard],
    index: _ResultIndex,
    out: _Writer | None,
    sink: _ParquetSink | None,
    retry_handle: BinaryIO | None,
    summary: JoinSummary,
) -> None:
    """Join every shard's requests in order (``out`` None: count the lines in place)."""
    by_model = np.zeros((len(index.model_names), 3), dtype=np.int64)
    seen = np.zeros(len(index.model_names), dtype=bool)
    done = 0
    for shard in shards:
        counts = _Counts(len(index.model_names))
        for json_ids, ids in _read_ids(shard.ids_path):
            _join_window(index, json_ids, ids, counts, out, sink, retry_handle, done)
            done += len(json_ids)
        prompt, completion, total = counts.tokens.tolist()
        part = ShardSummary(
            index=shard.index,
            requests=counts.succeeded + counts.failed,
            succeeded=counts.succeeded,
            failed=counts.failed,
            usage=TokenUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=total
            ),
        )
        summary.shards.append(part)
        summary.requests += part.requests
        summary.succeeded += part.succeeded
        summary.failed += part.failed
        summary.retryable += counts.retryable
        summary.usage = summary.usage + part.usage
        by_model += counts.by_model
        seen |= counts.seen
    summary.usage_by_model = {
        name: TokenUsage(prompt_tokens=p, completion_tokens=c, total_tokens=t)
        for name, (p, c, t), used in zip(
            index.model_names, by_model.tolist(), seen.tolist(), strict=True
        )
        if used
    }


def _publish_scratch(scratch_path: str, target: str) -> None:
    """The pass's scratch file becomes ``target``: renamed, or copied under a temporary name
    and published where it lies on another file system."""
    try:
        storage.publish(scratch_path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with open(scratch_path, "rb") as source, storage.published(target) as handle:
            shutil.copyfileobj(source, handle, 1 << 20)


def join_result_files(
    shards: Sequence[Shard],
    result_paths: Sequence[str],
    output_path: str | os.PathLike[str],
    overwrite: bool = False,
    parquet: bool = False,
    retry_ids_path: str | os.PathLike[str] | None = None,
) -> JoinSummary:
    """Write one joined line per request, in input order, from any number of result files.

    ``result_paths`` are output and error files in the order they were produced: when a
    custom_id has results in several (a retried line), the last one wins. Requests with
    no result at all are reported as errors with code ``not_processed``. The output is
    written to a temporary file and renamed, so it is never half-written; an existing
    output is refused unless ``overwrite``. ``retry_ids_path``, if given, receives the
    custom_ids whose failure was transient, one JSON string per line.
    """
    target = os.fspath(output_path)
    parquet_target = parquet_path_for(target) if parquet else None
    for existing in (target, parquet_target):
        if existing is not None and not overwrite and storage.exists(existing):
            raise OutputExistsError(
                f"{existing} already exists; pass overwrite=True (--overwrite) to replace it"
            )
    # The index's scratch files need random access: beside a local output, else in a
    # temporary folder removed at the end.
    local = storage.local_path(target)
    scratch_dir = None if local is not None else tempfile.mkdtemp(prefix="kluster-join-")
    scratch = Path(local) if local is not None else Path(scratch_dir) / "join"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    sink = None
    summary = JoinSummary(output_path=target)
    retry_handle = None
    index = None
    done = False
    try:
        ahead = list(map(take_first_pass_ahead, result_paths))
        # One result file whose pass was made as it downloaded, for a local output: if its
        # results came complete and in order, that pass's scratch file is the output.
        whole = len(ahead) == 1 and ahead[0] is not None and local is not None and not parquet
        # whether requests' keys are distinct (and, if needed, the keys in order), found
        # beside the first pass
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="join-keys") as pool:
            keys = pool.submit(_request_keys, shards, whole)
            index = _ResultIndex(result_paths, scratch, ahead, lookups_now=not whole)
            distinct, ordered = keys.result()
        in_place = index.in_place(shards, ordered) if ordered is not None and distinct else None
        index.release_copied = distinct and in_place is None
        sink = _ParquetSink(parquet_target) if parquet_target is not None else None
        retry_handle = (
            storage.open_file(os.fspath(retry_ids_path), "wb") if retry_ids_path else None
        )
        if in_place is not None:  # counted, then moved into place: no line copied
            _join_all(shards, index, None, None, retry_handle, summary)
            _publish_scratch(in_place, target)
        else:
            with storage.published(target) as handle:
                out = _Writer(handle)
                try:
                    _join_all(shards, index, out, sink, retry_handle, summary)
                finally:
                    out.close()
        done = True
    finally:
        if index is not None:
            index.close()
        if retry_handle is not None:
            retry_handle.close()
        if sink is not None:
            sink.close(keep=done)
            if done:
                summary.parquet_path = parquet_target
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)
    return summary


def parquet_path_for(output_path: str) -> str:
    """The Parquet copy's path: the output's, with ``.parquet`` for its extension."""
    name = storage.basename(output_path)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return storage.join(storage.parent(output_path), f"{stem}.parquet")


@task(name="join-results", cache_policy=NO_CACHE)
def join_results(
    shards: list[Shard],
    result_paths: list[str],
    output_path: str,
    overwrite: bool = False,
    parquet: bool = False,
) -> JoinSummary:
    """Join output and error files to the requests by custom_id, in input order."""
    summary = join_result_files(shards, result_paths, output_path, overwrite, parquet)
    get_run_logger().info(
        "Joined %d results into %s: %d ok, %d failed",
        summary.requests,
        summary.output_path,
        summary.succeeded,
        summary.failed,
    )
    return summary
