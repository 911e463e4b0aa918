"""Typed values that tasks return and flows pass along (pydantic, so Prefect can persist them)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

# Compared case-insensitively: older responses used capitalised statuses ("InProgress").
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
DEFAULT_MAX_FILE_BYTES = 99_000_000  # a little under the service's 100 MB per file
SERVICE_MAX_FILE_BYTES = 100_000_000


class Shard(BaseModel):
    """One request file that fits the service's limits, ready to upload."""

    index: int
    path: str
    sha256: str = Field(description="Hex SHA-256 of the shard's bytes: its identity for reuse.")
    lines: int
    bytes: int
    first_line: int = Field(description="Input line number (1-based) of the shard's first line.")
    ids_path: str = Field(description="Sidecar file: the shard's custom_ids in order, one a line.")


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class TokenUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )


def parse_timestamp(value: Any) -> datetime | None:
    """Timestamps come as integers, quoted integers or ISO strings: accept each."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    text = str(value).strip()
    try:
        return datetime.fromtimestamp(float(text), tz=timezone.utc)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class BatchInfo(BaseModel):
    """A batch as the service reported it, normalised: lower-case status, parsed timestamps,
    errors as a list of strings whichever shape the service sent."""

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completion_window: str | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    errors: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def progress(self) -> str:
        counts = self.request_counts
        return f"{counts.completed + counts.failed}/{counts.total}"

    @classmethod
    def from_sdk(cls, batch: Any) -> BatchInfo:
        """Build from an ``openai.types.Batch`` without trusting its strict types."""
        raw = (
            batch.model_dump(mode="python", warnings=False)
            if hasattr(batch, "model_dump")
            else dict(batch)
        )
        counts = raw.get("request_counts") or {}
        if not isinstance(counts, dict):
            counts = dict(counts)
        return cls(
            id=str(raw["id"]),
            status=str(raw.get("status") or "unknown").lower().replace("inprogress", "in_progress"),
            input_file_id=raw.get("input_file_id"),
            output_file_id=raw.get("output_file_id"),
            error_file_id=raw.get("error_file_id"),
            completion_window=raw.get("completion_window"),
            request_counts=RequestCounts(
                total=int(counts.get("total") or 0),
                completed=int(counts.get("completed") or 0),
                failed=int(counts.get("failed") or 0),
            ),
            errors=_error_strings(raw.get("errors")),
            metadata={str(k): str(v) for k, v in (raw.get("metadata") or {}).items()},
            created_at=parse_timestamp(raw.get("created_at")),
            completed_at=parse_timestamp(raw.get("completed_at")),
            expires_at=parse_timestamp(raw.get("expires_at")),
        )


def _error_strings(errors: Any) -> list[str]:
    if not errors:
        return []
    if isinstance(errors, dict):  # OpenAI's {"object": "list", "data": [...]}
        errors = errors.get("data") or []
    out = []
    for item in errors:
        if isinstance(item, dict):
            where = f" (line {item['line']})" if item.get("line") is not None else ""
            out.append(f"{item.get('code') or 'error'}: {item.get('message') or ''}{where}")
        else:
            out.append(str(item))
    return out


class ModelInfo(BaseModel):
    id: str
    owned_by: str | None = None
    created: datetime | None = None
