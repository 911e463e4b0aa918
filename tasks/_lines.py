"""Line-level work of validate-and-shard and of the join, importable without Prefect.

Decoding is the bottleneck of both steps. Where the compiled passes (``native/``) are
built, they do it with the GIL released, on two threads of this process (the callers in
``tasks.build`` and ``tasks.join``), and hand any block they are not sure of to the Python
code here, the reference they are tested against. Without them, large inputs are split
between this process and one helper process (``Helper``) on another core. The helper
imports only this module, ``prefect_kluster.tasks.schema`` and msgspec (not the package
``prefect_kluster.tasks``, which imports Prefect: 2 s and 110 MB), so it starts in about
0.1 s. Whatever the helper fails or does not answer, the caller does itself, so results
never depend on it.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from operator import attrgetter, sub
from pathlib import Path
from queue import SimpleQueue
from typing import Any, BinaryIO, TypeVar

import msgspec

from prefect_kluster.tasks.schema import (
    JoinedError,
    JoinedLine,
    RequestBody,
    ResultLine,
    TextPart,
    Usage,
    content_decoder,
    custom_id_decoder,
    joined_encoder,
    raw_request_decoder,
    raw_result_decoder,
    request_decoder,
    result_decoder,
)

T = TypeVar("T")
R = TypeVar("R")

# The compiled request check (native/, built by `make native`): the same answers for a valid
# block, 2.5x faster on one core and with the GIL released; absent (a plain pip install, no
# Rust toolchain) or turned off with PREFECT_KLUSTER_NATIVE=0, the Python check does all.
_native: Any = None
if os.environ.get("PREFECT_KLUSTER_NATIVE", "1") != "0":
    try:
        from prefect_kluster.tasks import _native
    except ImportError:
        pass
native_check_block: Any = getattr(_native, "check_block", None)
native_crlf_to_lf: Any = getattr(_native, "crlf_to_lf", None)
native_hash_ids: Any = getattr(_native, "hash_ids", None)
native_join_block: Any = getattr(_native, "join_block", None)
native_latest_entries: Any = getattr(_native, "LatestEntries", None)
native_gather_lines: Any = getattr(_native, "gather_lines", None)
native_lines_start_with: Any = getattr(_native, "lines_start_with", None)

# What decoding a line may raise: msgspec's errors, and UnicodeDecodeError for bytes in a
# string that are not UTF-8.
DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError)

NOT_PROCESSED = "not_processed"
# Failures that a later attempt can get past: rate limits, server errors, lines never run.
TRANSIENT_CODES = frozenset(
    {
        "batch_expired",
        "batch_cancelled",
        NOT_PROCESSED,
        "rate_limit_exceeded",
        "server_error",
        "timeout",
    }
)

# Large writes go out in pieces of at most this size. A write that covers a whole aligned
# MiB of a file gets a large page-cache folio, and on a virtual machine that gives free
# memory left idle back to its host (this one: a Firecracker guest, its balloon reporting
# free pages) the host must bring such a folio's memory back first. Measured here, 600 MB
# written after 5 s idle: in 1 MiB writes 0.65-1.5 s, in 256 KiB writes 0.14-0.17 s; into pages
# just freed 0.13 s either way (``make bench`` prints its page-cache probe). Smaller
# pieces cost nothing measurable where there is no such host.
WRITE_PIECE_BYTES = 1 << 18


def write_all(handle: BinaryIO, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``handle`` in pieces of at most ``WRITE_PIECE_BYTES``."""
    if len(data) <= WRITE_PIECE_BYTES:
        handle.write(data)
        return
    view = memoryview(data)
    for start in range(0, len(view), WRITE_PIECE_BYTES):
        handle.write(view[start : start + WRITE_PIECE_BYTES])


# Lines are read, checked and handed out a block at a time. Measured here: request blocks
# of 2 MB shard faster than 1 or 4 MB (and peak RSS is 45 MB lower than with 4 MB); result
# blocks of 4 MB join faster than smaller ones.
REQUEST_BLOCK_BYTES = 1 << 21
BLOCK_BYTES = 1 << 22

