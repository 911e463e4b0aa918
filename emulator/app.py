"""The HTTP side: kluster.ai-compatible /v1 routes, admin routes and the fault front door."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ModuleNotFoundError:  # pragma: no cover - older python-multipart
    from multipart.exceptions import FormParserError  # type: ignore[no-redef]
    from multipart.multipart import (  # type: ignore[no-redef]
        MultipartParser,
        parse_options_header,
    )

from .config import EmulatorConfig
from .pricing import extended_model
from .responder import load_tokenizers
from .state import BatchRecord, FileRecord, Store, new_id, window_seconds
from .worker import CHAT_URL, start_worker

DOWNLOAD_CHUNK_BYTES = 16 * 1024
ERROR_CODES = {400: 4000, 401: 4010, 404: 4040, 405: 4050, 413: 4130, 429: 4290, 500: 5000}
ERROR_TYPES = {
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}
MODEL_CREATED = 1733000000


class ApiError(Exception):
    """Raised by handlers; rendered in the real service's error body shape."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or ERROR_TYPES.get(status, "invalid_request_error")


def error_body(status: int, message: str, kind: str | None = None) -> dict[str, Any]:
    kind = kind or ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "errorCode": ERROR_CODES.get(status, -1)}}


def _error_response(status: int, message: str, kind: str | None = None) -> JSONResponse:
    headers = {"retry-after": "0"} if status == 429 else None
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)


