"""The batch flow's parameters, grouped as the UI's run form shows them.

``batch_inference`` keeps three plain parameters (``input_path``, ``output_path``,
``credentials_block``); everything else sits in four groups, each a section of the form:
what to run (when it is not a request file), where results go, how to run it, and limits.
In Python a group is a model or a plain dict: ``run={"wait": False}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_kluster.tasks.budget import SpendingLimit
from prefect_kluster.tasks.types import DEFAULT_MAX_FILE_BYTES

MAX_CONCURRENCY = 256  # batches at once per run; the flows' task threads are sized for it


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestOptions(_Group):
    """What to run, when it is not a request file: request dicts, or prompts and a model."""

    requests: list[dict[str, Any]] | None = Field(
        None, description="Request dicts in the batch format (custom_id, method, url, body)."
    )
    prompts: list[str] | None = Field(
        None, description="Plain user prompts; each becomes one request for `model`."
    )
    prompts_path: str | None = Field(
        None,
        description="A CSV (with a header row) or JSONL file of prompts, streamed; each row "
        "becomes one request for `model`.",
    )
    prompt_column: str = Field(
        "text", description="The column (CSV) or field (JSONL) holding the prompt text."
    )
    template: str | None = Field(
        None, description='A str.format template over a row\'s fields, e.g. "Summarise: {text}".'
    )
    model: str | None = Field(
        None, description="The model for prompts, e.g. klusterai/Meta-Llama-3.3-70B-Instruct-Turbo."
    )
    system_prompt: str | None = Field(None, description="A system message put before each prompt.")
    completion_params: dict[str, Any] | None = Field(
        None, description="Extra body fields for prompts, e.g. max_completion_tokens."
    )

    @property
    def given(self) -> bool:
        return any(x is not None for x in (self.requests, self.prompts, self.prompts_path))


class OutputOptions(_Group):
    """Where results go, besides ``output_path``."""

    overwrite: bool = Field(False, description="Replace an existing output file.")
    parquet: bool = Field(False, description="Also write a Parquet copy (needs pyarrow).")
    work_dir: str | None = Field(
        None,
        description="Where shards, the run's state and downloads go (local path or fsspec URL; "
        "default: the output path + '.work'). Any worker that reaches it can resume the run.",
    )


class RunOptions(_Group):
    """How to run it."""

    completion_window: str = Field(
        "24h", description='Passed to the service as given ("24h", "48h", "72h").'
    )
    metadata: dict[str, str] | None = Field(None, description="Key-value strings on each batch.")
    wait: bool = Field(
        True,
        description="False: submit, record the run as pending on the Prefect server and return "
        "at once; the kluster-collect-batches flow finishes it when its batches are done.",
    )
    poll_interval: float = Field(
        10.0, gt=0, description="Seconds between status checks while a batch is moving."
    )
    max_poll_interval: float | None = Field(
        None,
        gt=0,
        description="Longest pause between status checks while a batch shows no change "
        "(default: six times poll_interval).",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds the whole run may wait for its batches; when it runs out, the "
        "batches still running are cancelled and the run fails (None: no limit).",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Rounds for lines that failed for a transient reason (429, 5xx, timeout) "
        "or never ran (expired, cancelled); 1 means no retry round.",
    )
    check_models: bool = Field(
        False, description="Refuse lines whose model is not in the service's model list."
    )
    resubmit: bool = Field(
        False, description="Make new batches even if the service has batches for these inputs."
    )
    run_label: str | None = Field(
        None,
        description="Tells apart runs of the same inputs that must not share batches (set "
        "automatically by resubmit).",
    )
    estimate_only: bool = Field(
        False,
        description="Validate and price the requests, pay nothing: the estimate per model "
        "and completion window is left as an artifact.",
    )
    prices: dict[str, dict[str, dict[str, float]]] | None = Field(
        None,
        description='Price overrides, dollars per million tokens: {"model": {"24h": '
        '{"input": 0.05, "output": 0.05}}}; they win over the service\'s and the built-in '
        "prices.",
    )


class Limits(_Group):
    """Limits: money, file sizes, concurrency."""

    max_cost: float | None = Field(
        None,
        gt=0,
        description="Dollars: a run whose upper-bound estimate in its completion window is "
        "over this is refused before any upload.",
    )

    max_file_bytes: int = Field(
        DEFAULT_MAX_FILE_BYTES,
        gt=0,
        description="Largest shard file (the service takes at most 100 MB).",
    )
    max_requests_per_file: int | None = Field(
        None, gt=0, description="Most lines per shard (the free tier takes under 1000)."
    )
    max_concurrency: int = Field(
        4,
        ge=1,
        le=MAX_CONCURRENCY,
        description="How many batches run at once, in both modes (a cap keeps a rate-limited "
        "tier from expiring batches that wait in its queue).",
    )
    distribute: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="Spread the job over the work pool's workers: the shards are split into "
        'this many groups ("auto": one group per 4 shards, at most 32), each run by a '
        "child flow run of the kluster-shard-group deployment, with max_concurrency held "
        "for the whole job. None: the run takes every shard itself.",
    )


class StorageSettings(BaseSettings):
    """Set where the flow runs (the worker's environment or ``.env``), never by a run's
    parameters: ``KLUSTER_STORAGE_ROOTS`` lists the roots (comma-separated paths or URLs)
    that runs may read and write; empty means anywhere."""

    model_config = SettingsConfigDict(env_prefix="KLUSTER_", env_file=".env", extra="ignore")

    storage_roots: str = ""

    @property
    def roots(self) -> list[str]:
        return [r.strip() for r in self.storage_roots.split(",") if r.strip()]


class BudgetSettings(BaseSettings):
    """A spending limit every run shares, set where the flow runs (never a parameter):
    ``KLUSTER_BUDGET_USD`` dollars per ``KLUSTER_BUDGET_PERIOD`` (``daily`` or ``monthly``,
    UTC) for the budget named ``KLUSTER_BUDGET_NAME``. Runs reserve their upper estimate
    before paying and settle to what they spent."""

    model_config = SettingsConfigDict(env_prefix="KLUSTER_BUDGET_", env_file=".env", extra="ignore")

    usd: float | None = Field(None, gt=0)
    period: Literal["daily", "monthly"] = "monthly"
    name: str = "default"

    def limit(self) -> SpendingLimit | None:
        if self.usd is None:
            return None
        return SpendingLimit(name=self.name, limit_usd=self.usd, period=self.period)
