"""Background processing of one batch: validate, run each line, finish in the right state.

The input is streamed twice (validate, then process) and output lines are written as they
are produced, so memory stays flat however large the file is.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import IO, Any

import msgspec

from .responder import EXPIRED_MESSAGE, respond, transient_fault
from .state import BatchRecord, Store, new_id

log = logging.getLogger("emulator")

CHAT_URL = "/v1/chat/completions"
MAX_LISTED_ERRORS = 100
_CHECK_EVERY = 4096  # validation lines between cancel/stop checks

_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode


def start_worker(store: Store, batch: BatchRecord, input_handle: IO[bytes]) -> None:
    """Run the batch in its own thread; the handle was opened by the caller so a delete of
    the input file right after create cannot race the worker."""
    thread = threading.Thread(
        target=_run_guarded,
        args=(store, batch, input_handle),
        name=f"emulator-{batch.id}",
        daemon=True,
    )
    batch.thread = thread
    thread.start()


def _run_guarded(store: Store, batch: BatchRecord, handle: IO[bytes]) -> None:
    try:
        with handle:
            _Run(store, batch, handle).run()
    except Exception:  # a bug here must show as a failed batch, not a silent dead thread
        log.exception("emulator worker crashed on %s", batch.id)
        with store.lock:
            if batch.status not in ("completed", "failed", "expired", "cancelled"):
                batch.status = "failed"
                batch.failed_at = int(time.time())
                batch.errors = [
                    {"code": "server_error", "message": "internal emulator error", "line": None}
                ]


class _Run:
    """State of one worker run; split into stages so each exit path stays readable."""

    def __init__(self, store: Store, batch: BatchRecord, handle: IO[bytes]) -> None:
        self.store = store
        self.b = batch
        self.fh = handle
        self.out: IO[bytes] | None = None
        self.err: IO[bytes] | None = None
        self.out_id = new_id("file-")
        self.err_id = new_id("file-")
        self.err_lines = 0
        self.transient = 0

    # --- interruption ---
    def _interrupted(self) -> str | None:
        b = self.b
        if b.stop_requested:
            return "stop"
        if b.cancel_requested:
            return "cancel"
        if time.monotonic() >= b.deadline:
            return "expire"
        return None

    def _sleep(self, seconds: float, rate: float | None = None) -> str | None:
        """Sleep up to ``seconds``, waking early for stop, cancel or the window's end, or
        (given the ``rate`` it paces) when ``lines_per_second`` changes: ``"rate"``."""
        end = time.monotonic() + seconds
        while True:
            reason = self._interrupted()
            if reason:
                return reason
            if rate is not None and self.store.config.lines_per_second != rate:
                return "rate"
            now = time.monotonic()
            if now >= end:
                return None
            self.b.wake.wait(min(end, self.b.deadline) - now)
            self.b.wake.clear()

    # --- stages ---
    def run(self) -> None:
        reason = self._sleep(self.store.config.stage_delay)
        if reason is None:
            began = time.monotonic()
            reason, errors, total = self._validate()
            self.b.validation_seconds = round(time.monotonic() - began, 6)
            if reason is None and errors:
                self._finish_failed(errors)
                return
        if reason is not None:
            self._finish_early(reason)
            return
        with self.store.lock:
            if self.b.cancel_requested or self.b.stop_requested:
                reason = "stop" if self.b.stop_requested else "cancel"
            else:
                self.b.status = "in_progress"
                self.b.in_progress_at = int(time.time())
                self.b.started_mono = time.monotonic()
                self.b.total = total
        if reason is not None:
            self._finish_early(reason)
            return
        self.fh.seek(0)
        self.out = open(self.store.file_path(self.out_id), "wb")
        self.err = open(self.store.file_path(self.err_id), "wb")
        try:
            reason, pending = self._process()
            if reason == "expire":
                self._write_expired(pending)
        finally:
            self.out.close()
            self.err.close()
        if reason == "stop":
            self._discard_outputs()
        elif reason == "cancel":
            self._finish_cancelled()
        elif reason == "expire":
            self._finish_expired()
        else:
            self._finish_completed()

    def _validate(self) -> tuple[str | None, list[dict[str, Any]], int]:
        """Check every line once; errors name the line. Returns (interruption, errors, total)."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        total = 0

        def add(lineno: int, code: str, message: str) -> None:
            errors.append({"code": code, "message": message, "line": lineno, "param": None})

        for lineno, raw in enumerate(self.fh, 1):
            if lineno % _CHECK_EVERY == 0:
                reason = self._interrupted()
                if reason:
                    return reason, errors, total
            if len(errors) >= MAX_LISTED_ERRORS:
                break
            if not raw.strip():
                continue
            total += 1
            try:
                obj = _decode(raw)
            except msgspec.DecodeError:
                add(lineno, "invalid_json_line", f"Line {lineno} is not valid JSON.")
                continue
            if not isinstance(obj, dict):
                add(lineno, "invalid_json_line", f"Line {lineno} is not a JSON object.")
                continue
            missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
            if missing:
                names = ", ".join(missing)
                add(lineno, "missing_required_parameter", f"Line {lineno} is missing: {names}.")
                continue
            custom_id = obj["custom_id"]
            if not isinstance(custom_id, str) or not custom_id:
                add(lineno, "invalid_custom_id", f"Line {lineno}: custom_id must be a string.")
            elif custom_id in seen:
                add(
                    lineno,
                    "duplicate_custom_id",
                    f"Line {lineno}: duplicate custom_id '{custom_id}'.",
                )
            else:
                seen.add(custom_id)
            if obj["url"] != CHAT_URL:
                add(lineno, "invalid_url", f"Line {lineno}: url must be '{CHAT_URL}'.")
            if not isinstance(obj["method"], str) or obj["method"].upper() != "POST":
                add(lineno, "invalid_method", f"Line {lineno}: method must be 'POST'.")
            if not isinstance(obj["body"], dict):
                add(lineno, "invalid_body", f"Line {lineno}: body must be a JSON object.")
        if total == 0 and not errors:
            add(0, "empty_file", "The input file contains no requests.")
        if not errors and self.store.config.fail_batches:
            add(0, "batch_failed", "The batch failed at validation (emulator option fail_batches).")
        return None, errors, total

    def _process(self) -> tuple[str | None, bytes | None]:
        """Answer each line; returns (interruption, the line read but not run)."""
        store, b = self.store, self.b
        cfg = store.config
        assert self.out is not None and self.err is not None
        out_write, err_write = self.out.write, self.err.write
        models = frozenset(cfg.models)
        forced = frozenset(cfg.fail_custom_ids)
        seed, rate = cfg.fault_seed, cfg.fail_rate
        short = b.id[-8:]
        monotonic = time.monotonic
        deadline = b.deadline
        next_due = monotonic()
        n = 0
        for raw in self.fh:
            if not raw.strip():
                continue
            if b.stop_requested or b.cancel_requested or monotonic() >= deadline:
                return self._interrupted() or "expire", raw
            lps = cfg.lines_per_second
            if lps:
                now = monotonic()
                next_due = max(next_due, now - 1.0) + 1.0 / lps
                if next_due > now:
                    reason = self._sleep(next_due - now, lps)
                    if reason == "rate":  # a new pace starts now, with this line
                        reason, next_due = None, monotonic()
                    if reason:
                        return reason, raw
            n += 1
            obj = _decode(raw)
            custom_id = obj["custom_id"]
            request_id = f"req_{short}_{n}"
            if transient_fault(custom_id, seed, rate, forced) and not (
                cfg.fail_once and custom_id not in forced and custom_id in store.failed_once
            ):
                if cfg.fail_once:
                    with store.lock:
                        store.failed_once.add(custom_id)
                self.err_lines += 1
                self.transient += 1
                err_write(_encode(_transient_line(n, custom_id, request_id, self.transient)))
                err_write(b"\n")
                b.failed += 1
                continue
            status, body = respond(obj["body"], models, int(time.time()), f"chatcmpl-{short}-{n}")
            line: dict[str, Any] = {
                "id": f"batch_req_{n}",
                "custom_id": custom_id,
                "response": {"status_code": status, "request_id": request_id, "body": body},
                "error": None,
            }
            if status == 200:
                out_write(_encode(line))
                out_write(b"\n")
                b.completed += 1
            else:
                line["error"] = {"code": "invalid_request", "message": body["error"]["message"]}
                self.err_lines += 1
                err_write(_encode(line))
                err_write(b"\n")
                b.failed += 1
        return None, None

    def _write_expired(self, pending: bytes | None) -> None:
        """Every line that never ran goes to the error file as batch_expired."""
        assert self.err is not None
        lines = [pending] if pending is not None else []
        n = self.b.completed + self.b.failed
        for raw in _chain(lines, self.fh):
            if not raw.strip():
                continue
            try:
                custom_id = _decode(raw).get("custom_id")
            except (msgspec.DecodeError, AttributeError):
                continue
            n += 1
            self.err_lines += 1
            line = {
                "id": f"batch_req_{n}",
                "custom_id": custom_id,
                "response": None,
                "error": {"code": "batch_expired", "message": EXPIRED_MESSAGE},
            }
            self.err.write(_encode(line))
            self.err.write(b"\n")

    # --- endings ---
    def _register_outputs(self, always_output: bool = True) -> None:
        """Publish output (and error, if any lines) files; call under the store lock."""
        b, store = self.b, self.store
        if always_output or store.file_path(self.out_id).stat().st_size:
            store.add_file(self.out_id, f"{b.id}_output.jsonl", "batch_output")
            b.output_file_id = self.out_id
        else:
            store.remove_data_file(store.file_path(self.out_id))
        if self.err_lines:
            store.add_file(self.err_id, f"{b.id}_error.jsonl", "batch_output")
            b.error_file_id = self.err_id
        else:
            store.remove_data_file(store.file_path(self.err_id))

    def _discard_outputs(self) -> None:
        self.store.remove_data_file(self.store.file_path(self.out_id))
        self.store.remove_data_file(self.store.file_path(self.err_id))

    def _finish_failed(self, errors: list[dict[str, Any]]) -> None:
        with self.store.lock:
            if self.b.stop_requested:
                return
            cancelled = self.b.cancel_requested
            if not cancelled:
                self.b.status = "failed"
                self.b.failed_at = int(time.time())
                self.b.errors = errors
        if cancelled:
            self._finish_cancelled()

    def _finish_early(self, reason: str) -> None:
        """Interrupted before any line ran."""
        if reason == "cancel":
            self._finish_cancelled()
        elif reason == "expire":
            self.fh.seek(0)
            self.out = open(self.store.file_path(self.out_id), "wb")
            self.err = open(self.store.file_path(self.err_id), "wb")
            try:
                self._write_expired(None)
            finally:
                self.out.close()
                self.err.close()
            self._finish_expired()

    def _finish_cancelled(self) -> None:
        b = self.b
        wait = (b.cancel_mono or time.monotonic()) + self.store.config.cancel_delay
        while not b.stop_requested and time.monotonic() < wait:
            b.wake.wait(max(0.0, wait - time.monotonic()))
            b.wake.clear()
        with self.store.lock:
            if b.stop_requested:
                self._discard_outputs()
                return
            if self.out is not None:
                self._register_outputs()
            b.status = "cancelled"
            b.cancelled_at = int(time.time())
            b.finished_mono = time.monotonic()

    def _finish_expired(self) -> None:
        b = self.b
        with self.store.lock:
            if b.stop_requested:
                self._discard_outputs()
                return
            self._register_outputs()
            b.status = "expired"
            b.expired_at = int(time.time())
            b.finished_mono = time.monotonic()

    def _finish_completed(self) -> None:
        b, store = self.b, self.store
        with store.lock:
            if b.stop_requested:
                self._discard_outputs()
                return
            if b.cancel_requested:
                cancelled = True
            else:
                cancelled = False
                b.status = "finalizing"
                b.finalizing_at = int(time.time())
        if cancelled:
            self._finish_cancelled()
            return
        end = time.monotonic() + store.config.stage_delay
        while not b.stop_requested and time.monotonic() < end:
            b.wake.wait(max(0.0, end - time.monotonic()))
            b.wake.clear()
        with store.lock:
            if b.stop_requested:
                self._discard_outputs()
                return
            self._register_outputs()
            b.status = "completed"
            b.completed_at = int(time.time())
            b.finished_mono = time.monotonic()


def _chain(first: list[bytes], rest: IO[bytes]) -> Any:
    yield from first
    yield from rest


def _transient_line(n: int, custom_id: str, request_id: str, turn: int) -> dict[str, Any]:
    """A 500 or 429 (alternately) as the real service writes a transient failure."""
    if turn % 2 == 1:
        status, code, kind, message = 500, "server_error", "server_error", "Internal server error"
    else:
        status, code, kind = 429, "rate_limit_exceeded", "rate_limit_error"
        message = "Rate limit exceeded, please retry later"
    return {
        "id": f"batch_req_{n}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": request_id,
            "body": {"error": {"message": message, "type": kind}},
        },
        "error": {"code": code, "message": message},
    }