# What the join's first pass records of each result line.
OK, FAILED, TRANSIENT, UNREAD = 0, 1, 2, 3
# Token counts are kept in 32 bits a line (12 MB less per million results than 64); a count
# beyond this (no model has such a context) is clamped to it rather than failing the join.
_TOKEN_CAP = (1 << 31) - 1
_ZERO_USAGE = Usage()
_usage_counts = attrgetter("prompt_tokens", "completion_tokens", "total_tokens")
# The first byte of a raw JSON string or null.
_STR_OR_NULL = (ord('"'), ord("n"))


def is_transient_failure(line: JoinedLine) -> bool:
    """A failed line worth another round: 429, 5xx, a timeout, or a line that never ran."""
    if line.status == "ok" or line.error is None:
        return False
    code = line.error.status_code
    if code is not None and (code == 429 or code >= 500):
        return True
    return (line.error.code or "") in TRANSIENT_CODES


def to_joined(custom_id: str, result: ResultLine | None) -> JoinedLine:
    """The joined record for one request, from its result line (or its absence)."""
    if result is None:
        return JoinedLine(
            custom_id,
            "error",
            None,
            None,
            None,
            None,
            JoinedError("no result: the request was never processed", NOT_PROCESSED),
        )
    response = result.response
    body = response.body if response is not None else None
    status_code = response.status_code if response is not None else None
    if (
        result.error is None
        and body is not None
        and body.error is None
        and status_code is not None
        and 200 <= status_code < 300
    ):
        choice = body.choices[0] if body.choices else None
        content = choice.message.content if choice and choice.message else None
        return JoinedLine(
            custom_id,
            "ok",
            content,
            choice.finish_reason if choice else None,
            body.usage,
            body.model,
            None,
        )
    message = code = None
    if result.error is not None:
        message, code = result.error.message, result.error.code
    if body is not None:
        if isinstance(body.error, dict):
            message = message or body.error.get("message")
            code = code or body.error.get("code") or body.error.get("type")
        elif isinstance(body.error, str):
            message = message or body.error
        message = message or body.message
    return JoinedLine(
        custom_id,
        "error",
        None,
        None,
        None,
        body.model if body else None,
        JoinedError(message or f"request failed with HTTP {status_code}", code, status_code),
    )


def read_blocks(handle: BinaryIO, size: int | None = None) -> Iterator[tuple[int, bytes]]:
    """A file as (offset, block) pairs of whole lines: every block ends with a newline,
    except the file's last one when the file does not."""
    for offset, head, tail in read_block_parts(handle, size):
        yield offset, head + tail if tail else head


def read_block_parts(
    handle: BinaryIO, size: int | None = None
) -> Iterator[tuple[int, bytes, bytes]]:
    """A file as (offset, head, tail) of blocks of whole lines: what ``read`` gave and what
    ``readline`` added to finish its last line (empty if nothing). The compiled passes take
    a block so, never copied into one bytes only to be read; ``read_blocks`` joins them."""
    offset = 0
    size = size or BLOCK_BYTES
    while True:
        block = handle.read(size)
        if not block:
            break
        tail = handle.readline() if block[-1] != 10 else b""
        yield offset, block, tail
        offset += len(block) + len(tail)


