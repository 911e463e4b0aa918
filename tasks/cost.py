"""Prices, the cost estimate made in the validation pass, the budget cap and the actual cost.

A batch job is paid when it is submitted, so its price must be known before: prices come
from the service's extended model listing (``GET /v1/models?extended=true``) or, when that
gives none, from ``BUILT_IN_PRICES`` (source and date stated); a user may override any of
them. The token counts come from the one streaming pass that validates and shards the
input (``tasks.build.shard_and_tally``, counted by ``tasks._lines.BlockCost``): prompt
tokens are estimated from each message's text without a tokenizer, answers are bounded by
each line's ``max_completion_tokens`` (else ``max_tokens``, else the model's output
limit). Nothing here imports Prefect.

How good the prompt estimate is, measured by ``python benchmarks/cost_bench.py`` against
Llama 3's and Qwen's own tokenizers (shipped in the ``quicktok`` package; the emulator bills
with them), on 2026-11-25:

- central: over whole request files, 1.02x the real prompt tokens on guide-shaped requests
  and 1.00x on multilingual ones (per line: 5% to 95% of lines within 0.76x to 1.22x).
  Per language, on real translated text (gettext catalogues): within 0.87x to 1.36x for
  Arabic, Chinese, French, German, Italian, Japanese, Korean, Portuguese, Russian, Spanish
  and Turkish with both tokenizers, Hindi 1.03x (Llama 3) and 0.63x (Qwen); scripts that
  a tokenizer barely knows (Dhivehi, Armenian, Oriya...) go as low as 0.26x.
- upper: one token per UTF-8 byte of text plus a template allowance (32 a request, 8 a
  message, 16,384 an image), which no byte-level BPE tokenizer can exceed (each token
  stands for at least one byte). Never below the real count on any line or language
  measured (1.14x at the least, for a script Llama 3 tokenizes byte by byte); about 3.5x
  to 5x for most languages' text, and about 10x the prompt of short guide-shaped requests,
  where the template allowance dominates. Answers at their limits usually weigh more.
- lower: ``LOWER_PROMPT_SHARE`` of the central prompt tokens and no answer tokens at all.

The estimate costs the validate+shard pass about a quarter of its speed (same command:
177 -> 138 MB/s on guide-shaped requests, 188 -> 138 MB/s on multilingual UTF-8 ones).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol

import msgspec
from pydantic import BaseModel, Field

from prefect_kluster.tasks._lines import LIMITED, LINES, UNLIMITED, BlockCost, prompt_tokens

__all__ = [
    "BUILT_IN_PRICES",
    "WINDOWS",
    "ActualCost",
    "BudgetExceeded",
    "CostEstimate",
    "CostRange",
    "ModelEstimate",
    "ModelPrice",
    "ModelTally",
    "PriceTable",
    "RequestTally",
    "WindowPrice",
    "actual_cost",
    "check_budget",
    "estimate_cost",
    "fetch_prices",
    "format_usd",
    "load_prices",
    "usage_by_model",
]

# The completion windows shown side by side (kluster.ai's batch windows since 2025-04).
WINDOWS: tuple[str, ...] = ("24h", "48h", "72h")
# Answer tokens assumed for a line that sets no limit, when the model's own output limit
# is unknown too (kluster's listing gives 8,192 to 32,768 for its chat models).
DEFAULT_OUTPUT_TOKENS = 32768
# The central estimate's guess at answer length, as a share of each line's limit: nothing
# before the run knows how long answers will be. The upper bound takes every limit whole.
CENTRAL_ANSWER_SHARE = 0.5
# The lower estimate's prompt tokens, as a share of the central estimate (the central one
# was at most 30% over the real count per major language; see the module docstring).
LOWER_PROMPT_SHARE = 0.7
_MILLION = Decimal(1_000_000)


# --- prices ---------------------------------------------------------------------------
class WindowPrice(BaseModel):
    """Dollars per million tokens for one completion window."""

    input: float = Field(ge=0, description="$ per million prompt tokens.")
    output: float = Field(ge=0, description="$ per million completion tokens.")


class ModelPrice(BaseModel):
    """One model's prices per completion window, and its limits where known."""

    windows: dict[str, WindowPrice] = Field(default_factory=dict)
    output_length: int | None = Field(None, description="Most tokens one answer may have.")
    context_length: int | None = None


