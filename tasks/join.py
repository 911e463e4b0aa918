"""Step 6: join results back to their requests, in input order, in one streaming pass.

The service does not promise output order, so results are indexed by custom_id first:
an index holds only a 64-bit hash, a file number and an offset per result (16 bytes), and
the result line itself is read back from disk when its request's turn comes. When the
output is in input order, as it usually is, the reads are sequential.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np
from prefect import task
from prefect.logging import get_run_logger
from pydantic import BaseModel, Field

from tasks.schema import (
    JoinedError,
    JoinedLine,
    ResultLine,
    Usage,
    custom_id_decoder,
    joined_encoder,
    result_decoder,
)
from tasks.types import Shard, TokenUsage

CHUNK_LINES = 65536
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


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


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
    shards: list[ShardSummary] = Field(default_factory=list)


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


class _ResultIndex:
    """custom_id -> (file, offset) over several result files; later files take precedence."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        hashes, files, offsets = array("q"), array("q"), array("q")
        decode = custom_id_decoder.decode
        for file_no, path in enumerate(self.paths):
            offset = 0
            with open(path, "rb") as handle:
                for line in handle:
                    if line.strip():
                        hashes.append(hash(decode(line).custom_id))
                        files.append(file_no)
                        offsets.append(offset)
                    offset += len(line)
        keys = np.frombuffer(hashes, dtype=np.int64)
        file_nos = np.frombuffer(files, dtype=np.int64)
        offs = np.frombuffer(offsets, dtype=np.int64)
        order = np.lexsort((offs, file_nos, keys))
        self.keys = keys[order]
        self.files = file_nos[order]
        self.offsets = offs[order]
        self._handles: list[BinaryIO] = [open(p, "rb") for p in self.paths]  # noqa: SIM115
        self._positions = [0] * len(self.paths)

    def close(self) -> None:
        for handle in self._handles:
            handle.close()

    def _read(self, file_no: int, offset: int) -> bytes:
        handle = self._handles[file_no]
        if self._positions[file_no] != offset:  # sequential reads need no seek
            handle.seek(offset)
        line = handle.readline()
        self._positions[file_no] = offset + len(line)
        return line

    def lookup(self, custom_ids: list[str]) -> list[ResultLine | None]:
        """The latest result line for each custom_id, or None where there is none."""
        if not len(self.keys):
            return [None] * len(custom_ids)
        wanted = np.fromiter((hash(c) for c in custom_ids), dtype=np.int64, count=len(custom_ids))
        pos = np.searchsorted(self.keys, wanted, side="right") - 1
        clipped = np.maximum(pos, 0)
        hit = (pos >= 0) & (self.keys[clipped] == wanted)
        files = self.files[clipped].tolist()
        offsets = self.offsets[clipped].tolist()
        out: list[ResultLine | None] = []
        for i, custom_id in enumerate(custom_ids):
            if not hit[i]:
                out.append(None)
                continue
            result = result_decoder.decode(self._read(files[i], offsets[i]))
            if result.custom_id != custom_id:  # a 64-bit hash collision: search its run
                result = self._slow_lookup(custom_id, int(pos[i]))
            out.append(result)
        return out

    def _slow_lookup(self, custom_id: str, pos: int) -> ResultLine | None:
        key = self.keys[pos]
        while pos >= 0 and self.keys[pos] == key:
            result = result_decoder.decode(self._read(int(self.files[pos]), int(self.offsets[pos])))
            if result.custom_id == custom_id:
                return result
            pos -= 1
        return None


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

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.schema = pa.schema(
            [
                (c, pa.int64() if c.endswith(("tokens", "status_code")) else pa.string())
                for c in self.COLUMNS
            ]
        )
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
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
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def parquet_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _read_ids(path: str) -> Any:
    """The custom_ids of a shard, in order, a chunk at a time."""
    decode = msgspec.json.decode
    chunk: list[str] = []
    with open(path, "rb") as handle:
        for line in handle:
            chunk.append(decode(line))
            if len(chunk) >= CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


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
    target = Path(output_path)
    parquet_target = target.with_suffix(".parquet") if parquet else None
    for existing in (target, parquet_target):
        if existing is not None and existing.exists() and not overwrite:
            raise OutputExistsError(
                f"{existing} already exists; pass overwrite=True (--overwrite) to replace it"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    index = _ResultIndex(result_paths)
    sink = _ParquetSink(parquet_target) if parquet_target is not None else None
    summary = JoinSummary(output_path=str(target))
    retry_handle = open(retry_ids_path, "wb") if retry_ids_path else None  # noqa: SIM115
    done = False
    try:
        with open(tmp, "wb", buffering=1 << 20) as out:
            encode = joined_encoder.encode
            for shard in shards:
                part = ShardSummary(index=shard.index)
                prompt = completion = total = 0
                for ids in _read_ids(shard.ids_path):
                    for custom_id, result in zip(ids, index.lookup(ids), strict=True):
                        line = to_joined(custom_id, result)
                        out.write(encode(line))
                        out.write(b"\n")
                        if sink is not None:
                            sink.add(line)
                        if line.status == "ok":
                            part.succeeded += 1
                            usage: Usage | None = line.usage
                            if usage is not None:
                                prompt += usage.prompt_tokens
                                completion += usage.completion_tokens
                                total += usage.total_tokens
                        else:
                            part.failed += 1
                            if is_transient_failure(line):
                                summary.retryable += 1
                                if retry_handle is not None:
                                    retry_handle.write(msgspec.json.encode(custom_id) + b"\n")
                part.requests = part.succeeded + part.failed
                part.usage = TokenUsage(
                    prompt_tokens=prompt, completion_tokens=completion, total_tokens=total
                )
                summary.shards.append(part)
                summary.requests += part.requests
                summary.succeeded += part.succeeded
                summary.failed += part.failed
                summary.usage = summary.usage + part.usage
        os.replace(tmp, target)
        done = True
    finally:
        index.close()
        if retry_handle is not None:
            retry_handle.close()
        if sink is not None:
            sink.close(keep=done)
            if done:
                summary.parquet_path = str(parquet_target)
        tmp.unlink(missing_ok=True)
    return summary


@task(name="join-results")
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
