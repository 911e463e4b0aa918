"""The kluster.ai emulator, driven over real HTTP through the openai SDK (no mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from prefect_kluster.emulator import Emulator, EmulatorConfig, create_app, run_emulator
from prefect_kluster.emulator.responder import count_tokens

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
R1 = "deepseek-ai/DeepSeek-R1"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
WAIT = 60.0  # bound of every wait below: generous, so a busy machine does not fail them


# --- helpers ---
def request_line(
    custom_id: str, text: str = "Hello there", model: str = R1, **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": text},
            ],
            **body,
        },
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def wait_status(client: openai.OpenAI, batch_id: str, timeout: float = WAIT) -> Any:
    """Poll a batch until it is terminal (compared case-insensitively)."""

    def done() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status.lower() in TERMINAL else None

    return wait_for(done, timeout, f"batch {batch_id} to finish")


def jsonl(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def wire_batch(client: openai.OpenAI, batch_id: str) -> dict[str, Any]:
    """The batch JSON exactly as sent, before the SDK's lenient parsing."""
    return client.batches.with_raw_response.retrieve(batch_id).http_response.json()


def submit(client: openai.OpenAI, path: Path, **kwargs: Any) -> Any:
    with path.open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,
        completion_window=kwargs.pop("completion_window", "24h"),
        **kwargs,
    )


@pytest.fixture
def start() -> Iterator[Callable[..., Emulator]]:
    """Start emulators with given options; all stopped at test end."""
    with ExitStack() as stack:

        def _start(**options: Any) -> Emulator:
            return stack.enter_context(run_emulator(EmulatorConfig(**options)))

        yield _start


@pytest.fixture
def connect() -> Iterator[Callable[..., openai.OpenAI]]:
    """openai clients with no retries, so every injected fault is seen as it is."""
    clients: list[openai.OpenAI] = []

    def _connect(emu: Emulator, api_key: str = "test-key") -> openai.OpenAI:
        client = openai.OpenAI(base_url=emu.base_url, api_key=api_key, max_retries=0, timeout=10)
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()


@pytest.fixture
def emu(start: Callable[..., Emulator]) -> Emulator:
    return start()


@pytest.fixture
def client(emu: Emulator, connect: Callable[..., openai.OpenAI]) -> openai.OpenAI:
    return connect(emu)


# --- models and files ---
def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [
        "deepseek-ai/DeepSeek-R1",
        "deepseek-ai/DeepSeek-V3",
        "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
        "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo",
        "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo",
        "Qwen/Qwen2.5-VL-7B-Instruct",
    ]


def test_models_extended_listing_has_limits_and_prices(client: openai.OpenAI) -> None:
    plain = client.models.list().data[0].model_dump()
    assert "pricing" not in plain
    models = {m.id: m.model_dump() for m in client.models.list(extra_query={"extended": "true"})}
    r1 = models[R1]
    assert r1["name"] == "DeepSeek-R1" and r1["model_purpose"] == "text"
    assert r1["context_length"] > r1["output_length"] > 0
    assert r1["pricing"]["realtime"] == {"input": 3.0, "output": 5.0}
    windows = r1["pricing"]["asynchronous"]
    assert windows["24h"] == {"input": 2.0, "output": 3.5}
    for model in models.values():
        prices = model["pricing"]["asynchronous"]
        # Longer windows are cheaper, input and output alike.
        assert prices["24h"]["input"] > prices["48h"]["input"] > prices["72h"]["input"]
        assert prices["24h"]["output"] > prices["48h"]["output"] > prices["72h"]["output"]
    assert models["Qwen/Qwen2.5-VL-7B-Instruct"]["model_purpose"] == "multimodal"


def test_pricing_unavailable(start: Callable[..., Emulator], connect: Any) -> None:
    client = connect(start(pricing_unavailable=True))
    models = client.models.list(extra_query={"extended": "true"}).data
    assert len(models) == 6
    assert all("pricing" not in m.model_dump() for m in models)


