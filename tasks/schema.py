"""Typed shapes of the JSONL lines going to and coming back from the service.

msgspec Structs, because decoding a line into one of these is both the validation and
the fastest way to read it (about 4x pydantic and faster than orjson + checks, measured
on these machines; see shared/NOTES.md). Unknown fields are ignored, so any chat
completion parameter passes through untouched.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

NonEmptyStr = Annotated[str, Meta(min_length=1)]

CHAT_COMPLETIONS_URL = "/v1/chat/completions"


class ImageURL(Struct):
    url: NonEmptyStr


class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class ImagePart(Struct, tag_field="type", tag="image_url"):
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class Message(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Meta(min_length=1)]


class RequestBody(Struct):
    model: NonEmptyStr
    messages: Annotated[list[Message], Meta(min_length=1)]
    # Read for the cost estimate (the answer's token limit); the service prefers the first.
    max_completion_tokens: Annotated[int, Meta(ge=0)] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None


class RequestLine(Struct):
    """One line of a batch request file."""

    custom_id: NonEmptyStr
    method: Literal["POST"]
    url: Literal["/v1/chat/completions"]
    body: RequestBody


# The same request line with each message's content left as raw JSON, checked separately by
# ``content_decoder``: a long content that repeats (a system prompt on every line) is then
# checked once per block instead of decoded into a new str on every line.
Role = Literal["system", "developer", "user", "assistant", "tool"]
Content = str | Annotated[list[ContentPart], Meta(min_length=1)]


class RawMessage(Struct, gc=False):
    role: Role
    content: msgspec.Raw


class RawRequestBody(Struct, gc=False):
    model: NonEmptyStr
    messages: Annotated[list[RawMessage], Meta(min_length=1)]
    max_completion_tokens: Annotated[int, Meta(ge=0)] | None = None
    max_tokens: Annotated[int, Meta(ge=0)] | None = None


class RawRequestLine(Struct, gc=False):
    custom_id: NonEmptyStr
    method: Literal["POST"]
    url: Literal["/v1/chat/completions"]
    body: RawRequestBody


class CustomIdOnly(Struct):
    """Reads just the custom_id of a request or result line, skipping the rest fast."""

    custom_id: str


class Usage(Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ResultMessage(Struct):
    content: str | None = None


class ResultChoice(Struct):
    message: ResultMessage | None = None
    finish_reason: str | None = None


class ResultBody(Struct):
    """A chat.completion, or an error body in either of kluster's shapes."""

    model: str | None = None
    choices: list[ResultChoice] = []
    usage: Usage | None = None
    error: dict | str | None = None
    message: str | None = None


class ResultResponse(Struct):
    status_code: int = 0
    request_id: str | None = None
    body: ResultBody | None = None


class ResultError(Struct):
    code: str | None = None
    message: str | None = None


class ResultLine(Struct):
    """One line of an output or error file."""

    custom_id: str
    response: ResultResponse | None = None
    error: ResultError | None = None


# The join's fast read of a result line: each answer's content is kept as the raw JSON the
# service wrote (syntax checked, never turned into a str) and copied into the joined line
# as it is. Decoding a long multilingual answer into a str and encoding it again was two
# thirds of the join's time. A content that is not a JSON string or null is read again
# with ``result_decoder``, which refuses it, so this accepts what ``ResultLine`` accepts
# (except that bytes inside a string are not checked to be UTF-8: they are copied).
# Each raw shape is its typed twin with only the field leading to the content replaced.
RAW_NULL = msgspec.Raw(b"null")


class RawResultMessage(ResultMessage, gc=False):
    content: msgspec.Raw = msgspec.field(default_factory=lambda: RAW_NULL)  # type: ignore[assignment]


class RawResultChoice(ResultChoice, gc=False):
    message: RawResultMessage | None = None


class RawResultBody(ResultBody):
    choices: list[RawResultChoice] = []  # type: ignore[assignment]


class RawResultResponse(ResultResponse):
    body: RawResultBody | None = None


class RawResultLine(ResultLine):
    response: RawResultResponse | None = None


class JoinedError(Struct, omit_defaults=True):
    message: str
    code: str | None = None
    status_code: int | None = None


class JoinedLine(Struct):
    """One line of the joined results file, in input order."""

    custom_id: str
    status: Literal["ok", "error"]
    content: str | None
    finish_reason: str | None
    usage: Usage | None
    model: str | None
    error: JoinedError | None


request_decoder = msgspec.json.Decoder(RequestLine)
raw_request_decoder = msgspec.json.Decoder(RawRequestLine)
content_decoder = msgspec.json.Decoder(Content)
custom_id_decoder = msgspec.json.Decoder(CustomIdOnly)
result_decoder = msgspec.json.Decoder(ResultLine)
raw_result_decoder = msgspec.json.Decoder(RawResultLine)
joined_encoder = msgspec.json.Encoder()