class PriceTable(BaseModel):
    """Prices per model and window, and where they came from."""

    models: dict[str, ModelPrice] = Field(default_factory=dict)
    source: str = Field(description="Where these prices came from, and as of when.")
    from_service: bool = Field(
        False, description="True when read from the service's extended model listing."
    )

    def price(self, model: str, window: str) -> WindowPrice | None:
        entry = self.models.get(model)
        return entry.windows.get(window) if entry is not None else None

    def output_limit(self, model: str) -> int | None:
        entry = self.models.get(model)
        return entry.output_length if entry is not None else None

    def over(self, fallback: PriceTable) -> PriceTable:
        """These prices, with ``fallback``'s for models (and windows) these lack."""
        models = {name: entry.model_copy(deep=True) for name, entry in fallback.models.items()}
        for name, entry in self.models.items():
            base = models.get(name)
            if base is None:
                models[name] = entry.model_copy(deep=True)
                continue
            base.windows.update(entry.windows)
            base.output_length = entry.output_length or base.output_length
            base.context_length = entry.context_length or base.context_length
        return PriceTable(models=models, source=self.source, from_service=self.from_service)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]] | None) -> PriceTable:
        """These prices with the user's: ``{model: {window: {"input": x, "output": y}}}``."""
        if not overrides:
            return self
        models = {name: entry.model_copy(deep=True) for name, entry in self.models.items()}
        for model, windows in overrides.items():
            entry = models.setdefault(model, ModelPrice())
            for window, price in windows.items():
                entry.windows[window] = WindowPrice.model_validate(price)
        return PriceTable(
            models=models,
            source=f"{self.source}; overridden by the user for {', '.join(sorted(overrides))}",
            from_service=self.from_service,
        )


# kluster.ai's price page as of 2025-04, copied by a third party (see the project's
# reference notes): $ per million tokens, input and output alike. Used when the service's
# listing gives no prices; check it before relying on it, and override where it is stale.
BUILT_IN_PRICES = PriceTable(
    source="built-in table: kluster.ai price page, 2025-04 (third-party copy; may be stale)",
    models={
        "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo": ModelPrice(
            windows={
                "24h": WindowPrice(input=0.05, output=0.05),
                "48h": WindowPrice(input=0.04, output=0.04),
                "72h": WindowPrice(input=0.03, output=0.03),
            }
        ),
        "deepseek-ai/DeepSeek-R1": ModelPrice(
            windows={
                "24h": WindowPrice(input=3.5, output=3.5),
                "48h": WindowPrice(input=3.0, output=3.0),
                "72h": WindowPrice(input=2.5, output=2.5),
            }
        ),
    },
)


def _money(value: Any) -> float | None:
    """A price from the listing: a number, or a string such as "0.05" or "$0.05"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if isinstance(value, str):
        try:
            number = float(value.strip().lstrip("$"))
        except ValueError:
            return None
        return number if number >= 0 else None
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _model_price(entry: Mapping[str, Any]) -> ModelPrice | None:
    pricing = entry.get("pricing")
    windows: dict[str, WindowPrice] = {}
    if isinstance(pricing, Mapping) and isinstance(pricing.get("asynchronous"), Mapping):
        for window, price in pricing["asynchronous"].items():
            if not isinstance(price, Mapping):
                continue
            cost_in, cost_out = _money(price.get("input")), _money(price.get("output"))
            if cost_in is not None and cost_out is not None:
                windows[str(window)] = WindowPrice(input=cost_in, output=cost_out)
    if not windows:
        return None
    return ModelPrice(
        windows=windows,
        output_length=_int(entry.get("output_length")),
        context_length=_int(entry.get("context_length")),
    )


def fetch_prices(client: Any) -> PriceTable | None:
    """The service's prices (``GET /v1/models?extended=true``, through the openai SDK), or
    None when it answers with none or not at all: the caller falls back to the built-in
    table and says so."""
    import openai

    try:
        page = client.models.list(extra_query={"extended": "true"})
        entries = [model.model_dump() for model in page.data]
    except (openai.APIError, ValueError):
        return None
    models: dict[str, ModelPrice] = {}
    for entry in entries:
        price = _model_price(entry)
        if price is not None and isinstance(entry.get("id"), str):
            models[entry["id"]] = price
    if not models:
        return None
    return PriceTable(
        models=models,
        source="the service's model listing (GET /v1/models?extended=true)",
        from_service=True,
    )


def load_prices(
    client: Any | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> PriceTable:
    """The prices to use: the service's (built-in ones filling the gaps) when it gives any,
    else the built-in table; then the user's ``overrides`` on top."""
    fetched = fetch_prices(client) if client is not None else None
    table = fetched.over(BUILT_IN_PRICES) if fetched is not None else BUILT_IN_PRICES
    return table.with_overrides(overrides)


