"""Deterministic stand-in for a model: input line in, output (or error) line out.

The reply depends only on the request, so tests can predict output lines exactly.

Token counts are a real tokenizer's, so that cost estimates can be checked against them:
text is counted with Llama 3's BPE (Qwen models: Qwen's), whose vocabularies ship inside
the ``quicktok`` package (no download at run time). Around the text, a chat template's
tokens: ``PER_REQUEST_TOKENS`` once and ``PER_MESSAGE_TOKENS`` per message (Llama 3's
template: begin-of-text and the assistant header; a header and end-of-turn per message),
and ``IMAGE_TOKENS`` per image part (Qwen2.5-VL: one token per 28x28 pixels, so a
1008x1008 image). A reply is cut to the line's ``max_completion_tokens`` (else
``max_tokens``) tokens, so completion tokens never exceed the limit a line sets.
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any

import quicktok

REPLY_PREFIX = "[kluster.ai emulator]"
SNIPPET_CHARS = 200
PER_REQUEST_TOKENS = 5
PER_MESSAGE_TOKENS = 5
IMAGE_TOKENS = 1296


@cache
def _encoding(model: str) -> quicktok.Tokenizer:
    return quicktok.get_encoding("qwen3" if "qwen" in model.lower() else "llama3")


def load_tokenizers(models: list[str]) -> None:
    """Load the models' tokenizers now. Loading one holds the interpreter lock for about
    half a second (measured here), so loading them at the first batch stalled every thread
    of the process hosting the emulator, such as a flow run beside it."""
    for model in models:
        _encoding(model)


def count_tokens(model: str, text: str) -> int:
    """Tokens of ``text`` (special-token names count as plain text) for ``model``."""
    return _encoding(model).count(text) if text else 0


EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def transient_fault(custom_id: str, seed: int, rate: float, forced: frozenset[str]) -> bool:
    """Whether this line fails transiently; hashed so the same input fails the same way."""
    if custom_id in forced:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{custom_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def _text_and_images(content: Any) -> tuple[list[str], int]:
    """Text parts of one message's content (plain string or list of parts) and its image
    count."""
    if isinstance(content, str):
        return [content], 0
    if not isinstance(content, list):
        return [], 0
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
    return texts, images


def prompt_tokens_of(model: str, messages: list[Any]) -> int:
    """The prompt tokens the emulator bills for ``messages`` (see the module docstring)."""
    tokens = PER_REQUEST_TOKENS
    for message in messages:
        if not isinstance(message, dict):
            continue
        texts, images = _text_and_images(message.get("content"))
        tokens += PER_MESSAGE_TOKENS + images * IMAGE_TOKENS
        tokens += sum(count_tokens(model, text) for text in texts)
    return tokens


def build_reply(model: str, messages: list[Any]) -> tuple[str, int]:
    """Reply text and prompt token count."""
    last_user = ""
    last_images = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        texts, images = _text_and_images(message.get("content"))
        if message.get("role") == "user":
            last_user, last_images = " ".join(texts), images
    reply = f"{REPLY_PREFIX} {model} reply to: {last_user[:SNIPPET_CHARS]}"
    if last_images:
        reply += f" [{last_images} image{'s' if last_images != 1 else ''}]"
    return reply, prompt_tokens_of(model, messages)


def cut_reply(model: str, reply: str, limit: Any) -> tuple[str, int, str]:
    """The reply cut to ``limit`` tokens (if an int below its length): (text, completion
    tokens, finish_reason)."""
    encoding = _encoding(model)
    ids = encoding.encode_ordinary(reply)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(ids):
        ids = ids[:limit]
        text = encoding.decode_bytes(ids).decode("utf-8", "ignore") if ids else ""
        return text, len(ids), "length"
    return reply, len(ids), "stop"


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
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    reply, completion_tokens, finish_reason = cut_reply(model, reply, limit)
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