@pytest.mark.parametrize("variant", ["has_more", "no_has_more"])
def test_ignore_after_repeats_the_first_page(
    start: Callable[..., Emulator], connect: Any, tmp_path: Path, variant: str
) -> None:
    # The batches stay validating: no output file appears between the two file listings.
    emu = start(ignore_after=variant, stage_delay=120)
    client = connect(emu)
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a")])
    ids = [submit(client, path).id for _ in range(3)][::-1]
    first = client.batches.with_raw_response.list(limit=2).http_response.json()
    again = client.batches.with_raw_response.list(limit=2, after=ids[1]).http_response.json()
    assert [b["id"] for b in again["data"]] == [b["id"] for b in first["data"]] == ids[:2]
    all_files = client.files.with_raw_response.list().http_response.json()
    files = client.files.with_raw_response.list(after=all_files["data"][0]["id"])
    files = files.http_response.json()
    assert files["data"] == all_files["data"] and len(files["data"]) >= 3
    if variant == "has_more":
        assert first["has_more"] is True and files["has_more"] is True
    else:
        assert "has_more" not in first and "has_more" not in files
    # A naive SDK iterator never ends: it sees the same ids over and over (bounded here).
    seen = []
    for batch in client.batches.list(limit=2):
        seen.append(batch.id)
        if len(seen) == 10:
            break
    assert seen[:4] == ids[:2] * 2 and len(seen) == 10


def test_models_configurable(start: Callable[..., Emulator], connect: Any) -> None:
    client = connect(start(models=["a/one", "b/two"]))
    assert [m.id for m in client.models.list()] == ["a/one", "b/two"]


def test_files_round_trip(client: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a"), request_line("b")])
    raw = path.read_bytes()
    with path.open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="batch")
    assert uploaded.bytes == len(raw)
    assert uploaded.filename == "in.jsonl"
    assert uploaded.purpose == "batch"
    assert uploaded.status is None  # the real upload response has no status
    assert isinstance(uploaded.created_at, int)

    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert list(client.files.list(purpose="batch_output")) == []
    assert client.files.content(uploaded.id).content == raw
    with client.files.with_streaming_response.content(uploaded.id) as response:
        assert b"".join(response.iter_bytes()) == raw

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve(uploaded.id)
    assert err.value.body["message"].startswith("No such file")  # type: ignore[index]
    assert err.value.response.json()["error"]["errorCode"] == 4040


def test_files_list_order_and_after(client: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a")])
    ids = []
    for _ in range(3):
        with path.open("rb") as fh:
            ids.append(client.files.create(file=fh, purpose="batch").id)
    page = client.files.list(limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2] and page.has_more is True
    assert [f.id for f in client.files.list(order="asc")] == ids
    assert [f.id for f in client.files.list(after=ids[2])] == ids[1::-1]


def test_file_too_large_refused(
    start: Callable[..., Emulator], connect: Any, tmp_path: Path
) -> None:
    emu = start(max_file_bytes=1000)
    client = connect(emu)
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(openai.BadRequestError, match="too large"), path.open("rb") as fh:
        client.files.create(file=fh, purpose="batch")
    assert emu.stats()["files"] == 0


def test_internal_filenames(start: Callable[..., Emulator], connect: Any, tmp_path: Path) -> None:
    client = connect(start(internal_filenames=True))
    path = write_jsonl(tmp_path / "mine.jsonl", [request_line("a")])
    with path.open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="batch")
    assert uploaded.filename.startswith("/data/uploads/") and uploaded.filename.endswith(".jsonl")