# --- what the validation pass counted -------------------------------------------------
class ModelTally(BaseModel):
    """One model's requests as the validation pass counted them."""

    lines: int = 0
    prompt_tokens_central: int = 0
    prompt_tokens_upper: int = 0
    completion_tokens_limited: int = Field(
        0, description="Sum of the answer limits of the lines that set one."
    )
    lines_without_limit: int = Field(0, description="Lines that set no answer limit.")


class RequestTally(BaseModel):
    """Per model: lines, prompt tokens and answer limits of a request file."""

    models: dict[str, ModelTally] = Field(default_factory=dict)

    @classmethod
    def from_block_cost(cls, cost: BlockCost) -> RequestTally:
        models = {}
        for model, counts in sorted(cost.models.items()):
            central, upper = prompt_tokens(counts)
            models[model] = ModelTally(
                lines=counts[LINES],
                prompt_tokens_central=round(central),
                prompt_tokens_upper=upper,
                completion_tokens_limited=counts[LIMITED],
                lines_without_limit=counts[UNLIMITED],
            )
        return cls(models=models)


# --- the estimate ---------------------------------------------------------------------
class CostRange(BaseModel):
    """Dollars: lower, central and upper estimates."""

    lower: float
    central: float
    upper: float


class ModelEstimate(BaseModel):
    model: str
    lines: int
    prompt_tokens_central: int
    prompt_tokens_upper: int
    completion_tokens_upper: int = Field(description="Every answer at its limit.")
    output_limit_used: int | None = Field(
        None, description="The answer limit assumed for lines that set none."
    )
    cost: dict[str, CostRange] = Field(
        default_factory=dict, description="Per completion window; empty when unpriced."
    )


