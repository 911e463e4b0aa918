"""Synthetic, deterministic benchmark data: guide-shaped request lines and result lines.

Requests look like the kluster.ai guide's examples (``json.dumps`` spacing, a system and a
user message, ``max_completion_tokens``; some with image parts, temperature or a
conversation turn), with varying custom_ids and models. Results look like the emulator's
output file (compact JSON, a chat.completion body with usage). Everything comes from a
fixed seed, so two runs measure the same bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from prefect_kluster.emulator.config import DEFAULT_MODELS

SEED = 20240611
MODELS = DEFAULT_MODELS  # the emulator serves these, so every line is valid there
SYSTEMS = (
    "You are an experienced cook.",
    "You are a maths tutor.",
    "You are a multilingual, experienced maths tutor.",
    "You are a helpful assistant that answers briefly.",
    "You summarise support tickets in one sentence.",
    "Eres un asistente que responde en espa\u00f1ol.",
)
WORDS = (
    "what is the ultimate breakfast sandwich explain pythagorean theorem in spanish "
    "summarise this ticket the customer says their order arrived late and the box was "
    "damaged please classify sentiment of review translate into french list three facts "
    'about rivers why is the sky blue write a haiku about autumn "quoted" caf\u00e9 '
    "na\u00efve r\u00e9sum\u00e9 50% off 3/4 cup"
).split()
IMAGE_URL = (
    "https://github.com/kluster-ai/docs/blob/main/images/get-started/start-building/"
    "parking-image.jpg?raw=true"
)


def _id(rng: random.Random, i: int) -> str:
    kind = i % 4
    if kind == 0:
        return f"request-{i}"
    if kind == 1:
        return f"ticket-{rng.getrandbits(48):012x}-{i}"
    if kind == 2:
        return f"doc/{i // 1000}/{i % 1000}"
    return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{i:010d}"


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def request_dicts(n: int, seed: int = SEED) -> Iterator[dict]:
    """``n`` guide-shaped request dicts with unique custom_ids."""
    rng = random.Random(seed)
    for i in range(n):
        model = MODELS[rng.randrange(len(MODELS))]
        messages: list[dict] = []
        if rng.random() < 0.7:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        if model.startswith("Qwen") and rng.random() < 0.5:
            content: object = [
                {"type": "text", "text": _text(rng, 4, 12)},
                {"type": "image_url", "image_url": {"url": IMAGE_URL}},
            ]
        else:
            content = _text(rng, 2, 9)
        messages.append({"role": "user", "content": content})
        if rng.random() < 0.05:
            messages.append({"role": "assistant", "content": _text(rng, 3, 10)})
            messages.append({"role": "user", "content": _text(rng, 3, 10)})
        body: dict = {"model": model, "messages": messages, "max_completion_tokens": 1000}
        if rng.random() < 0.3:
            body["temperature"] = round(rng.random(), 2)
        yield {
            "custom_id": _id(rng, i),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }


def write_requests(path: Path, n: int, seed: int = SEED) -> int:
    """Write ``n`` request lines the guide's way (``json.dumps`` + newline); returns bytes."""
    size = 0
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for request in request_dicts(n, seed):
            line = json.dumps(request) + "\n"
            handle.write(line)
            size += len(line.encode())
    return Path(path).stat().st_size


def _ok_line(n: int, custom_id: str, model: str, rng: random.Random) -> dict:
    reply = _text(rng, 4, 24)
    prompt, completion = rng.randint(10, 60), len(reply.split())
    return {
        "id": f"batch_req_{n}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": f"req_bench_{n}",
            "body": {
                "id": f"chatcmpl-bench-{n}",
                "object": "chat.completion",
                "created": 1733832777 + n // 1000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop" if rng.random() < 0.95 else "length",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            },
        },
        "error": None,
    }


def _error_line(n: int, custom_id: str, model: str, turn: int) -> dict:
    if turn % 3 == 0:
        status, code, message = 400, "invalid_request", f"The model '{model}' is not supported."
        body: dict = {"error": {"message": message, "type": "invalid_request_error"}}
    elif turn % 3 == 1:
        status, code, message = 500, "server_error", "Internal server error"
        body = {"error": {"message": message, "type": "server_error"}}
    else:
        status, code = 429, "rate_limit_exceeded"
        message = "Rate limit exceeded, please retry later"
        body = {"error": {"message": message, "type": "rate_limit_error"}}
    return {
        "id": f"batch_req_{n}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_bench_{n}", "body": body},
        "error": {"code": code, "message": message},
    }


def write_results(
    n: int,
    output_path: Path,
    error_path: Path,
    seed: int = SEED,
    error_every: int = 997,
    missing_every: int = 4999,
    window: int = 64,
) -> tuple[int, int]:
    """Result lines for ``request_dicts(n, seed)``, the way a service writes them.

    Output lines come in a lightly shuffled order (each block of ``window`` lines is
    shuffled, as parallel workers finish out of turn); every ``error_every``-th request
    goes to the error file instead, and every ``missing_every``-th has no result at all.
    Returns (output bytes, error bytes).
    """
    rng = random.Random(seed + 1)
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    errors = 0
    block: list[str] = []
    with (
        open(output_path, "w", encoding="utf-8") as out,
        open(error_path, "w", encoding="utf-8") as err,
    ):

        def flush() -> None:
            rng.shuffle(block)
            out.writelines(block)
            block.clear()

        for line_no, request in enumerate(request_dicts(n, seed), start=1):
            custom_id, model = request["custom_id"], request["body"]["model"]
            if line_no % missing_every == 0:
                continue
            if line_no % error_every == 0:
                errors += 1
                err.write(encode(_error_line(line_no, custom_id, model, errors)) + "\n")
                continue
            block.append(encode(_ok_line(line_no, custom_id, model, rng)) + "\n")
            if len(block) >= window:
                flush()
        flush()
    return Path(output_path).stat().st_size, Path(error_path).stat().st_size