def map_block_parts(path: str, size: int | None = None) -> Iterator[tuple[int, memoryview, bytes]]:
    """A local file as ``read_block_parts`` gives it, but each block a view of the file's
    read-only mapping (the tail always empty): the compiled passes read the page cache's
    pages themselves, with no copy made (a sixth of the join's time at 1M lines was
    ``read`` copying 860 MB of result files while both cores joined). The pages of blocks
    left ``MAPPED_BEHIND`` blocks behind leave the mapping (the page cache keeps them), so
    the process maps a few blocks at a time, not the file."""
    size = size or BLOCK_BYTES
    with open(path, "rb") as handle:
        length = os.fstat(handle.fileno()).st_size
        if not length:
            return
        mapped = mmap.mmap(handle.fileno(), length, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    starts: deque[int] = deque()
    try:
        offset = 0
        while offset < length:
            newline = mapped.find(b"\n", offset + size - 1)
            end = length if newline < 0 else newline + 1
            yield offset, view[offset:end], b""
            starts.append(offset)
            if len(starts) > MAPPED_BEHIND and _DROP_PAGES is not None:
                # Safe even if that block were still read: its pages come back on touch.
                done = starts.popleft() // mmap.PAGESIZE * mmap.PAGESIZE
                below = starts[0] // mmap.PAGESIZE * mmap.PAGESIZE
                if below > done:
                    mapped.madvise(_DROP_PAGES, done, below - done)
            offset = end
    finally:
        try:
            view.release()
            mapped.close()
        except BufferError:  # a block still held elsewhere: unmapped when it is let go
            pass


def crlf_to_lf(block: bytes, tail: bytes = b"") -> bytes:
    """``block`` followed by ``tail``, with each CRLF line end made LF (a lone CR, JSON
    whitespace, is kept).

    Found with memchr, one piece a CRLF, one copy: several times quicker than
    ``bytes.replace`` with a two-byte pattern (and the compiled one quicker still, and
    without the copy that puts the two parts together)."""
    if native_crlf_to_lf is not None:
        return native_crlf_to_lf(block, tail or None)
    if tail:
        block += tail
    find = block.find
    at = find(b"\r")
    if at < 0:
        return block
    pieces = []
    start = 0
    while at >= 0:
        if block[at + 1 : at + 2] == b"\n":
            pieces.append(block[start:at])
            start = at + 1
        at = find(b"\r", at + 1)
    if not pieces:
        return block
    pieces.append(block[start:])
    return b"".join(pieces)


# Blocks read ahead of the one being taken on the compiled passes' path: enough to keep both
# threads busy, few enough to keep memory flat (2 to 4 MB each).
NATIVE_AHEAD = 6
# Blocks of a mapped file kept in the mapping behind the newest (``map_block_parts``): those
# being joined, and those joined but not yet taken, stay mapped.
MAPPED_BEHIND = NATIVE_AHEAD + 2
_DROP_PAGES = getattr(mmap, "MADV_DONTNEED", None)  # not everywhere mmap is


def in_order_on_threads(
    items: Iterable[T], wanted: Callable[[T], bool], work: Callable[[T], R], name: str
) -> Iterator[tuple[T, R | None]]:
    """Each item with ``work(item)``'s answer (None for an item not ``wanted``, asked as it
    is read), in the items' order. ``work`` runs on two threads while the caller takes the
    answers, up to ``NATIVE_AHEAD`` items ahead: it gains only by releasing the GIL, as the
    compiled passes do. Close the iterator to stop early; the work still running ends first."""
    pending: deque[tuple[T, Future[R] | None]] = deque()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=name)
    try:
        for item in items:
            pending.append((item, pool.submit(work, item) if wanted(item) else None))
            while pending and (
                len(pending) > NATIVE_AHEAD or pending[0][1] is None or pending[0][1].done()
            ):
                item, answer = pending.popleft()
                yield item, answer.result() if answer is not None else None
        while pending:
            item, answer = pending.popleft()
            yield item, answer.result() if answer is not None else None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def hash_ids(ids: list[bytes]) -> bytes:
    """64-bit hashes of JSON custom_ids for the duplicate check, as an ``array("q")``'s
    bytes: the compiled check's (it hashes the blocks it checks) when it is built, else
    Python's. Either is the same for the same id within a process, which is all the check
    needs (equal hashes are only suspects: their lines are read again)."""
    if native_hash_ids is not None:
        return native_hash_ids(ids)
    return array("q", map(hash, ids)).tobytes()


def hash_id(json_id: bytes) -> int:
    """``hash_ids`` of one id."""
    return array("q", hash_ids([json_id]))[0]


def split_lines(block: bytes) -> list[bytes]:
    """A block's lines without their newlines."""
    lines = block.split(b"\n")
    if block[-1:] == b"\n":
        lines.pop()
    return lines


class ModelNotAllowed(Exception):
    """A request names a model outside the allowed set."""