class CostEstimate(BaseModel):
    """A request file's cost per model and completion window, before anything is paid."""

    models: list[ModelEstimate] = Field(default_factory=list)
    windows: list[str] = Field(default_factory=lambda: list(WINDOWS))
    price_source: str
    prices_from_service: bool
    unpriced_models: list[str] = Field(
        default_factory=list, description="Models with no price for some shown window."
    )

    def _total(self, window: str, which: str) -> float:
        return float(
            sum(
                (
                    Decimal(str(getattr(m.cost[window], which)))
                    for m in self.models
                    if window in m.cost
                ),
                Decimal(0),
            )
        )

    def lower_usd(self, window: str = "24h") -> float:
        return self._total(window, "lower")

    def central_usd(self, window: str = "24h") -> float:
        return self._total(window, "central")

    def upper_usd(self, window: str = "24h") -> float:
        """The most the file can cost in ``window`` (models with a price only)."""
        return self._total(window, "upper")

    def costliest(self, window: str = "24h", count: int = 3) -> list[ModelEstimate]:
        priced = [m for m in self.models if window in m.cost]
        priced.sort(key=lambda m: m.cost[window].upper, reverse=True)
        return priced[:count]

    def summary_line(self, window: str = "24h") -> str:
        text = (
            f"{format_usd(self.central_usd(window))} (at most {format_usd(self.upper_usd(window))})"
            f" in {window}"
        )
        if self.unpriced_models:
            text += f"; no price for {', '.join(self.unpriced_models)}"
        return text

    def to_markdown(self) -> str:
        """The estimate as a markdown table (for the run's artifact and the CLI)."""
        head = ["Model", "Lines", "Prompt tokens (est. / at most)", "Answer tokens at most"]
        head += [f"{w}: est. (at most)" for w in self.windows]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def cells(m: ModelEstimate) -> list[str]:
            return [
                f"{format_usd(m.cost[w].central)} ({format_usd(m.cost[w].upper)})"
                if w in m.cost
                else "no price"
                for w in self.windows
            ]

        for m in self.models:
            row = [
                f"`{m.model}`",
                f"{m.lines:,}",
                f"{m.prompt_tokens_central:,} / {m.prompt_tokens_upper:,}",
                f"{m.completion_tokens_upper:,}",
                *cells(m),
            ]
            rows.append("| " + " | ".join(row) + " |")
        total = [
            "**total**",
            f"{sum(m.lines for m in self.models):,}",
            f"{sum(m.prompt_tokens_central for m in self.models):,} / "
            f"{sum(m.prompt_tokens_upper for m in self.models):,}",
            f"{sum(m.completion_tokens_upper for m in self.models):,}",
            *(
                f"**{format_usd(self.central_usd(w))}** ({format_usd(self.upper_usd(w))})"
                for w in self.windows
            ),
        ]
        rows.append("| " + " | ".join(total) + " |")
        notes = [
            "",
            f"Prices: {self.price_source}"
            + ("" if self.prices_from_service else " (the service gave no prices)")
            + ".",
            "Est.: prompt tokens estimated from the text, answers at half their limit. "
            "At most: one token per byte of text and every answer at its limit.",
        ]
        unlimited = [m for m in self.models if m.output_limit_used is not None]
        if unlimited:
            notes.append(
                "Lines without max_completion_tokens count at the model's output limit: "
                + ", ".join(f"`{m.model}` {m.output_limit_used:,} tokens" for m in unlimited)
                + ". Set max_completion_tokens to lower the bound."
            )
        if self.unpriced_models:
            notes.append(
                f"No price known for {', '.join(f'`{m}`' for m in self.unpriced_models)}: "
                "give one with the price overrides."
            )
        return "\n".join(rows + notes)


def estimate_cost(
    tally: RequestTally, prices: PriceTable, windows: Iterable[str] = WINDOWS
) -> CostEstimate:
    """Price what the validation pass counted, per model and window (give the run's own
    window among ``windows`` if it is not one of the usual three)."""
    shown = list(dict.fromkeys(windows))
    estimates: list[ModelEstimate] = []
    unpriced: list[str] = []
    for model, t in tally.models.items():
        limit = None
        if t.lines_without_limit:
            limit = prices.output_limit(model) or DEFAULT_OUTPUT_TOKENS
        answers_upper = t.completion_tokens_limited + t.lines_without_limit * (limit or 0)
        prompt_central = Decimal(t.prompt_tokens_central)
        prompt_upper = Decimal(t.prompt_tokens_upper)
        costs: dict[str, CostRange] = {}
        for window in shown:
            price = prices.price(model, window)
            if price is None:
                continue
            p_in, p_out = Decimal(str(price.input)), Decimal(str(price.output))
            lower = prompt_central * Decimal(str(LOWER_PROMPT_SHARE)) * p_in
            central = prompt_central * p_in + (
                Decimal(answers_upper) * Decimal(str(CENTRAL_ANSWER_SHARE)) * p_out
            )
            upper = prompt_upper * p_in + Decimal(answers_upper) * p_out
            costs[window] = CostRange(
                lower=float(lower / _MILLION),
                central=float(central / _MILLION),
                upper=float(upper / _MILLION),
            )
        if len(costs) < len(shown):
            unpriced.append(model)
        estimates.append(
            ModelEstimate(
                model=model,
                lines=t.lines,
                prompt_tokens_central=t.prompt_tokens_central,
                prompt_tokens_upper=t.prompt_tokens_upper,
                completion_tokens_upper=answers_upper,
                output_limit_used=limit,
                cost=costs,
            )
        )
    return CostEstimate(
        models=estimates,
        windows=shown,
        price_source=prices.source,
        prices_from_service=prices.from_service,
        unpriced_models=unpriced,
    )


