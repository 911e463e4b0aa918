"""Shared test data builders."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MODEL = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"


def request(custom_id: str, text: str = "Say hello.", model: str = MODEL, **body: Any) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def requests(n: int, prefix: str = "req-", model: str = MODEL) -> list[dict]:
    return [
        request(f"{prefix}{i}", f"Question number {i}: what is {i} + {i}?", model) for i in range(n)
    ]


def write_jsonl(path: Path, rows: Iterable[dict | bytes | str], newline: bytes = b"\n") -> Path:
    with open(path, "wb") as handle:
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps(row).encode()
            elif isinstance(row, str):
                row = row.encode()
            handle.write(row + newline)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


_FLOW_GROUPS = {
    "requests": ("requests", "prompts", "prompts_path", "prompt_column", "template", "model",
                 "system_prompt", "completion_params"),
    "output": ("overwrite", "parquet", "work_dir"),
    "run": ("completion_window", "metadata", "wait", "poll_interval", "max_poll_interval",
            "timeout", "max_attempts", "check_models", "resubmit", "run_label"),
    "limits": ("max_file_bytes", "max_requests_per_file", "max_concurrency"),
}  # fmt: skip


def grouped(**options: Any) -> dict[str, Any]:
    """Flat option names (as the CLI flags have them) in the flow's parameter groups."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        group = next((g for g, names in _FLOW_GROUPS.items() if name in names), None)
        if group is None:
            out[name] = value
        else:
            out.setdefault(group, {})[name] = value
    return out


def without_native(monkeypatch: Any) -> None:
    """Run the Python check (and its helper process) instead of the compiled one (native/),
    so that the Python path keeps its own tests where the compiled check is built."""
    import prefect_kluster.tasks._lines as lines_module

    for name in (
        "native_check_block",
        "native_crlf_to_lf",
        "native_hash_ids",
        "native_join_block",
        "native_latest_entries",
        "native_gather_lines",
    ):
        monkeypatch.setattr(lines_module, name, None)


def record_prefect_requests(monkeypatch: Any) -> list[tuple[str, str]]:
    """(method, path) of every request this process sends through ``httpx.Client`` from now
    on (the Prefect client's; openai's SDK uses httpx2), in order."""
    import httpx

    sent: list[tuple[str, str]] = []
    send = httpx.Client.send

    def recording(self: httpx.Client, request: httpx.Request, *args: Any, **kwargs: Any) -> Any:
        sent.append((request.method, request.url.path))
        return send(self, request, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", recording)
    return sent