# --- the cost estimate's share of the pass ------------------------------------------------
# Prompt tokens of a request, from its text alone (no tokenizer in the pass: one would cost
# more than the decode itself). Central: pure-ASCII text at 0.24 tokens a character; other
# text at 0.297 a character plus 0.185 a UTF-8 byte beyond the first of each character
# (one encode, no count of scripts). Fitted on real translated text against Llama 3's and
# Qwen's tokenizers; benchmarks/cost_bench.py measures it (tasks.cost quotes the figures).
# Upper: the text's UTF-8 bytes, a bound no byte-level BPE (Llama 3, Qwen, DeepSeek) can
# exceed, since each of its tokens stands for at least one byte.
ASCII_TOKENS_PER_CHAR = 0.24
TOKENS_PER_CHAR = 0.297
TOKENS_PER_EXTRA_BYTE = 0.185
# A chat template's tokens around the text, (central, upper): once a request (begin of text,
# the assistant header; a default system prompt some templates add), once a message (its
# header and end-of-turn mark). Llama 3's template uses 5 and 5.
REQUEST_TOKENS = (5, 32)
MESSAGE_TOKENS = (5, 8)
# An image part, (central, upper): Qwen2.5-VL spends a token per 28x28 pixels, about 1,300
# for a 1,000-pixel-square image and at most 16,384 (its default max_pixels, 12,845,056).
IMAGE_TOKENS = (1300, 16384)

# Per model, all integers: lines, messages, image parts, characters of pure-ASCII texts,
# characters and UTF-8 bytes of the other texts, the sum of the answer limits that lines
# set (max_completion_tokens, else max_tokens), and the lines that set none.
LINES, MESSAGES, IMAGES, ASCII_CHARS, OTHER_CHARS, OTHER_BYTES, LIMITED, UNLIMITED = range(8)


def prompt_tokens(counts: list[int]) -> tuple[float, int]:
    """(central, upper) prompt tokens from one model's counts."""
    central = (
        REQUEST_TOKENS[0] * counts[LINES]
        + MESSAGE_TOKENS[0] * counts[MESSAGES]
        + IMAGE_TOKENS[0] * counts[IMAGES]
        + ASCII_TOKENS_PER_CHAR * counts[ASCII_CHARS]
        + TOKENS_PER_CHAR * counts[OTHER_CHARS]
        + TOKENS_PER_EXTRA_BYTE * (counts[OTHER_BYTES] - counts[OTHER_CHARS])
    )
    upper = (
        REQUEST_TOKENS[1] * counts[LINES]
        + MESSAGE_TOKENS[1] * counts[MESSAGES]
        + IMAGE_TOKENS[1] * counts[IMAGES]
        + counts[ASCII_CHARS]
        + counts[OTHER_BYTES]
    )
    return central, upper


class BlockCost:
    """What the cost estimate needs of some request lines, per model, counted as the
    lines are checked: integers only (``prompt_tokens`` turns them into tokens), so the
    helper can send them as JSON and blocks add up exactly.
    """

    __slots__ = ("models",)

    def __init__(self, models: dict[str, list[int]] | None = None) -> None:
        self.models: dict[str, list[int]] = models if models is not None else {}

    def add(self, body: RequestBody) -> None:
        """Count one valid request: its messages, images, text sizes and answer limit."""
        ascii_chars = other_chars = other_bytes = images = 0
        messages = body.messages
        for message in messages:
            content = message.content
            if content.__class__ is str:
                if content.isascii():
                    ascii_chars += len(content)
                else:
                    other_chars += len(content)
                    other_bytes += len(content.encode())
                continue
            for part in content:
                if part.__class__ is not TextPart:
                    images += 1
                    continue
                text = part.text
                if text.isascii():
                    ascii_chars += len(text)
                else:
                    other_chars += len(text)
                    other_bytes += len(text.encode())
        self.record(body, len(messages), images, ascii_chars, other_chars, other_bytes)

    def record(
        self,
        body: Any,
        messages: int,
        images: int,
        ascii_chars: int,
        other_chars: int,
        other_bytes: int,
    ) -> None:
        """Add one measured request to its model's counts."""
        tally = self.models.get(body.model)
        if tally is None:
            tally = self.models[body.model] = [0, 0, 0, 0, 0, 0, 0, 0]
        tally[0] += 1
        tally[1] += messages
        tally[2] += images
        tally[3] += ascii_chars
        tally[4] += other_chars
        tally[5] += other_bytes
        cap = body.max_completion_tokens
        if cap is None:
            cap = body.max_tokens
        if cap is None:
            tally[7] += 1
        else:
            tally[6] += cap

    def merge(self, other: BlockCost) -> None:
        for model, counts in other.models.items():
            tally = self.models.get(model)
            if tally is None:
                self.models[model] = list(counts)
            else:
                for i, value in enumerate(counts):
                    tally[i] += value

    def pack(self) -> bytes:
        return msgspec.json.encode(self.models)

    @classmethod
    def unpack(cls, blob: bytes) -> BlockCost:
        return cls(msgspec.json.decode(blob, type=dict[str, list[int]]))


