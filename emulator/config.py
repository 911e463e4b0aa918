"""Options of the kluster.ai Batch API emulator.

Every real-service quirk and every fault is an option (default off), so tests can pin the
exact behaviour they exercise and the CLI can expose each one as a flag.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODELS: tuple[str, ...] = (
    "deepseek-ai/DeepSeek-R1",
    "deepseek-ai/DeepSeek-V3",
    "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo",
    "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo",
    "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo",
    "Qwen/Qwen2.5-VL-7B-Instruct",
)


class EmulatorConfig(BaseModel):
    """All emulator options; validated on every change so a bad value never goes live."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- service basics ---
    api_key: str | None = Field(
        default=None, description="If set, requests must send 'Authorization: Bearer <key>'."
    )
    models: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MODELS), description="Models served and accepted."
    )
    data_dir: str | None = Field(
        default=None,
        description="Where files are stored; None = a fresh temp dir removed on exit.",
    )
    max_file_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1, description="Uploads larger than this get a 400."
    )

    # --- batch processing ---
    lines_per_second: float | None = Field(
        default=None, gt=0, description="Processing rate; None = as fast as possible."
    )
    time_scale: float = Field(
        default=1.0, gt=0, description="Emulated seconds per real second for the window."
    )
    cancel_delay: float = Field(
        default=0.2, ge=0, description="Seconds a batch stays 'cancelling' before 'cancelled'."
    )
    stage_delay: float = Field(
        default=0.0, ge=0, description="Real seconds spent in validating and in finalizing."
    )
    fail_rate: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of lines failing transiently (500/429)."
    )
    fail_batches: bool = Field(
        default=False,
        description="Every new batch fails at validation (a service-side failure on valid input).",
    )
    fail_once: bool = Field(
        default=False,
        description="A line that failed by fail_rate succeeds when it is sent again (transient).",
    )
    fail_custom_ids: list[str] = Field(
        default_factory=list, description="custom_ids that always fail transiently."
    )

    # --- response quirks of the real service ---
    pre_schedule: bool = Field(
        default=False, description="New batches start in 'pre_schedule' with total 0."
    )
    string_timestamps: bool = Field(
        default=False, description="Timestamps as quoted integers, as in the guide."
    )
    errors_as_list: bool = Field(
        default=False, description="Batch 'errors' as a list of strings ([] when none)."
    )
    capitalised_statuses: bool = Field(
        default=False, description="Statuses like 'InProgress' as in older responses."
    )
    list_extras: bool = Field(
        default=False, description="Batch list adds count/page/page_count/items_per_page."
    )
    internal_filenames: bool = Field(
        default=False, description="Stored filename is an internal path, not the uploaded name."
    )
    pricing_unavailable: bool = Field(
        default=False,
        description=(
            "GET /v1/models?extended=true answers the plain listing, without limits or"
            " pricing (as a service that no longer knows 'extended' would)."
        ),
    )
    ignore_after: Literal["has_more", "no_has_more"] | None = Field(
        default=None,
        description=(
            "Batch and file lists ignore 'after' and always answer the first page, with"
            " has_more true ('has_more') or with no has_more key ('no_has_more'); either"
            " makes a naive SDK list iterator loop forever."
        ),
    )

    # --- fault injection on /v1 --------------------------------------------------------------
    fault_rate: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of requests answered 429/500 alternately."
    )
    drop_rate: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of requests whose connection is dropped."
    )
    download_chunk_delay: float = Field(
        default=0.0,
        ge=0,
        description="Seconds between 16 KiB chunks of file content (slow downloads).",
    )
    latency: float = Field(
        default=0.0, ge=0, description="Max extra seconds (uniform) before answering."
    )
    fault_routes: list[str] | None = Field(
        default=None,
        description='Only these routes get faults and latency, e.g. ["POST /v1/batches"]; '
        "None = all.",
    )
    fault_seed: int = Field(default=0, description="Seed of the fault and fail_rate decisions.")
    fault_after_create: bool = Field(
        default=False,
        description="Injected faults hit after the handler ran (state changed, answer lost).",
    )