# --- lifecycle ---
def test_full_lifecycle(client: openai.OpenAI, tmp_path: Path) -> None:
    image_line = {
        "custom_id": "img",
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": "Qwen/Qwen2.5-VL-7B-Instruct",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Who can park here?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/p.jpg"}},
                    ],
                }
            ],
        },
    }
    rows = [
        request_line("r1", "What is the ultimate breakfast sandwich?"),
        request_line("r2", "Explain the Pythagorean theorem.", max_completion_tokens=3),
        image_line,
        request_line("bad-model", model="nope/unknown"),
        {**request_line("no-messages"), "body": {"model": R1, "messages": []}},
    ]
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", rows), metadata={"job": "t1"})
    assert batch.status == "validating"
    assert batch.metadata == {"job": "t1"}
    assert batch.expires_at == batch.created_at + 24 * 3600

    done = wait_status(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 5
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)
    for stamp in (done.in_progress_at, done.finalizing_at, done.completed_at):
        assert isinstance(stamp, int) and stamp >= done.created_at
    assert done.errors is None

    out = {line["custom_id"]: line for line in jsonl(client, done.output_file_id)}
    assert list(out) == ["r1", "r2", "img"]
    r1 = out["r1"]
    assert r1["error"] is None and r1["id"].startswith("batch_req_")
    assert r1["response"]["status_code"] == 200
    body = r1["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == R1
    reply = f"[kluster.ai emulator] {R1} reply to: What is the ultimate breakfast sandwich?"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": reply}
    assert body["choices"][0]["finish_reason"] == "stop"
    # Llama 3's tokenizer: 4 + 7 tokens of text, 5 for the request and 5 per message.
    assert count_tokens(R1, "You are terse.") == 4
    assert count_tokens(R1, "What is the ultimate breakfast sandwich?") == 7
    completion = count_tokens(R1, reply)
    assert body["usage"] == {
        "prompt_tokens": 5 + 2 * 5 + 4 + 7,
        "completion_tokens": completion,
        "total_tokens": 26 + completion,
    }
    # Parses as the SDK's own chat completion type.
    parsed = openai.types.chat.ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == reply

    short = out["r2"]["response"]["body"]
    assert short["choices"][0]["finish_reason"] == "length"
    # Cut at 3 tokens, as a model stops mid-word at its limit.
    assert short["choices"][0]["message"]["content"] == "[kluster"
    assert short["usage"]["completion_tokens"] == 3

    image_reply = out["img"]["response"]["body"]["choices"][0]["message"]["content"]
    assert image_reply.endswith("reply to: Who can park here? [1 image]")

    errors = jsonl(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad-model", "no-messages"]
    assert "messages" in errors[1]["error"]["message"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors[0]["error"]["code"] == "invalid_request"
    assert "nope/unknown" in errors[0]["error"]["message"]


def test_output_is_deterministic(client: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line(f"r{i}", f"q {i}") for i in range(5)])

    def contents() -> list[str]:
        done = wait_status(client, submit(client, path).id)
        return [
            line["response"]["body"]["choices"][0]["message"]["content"]
            for line in jsonl(client, done.output_file_id)
        ]

    assert contents() == contents()


def test_counts_rise_at_slow_rate(
    start: Callable[..., Emulator], connect: Any, tmp_path: Path
) -> None:
    client = connect(start(lines_per_second=40))
    batch = submit(
        client, write_jsonl(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(40)])
    )
    seen: list[int] = []

    def midway() -> bool:
        current = client.batches.retrieve(batch.id)
        if current.status == "in_progress":
            assert current.request_counts.total == 40
            seen.append(current.request_counts.completed)
        return len(set(seen)) >= 3 and 0 < seen[-1] < 40

    wait_for(midway, WAIT, "counts to rise while in_progress")
    assert seen == sorted(seen)
    done = wait_status(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 40


def test_invalid_input_file_fails(client: openai.OpenAI, tmp_path: Path) -> None:
    rows: list[Any] = [
        request_line("ok"),
        "this is not json",
        {"method": "POST", "url": CHAT, "body": {}},
        request_line("ok"),
        {**request_line("x"), "url": "/v1/embeddings"},
        "[1, 2]",
    ]
    batch = submit(client, write_jsonl(tmp_path / "bad.jsonl", rows))
    done = wait_status(client, batch.id)
    assert done.status == "failed"
    assert isinstance(done.failed_at, int)
    assert done.output_file_id is None
    found = {(e.line, e.code) for e in done.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "missing_required_parameter"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
        (6, "invalid_json_line"),
    }
    assert all(f"Line {e.line}" in e.message for e in done.errors.data)
    assert "custom_id" in next(e.message for e in done.errors.data if e.line == 3)


def test_cancel_keeps_partial_output(
    start: Callable[..., Emulator], connect: Any, tmp_path: Path
) -> None:
    client = connect(start(lines_per_second=50, cancel_delay=0.2))
    rows = [request_line(f"r{i}") for i in range(200)]
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", rows))
    wait_for(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3, WAIT, "progress"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert isinstance(cancelling.cancelling_at, int)
    done = wait_status(client, batch.id)
    assert done.status == "cancelled" and isinstance(done.cancelled_at, int)
    lines = jsonl(client, done.output_file_id)
    assert 3 <= len(lines) == done.request_counts.completed < 200
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(len(lines))]
    with pytest.raises(openai.BadRequestError, match="cannot be cancelled"):
        client.batches.cancel(batch.id)


def test_cancel_accepts_no_body_and_empty_body(
    start: Callable[..., Emulator], connect: Any, tmp_path: Path
) -> None:
    emu = start(lines_per_second=5)
    client = connect(emu)
    path = write_jsonl(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(50)])
    first, second = submit(client, path), submit(client, path)
    with httpx.Client(base_url=emu.base_url) as http:
        assert http.post(f"/batches/{first.id}/cancel").json()["status"] == "cancelling"
        reply = http.post(f"/batches/{second.id}/cancel", json={})
        assert reply.json()["status"] == "cancelling"
    assert wait_status(client, first.id).status == "cancelled"
    assert wait_status(client, second.id).status == "cancelled"


def test_expiry_keeps_partial_output(
    start: Callable[..., Emulator], connect: Any, tmp_path: Path
) -> None:
    # A "1h" window lasts 0.5 real seconds; 20 lines/s runs ~10 of the 60 lines.
    client = connect(start(lines_per_second=20, time_scale=7200))
    rows = [request_line(f"r{i}") for i in range(60)]
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", rows), completion_window="1h")
    assert batch.expires_at == batch.created_at + 3600
    done = wait_status(client, batch.id)
    assert done.status == "expired" and isinstance(done.expired_at, int)
    ran = jsonl(client, done.output_file_id)
    expired = jsonl(client, done.error_file_id)
    assert 0 < len(ran) < 60
    assert [line["custom_id"] for line in ran + expired] == [f"r{i}" for i in range(60)]
    assert {line["error"]["code"] for line in expired} == {"batch_expired"}
    assert expired[0]["error"]["message"] == (
        "This request could not be executed before the completion window expired."
    )


def test_completion_windows(client: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a")])
    for window in ("24h", "48h", "72h", "1h", "12h", "asap"):
        assert submit(client, path, completion_window=window).completion_window == window
    for window in ("0h", "25h", "1d", "soon"):
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            submit(client, path, completion_window=window)


def test_unknown_ids_are_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.batches.retrieve("batch_nope")
    body = err.value.response.json()
    assert body["error"]["type"] == "invalid_request_error" and "errorCode" in body["error"]
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")


# --- quirks ---
def test_string_timestamps(start: Callable[..., Emulator], connect: Any, tmp_path: Path) -> None:
    client = connect(start(string_timestamps=True))
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", [request_line("a")]))
    done = wait_status(client, batch.id)  # the SDK parses it without complaint
    assert int(done.expires_at) == int(done.created_at) + 86400
    wire = wire_batch(client, batch.id)
    for name in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "expires_at"):
        assert isinstance(wire[name], str) and wire[name].isdigit(), name
    assert wire["cancelled_at"] is None
    wire_file = client.files.with_raw_response.retrieve(batch.input_file_id).http_response.json()
    assert isinstance(wire_file["created_at"], str)


def test_errors_as_list(start: Callable[..., Emulator], connect: Any, tmp_path: Path) -> None:
    client = connect(start(errors_as_list=True))
    good = wait_status(
        client, submit(client, write_jsonl(tmp_path / "a.jsonl", [request_line("a")])).id
    )
    # Read the wire: the SDK parses these, but its model_dump() warns about the list shape.
    assert wire_batch(client, good.id)["errors"] == []
    bad = wait_status(client, submit(client, write_jsonl(tmp_path / "b.jsonl", ["nope"])).id)
    assert bad.status == "failed"
    errors = wire_batch(client, bad.id)["errors"]
    assert isinstance(errors, list) and len(errors) == 1 and "line 1" in errors[0]


def test_list_extras(start: Callable[..., Emulator], connect: Any, tmp_path: Path) -> None:
    client = connect(start(list_extras=True))
    submit(client, write_jsonl(tmp_path / "in.jsonl", [request_line("a")]))
    page = client.batches.list(limit=3).to_dict()
    assert page["object"] == "list" and len(page["data"]) == 1
    assert page["count"] == 1 and page["page"] == 1 and page["page_count"] == -1
    assert page["items_per_page"] == 9223372036854775807


def test_pre_schedule(start: Callable[..., Emulator], connect: Any, tmp_path: Path) -> None:
    client = connect(start(pre_schedule=True, stage_delay=0.2))
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", [request_line("a")]))
    assert batch.status == "pre_schedule" and batch.request_counts.total == 0
    done = wait_status(client, batch.id)
    assert done.status == "completed" and done.request_counts.total == 1


def test_capitalised_statuses(start: Callable[..., Emulator], connect: Any, tmp_path: Path) -> None:
    client = connect(start(capitalised_statuses=True, lines_per_second=20))
    rows = [request_line(f"r{i}") for i in range(10)]
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", rows))
    wait_for(lambda: client.batches.retrieve(batch.id).status == "InProgress", WAIT, "InProgress")
    assert wait_status(client, batch.id).status == "Completed"


def test_batch_list_pagination(client: openai.OpenAI, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a")])
    ids = [submit(client, path).id for _ in range(5)]
    newest_first = ids[::-1]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more is True
    assert (page.first_id, page.last_id) == (newest_first[0], newest_first[1])  # type: ignore[attr-defined]
    rest = client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data] == newest_first[2:4]
    last = client.batches.list(limit=2, after=newest_first[3])
    assert [b.id for b in last.data] == newest_first[4:] and last.has_more is False
    assert [b.id for b in client.batches.list(limit=2)] == newest_first  # auto-pagination
    assert [b.id for b in client.batches.list()] == newest_first
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)