# A line longer than this is decoded with its message contents left raw, and a content of
# at least ``_LONG_CONTENT`` bytes is checked once per block: when the same bytes come again
# (a system prompt or few-shot examples repeated on every line) its counts are reused.
# Shorter lines are decoded whole, in one call.
_LONG_LINE = 1024
_LONG_CONTENT = 256


def _content_counts(content: Any) -> tuple[int, int, int, int]:
    """(ASCII characters, other characters, their UTF-8 bytes, image parts) of a message's
    content, counted as ``BlockCost.add`` counts them."""
    if content.__class__ is str:
        if content.isascii():
            return len(content), 0, 0, 0
        return 0, len(content), len(content.encode()), 0
    ascii_chars = other_chars = other_bytes = images = 0
    for part in content:
        if part.__class__ is not TextPart:
            images += 1
            continue
        text = part.text
        if text.isascii():
            ascii_chars += len(text)
        else:
            other_chars += len(text)
            other_bytes += len(text.encode())
    return ascii_chars, other_chars, other_bytes, images


def check_requests(
    lines: list[bytes], models: frozenset[str] | None, cost: BlockCost | None = None
) -> list[bytes]:
    """The JSON custom_ids of ``lines`` if every line is a valid request; raises otherwise.

    With ``cost``, each line's tokens are added to it on the way (same decode). Long lines
    are decoded with their message contents left raw; each content is then checked on its
    own, except that a long one already checked in this block (same bytes) is not checked
    again. Either way, what this accepts ``request_decoder`` accepts, with the same counts.
    The compiled check (``native_check_block``) is held to this one."""
    decode_whole = request_decoder.decode
    if cost is None:
        if models is None:
            return [msgspec.json.encode(decode_whole(line).custom_id) for line in lines]
        ids = []
        for line in lines:
            request = decode_whole(line)
            if request.body.model not in models:
                raise ModelNotAllowed
            ids.append(request.custom_id)
        return list(map(msgspec.json.encode, ids))
    decode = raw_request_decoder.decode
    check = content_decoder.decode
    seen: dict[bytes, tuple[int, int, int, int]] = {}
    record = cost.record
    ids = []
    add_id = ids.append
    for line in lines:
        ascii_chars = other_chars = other_bytes = images = 0
        if len(line) < _LONG_LINE:
            request = decode_whole(line)
            body = request.body
            model = body.model
            if models is not None and model not in models:
                raise ModelNotAllowed
            messages = body.messages
            for message in messages:
                content = message.content
                if content.__class__ is str:
                    if content.isascii():
                        ascii_chars += len(content)
                    else:
                        other_chars += len(content)
                        other_bytes += len(content.encode())
                    continue
                counts = _content_counts(content)
                ascii_chars += counts[0]
                other_chars += counts[1]
                other_bytes += counts[2]
                images += counts[3]
        else:
            request = decode(line)
            body = request.body
            model = body.model
            if models is not None and model not in models:
                raise ModelNotAllowed
            messages = body.messages
            for message in messages:
                raw = message.content
                if len(raw) >= _LONG_CONTENT:
                    key = bytes(raw)
                    counts = seen.get(key)
                    if counts is None:
                        counts = seen[key] = _content_counts(check(key))
                else:
                    counts = _content_counts(check(raw))
                ascii_chars += counts[0]
                other_chars += counts[1]
                other_bytes += counts[2]
                images += counts[3]
        add_id(request.custom_id)
        record(body, len(messages), images, ascii_chars, other_chars, other_bytes)
    return list(map(msgspec.json.encode, ids))