def format_usd(amount: float) -> str:
    """Dollars for people: cents above a dime, more digits for small amounts."""
    if amount == 0:
        return "$0"
    if abs(amount) >= 0.1:
        return f"${amount:,.2f}"
    return f"${amount:.6f}".rstrip("0")


# --- the cap --------------------------------------------------------------------------
class BudgetExceeded(Exception):
    """The run could cost more than the cap allows; nothing was uploaded."""

    def __init__(self, estimate: CostEstimate, max_cost: float, window: str) -> None:
        self.estimate = estimate
        self.max_cost = max_cost
        self.window = window
        self.upper_usd = estimate.upper_usd(window)
        costly = ", ".join(
            f"{m.model} {format_usd(m.cost[window].upper)}" for m in estimate.costliest(window)
        )
        self.unpriced = [m.model for m in estimate.models if window not in m.cost]
        if self.unpriced:
            reason = (
                f"no price is known for {', '.join(self.unpriced)} in {window}, so "
                f"the cost cannot be held under the cap of {format_usd(max_cost)}; give its "
                f"price with the price overrides (priced models: at most "
                f"{format_usd(self.upper_usd)})"
            )
        else:
            reason = (
                f"the estimated cost is at most {format_usd(self.upper_usd)} in {window} "
                f"(central estimate {format_usd(estimate.central_usd(window))}), over the cap "
                f"of {format_usd(max_cost)}"
            )
        super().__init__(
            f"Refused before any upload: {reason}. Costliest models: {costly or 'none'}. "
            "Raise max_cost, choose a longer window or a cheaper model, set "
            "max_completion_tokens, or split the file."
        )


def check_budget(estimate: CostEstimate, max_cost: float | None, window: str) -> None:
    """Raise ``BudgetExceeded`` if the upper estimate in ``window`` is over ``max_cost``
    (or a model has no price there, so no bound is known)."""
    if max_cost is None:
        return
    unpriced = any(window not in m.cost for m in estimate.models)
    if unpriced or estimate.upper_usd(window) > max_cost:
        raise BudgetExceeded(estimate, max_cost, window)


# --- what was spent -------------------------------------------------------------------
class _Usage(Protocol):
    prompt_tokens: int
    completion_tokens: int


class ActualCost(BaseModel):
    """Dollars spent, from the results' usage and the window's prices."""

    total_usd: float
    window: str
    models: dict[str, float] = Field(default_factory=dict)
    price_source: str
    unpriced_models: list[str] = Field(
        default_factory=list, description="Models used with no known price (not in total)."
    )


def actual_cost(usage: Mapping[str, _Usage], prices: PriceTable, window: str) -> ActualCost:
    """Usage per model times the window's price per token, exactly (decimal arithmetic)."""
    per_model: dict[str, float] = {}
    unpriced: list[str] = []
    total = Decimal(0)
    for model, used in sorted(usage.items()):
        price = prices.price(model, window)
        if price is None:
            if used.prompt_tokens or used.completion_tokens:
                unpriced.append(model)
            continue
        cost = (
            Decimal(used.prompt_tokens) * Decimal(str(price.input))
            + Decimal(used.completion_tokens) * Decimal(str(price.output))
        ) / _MILLION
        per_model[model] = float(cost)
        total += cost
    return ActualCost(
        total_usd=float(total),
        window=window,
        models=per_model,
        price_source=prices.source,
        unpriced_models=unpriced,
    )


class _JoinedUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _JoinedCostLine(msgspec.Struct):
    model: str | None = None
    usage: _JoinedUsage | None = None


def usage_by_model(joined_path: str | os.PathLike[str]) -> dict[str, _JoinedUsage]:
    """Usage per model from a joined results file (one streaming read). The join could
    count this itself in its own pass; until it does, this reads the file once more."""
    import fsspec

    decode = msgspec.json.Decoder(_JoinedCostLine).decode
    totals: dict[str, _JoinedUsage] = {}
    with fsspec.open(os.fspath(joined_path), "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            line = decode(raw)
            if line.usage is None or line.model is None:
                continue
            total = totals.setdefault(line.model, _JoinedUsage())
            total.prompt_tokens += line.usage.prompt_tokens
            total.completion_tokens += line.usage.completion_tokens
            total.total_tokens += line.usage.total_tokens
    return totals
