"""In-memory records of files and batches, their JSON rendering, counters and faults.

One ``Store`` per app. HTTP handlers (event-loop thread) and batch workers (their own
threads) share it; every status transition happens under ``Store.lock`` so a cancel and a
completion can never both win.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import EmulatorConfig

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
CAPITALISED = {
    "pre_schedule": "PreSchedule",
    "validating": "Validating",
    "in_progress": "InProgress",
    "finalizing": "Finalizing",
    "completed": "Completed",
    "failed": "Failed",
    "expired": "Expired",
    "cancelling": "Cancelling",
    "cancelled": "Cancelled",
}
BATCH_TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_WINDOW_RE = re.compile(r"^([1-9][0-9]?)h$")
_ALLOWED_HOURS = frozenset(range(1, 25)) | {48, 72}


def window_seconds(window: str) -> int | None:
    """Seconds of a completion window, or None if the service would refuse it."""
    if window == "asap":
        return 24 * 3600
    match = _WINDOW_RE.match(window)
    if match is None or int(match.group(1)) not in _ALLOWED_HOURS:
        return None
    return int(match.group(1)) * 3600


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@dataclass
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    path: Path
    seq: int


@dataclass
class BatchRecord:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created_at: int
    expires_at: int
    deadline: float  # time.monotonic() at which the (scaled) window ends
    seq: int
    status: str = "validating"
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    cancel_requested: bool = False
    cancel_mono: float | None = None
    stop_requested: bool = False
    validation_seconds: float | None = None  # the validation stage's wall time, once done
    started_mono: float | None = None
    finished_mono: float | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Store:
    """All emulator state plus the live config; safe to share between threads."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.files: dict[str, FileRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self.requests: Counter[str] = Counter()
        self.faults: dict[str, int] = {"429": 0, "500": 0, "dropped": 0}
        self._seq = itertools.count(1)
        self._fault_rng = random.Random(config.fault_seed)
        self.failed_once: set[str] = set()
        self._fault_turn = 0
        self._closed = False
        if config.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="kluster-emulator-"))
            self._owns_data_dir = True
        else:
            self.data_dir = Path(config.data_dir)
            self._owns_data_dir = False
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)

    # --- config, stats, reset, close ---
    def configure(self, **changes: Any) -> EmulatorConfig:
        """Validate all changes together, then apply them to the live config object."""
        if "data_dir" in changes and changes["data_dir"] != self.config.data_dir:
            raise ValueError("data_dir cannot be changed while the emulator runs")
        merged = EmulatorConfig.model_validate({**self.config.model_dump(), **changes})
        with self.lock:
            for key in changes:
                setattr(self.config, key, getattr(merged, key))
            if "fault_seed" in changes:
                self._fault_rng = random.Random(self.config.fault_seed)
                self._fault_turn = 0
            if "lines_per_second" in changes:  # a batch paced by the old rate takes the new
                for b in self.batches.values():
                    b.wake.set()
        return self.config

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            batches = []
            for b in self.batches.values():
                seconds = None
                if b.started_mono is not None:
                    seconds = round((b.finished_mono or now) - b.started_mono, 6)
                batches.append(
                    {
                        "id": b.id,
                        "status": b.status,
                        "input_file_id": b.input_file_id,
                        "total": b.total,
                        "completed": b.completed,
                        "failed": b.failed,
                        "validation_seconds": b.validation_seconds,
                        "processing_seconds": seconds,
                        # time.monotonic() when it ended (system-wide on Linux: comparable
                        # with a client's on the same machine); None while it runs
                        "finished_mono": b.finished_mono,
                        "created_at": b.created_at,
                    }
                )
            return {
                "requests": dict(self.requests),
                "faults_injected": dict(self.faults),
                "batches": batches,
                "files": len(self.files),
            }

    def _stop_workers(self) -> None:
        with self.lock:
            batches = list(self.batches.values())
            for b in batches:
                b.stop_requested = True
                b.wake.set()
        for b in batches:
            if b.thread is not None and b.thread is not threading.current_thread():
                b.thread.join(timeout=10)

    def reset(self) -> None:
        """Drop all files, batches and counters (running batches are stopped first)."""
        self._stop_workers()
        with self.lock:
            self.files.clear()
            self.batches.clear()
            self.requests.clear()
            self.faults = {"429": 0, "500": 0, "dropped": 0}
            self._fault_rng = random.Random(self.config.fault_seed)
            self._fault_turn = 0
            self.failed_once.clear()
        for child in self.files_dir.iterdir():
            child.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop workers and remove the temp data dir; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop_workers()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # --- faults and counters ---
    def count_request(self, key: str) -> None:
        with self.lock:
            self.requests[key] += 1

    def decide_fault(self) -> tuple[bool, bool, float]:
        """(drop, fault, delay) for one request; three draws always, so runs replay exactly."""
        cfg = self.config
        with self.lock:
            drop_draw = self._fault_rng.random()
            fault_draw = self._fault_rng.random()
            delay_draw = self._fault_rng.random()
        drop = drop_draw < cfg.drop_rate
        fault = not drop and fault_draw < cfg.fault_rate
        return drop, fault, delay_draw * cfg.latency

    def next_fault_status(self) -> int:
        """429 and 500 alternately, starting with 429."""
        with self.lock:
            status = 429 if self._fault_turn % 2 == 0 else 500
            self._fault_turn += 1
            self.faults[str(status)] += 1
        return status

    def count_drop(self) -> None:
        with self.lock:
            self.faults["dropped"] += 1

    # --- files ---
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(self, file_id: str, filename: str, purpose: str) -> FileRecord:
        path = self.file_path(file_id)
        record = FileRecord(
            id=file_id,
            bytes=path.stat().st_size,
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
            path=path,
            seq=next(self._seq),
        )
        with self.lock:
            self.files[file_id] = record
        return record

    def delete_file(self, file_id: str) -> bool:
        with self.lock:
            record = self.files.pop(file_id, None)
        if record is None:
            return False
        # Open handles (a running batch, a download in flight) keep working on POSIX.
        record.path.unlink(missing_ok=True)
        return True

    # --- batches ---
    def new_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        window: int,
        metadata: dict[str, Any] | None,
    ) -> BatchRecord:
        now = time.time()
        batch = BatchRecord(
            id=new_id("batch_"),
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            created_at=int(now),
            expires_at=int(now) + window,
            deadline=time.monotonic() + window / self.config.time_scale,
            seq=next(self._seq),
            status="pre_schedule" if self.config.pre_schedule else "validating",
        )
        with self.lock:
            self.batches[batch.id] = batch
        return batch

    def request_cancel(self, batch: BatchRecord) -> bool:
        """Move a live batch to cancelling; False if it already ended."""
        with self.lock:
            if batch.status in TERMINAL_STATUSES:
                return False
            if not batch.cancel_requested:
                batch.cancel_requested = True
                batch.cancel_mono = time.monotonic()
                batch.cancelling_at = int(time.time())
                batch.status = "cancelling"
                batch.wake.set()
            return True

    # --- rendering ---
    def _ts(self, value: int | None) -> int | str | None:
        if value is None or not self.config.string_timestamps:
            return value
        return str(value)

    def render_file(self, record: FileRecord) -> dict[str, Any]:
        # No "status": the real upload response has none.
        return {
            "id": record.id,
            "object": "file",
            "bytes": record.bytes,
            "created_at": self._ts(record.created_at),
            "filename": record.filename,
            "purpose": record.purpose,
        }

    def render_batch(self, b: BatchRecord) -> dict[str, Any]:
        cfg = self.config
        with self.lock:
            status = CAPITALISED[b.status] if cfg.capitalised_statuses else b.status
            errors: Any
            if cfg.errors_as_list:
                errors = [f"line {e['line']}: {e['message']}" for e in b.errors or []]
            elif b.errors:
                errors = {"object": "list", "data": [dict(e) for e in b.errors]}
            else:
                errors = None
            body: dict[str, Any] = {
                "id": b.id,
                "object": "batch",
                "endpoint": b.endpoint,
                "errors": errors,
                "input_file_id": b.input_file_id,
                "completion_window": b.completion_window,
                "status": status,
                "output_file_id": b.output_file_id,
                "error_file_id": b.error_file_id,
            }
            for name in BATCH_TIMESTAMPS:
                body[name] = self._ts(getattr(b, name))
            body["request_counts"] = {
                "total": b.total,
                "completed": b.completed,
                "failed": b.failed,
            }
            body["metadata"] = b.metadata
        return body

    def remove_data_file(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