def pack_checked(ids: list[bytes], cost: BlockCost | None) -> bytes:
    """The helper's reply for a valid request block: the ids, then the cost if counted."""
    blob = b"\n".join(ids) + b"\n"
    if cost is None:
        return blob
    return struct.pack("<q", len(blob)) + blob + cost.pack()


def unpack_checked(blob: bytes, estimating: bool) -> tuple[list[bytes], BlockCost | None]:
    """The inverse of ``pack_checked``: (the JSON custom_ids, the block's cost)."""
    cost = None
    if estimating:
        (size,) = struct.unpack_from("<q", blob)
        cost = BlockCost.unpack(blob[8 + size :])
        blob = blob[8 : 8 + size]
    ids = blob.split(b"\n")
    ids.pop()
    return ids, cost


class JoinedBlock:
    """The join's first pass over a block of result lines: their joined lines (each ending
    with a newline; a line that does not decode is kept as it is, kind UNREAD; an answer's
    content copied as the raw JSON string the service wrote, see ``RawResultLine``) and, per
    line, the JSON custom_id, the kind, three token counts, the joined line's length and a
    model code: an index into ``models`` (the block's own table of model names) for an ok
    line that reports its model and usage, else -1. Blank lines are skipped."""

    __slots__ = (
        "data", "ids", "hashes", "kinds", "tokens", "lengths", "start", "models", "codes"
    )  # fmt: skip

    def __init__(self, lines: list[bytes]):
        decode = raw_result_decoder.decode
        strict = result_decoder.decode
        encode_into = joined_encoder.encode_into
        out = bytearray()
        ends = array("q")  # where each joined line ends in ``out``
        ids: list[str] = []
        kinds = bytearray()
        # Per line: its usage (zero if none or not ok) and its model (None: no code). Turned
        # into arrays once for the block, in C, not a line at a time.
        usages: list[Usage] = []
        models: list[str | None] = []
        add_end, add_id, add_kind = ends.append, ids.append, kinds.append
        add_usage, add_model = usages.append, models.append
        for line in lines:
            try:
                result = decode(line)
                response = result.response
                body = response.body if response is not None else None
                if body is not None:
                    for choice in body.choices:
                        message = choice.message
                        # a content that is not a string or null: let the typed decoder
                        # refuse the line, as it always did
                        if (
                            message is not None
                            and memoryview(message.content)[0] not in _STR_OR_NULL
                        ):
                            strict(line)
            except DECODE_ERRORS:
                if not line.strip():
                    continue
                # A line without a custom_id fails the join here; one that is otherwise
                # malformed fails it only if its request needs it.
                add_id(custom_id_decoder.decode(line).custom_id)
                out += line
                out.append(10)
                add_end(len(out))
                add_kind(UNREAD)
                add_usage(_ZERO_USAGE)
                add_model(None)
                continue
            custom_id = result.custom_id
            joined = to_joined(custom_id, result)
            if joined.status == "ok":
                add_kind(OK)
                usage = joined.usage
                if usage is None:
                    add_usage(_ZERO_USAGE)
                    add_model(None)
                else:
                    add_usage(usage)
                    add_model(joined.model)
            else:
                add_kind(TRANSIENT if is_transient_failure(joined) else FAILED)
                add_usage(_ZERO_USAGE)
                add_model(None)
            encode_into(joined, out, -1)
            out.append(10)
            add_end(len(out))
            add_id(custom_id)
        tokens = array("i")  # a line's counts fit 32 bits (see _TOKEN_CAP)
        try:
            tokens.extend(chain.from_iterable(map(_usage_counts, usages)))
        except OverflowError:  # a count beyond 32 bits: clamped, not fatal
            counts = chain.from_iterable(map(_usage_counts, usages))
            tokens = array("i", (max(0, min(n, _TOKEN_CAP)) for n in counts))
        names = dict.fromkeys(models)  # in order of first appearance
        names.pop(None, None)
        table: dict[str | None, int] = {name: code for code, name in enumerate(names)}
        self.models = list(names)
        table[None] = -1
        self.codes = array("i", map(table.__getitem__, models))
        self.data = bytes(out)
        self.ids: list[bytes] | bytes = list(map(msgspec.json.encode, ids))
        self.hashes: bytes | None = None
        self.kinds = bytes(kinds)
        self.tokens = tokens
        self.lengths = array("q", map(sub, ends, [0, *ends[:-1]]))
        self.start = 0  # where the caller put ``data``

    @classmethod
    def joined_natively(cls, block: bytes | memoryview, tail: bytes = b"") -> JoinedBlock | None:
        """The same block (``block`` followed by ``tail``, see ``read_block_parts``) from
        the compiled first pass (``native/``, GIL released), or
        None where it does not read every line exactly as this class does: ``data`` is then
        a read-only buffer (written and measured as bytes are, never copied into one),
        ``ids`` one bytes (each JSON id followed by a newline) and ``hashes`` their
        ``hash_ids``."""
        answer = native_join_block(block, tail or None)
        if answer is None:
            return None
        joined = cls.__new__(cls)
        data, joined.ids, joined.hashes, joined.kinds, tokens, lengths, models, codes = answer
        joined.data = data
        joined.tokens, joined.lengths, joined.codes = array("i"), array("q"), array("i")
        joined.tokens.frombytes(tokens)
        joined.lengths.frombytes(lengths)
        joined.codes.frombytes(codes)
        joined.models = models
        joined.start = 0
        return joined

    def id_list(self) -> list[bytes]:
        """The JSON custom_ids, one a line."""
        if isinstance(self.ids, list):
            return self.ids
        ids = self.ids.split(b"\n")
        ids.pop()
        return ids

    def pack(self) -> bytes:
        """The block minus its joined lines, as the helper sends it."""
        ids = b"\n".join(self.id_list())
        models = msgspec.json.encode(self.models)
        head = struct.pack("<qqq", len(self.kinds), len(ids), len(models))
        return b"".join(
            (
                head,
                self.kinds,
                self.tokens.tobytes(),
                self.lengths.tobytes(),
                self.codes.tobytes(),
                models,
                ids,
            )
        )

    @classmethod
    def unpack(cls, blob: bytes) -> JoinedBlock:
        count, ids_size, models_size = struct.unpack_from("<qqq", blob)
        block = cls.__new__(cls)
        at = 24
        block.kinds = blob[at : at + count]
        at += count
        block.tokens = array("i")
        block.tokens.frombytes(blob[at : at + 3 * block.tokens.itemsize * count])
        at += 3 * block.tokens.itemsize * count
        block.lengths = array("q")
        block.lengths.frombytes(blob[at : at + 8 * count])
        at += 8 * count
        block.codes = array("i")
        block.codes.frombytes(blob[at : at + block.codes.itemsize * count])
        at += block.codes.itemsize * count
        block.models = msgspec.json.decode(blob[at : at + models_size], type=list[str])
        at += models_size
        block.ids = blob[at : at + ids_size].split(b"\n") if count else []
        block.hashes = None
        if len(block.ids) != count or len(block.codes) != count:
            raise ValueError("helper answer does not add up")
        if count and max(block.codes) >= len(block.models):
            raise ValueError("helper answer names an unknown model")
        block.data = b""
        block.start = 0
        return block