# --- auth and faults ---
def test_api_key(start: Callable[..., Emulator], connect: Any) -> None:
    emu = start(api_key="right-key")
    assert [m.id for m in connect(emu, "right-key").models.list()]
    with pytest.raises(openai.AuthenticationError) as err:
        connect(emu, "sk-WRONG-secret-123").models.list()
    response = err.value.response
    assert response.status_code == 401
    assert response.json() == {
        "error": {
            "message": "Invalid API key provided",
            "type": "authentication_error",
            "errorCode": 4010,
        }
    }
    assert "sk-WRONG-secret-123" not in response.text
    assert "right-key" not in response.text
    # Admin routes never need the key.
    with urllib.request.urlopen(emu.base_url.replace("/v1", "/_emulator/stats")) as reply:
        assert json.load(reply)["requests"]["GET /v1/models"] == 2


def test_fault_rate_gives_429_and_500(emu: Emulator, client: openai.OpenAI) -> None:
    emu.configure(fault_rate=1.0)
    with pytest.raises(openai.RateLimitError) as rate_limited:
        client.models.list()
    assert int(rate_limited.value.response.headers["retry-after"]) == 0
    with pytest.raises(openai.InternalServerError):
        client.batches.list()
    assert emu.stats()["faults_injected"] == {"429": 1, "500": 1, "dropped": 0}
    emu.configure(fault_rate=0.0)
    assert client.models.list().data


