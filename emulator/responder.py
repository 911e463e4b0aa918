"""Deterministic stand-in for a model: input line in, output (or error) line out.

The reply depends only on the request, so tests can predict output lines exactly.
"""

from __future__ import annotations

import hashlib
from typing import Any

REPLY_PREFIX = "[kluster.ai emulator]"
SNIPPET_CHARS = 200
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def transient_fault(custom_id: str, seed: int, rate: float, forced: frozenset[str]) -> bool:
    """Whether this line fails transiently; hashed so the same input fails the same way."""
    if custom_id in forced:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{custom_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def _text_and_images(content: Any) -> tuple[str, int]:
    """Text of one message's content (plain string or list of parts) and its image count."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts: list[str] = []
    images = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images += 1
    return " ".join(texts), images


def build_reply(model: str, messages: list[Any]) -> tuple[str, int]:
    """Reply text and prompt token count (whitespace words of every message text)."""
    prompt_tokens = 0
    last_user = ""
    last_images = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        text, images = _text_and_images(message.get("content"))
        prompt_tokens += len(text.split())
        if message.get("role") == "user":
            last_user, last_images = text, images
    reply = f"{REPLY_PREFIX} {model} reply to: {last_user[:SNIPPET_CHARS]}"
    if last_images:
        reply += f" [{last_images} image{'s' if last_images != 1 else ''}]"
    return reply, prompt_tokens


def respond(
    body: Any, models: frozenset[str], created: int, completion_id: str
) -> tuple[int, dict[str, Any]]:
    """Answer one request body: (200, chat.completion) or (400, error body)."""
    if not isinstance(body, dict):
        return 400, _error_body("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or model not in models:
        return 400, _error_body(f"The model '{model}' is not supported for batch inference.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return 400, _error_body("'messages' is required and must be a non-empty list.")
    reply, prompt_tokens = build_reply(model, messages)
    words = reply.split()
    finish_reason = "stop"
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(words):
        words = words[:limit]
        reply = " ".join(words)
        finish_reason = "length"
    completion_tokens = len(words)
    return 200, {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error"}}