# --- the helper process -----------------------------------------------------------------

# Runs in the helper: bare ``prefect_kluster`` and ``prefect_kluster.tasks`` packages, so
# that importing the line module does not run their __init__ files (and import Prefect).
_BOOT = """
import sys, types
for name, path in (("prefect_kluster", []), ("prefect_kluster.tasks", [sys.argv[1]])):
    package = types.ModuleType(name)
    package.__path__ = path
    sys.modules[name] = package
from prefect_kluster.tasks._lines import serve
serve(sys.argv[2])
"""
_FAILED = object()


def serve(config_json: str) -> None:
    """The helper's loop: read (file, offset, size) requests on stdin; answer each, in
    order, on stdout with a length-prefixed reply (length -1: the block has a problem)."""
    config = msgspec.json.decode(config_json)
    paths: list[str] = config["paths"]
    models = frozenset(config["models"]) if config.get("models") is not None else None
    estimating = bool(config.get("estimate"))
    scratch = open(config["scratch"], "wb") if config.get("scratch") else None  # noqa: SIM115
    handles: dict[int, BinaryIO] = {}
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        while len(header := inp.read(24)) == 24:
            file_no, offset, size = struct.unpack("<qqq", header)
            handle = handles.get(file_no)
            if handle is None:
                handle = handles[file_no] = open(paths[file_no], "rb")  # noqa: SIM115
            handle.seek(offset)
            lines = split_lines(handle.read(size))
            try:
                if scratch is None:
                    cost = BlockCost() if estimating else None
                    reply = pack_checked(check_requests(lines, models, cost), cost)
                else:
                    block = JoinedBlock(lines)
                    reply = block.pack()
                    write_all(scratch, block.data)
                    scratch.flush()  # on disk before the caller hears of it
            except Exception:
                out.write(struct.pack("<q", -1))
            else:
                out.write(struct.pack("<q", len(reply)))
                out.write(reply)
            out.flush()
    finally:
        if scratch is not None:
            scratch.close()
        for handle in handles.values():
            handle.close()