def test_drop_rate_gives_connection_error(emu: Emulator, client: openai.OpenAI) -> None:
    emu.configure(drop_rate=1.0)
    started = time.monotonic()
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
    assert time.monotonic() - started < 5
    assert emu.stats()["faults_injected"]["dropped"] == 1
    emu.configure(drop_rate=0.0)
    assert client.models.list().data


def test_fault_before_create_creates_nothing(
    emu: Emulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    with (tmp_path / "in.jsonl").open("w") as fh:
        fh.write(json.dumps(request_line("a")) + "\n")
    with (tmp_path / "in.jsonl").open("rb") as fh:
        file_id = client.files.create(file=fh, purpose="batch").id
    emu.configure(fault_rate=1.0)
    with pytest.raises(openai.RateLimitError):
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    emu.configure(fault_rate=0.0)
    assert client.batches.list().data == []


def test_fault_after_create_loses_the_answer(
    emu: Emulator, client: openai.OpenAI, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a")])
    with path.open("rb") as fh:
        file_id = client.files.create(file=fh, purpose="batch").id
    emu.configure(fault_rate=1.0, fault_after_create=True)
    with pytest.raises(openai.RateLimitError):
        client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={"k": "v"}
        )
    emu.configure(fault_rate=0.0, drop_rate=1.0)
    with pytest.raises(openai.APIConnectionError):
        client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    emu.configure(drop_rate=0.0, fault_after_create=False)
    batches = client.batches.list().data
    assert len(batches) == 2 and batches[1].metadata == {"k": "v"}


def test_latency(start: Callable[..., Emulator], connect: Any) -> None:
    client = connect(start(latency=0.05))
    for _ in range(3):
        assert client.models.list().data


def test_fail_rate_and_fail_custom_ids(
    start: Callable[..., Emulator], connect: Any, tmp_path: Path
) -> None:
    client = connect(start(fail_rate=0.3, fault_seed=7, fail_custom_ids=["r1"]))
    path = write_jsonl(tmp_path / "in.jsonl", [request_line(f"r{i}") for i in range(100)])

    def failed_ids() -> list[str]:
        done = wait_status(client, submit(client, path).id)
        assert done.status == "completed"
        errors = jsonl(client, done.error_file_id)
        assert done.request_counts.failed == len(errors)
        assert done.request_counts.completed == 100 - len(errors)
        codes = {(e["response"]["status_code"], e["error"]["code"]) for e in errors}
        assert codes == {(500, "server_error"), (429, "rate_limit_exceeded")}
        return [e["custom_id"] for e in errors]

    first = failed_ids()
    assert "r1" in first and 15 <= len(first) <= 50
    assert failed_ids() == first  # deterministic from custom_id and seed


# --- admin, stats, embedding, CLI ---
def test_stats_and_reset(emu: Emulator, client: openai.OpenAI, tmp_path: Path) -> None:
    batch = submit(client, write_jsonl(tmp_path / "in.jsonl", [request_line("a")]))
    wait_status(client, batch.id)
    client.batches.retrieve(batch.id)
    stats = emu.stats()
    assert stats["requests"]["POST /v1/files"] == 1
    assert stats["requests"]["POST /v1/batches"] == 1
    assert stats["requests"]["GET /v1/batches/{id}"] >= 2
    assert stats["files"] == 2  # input + output
    (row,) = stats["batches"]
    assert row["id"] == batch.id and row["status"] == "completed" and row["total"] == 1
    assert row["input_file_id"] == batch.input_file_id
    assert row["processing_seconds"] >= 0 and isinstance(row["created_at"], int)
    assert row["validation_seconds"] is not None and row["validation_seconds"] >= 0

    with httpx.Client(base_url=emu.base_url.replace("/v1", "")) as http:
        changed = http.post("/_emulator/config", json={"list_extras": True}).json()
        assert changed["list_extras"] is True and emu.config.list_extras is True
        assert http.post("/_emulator/config", json={"fault_rate": 2}).status_code == 400
        assert http.post("/_emulator/reset").json() == {"ok": True}
    assert emu.stats() == {
        "requests": {},
        "faults_injected": {"429": 0, "500": 0, "dropped": 0},
        "batches": [],
        "files": 0,
    }


def test_configure_rejects_bad_values(emu: Emulator) -> None:
    with pytest.raises(ValueError):
        emu.configure(fault_rate=-1)
    with pytest.raises(ValueError):
        emu.configure(no_such_option=True)
    assert emu.config.fault_rate == 0.0


def test_create_app_returns_fastapi() -> None:
    app = create_app(EmulatorConfig())
    try:
        assert {"/v1/batches", "/v1/files", "/v1/models"} <= {r.path for r in app.routes}  # type: ignore[attr-defined]
    finally:
        app.state.store.close()


def test_cli_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", "0", "--list-extras", "--fault-rate", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("emulator listening on http://127.0.0.1:")
        base_url = first.removeprefix("emulator listening on ")
        assert base_url.endswith("/v1")
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=3)
        try:
            assert len(client.models.list().data) == 6
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exit_stops_running_batches_and_cleans_up(tmp_path: Path) -> None:
    with run_emulator(EmulatorConfig(lines_per_second=2)) as emu:
        data_dir = emu.data_dir
        with openai.OpenAI(base_url=emu.base_url, api_key="x", max_retries=0) as client:
            rows = [request_line(f"r{i}") for i in range(100)]
            batch = submit(client, write_jsonl(tmp_path / "in.jsonl", rows))
            wait_for(
                lambda: client.batches.retrieve(batch.id).status == "in_progress", WAIT, "start"
            )
        assert any(data_dir.joinpath("files").iterdir())
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 3
    assert not data_dir.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("emulator-")]


def test_data_dir_is_kept(start: Callable[..., Emulator], connect: Any, tmp_path: Path) -> None:
    store = tmp_path / "store"
    emu = start(data_dir=str(store))
    client = connect(emu)
    path = write_jsonl(tmp_path / "in.jsonl", [request_line("a")])
    with path.open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="batch")
    assert emu.data_dir == store
    assert (store / "files" / f"{uploaded.id}.jsonl").read_bytes() == path.read_bytes()
