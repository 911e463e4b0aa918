"""Step 1 of the lifecycle: build, validate and shard request files.

Everything here streams: the input is read in blocks of whole lines (about 4 MB) and valid
lines are copied to shard files byte for byte, so a 10-million-line input costs no more
memory than a small one (plus 8 bytes a line for the duplicate check). Each line is decoded
once, by the schema's typed decoder; on large local inputs a helper process decodes part of
the blocks on a second core (tasks._lines). A block with any problem is gone through again
a line at a time, which names each problem. Nothing is uploaded until every line has passed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import struct
import tempfile
import uuid
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, BinaryIO

import fsspec
import msgspec
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from prefect_kluster.tasks import _lines as line_work
from prefect_kluster.tasks import storage
from prefect_kluster.tasks._lines import (
    BlockCost,
    Helper,
    ModelNotAllowed,
    check_requests,
    crlf_to_lf,
    hash_id,
    hash_ids,
    read_blocks,
    unpack_checked,
)
from prefect_kluster.tasks.cost import (
    WINDOWS,
    CostEstimate,
    PriceTable,
    RequestTally,
    estimate_cost,
)
from prefect_kluster.tasks.schema import CHAT_COMPLETIONS_URL, request_decoder
from prefect_kluster.tasks.types import DEFAULT_MAX_FILE_BYTES, Shard

MAX_REPORTED_PROBLEMS = 20
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class LineProblem:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class RequestFileError(ValueError):
    """The request input is malformed; nothing was uploaded. ``problems`` names each line."""

    def __init__(self, source: str, problems: list[LineProblem], more: bool = False):
        self.source = source
        self.problems = problems
        listed = "\n".join(f"  {p}" for p in problems)
        tail = "\n  (further problems not listed)" if more else ""
        super().__init__(f"{source}: {len(problems)} invalid request line(s):\n{listed}{tail}")


def open_source(source: str | os.PathLike[str]) -> BinaryIO:
    """Open a local path or any fsspec URL (s3://, gs://, https://, memory://...) as bytes."""
    return storage.open_file(os.fspath(source))


def _line_reason(raw: bytes, line_no: int, err: Exception) -> str:
    if line_no == 1 and raw.startswith(_BOM):
        return "starts with a UTF-8 byte-order mark (BOM); save the file as UTF-8 without BOM"
    if not isinstance(err, UnicodeDecodeError):  # msgspec 0.23 reports it as a DecodeError
        try:
            raw.decode()
        except UnicodeDecodeError as bad:
            err = bad
    if isinstance(err, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {err.start})"
    text = str(err)
    if isinstance(err, msgspec.ValidationError):
        text = text.replace("`$.", "`").replace("`$`", "the line")
        if "Expected `object`" in text and "- at" not in text:
            return "not a JSON object"
        if "url" in text and "Invalid enum value" in text:
            return f"{text} (only {CHAT_COMPLETIONS_URL} is supported)"
        return text
    return f"not valid JSON: {text}"


# A block's bytes: one bytes, or the two parts it was read in (``read_block_parts``), never
# copied into one only to be written.
_Data = bytes | tuple[bytes, bytes]


def _lf_parts(head: bytes, tail: bytes) -> _Data:
    """``head`` followed by ``tail`` with CRLF line ends made LF: the two parts as they are
    when neither holds a CR at all (a memchr each: a JSON line has a CR only as part of its
    line end), else one bytes (the one copy made then). Putting each 2 MB block's parts
    together cost the reading thread a copy of the whole file."""
    if tail and b"\r" not in head and b"\r" not in tail:
        return head, tail
    return crlf_to_lf(head, tail)


def _size(data: _Data) -> int:
    return len(data[0]) + len(data[1]) if isinstance(data, tuple) else len(data)


# Input is read in blocks of whole lines (tasks._lines.read_blocks). Each block is checked
# with one decode per line: by the compiled check on two threads when it is built, else
# here or in a helper process; and written with one write per shard piece; a helper thread
# hashes and writes (hashlib and file writes release the GIL).
_PENDING_WRITES = 4


class _ShardFiles:
    """The open shard's files and hash; used only from the writer's helper thread."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.file: BinaryIO | None = None
        self.ids: BinaryIO | None = None
        self.hash: Any = None
        self.shards: list[Shard] = []

    def open(self, index: int) -> None:
        # Written under temporary names, published whole (local disk or object store).
        self._tmp = [
            storage.join(self.out_dir, f"part-{index:05d}.{kind}.{uuid.uuid4().hex[:8]}.tmp")
            for kind in ("jsonl", "ids")
        ]
        self.file = storage.open_file(self._tmp[0], "wb")
        self.ids = storage.open_file(self._tmp[1], "wb")
        self.hash = hashlib.sha256()

    def write(self, data: _Data, ids: bytes) -> None:
        assert self.file is not None and self.ids is not None
        for part in data if isinstance(data, tuple) else (data,):
            self.hash.update(part)
            line_work.write_all(self.file, part)
        line_work.write_all(self.ids, ids)

    def close(self, index: int, lines: int, size: int, first_line: int) -> None:
        assert self.file is not None and self.ids is not None
        self.file.close()
        self.ids.close()
        digest = self.hash.hexdigest()
        # The content hash is in the name: the same shard always has the same identity.
        stem = f"shard-{index:05d}-{digest[:16]}"
        path = storage.join(self.out_dir, f"{stem}.jsonl")
        ids_path = storage.join(self.out_dir, f"{stem}.ids")
        storage.publish(self._tmp[0], path)
        storage.publish(self._tmp[1], ids_path)
        self.shards.append(
            Shard(
                index=index,
                path=str(path),
                sha256=digest,
                lines=lines,
                bytes=size,
                first_line=first_line,
                ids_path=str(ids_path),
            )
        )
        self.file = self.ids = None

    def abort(self) -> None:
        for f in (self.file, self.ids):
            if f is not None:
                f.close()
        for tmp in getattr(self, "_tmp", []):
            storage.remove(tmp)
        for shard in self.shards:
            storage.remove(shard.path)
            storage.remove(shard.ids_path)
        self.file = self.ids = None
        self.shards = []


def balanced_bytes(total: int, max_bytes: int) -> int:
    """The size to fill each shard to: the fewest shards ``max_bytes`` allows, made equal.

    Batches run side by side, so a run lasts as long as its largest shard: 338 MB in 99 MB
    shards is 99 + 99 + 99 + 41 MB, but 85 MB each finishes a sixth sooner."""
    if total <= max_bytes:
        return max_bytes
    return -(-total // -(-total // max_bytes))


class _ShardWriter:
    """Writes lines into successive shard files, closing one when the next line won't fit
    or once it holds ``target_bytes`` (the line that reaches the target goes in it).

    The split decisions are made here, in order; the file work runs on one helper thread,
    in the same order, at most ``_PENDING_WRITES`` pieces behind.
    """

    def __init__(
        self, out_dir: str, max_bytes: int, max_lines: int | None, target_bytes: int | None = None
    ):
        self.max_bytes = max_bytes
        self.target = min(target_bytes or max_bytes, max_bytes)
        self.max_lines = max_lines
        self._files = _ShardFiles(out_dir)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future[None]] = deque()
        self._open = False
        self._index = 0
        self._lines = 0
        self._bytes = 0
        self._first_line = 0
        self._written = 0  # lines written so far: written lines are always lines 1..n

    def _submit(self, fn: Any, *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > _PENDING_WRITES:
            self._pending.popleft().result()

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _open_next(self) -> None:
        self._submit(self._files.open, self._index)
        self._open = True
        self._lines = self._bytes = 0
        self._first_line = self._written + 1

    def _close(self) -> None:
        self._submit(self._files.close, self._index, self._lines, self._bytes, self._first_line)
        self._open = False
        self._index += 1

    def add(
        self,
        data: _Data,
        ids: list[bytes] | bytes,
        lines: list[bytes] | None = None,
        count: int | None = None,
    ) -> None:
        """Append ``data``: whole lines, each ended by a newline, whose JSON custom_ids are
        ``ids`` (a list, or one bytes of them each ended by a newline, with their ``count``;
        ``lines``, if given, are the same lines without their newlines)."""
        if count is None:
            count = len(ids) if isinstance(ids, list) else ids.count(b"\n")
        if not count:
            return
        max_bytes, max_lines, target = self.max_bytes, self.max_lines, self.target
        if not self._open:  # a block that fits the new shard whole is not split into lines
            self._open_next()
        if self._bytes + _size(data) < target and (
            max_lines is None or self._lines + count <= max_lines
        ):
            self._put(data, ids, count)
            return
        if isinstance(data, tuple):  # cut between shards: as one bytes
            data = data[0] + data[1]
        if isinstance(ids, bytes):
            ids = ids.split(b"\n")
            ids.pop()
        if lines is None:
            lines = data.split(b"\n")
            lines.pop()
        ends = [0, *accumulate(len(line) + 1 for line in lines)]
        i = 0
        while i < count:
            if self._open and (
                self._bytes >= target
                or self._bytes + ends[i + 1] - ends[i] > max_bytes
                or (max_lines is not None and self._lines >= max_lines)
            ):
                self._close()
            if not self._open:
                self._open_next()
            j = bisect_right(ends, ends[i] + max_bytes - self._bytes, i + 1) - 1
            # up to and including the line that brings the shard to its target
            j = min(j, bisect_left(ends, ends[i] + target - self._bytes, i + 1))
            if max_lines is not None:
                j = min(j, i + max_lines - self._lines)
            piece = data if i == 0 and j == count else data[ends[i] : ends[j]]
            self._put(piece, ids[i:j], j - i)
            i = j

    def _put(self, data: _Data, ids: list[bytes] | bytes, count: int) -> None:
        blob = ids if isinstance(ids, bytes) else b"\n".join(ids) + b"\n"
        self._submit(self._files.write, data, blob)
        self._lines += count
        self._bytes += _size(data)
        self._written += count

    def finish(self) -> list[Shard]:
        if self._open:
            self._close()
        self._drain()
        self._pool.shutdown()
        return self._files.shards

    def abort(self) -> None:
        while self._pending:
            try:
                self._pending.popleft().result()
            except BaseException:  # noqa: S110 - cleaning up after the first error
                pass
        self._pool.shutdown()
        self._files.abort()


def _duplicate_problems(source: str, hashes: np.ndarray) -> list[LineProblem]:
    """Second pass, only when two custom_id hashes collide: confirm and name the lines.

    ``hashes`` are of each custom_id's JSON encoding (one-to-one with the id itself).
    """
    ordered = np.sort(hashes)
    suspects = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not suspects:
        return []
    encode = msgspec.json.encode
    first_seen: dict[str, int] = {}
    problems: list[LineProblem] = []
    with open_source(source) as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                custom_id = request_decoder.decode(raw).custom_id
            except (msgspec.MsgspecError, UnicodeDecodeError):
                continue
            if hash_id(encode(custom_id)) not in suspects:
                continue
            if custom_id in first_seen:
                problems.append(
                    LineProblem(
                        line_no,
                        f"duplicate custom_id {custom_id!r} (first used on line "
                        f"{first_seen[custom_id]})",
                    )
                )
                if len(problems) >= MAX_REPORTED_PROBLEMS:
                    break
            else:
                first_seen[custom_id] = line_no
    return problems


class _Block:
    """A block of input lines on its way through the check, in input order."""

    __slots__ = (
        "offset", "data", "first_line", "count", "lines", "ids", "hashes", "state", "cost"
    )  # fmt: skip

    def __init__(self, offset: int, data: _Data, first_line: int, count: int):
        self.offset = offset
        self.data = data
        self.first_line = first_line
        self.count = count
        self.lines: list[bytes] | None = None
        # The JSON custom_ids: a list, or one bytes of them each followed by a newline (from
        # the compiled check, with their ``hashes`` beside).
        self.ids: list[bytes] | bytes | None = None
        self.hashes: bytes | None = None
        # None: with the helper; True: every line valid (ids set); False: go line by line.
        self.state: bool | None = None
        self.cost: BlockCost | None = None  # the block's token tallies, when estimating


class _Sharding:
    """One validate-and-shard pass: blocks are checked (here or by the helper) and then
    taken in input order, written while no line has had a problem."""

    def __init__(
        self,
        source: str,
        writer: _ShardWriter,
        max_file_bytes: int,
        models: frozenset[str] | None,
        estimate: bool = False,
    ):
        self.source = source
        self.writer = writer
        self.max_file_bytes = max_file_bytes
        self.models = models
        # The run's token tallies (of written lines only), when estimating the cost.
        self.cost: BlockCost | None = BlockCost() if estimate else None
        self.problems: list[LineProblem] = []
        self.more = False
        self.lines = 0
        self.id_hashes = array("q")
        self.decode = request_decoder.decode
        self.encode = msgspec.json.encode

    def run(self, handle: BinaryIO) -> None:
        if line_work.native_check_block is not None:
            self._run_native(handle)
            return
        helper = None
        if "://" not in self.source:
            models = sorted(self.models) if self.models is not None else None
            helper = Helper.start([self.source], models=models, estimate=self.cost is not None)
        pending: deque[_Block] = deque()
        try:
            for offset, raw in read_blocks(handle, line_work.REQUEST_BLOCK_BYTES):
                block = self._block(offset, raw)
                if (
                    helper is not None
                    and helper.can_take()
                    and raw[-1] == 10  # ends with a newline
                    and len(raw) < self.max_file_bytes
                    and not self.problems
                    and helper.send(0, offset, len(raw))
                ):
                    pending.append(block)
                else:
                    self._check(block)
                    pending.append(block)
                if not self._take(pending, helper, wait=len(pending) > 2 * Helper.MAX_OUTSTANDING):
                    return
            self._take(pending, helper, wait=True)
        finally:
            if helper is not None:
                helper.close()

    def _check(self, block: _Block) -> None:
        """The fast check of a whole block, here."""
        data = block.data
        if data[-1:] != b"\n":  # the file's last line, without its newline
            data = block.data = crlf_to_lf(data + b"\n")
        lines = data.split(b"\n")
        lines.pop()
        block.lines = lines
        block.state = False
        if self.problems:
            return
        if len(data) > self.max_file_bytes and max(map(len, lines)) >= self.max_file_bytes:
            return
        block.cost = BlockCost() if self.cost is not None else None
        try:
            block.ids = check_requests(lines, self.models, block.cost)
        except (ModelNotAllowed, msgspec.MsgspecError, UnicodeDecodeError):
            return
        block.state = True

    def _take(self, pending: deque[_Block], helper: Helper | None, wait: bool) -> bool:
        """Take finished blocks in order; False once too many problems were found."""
        while pending:
            block = pending[0]
            if block.state is None:
                assert helper is not None
                if not wait and not helper.ready():
                    return True
                blob = helper.reply()
                try:
                    ids, cost = unpack_checked(blob, self.cost is not None) if blob else ([], None)
                except (ValueError, struct.error, msgspec.MsgspecError):
                    ids, cost = [], None
                if len(ids) == block.count:
                    block.ids, block.cost = ids, cost
                    block.state = True
                else:
                    self._check(block)
            pending.popleft()
            if not self._settle(block):
                return False
        return True

    def _settle(self, block: _Block) -> bool:
        """Write a checked block, or name its problems; False once there are too many."""
        if block.state:
            if not self.problems:
                assert block.ids is not None
                hashes = block.hashes
                if hashes is None:
                    assert isinstance(block.ids, list)
                    hashes = hash_ids(block.ids)
                self.id_hashes.frombytes(hashes)
                self.writer.add(block.data, block.ids, block.lines, block.count)
                if self.cost is not None and block.cost is not None:
                    self.cost.merge(block.cost)
            return True
        return self._line_by_line(block)

    def _run_native(self, handle: BinaryIO) -> None:
        """The pass with the compiled check (``native/``): it releases the GIL, so blocks
        are checked on two threads while this one reads ahead and writes in order; no
        helper process, and each block is read once. A block it does not accept goes
        through the Python check (``_check``), which decides and names the problems."""
        check = line_work.native_check_block
        blocks = line_work.in_order_on_threads(
            line_work.read_block_parts(handle, line_work.REQUEST_BLOCK_BYTES),
            lambda read: (
                (read[2] or read[1])[-1] == 10
                and len(read[1]) + len(read[2]) < self.max_file_bytes
                and not self.problems
            ),
            lambda read: check(read[1], read[2] or None),
            "kluster-check",
        )
        with closing(blocks):
            for (offset, head, tail), answer in blocks:
                if not self._settle(self._checked(offset, head, tail, answer)):
                    return

    def _block(self, offset: int, raw: bytes) -> _Block:
        """The block read at ``offset``, numbered after the lines before it, its CRLF line
        ends made LF (a helper reads the file's own bytes: CR before a newline is JSON
        whitespace to it)."""
        count = raw.count(b"\n")
        complete = count and raw[-1] == 10  # ends with a newline
        data = crlf_to_lf(raw) if complete else raw
        block = _Block(offset, data, self.lines + 1, count if complete else count + 1)
        self.lines += block.count
        return block

    def _checked(self, offset: int, head: bytes, tail: bytes, answer: Any) -> _Block:
        """The block at ``offset`` (read as ``head`` and ``tail``), checked: by the compiled
        check if it accepted it (``answer``), else by ``_check``."""
        if answer is not None:
            blob, counts, count, hashes = answer
            if self.models is None or self.models.issuperset(counts):
                block = _Block(offset, _lf_parts(head, tail), self.lines + 1, count)
                self.lines += count
                block.ids, block.hashes = blob, hashes
                block.cost = BlockCost(counts) if self.cost is not None else None
                block.state = True
                return block
        block = self._block(offset, head + tail)
        self._check(block)
        return block

    def _line_by_line(self, block: _Block) -> bool:
        """Name each problem in the block; write its valid lines until the first one."""
        if block.lines is None:
            self._check(block)
        assert block.lines is not None
        max_file_bytes, models = self.max_file_bytes, self.models
        problems = self.problems
        valid: list[bytes] = []
        valid_ids: list[bytes] = []
        for line_no, line in enumerate(block.lines, start=block.first_line):
            data = line + b"\n"
            if len(data) == 1:
                problem = "blank line (remove empty lines from the file)"
            elif len(data) > max_file_bytes:
                problem = (
                    f"line is {len(data):,} bytes, larger than the {max_file_bytes:,}-byte "
                    "file limit, so it fits in no shard"
                )
            else:
                try:
                    request = self.decode(data)
                except (msgspec.MsgspecError, UnicodeDecodeError) as err:
                    problem = _line_reason(data, line_no, err)
                else:
                    if models is not None and request.body.model not in models:
                        problem = f"unknown model {request.body.model!r}"
                    else:
                        problem = None
                        if not problems:
                            valid.append(data)
                            valid_ids.append(self.encode(request.custom_id))
                            if self.cost is not None:
                                self.cost.add(request.body)
            if problem is not None:
                if len(problems) >= MAX_REPORTED_PROBLEMS:
                    self.more = True
                    return False
                problems.append(LineProblem(line_no, problem))
        self.id_hashes.frombytes(hash_ids(valid_ids))
        self.writer.add(b"".join(valid), valid_ids)
        return True


def shard_request_file(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
    allowed_models: Iterable[str] | None = None,
) -> list[Shard]:
    """Validate every line of a request JSONL file and split it into shards.

    Each shard holds at most ``max_file_bytes`` bytes and ``max_requests_per_file`` lines;
    a file over ``max_file_bytes`` is cut into the fewest shards of about equal size.
    custom_ids must be unique across the whole input. Lines are copied byte for byte, with
    CRLF line ends normalised to LF and a final newline added where missing. On any
    problem, no shard is left behind and ``RequestFileError`` names the lines.
    """
    shards, _ = _shard(source, out_dir, max_file_bytes, max_requests_per_file, allowed_models)
    return shards


def shard_and_tally(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
    allowed_models: Iterable[str] | None = None,
) -> tuple[list[Shard], RequestTally]:
    """``shard_request_file`` that also counts, in the same pass over the input, each
    model's lines, prompt tokens (central and upper) and answer limits: what the cost
    estimate prices (``tasks.cost.estimate_cost``)."""
    shards, cost = _shard(
        source, out_dir, max_file_bytes, max_requests_per_file, allowed_models, estimate=True
    )
    assert cost is not None
    return shards, RequestTally.from_block_cost(cost)


def _shard(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    max_file_bytes: int,
    max_requests_per_file: int | None,
    allowed_models: Iterable[str] | None,
    estimate: bool = False,
) -> tuple[list[Shard], BlockCost | None]:
    if max_file_bytes <= 0:
        raise ValueError("max_file_bytes must be positive")
    if max_requests_per_file is not None and max_requests_per_file <= 0:
        raise ValueError("max_requests_per_file must be positive")
    models = frozenset(allowed_models) if allowed_models is not None else None
    out = os.fspath(out_dir)
    storage.makedirs(out)
    name = os.fspath(source)
    try:
        target = balanced_bytes(storage.size(name), max_file_bytes)
    except (OSError, ValueError):  # size unknown: shards simply fill up
        target = max_file_bytes
    writer = _ShardWriter(out, max_file_bytes, max_requests_per_file, target)
    run = _Sharding(name, writer, max_file_bytes, models, estimate)
    try:
        with open_source(source) as handle:
            run.run(handle)
        problems = run.problems
        if not problems:
            if run.lines == 0:
                problems.append(LineProblem(1, "the request file is empty"))
            else:
                hashes = np.frombuffer(run.id_hashes, dtype=np.int64)
                problems = _duplicate_problems(name, hashes)
        if problems:
            raise RequestFileError(name, problems, run.more)
        return writer.finish(), run.cost
    except BaseException:
        writer.abort()
        raise


def build_request_lines(
    prompts: Iterable[str],
    model: str,
    system_prompt: str | None = None,
    completion_params: dict[str, Any] | None = None,
    custom_id_prefix: str = "request-",
    start: int = 1,
) -> Iterator[dict[str, Any]]:
    """Turn plain prompts into batch request dicts, numbered ``request-1``, ``request-2``, ..."""
    params = dict(completion_params or {})
    for number, prompt in enumerate(prompts, start=start):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        yield {
            "custom_id": f"{custom_id_prefix}{number}",
            "method": "POST",
            "url": CHAT_COMPLETIONS_URL,
            "body": {"model": model, "messages": messages, **params},
        }


def read_prompts(
    source: str | os.PathLike[str], column: str = "text", template: str | None = None
) -> Iterator[str]:
    """Stream prompts from a CSV (with a header row) or JSONL file's ``column``.

    ``template`` is a ``str.format`` pattern over the row's fields, e.g.
    ``"Summarise: {text}"``; without one the column's text is the prompt.
    """
    text = os.fspath(source)
    with fsspec.open(text, "rt", encoding="utf-8", newline="") as handle:
        if text.lower().endswith((".csv", ".csv.gz")):
            rows: Iterable[dict[str, Any]] = csv.DictReader(handle)
        else:
            rows = (msgspec.json.decode(line) for line in handle if line.strip())
        for row_no, row in enumerate(rows, start=1):
            if column not in row:
                raise RequestFileError(text, [LineProblem(row_no, f"no {column!r} field")])
            yield template.format(**row) if template else str(row[column])


def write_request_lines(requests: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write request dicts as JSONL (atomically: a crash leaves no half file). Returns lines."""
    encoder = msgspec.json.Encoder()
    count = 0
    with storage.published(os.fspath(path)) as handle:
        for request in requests:
            handle.write(encoder.encode(request) + b"\n")
            count += 1
    return count


@task(name="build-request-file", cache_policy=NO_CACHE)
def build_request_file(
    path: str,
    requests: list[dict[str, Any]] | None = None,
    prompts: list[str] | None = None,
    model: str | None = None,
    system_prompt: str | None = None,
    completion_params: dict[str, Any] | None = None,
    prompts_path: str | None = None,
    prompt_column: str = "text",
    template: str | None = None,
) -> str:
    """Write a batch request JSONL file from request dicts, or from prompts (a list, or a
    CSV/JSONL file streamed row by row through ``template``) and a model.

    The file is validated afterwards by ``validate_and_shard``, like any user-given file.
    """
    if sum(x is not None for x in (requests, prompts, prompts_path)) != 1:
        raise ValueError("give exactly one of requests, prompts or prompts_path")
    if requests is not None:
        lines: Iterable[dict[str, Any]] = requests
    else:
        if not model:
            raise ValueError("building from prompts needs a model")
        texts: Iterable[str] = (
            prompts if prompts is not None else read_prompts(prompts_path, prompt_column, template)
        )
        lines = build_request_lines(texts, model, system_prompt, completion_params)
    count = write_request_lines(lines, path)
    get_run_logger().info("Wrote %d request lines to %s", count, path)
    return path


@contextmanager
def replacing_shards(out_dir: str) -> Iterator[list[Shard]]:
    """Shards written into a folder that may hold an earlier run's: add the new ones to the
    list this yields. The same input makes the same shards (the content hash is in their
    names), published over the old ones in place; only the shards not made again are
    removed, after. A child run of the earlier attempt still uploading one of them never
    finds it missing while a rerun checks the input again. If writing fails, no shard is
    left."""
    for stale in storage.listdir(out_dir):  # a crashed writer's temporary files
        if storage.basename(stale).startswith("part-"):
            storage.remove(stale)
    written: list[Shard] = []
    try:
        yield written
    except BaseException:
        written.clear()
        raise
    finally:
        keep = {storage.basename(p) for s in written for p in (s.path, s.ids_path)}
        for old in storage.listdir(out_dir):
            name = storage.basename(old)
            if name.startswith("shard-") and name not in keep:
                storage.remove(old)


@task(name="validate-and-shard", cache_policy=NO_CACHE)
def validate_and_shard(
    source: str,
    out_dir: str,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
    allowed_models: list[str] | None = None,
) -> list[Shard]:
    """Validate a request file and split it into shards that fit the service's limits."""
    with replacing_shards(out_dir) as written:
        shards = shard_request_file(
            source, out_dir, max_file_bytes, max_requests_per_file, allowed_models
        )
        written += shards
    get_run_logger().info(
        "Validated %d request lines into %d shard(s)", sum(s.lines for s in shards), len(shards)
    )
    return shards


def _refuse_models_not_offered(
    source: str,
    tally: RequestTally,
    offered: list[str],
    max_file_bytes: int,
    max_requests_per_file: int | None,
) -> None:
    """The file was checked before the service's model list came: if it names a model the
    service does not offer, a check that knows the list names its lines (into a folder
    thrown away), as it would have in the first place."""
    unknown = sorted(set(tally.models) - set(offered))
    if not unknown:
        return
    scratch = tempfile.mkdtemp(prefix="kluster-model-check-")
    try:
        shard_request_file(source, scratch, max_file_bytes, max_requests_per_file, offered)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raise RequestFileError(  # not reached: that check refuses the same lines
        source, [LineProblem(1, f"unknown model(s) {', '.join(map(repr, unknown))}")]
    )


@task(name="validate-shard-and-estimate", cache_policy=NO_CACHE)
def validate_shard_and_estimate(
    source: str,
    out_dir: str,
    prices: PriceTable | Future[PriceTable],
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_requests_per_file: int | None = None,
    allowed_models: list[str] | Future[list[str]] | None = None,
    windows: Sequence[str] = WINDOWS,
) -> tuple[list[Shard], CostEstimate]:
    """``validate_and_shard`` that also prices the requests, from the same single read of
    the input: (shards, the cost estimate per model and completion window). ``prices`` and
    ``allowed_models`` may still be coming (futures): they are needed only once the file
    has been read."""
    coming = allowed_models if isinstance(allowed_models, Future) else None
    with replacing_shards(out_dir) as written:
        shards, tally = shard_and_tally(
            source,
            out_dir,
            max_file_bytes,
            max_requests_per_file,
            None if coming is not None else allowed_models,  # type: ignore[arg-type]
        )
        if coming is not None:
            _refuse_models_not_offered(
                source, tally, coming.result(), max_file_bytes, max_requests_per_file
            )
        written += shards
    table = prices.result() if isinstance(prices, Future) else prices
    estimate = estimate_cost(tally, table, windows)
    get_run_logger().info(
        "Validated %d request lines into %d shard(s); estimated cost %s",
        sum(s.lines for s in shards),
        len(shards),
        estimate.summary_line(windows[0]),
    )
    return shards, estimate