class Helper:
    """The caller's side of one helper process.

    ``send`` names a block; ``reply`` gives the answers in the order asked: the reply
    bytes, ``None`` if the helper found a problem in that block, or ``None`` with
    ``alive`` false once the helper is gone. Any answer but bytes: do the block yourself.
    """

    MAX_OUTSTANDING = 4
    MIN_BYTES = 32 << 20  # smaller inputs are quicker done alone

    def __init__(self, config: dict[str, Any]):
        self.outstanding = 0
        self.alive = True
        self._replies: SimpleQueue[Any] = SimpleQueue()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _BOOT,
                str(Path(__file__).resolve().parent),
                msgspec.json.encode(config).decode(),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, name="kluster-helper", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, paths: list[str], **config: Any) -> Helper | None:
        """A helper for local files ``paths`` if they are big enough to be worth one."""
        if not sys.executable:
            return None
        try:
            if sum(os.path.getsize(p) for p in paths) < cls.MIN_BYTES:
                return None
            if not all(os.path.isfile(p) for p in paths):
                return None
            return cls({"paths": paths, **config})
        except (OSError, ValueError):
            return None

    def _read(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            while len(header := stdout.read(8)) == 8:
                (size,) = struct.unpack("<q", header)
                if size < 0:
                    self._replies.put(_FAILED)
                    continue
                blob = stdout.read(size)
                if len(blob) != size:
                    break
                self._replies.put(blob)
        except (OSError, ValueError):
            pass
        self._replies.put(None)

    def can_take(self) -> bool:
        return self.alive and self.outstanding < self.MAX_OUTSTANDING

    def send(self, file_no: int, offset: int, size: int) -> bool:
        try:
            stdin = self._proc.stdin
            assert stdin is not None
            stdin.write(struct.pack("<qqq", file_no, offset, size))
            stdin.flush()
        except (OSError, ValueError):
            self.alive = False
            return False
        self.outstanding += 1
        return True

    def ready(self) -> bool:
        return not self.alive or not self._replies.empty()

    def reply(self) -> bytes | None:
        """The next answer, waiting for it."""
        if not self.alive:
            return None
        answer = self._replies.get()
        if answer is None:
            self.alive = False
            return None
        self.outstanding -= 1
        return None if answer is _FAILED else answer

    def close(self) -> None:
        """Stop the helper: it finishes what it was asked and exits."""
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