# --- front door: request counting, faults, auth ---
class FrontDoor:
    """Pure ASGI middleware so it can drop a connection and see the raw request stream."""

    def __init__(self, app: ASGIApp, store: Store, router: Router) -> None:
        self.app = app
        self.store = store
        self.router = router

    def _route_key(self, scope: Scope) -> str:
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return f"{scope['method']} {getattr(route, 'path', scope['path'])}"
        return f"{scope['method']} (unmatched)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        store = self.store
        route = self._route_key(scope)
        store.count_request(route)
        cfg = store.config
        drop, fault, delay = store.decide_fault()
        if cfg.fault_routes is not None and route not in cfg.fault_routes:
            drop = fault = False
            delay = 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        if (drop or fault) and not cfg.fault_after_create:
            await _drain(receive)
            await self._inject(drop, scope, receive, send)
            return
        if cfg.api_key is not None and not _authorised(scope, cfg.api_key):
            await _drain(receive)
            response = _error_response(401, "Invalid API key provided", "authentication_error")
            await response(scope, receive, send)
            return
        if drop or fault:
            await self.app(scope, receive, _swallow)
            await self._inject(drop, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _inject(self, drop: bool, scope: Scope, receive: Receive, send: Send) -> None:
        if drop:
            self.store.count_drop()
            await _drop_connection(receive)
            return
        status = self.store.next_fault_status()
        message = (
            "Rate limit exceeded (injected by the emulator)"
            if status == 429
            else "Internal server error (injected by the emulator)"
        )
        response = _error_response(status, message)
        await response(scope, receive, send)


def _authorised(scope: Scope, key: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return hmac.compare_digest(value, b"Bearer " + key.encode())
    return False


async def _swallow(message: Message) -> None:
    """Send target that loses the handler's answer (fault_after_create)."""


async def _drain(receive: Receive) -> None:
    """Read the request body so an early answer is not a broken pipe for the client."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _drop_connection(receive: Receive) -> None:
    """Abort the TCP connection with no HTTP response, via uvicorn's request cycle."""
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise RuntimeError("drop_rate needs the emulator to run under uvicorn")
    transport.abort()
    for _ in range(100):
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0)
    cycle.disconnected = True  # stop uvicorn from writing a 500 onto the dead socket


# --- multipart upload streamed straight to disk ---
class _UploadSink:
    """Multipart callbacks: the file part goes to disk chunk by chunk, small fields to memory."""

    def __init__(self, dest: Any, limit: int) -> None:
        self.dest = dest
        self.limit = limit
        self.size = 0
        self.too_large = False
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._buffer = bytearray()

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._buffer = bytearray()
        self._is_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._name == "file"
        if self._is_file:
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            if len(self._buffer) < 4096:
                self._buffer += data[start:end]
            return
        self.size += end - start
        if self.size > self.limit:
            self.too_large = True
        if not self.too_large:
            self.dest.write(data[start:end])

    def on_part_end(self) -> None:
        if not self._is_file:
            self.fields[self._name] = self._buffer.decode("utf-8", "replace")

    def callbacks(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in (
                "on_part_begin",
                "on_part_data",
                "on_part_end",
                "on_header_field",
                "on_header_value",
                "on_header_end",
                "on_headers_finished",
            )
        }


async def _receive_upload(request: Request, store: Store) -> FileRecord:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(400, "Expected a multipart/form-data upload with 'file' and 'purpose'.")
    file_id = new_id("file-")
    path = store.file_path(file_id)
    limit = store.config.max_file_bytes
    try:
        with open(path, "wb") as dest:
            sink = _UploadSink(dest, limit)
            parser = MultipartParser(boundary, sink.callbacks())
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                parser.finalize()
            except FormParserError as exc:
                raise ApiError(400, "Invalid multipart data.") from exc
        if sink.too_large:
            raise ApiError(
                400, f"File is too large: the maximum is {limit} bytes ({limit // 2**20} MB)."
            )
        if sink.filename is None:
            raise ApiError(400, "Missing 'file' in the upload.")
        purpose = sink.fields.get("purpose")
        if purpose != "batch":
            raise ApiError(400, f"Invalid purpose '{purpose}': only 'batch' is supported.")
    except BaseException:
        store.remove_data_file(path)
        raise
    filename = sink.filename
    if store.config.internal_filenames:
        filename = f"/data/uploads/{uuid.uuid4()}.jsonl"
    return store.add_file(file_id, filename, purpose)


# --- app ---
def _page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def _list_page(items: list[dict[str, Any]], has_more: bool, ignore_after: str | None) -> dict:
    """A list page; with ``ignore_after`` set, the broken paging of that option."""
    page = _page(items, has_more or ignore_after == "has_more")
    if ignore_after == "no_has_more":
        del page["has_more"]
    return page


def _after(records: list[Any], after: str | None) -> list[Any]:
    if after is None:
        return records
    for index, record in enumerate(records):
        if record.id == after:
            return records[index + 1 :]
    return []


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, "The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def create_app(config: EmulatorConfig | None = None) -> FastAPI:
    """Build the app and its Store; the Store is closed at the app's lifespan end."""
    store = Store(config if config is not None else EmulatorConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Before the first request is answered, as a service is ready before it takes work.
        await asyncio.to_thread(load_tokenizers, store.config.models)
        try:
            yield
        finally:
            await asyncio.to_thread(store.close)

    app = FastAPI(
        title="kluster.ai Batch API emulator",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.store = store

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return _error_response(400, "; ".join(parts) or "Invalid request.")

    def get_file(file_id: str) -> FileRecord:
        record = store.files.get(file_id)
        if record is None:
            raise ApiError(404, f"No such file: '{file_id}'.")
        return record

    def get_batch(batch_id: str) -> BatchRecord:
        batch = store.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No such batch: '{batch_id}'.")
        return batch

    # --- models ---
    @app.get("/v1/models")
    async def list_models(extended: str | None = None) -> dict[str, Any]:
        cfg = store.config
        data = [
            {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": m.split("/")[0]}
            for m in cfg.models
        ]
        if (extended or "").lower() in ("true", "1") and not cfg.pricing_unavailable:
            for entry in data:
                entry.update(extended_model(entry["id"]))
        return {"object": "list", "data": data}

    # --- files ---
    @app.post("/v1/files")
    async def upload_file(request: Request) -> dict[str, Any]:
        return store.render_file(await _receive_upload(request, store))

    @app.get("/v1/files")
    async def list_files(
        purpose: str | None = None,
        limit: int = 10000,
        order: str = "desc",
        after: str | None = None,
    ) -> dict[str, Any]:
        if not 1 <= limit <= 10000:
            raise ApiError(400, "limit must be between 1 and 10000.")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be 'asc' or 'desc'.")
        with store.lock:
            records = sorted(store.files.values(), key=lambda f: f.seq, reverse=order == "desc")
        if purpose is not None:
            records = [f for f in records if f.purpose == purpose]
        if store.config.ignore_after is None:
            records = _after(records, after)
        return _list_page(
            [store.render_file(f) for f in records[:limit]],
            len(records) > limit,
            store.config.ignore_after,
        )

    @app.get("/v1/files/{id}")
    async def retrieve_file(id: str) -> dict[str, Any]:
        return store.render_file(get_file(id))

    @app.get("/v1/files/{id}/content", response_model=None)
    async def file_content(id: str) -> FileResponse | StreamingResponse:
        record = get_file(id)
        delay = store.config.download_chunk_delay
        if not delay:
            return FileResponse(record.path, media_type="application/octet-stream")

        async def slow_chunks() -> AsyncIterator[bytes]:
            with open(record.path, "rb") as handle:
                while chunk := handle.read(DOWNLOAD_CHUNK_BYTES):
                    yield chunk
                    await asyncio.sleep(delay)

        return StreamingResponse(slow_chunks(), media_type="application/octet-stream")

    @app.delete("/v1/files/{id}")
    async def delete_file(id: str) -> dict[str, Any]:
        if not store.delete_file(id):
            raise ApiError(404, f"No such file: '{id}'.")
        return {"id": id, "object": "file", "deleted": True}

    # --- batches ---
    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise ApiError(400, "input_file_id is required.")
        endpoint = body.get("endpoint")
        if endpoint != CHAT_URL:
            raise ApiError(400, f"endpoint must be '{CHAT_URL}', got '{endpoint}'.")
        window = body.get("completion_window")
        seconds = window_seconds(window) if isinstance(window, str) else None
        if seconds is None:
            raise ApiError(
                400, f"Invalid completion_window '{window}': use 1h..24h, 48h, 72h or asap."
            )
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ApiError(400, "metadata must be an object.")
        record = get_file(input_file_id)
        if record.purpose != "batch":
            raise ApiError(400, f"File '{input_file_id}' does not have purpose 'batch'.")
        try:
            handle = open(record.path, "rb")  # noqa: SIM115 - owned by the worker thread
        except FileNotFoundError as exc:
            raise ApiError(404, f"No such file: '{input_file_id}'.") from exc
        assert isinstance(window, str)
        batch = store.new_batch(input_file_id, endpoint, window, seconds, metadata or {})
        created = store.render_batch(batch)  # before the worker can move it on
        start_worker(store, batch, handle)
        return created

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be between 1 and 100.")
        with store.lock:
            records = sorted(store.batches.values(), key=lambda b: b.seq, reverse=True)
        if store.config.ignore_after is None:
            records = _after(records, after)
        page = _list_page(
            [store.render_batch(b) for b in records[:limit]],
            len(records) > limit,
            store.config.ignore_after,
        )
        if store.config.list_extras:
            page.update(
                count=len(page["data"]),
                page=1,
                page_count=-1,
                items_per_page=9223372036854775807,
            )
        return page

    @app.get("/v1/batches/{id}")
    async def retrieve_batch(id: str) -> dict[str, Any]:
        return store.render_batch(get_batch(id))

    @app.post("/v1/batches/{id}/cancel")
    async def cancel_batch(id: str) -> dict[str, Any]:
        # The body (none, empty or {}) is ignored on purpose: the SDK sends either.
        batch = get_batch(id)
        if not store.request_cancel(batch):
            raise ApiError(400, f"Batch '{id}' is already {batch.status} and cannot be cancelled.")
        return store.render_batch(batch)

    # --- admin (no faults, no key) ---
    @app.get("/_emulator/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/_emulator/stats")
    async def stats() -> dict[str, Any]:
        return store.stats()

    @app.post("/_emulator/reset")
    async def reset() -> dict[str, Any]:
        await asyncio.to_thread(store.reset)
        return {"ok": True}

    @app.post("/_emulator/config")
    async def configure(request: Request) -> dict[str, Any]:
        changes = await _json_object(request)
        try:
            cfg = store.configure(**changes)
        except (ValidationError, ValueError) as exc:
            raise ApiError(400, str(exc)) from exc
        return cfg.model_dump()

    app.add_middleware(FrontDoor, store=store, router=app.router)
    return app
