"""Cost estimate, budget cap and actual cost, against the emulator's prices and token counts.

The emulator bills prompt and completion tokens with a real tokenizer (Llama 3's; Qwen's for
Qwen), so "the estimate's upper bound is at least the actual cost" is checked against real
token counts, over the openai SDK and real HTTP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefect_kluster.emulator import EmulatorConfig, run_emulator
from prefect_kluster.emulator.pricing import window_price
from prefect_kluster.emulator.responder import count_tokens
from prefect_kluster.tasks import _lines as line_work
from prefect_kluster.tasks import build as build_module
from prefect_kluster.tasks.build import shard_and_tally, shard_request_file
from prefect_kluster.tasks.cost import (
    BUILT_IN_PRICES,
    WINDOWS,
    BudgetExceeded,
    PriceTable,
    RequestTally,
    actual_cost,
    check_budget,
    estimate_cost,
    fetch_prices,
    load_prices,
    usage_by_model,
)
from tests.helpers import without_native

R1 = "deepseek-ai/DeepSeek-R1"
V3 = "deepseek-ai/DeepSeek-V3"
LLAMA = "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
IMAGE = "https://example.com/parking.jpg"

# Real sentences in many scripts, plus the texts tokenizers find hardest (digits, hex ids,
# code, emoji, rare scripts): the estimate's upper bound must hold on every one.
TEXTS = [
    "What is the ultimate breakfast sandwich? Answer in two sentences.",
    "Explica el teorema de Pitágoras con un ejemplo sencillo, por favor.",
    "Résume ce ticket : le client dit que sa commande est arrivée en retard et abîmée.",
    "Übersetze bitte: Die Straße ist nass, weil es die ganze Nacht geregnet hat.",
    "Объясни, почему небо голубое, простыми словами для ребёнка.",
    "请用三句话总结这篇文章的主要观点，并给出你的评价。",
    "この文章を日本語で要約してください。重要な点を三つ挙げてください。",
    "다음 리뷰의 감정을 분류하세요: 배송이 빨라서 정말 만족합니다!",
    "لخص هذه التذكرة في جملة واحدة من فضلك.",
    "कृपया इस समीक्षा की भावना को वर्गीकृत करें: उत्पाद बहुत अच्छा है।",
    "Անհրաժեշտ է թարգմանել այս նախադասությունը հայերեն։",
    "ދިވެހި ބަހުން ލިޔެފައިވާ ޖުމްލައެއް",
    "Order 4815162342 shipped on 2024-06-11 at 13:37; refund 1,299.99 of 31,415.92.",
    "ids: 3f9a1c7e-42b0-4d6f-9e8a-7b2c5d1e0f93 deadbeefcafebabe0123456789abcdef",
    "def f(x):\n    return {k: v ** 2 for k, v in x.items() if v % 3 == 0}  # squares\n",
    "Emoji test 🎉🚀👍🏽 — naïve café résumé 50% off ¾ cup ✓",
]


def line(custom_id: str, model: str, messages: list[dict], **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, **body},
    }


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def multilingual(limit: bool) -> list[dict]:
    models = (R1, V3, LLAMA, QWEN)
    rows = []
    for i, text in enumerate(TEXTS * 2):
        model = models[i % len(models)]
        body = {"max_completion_tokens": 3 + i % 7} if limit else {}
        rows.append(line(f"ml-{i}", model, [user(text)], **body))
    return rows


def images() -> list[dict]:
    rows = []
    for i in range(6):
        parts: list[dict] = [{"type": "text", "text": TEXTS[i]}]
        parts += [{"type": "image_url", "image_url": {"url": IMAGE}}] * (1 + i % 3)
        body = {"max_tokens": 20} if i % 2 else {}
        rows.append(line(f"img-{i}", QWEN, [{"role": "user", "content": parts}], **body))
    return rows


def long_system_prompts() -> list[dict]:
    system = {"role": "system", "content": "\n".join(TEXTS) * 40}  # about 40 KB
    rows = []
    for i, text in enumerate(TEXTS[:8]):
        messages = [system, user(text), {"role": "assistant", "content": TEXTS[-1]}, user("Go on.")]
        rows.append(line(f"sys-{i}", (R1, LLAMA)[i % 2], messages, max_completion_tokens=50))
    return rows


WORKLOADS = {
    "multilingual, limits set, UTF-8": (lambda: multilingual(True), False),
    "multilingual, no limits, ASCII escapes": (lambda: multilingual(False), True),
    "image parts": (images, False),
    "long system prompts": (long_system_prompts, False),
}


def write_rows(path: Path, rows: list[dict], ensure_ascii: bool) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
    return path


@pytest.fixture(scope="module")
def emu() -> Iterator[Any]:
    with run_emulator(EmulatorConfig()) as emulator:
        yield emulator


@pytest.fixture
def client(emu: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=emu.base_url, api_key="test-key", max_retries=0, timeout=10)


def run_batch(client: openai.OpenAI, path: Path, window: str = "24h") -> list[dict]:
    """Submit ``path`` as one batch and return its output lines."""
    with open(path, "rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window=window
    )
    deadline = time.monotonic() + 30
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, "batch did not finish"
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.failed == 0
    text = client.files.content(batch.output_file_id).text
    return [json.loads(row) for row in text.splitlines()]


class Used:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0


def usage_of(results: list[dict]) -> dict[str, Used]:
    usage: dict[str, Used] = {}
    for result in results:
        body = result["response"]["body"]
        used = usage.setdefault(body["model"], Used())
        used.prompt_tokens += body["usage"]["prompt_tokens"]
        used.completion_tokens += body["usage"]["completion_tokens"]
    return usage


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_upper_bound_holds_and_actual_cost_is_usage_times_price(
    workload: str, client: openai.OpenAI, tmp_path: Path
) -> None:
    make, ensure_ascii = WORKLOADS[workload]
    source = write_rows(tmp_path / "in.jsonl", make(), ensure_ascii)
    shards, tally = shard_and_tally(source, tmp_path / "shards")
    prices = load_prices(client)
    assert prices.from_service
    estimate = estimate_cost(tally, prices)
    assert not estimate.unpriced_models
    results = run_batch(client, Path(shards[0].path))
    usage = usage_of(results)

    for model, used in usage.items():
        counted = tally.models[model]
        # Token bounds per model: prompt (text bytes + template) and answers (limits).
        assert counted.prompt_tokens_upper >= used.prompt_tokens
        assert estimate.models[[m.model for m in estimate.models].index(model)].lines == (
            counted.lines
        )
        limit_total = next(m for m in estimate.models if m.model == model).completion_tokens_upper
        assert limit_total >= used.completion_tokens
    for window in WINDOWS:
        spent = actual_cost(usage, prices, window)
        # Exactly usage x price, with the emulator's own per-window price list.
        expected = Decimal(0)
        for model, used in usage.items():
            price_in, price_out = window_price(model, window)  # type: ignore[misc]
            expected += (
                used.prompt_tokens * Decimal(str(price_in))
                + used.completion_tokens * Decimal(str(price_out))
            ) / Decimal(1_000_000)
        assert spent.total_usd == float(expected) > 0
        assert spent.window == window and not spent.unpriced_models
        assert estimate.upper_usd(window) >= spent.total_usd
        assert estimate.lower_usd(window) <= spent.total_usd
        for model, dollars in spent.models.items():
            entry = next(m for m in estimate.models if m.model == model)
            assert entry.cost[window].upper >= dollars
    # A longer window is cheaper, and the table shows all three side by side.
    assert estimate.upper_usd("24h") > estimate.upper_usd("48h") > estimate.upper_usd("72h")
    table = estimate.to_markdown()
    assert all(f"{w}: est." in table for w in WINDOWS)


def test_central_estimate_is_close_on_multilingual_text(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    """The central prompt estimate, against the real tokenizer, over the whole file."""
    source = write_rows(tmp_path / "in.jsonl", multilingual(True), False)
    shards, tally = shard_and_tally(source, tmp_path / "shards")
    usage = usage_of(run_batch(client, Path(shards[0].path)))
    central = sum(m.prompt_tokens_central for m in tally.models.values())
    real = sum(u.prompt_tokens for u in usage.values())
    assert 0.7 * real <= central <= 1.3 * real, (central, real)


def test_answer_limit_falls_back_to_the_models_output_length(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    rows = [
        line("a", R1, [user("hi")], max_completion_tokens=7),
        line("b", R1, [user("hi")], max_tokens=11),
        line("c", R1, [user("hi")]),
        line("d", R1, [user("hi")], max_completion_tokens=5, max_tokens=100),
    ]
    _, tally = shard_and_tally(write_rows(tmp_path / "in.jsonl", rows, False), tmp_path / "s")
    counted = tally.models[R1]
    assert (counted.lines, counted.completion_tokens_limited, counted.lines_without_limit) == (
        4,
        7 + 11 + 5,
        1,
    )
    served = estimate_cost(tally, load_prices(client)).models[0]
    assert served.output_limit_used == 32768  # the emulator's output_length for R1
    assert served.completion_tokens_upper == 23 + 32768


def test_pricing_unavailable_uses_the_built_in_table_and_says_so(tmp_path: Path) -> None:
    with run_emulator(EmulatorConfig(pricing_unavailable=True)) as emu:
        client = openai.OpenAI(base_url=emu.base_url, api_key="k", max_retries=0)
        assert fetch_prices(client) is None
        prices = load_prices(client)
    assert prices is BUILT_IN_PRICES and not prices.from_service
    assert "2025-04" in prices.source
    rows = [line("a", LLAMA, [user("hello")], max_completion_tokens=10)]
    _, tally = shard_and_tally(write_rows(tmp_path / "in.jsonl", rows, False), tmp_path / "s")
    estimate = estimate_cost(tally, prices)
    assert not estimate.prices_from_service
    assert "built-in" in estimate.price_source
    assert "the service gave no prices" in estimate.to_markdown()
    # The built-in 24h price for Llama 3.1 8B: $0.05 per million tokens in and out.
    upper_tokens = tally.models[LLAMA].prompt_tokens_upper + 10
    assert estimate.upper_usd("24h") == pytest.approx(upper_tokens * 0.05 / 1e6)


def test_prices_when_the_listing_fails_and_with_overrides() -> None:
    config = EmulatorConfig(fault_rate=1.0, fault_routes=["GET /v1/models"])
    with run_emulator(config) as emu:
        client = openai.OpenAI(base_url=emu.base_url, api_key="k", max_retries=0)
        assert fetch_prices(client) is None
    with run_emulator(EmulatorConfig()) as emu:
        client = openai.OpenAI(base_url=emu.base_url, api_key="k", max_retries=0)
        prices = load_prices(client, {R1: {"24h": {"input": 9, "output": 10}}, "x/y": {}})
    assert prices.from_service and "overridden by the user" in prices.source
    assert prices.price(R1, "24h").input == 9  # type: ignore[union-attr]
    assert prices.price(R1, "48h").input == 1.6  # type: ignore[union-attr]  # the service's
    # A model the service does not list keeps its built-in price.
    assert load_prices(None).price(LLAMA, "72h").output == 0.03  # type: ignore[union-attr]


def test_budget_cap_names_the_estimate_the_cap_and_the_costliest_models(
    tmp_path: Path,
) -> None:
    rows = [line(f"r{i}", R1, [user(TEXTS[i])], max_completion_tokens=4000) for i in range(5)]
    rows += [line(f"l{i}", LLAMA, [user(TEXTS[i])], max_completion_tokens=10) for i in range(5)]
    _, tally = shard_and_tally(write_rows(tmp_path / "in.jsonl", rows, False), tmp_path / "s")
    estimate = estimate_cost(tally, BUILT_IN_PRICES)
    upper = estimate.upper_usd("24h")
    assert upper == pytest.approx(
        (tally.models[R1].prompt_tokens_upper + 20000) * 3.5 / 1e6
        + (tally.models[LLAMA].prompt_tokens_upper + 50) * 0.05 / 1e6
    )
    check_budget(estimate, upper, "24h")  # exactly at the cap is allowed
    check_budget(estimate, None, "24h")
    with pytest.raises(BudgetExceeded) as refused:
        check_budget(estimate, 0.05, "24h")
    message = str(refused.value)
    assert "$0.05" in message and f"${upper:,.2f}" in message
    assert message.index(R1) < message.index(LLAMA)  # costliest first
    assert refused.value.upper_usd == upper
    # A model with no price cannot be held under a cap.
    unknown = estimate_cost(tally, PriceTable(models={}, source="none"))
    assert unknown.unpriced_models == [R1, LLAMA]
    with pytest.raises(BudgetExceeded, match="no price is known"):
        check_budget(unknown, 1000.0, "24h")
    # A window the estimate was not priced for is no free pass either.
    with pytest.raises(BudgetExceeded, match=r"no price is known for .* in 1h"):
        check_budget(estimate, 1000.0, "1h")
    hourly = BUILT_IN_PRICES.with_overrides({R1: {"1h": {"input": 5, "output": 6}}})
    with pytest.raises(BudgetExceeded, match=f"no price is known for {LLAMA} in 1h"):
        check_budget(estimate_cost(tally, hourly, [*WINDOWS, "1h"]), 1000.0, "1h")


def test_estimate_adds_no_second_read_and_helper_counts_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [json.loads(json.dumps(r)) for r in multilingual(True) * 400 + images() * 200]
    for i, row in enumerate(rows):
        row["custom_id"] = f"id-{i}"
    source = write_rows(tmp_path / "in.jsonl", rows, False)
    size = source.stat().st_size
    read: list[int] = []
    real_open = build_module.open_source

    def counting_open(path: Any) -> Any:
        handle = real_open(path)
        for name in ("read", "readline"):
            original = getattr(handle, name)

            def read_and_count(n: int = -1, original: Any = original) -> bytes:
                data = original(n)
                read.append(len(data))
                return data

            setattr(handle, name, read_and_count)
        return handle

    monkeypatch.setattr(build_module, "open_source", counting_open)
    shard_request_file(source, tmp_path / "plain")
    plain = sum(read)
    read.clear()
    _, alone = shard_and_tally(source, tmp_path / "alone", max_file_bytes=200_000)
    assert sum(read) == plain == size  # one read of the input, with or without the estimate
    read.clear()
    without_native(monkeypatch)  # the helper process is the Python check's
    monkeypatch.setattr(line_work.Helper, "MIN_BYTES", 0)
    monkeypatch.setattr(line_work, "REQUEST_BLOCK_BYTES", 1 << 14)
    answered: list[int] = []
    real_unpack = build_module.unpack_checked

    def counting_unpack(blob: bytes, estimating: bool) -> Any:
        ids, cost = real_unpack(blob, estimating)
        assert estimating and cost is not None
        answered.append(len(ids))
        return ids, cost

    monkeypatch.setattr(build_module, "unpack_checked", counting_unpack)
    _, helped = shard_and_tally(source, tmp_path / "helped", max_file_bytes=200_000)
    assert sum(read) == size
    assert len(answered) > 10  # the helper process counted many of the blocks
    assert helped == alone
    assert sum(m.lines for m in alone.models.values()) == len(rows)


def test_usage_by_model_reads_a_joined_file(tmp_path: Path) -> None:
    joined = tmp_path / "joined.jsonl"
    rows = [
        {"custom_id": "a", "model": R1, "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        {"custom_id": "b", "model": R1, "usage": {"prompt_tokens": 5, "completion_tokens": 6}},
        {"custom_id": "c", "model": None, "usage": None, "status": "error"},
        {"custom_id": "d", "model": LLAMA, "usage": {"prompt_tokens": 1, "completion_tokens": 0}},
    ]
    write_rows(joined, rows, False)
    usage = usage_by_model(joined)
    assert (usage[R1].prompt_tokens, usage[R1].completion_tokens) == (8, 10)
    spent = actual_cost(usage, BUILT_IN_PRICES, "72h")
    assert spent.total_usd == float((Decimal(18) * Decimal("2.5") + Decimal("0.03")) / 10**6)


def test_tally_round_trips_as_json() -> None:
    tally = RequestTally.model_validate({"models": {R1: {"lines": 2, "prompt_tokens_upper": 9}}})
    assert RequestTally.model_validate_json(tally.model_dump_json()) == tally


def test_cost_bench_runs_and_prints_its_figures() -> None:
    """benchmarks/cost_bench.py on a small file: both speeds, their ratio, the errors."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "cost_bench.py"), "--n", "3000"]
        + ["--repeat", "1", "--sample", "500", "--no-languages"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    out = done.stdout
    assert out.count("without estimate") == 2 and out.count("ratio") == 2
    assert out.count("lines where upper < real: 0") == 2


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=200), st.sampled_from([LLAMA, QWEN]))
def test_no_text_has_more_tokens_than_utf8_bytes(text: str, model: str) -> None:
    """The upper bound's premise, for both tokenizers the emulator bills with: any text,
    any script, never more tokens than UTF-8 bytes (surrogates cannot be sent as UTF-8)."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        return
    assert count_tokens(model, text) <= size
