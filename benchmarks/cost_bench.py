"""Benchmark: what the cost estimate costs in throughput, and how close it is to real tokens.

    .venv/bin/python benchmarks/cost_bench.py [--n 300000] [--repeat 3] [--sample 20000]

1. validate + shard N requests with and without the estimate (``shard_request_file`` vs.
   ``shard_and_tally``, the same single pass), on two files: the guide-shaped requests of
   benchmarks/data.py (mostly ASCII, ``json.dumps`` escapes) and the same requests with
   multilingual user texts written as UTF-8. Runs alternate, the fastest of ``--repeat``
   counts; MB are 10^6 bytes.
2. The prompt-token estimate against real tokenizers (Llama 3's and Qwen's, from the
   ``quicktok`` package, as the emulator bills them): per request line of both files
   (totals, the spread per line, and whether the upper bound ever fell short), and per
   language over real translated text (the gettext catalogues under /usr/share/locale,
   when the machine has them).
"""

from __future__ import annotations

import argparse
import gettext
import glob
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import MULTILINGUAL, request_dicts, write_requests  # noqa: E402

from prefect_kluster.emulator.responder import count_tokens, prompt_tokens_of  # noqa: E402
from prefect_kluster.tasks._lines import (  # noqa: E402
    MESSAGE_TOKENS,
    REQUEST_TOKENS,
    BlockCost,
    prompt_tokens,
)
from prefect_kluster.tasks.build import shard_and_tally, shard_request_file  # noqa: E402
from prefect_kluster.tasks.schema import Message, RequestBody, request_decoder  # noqa: E402


def multilingual_dicts(n: int) -> Iterator[dict]:
    """The guide-shaped requests with their user texts replaced by multilingual ones."""
    rng = random.Random(7)
    for request in request_dicts(n):
        for message in request["body"]["messages"]:
            if message["role"] != "user":
                continue
            text = " ".join(rng.choices(MULTILINGUAL, k=rng.randint(1, 3)))
            if isinstance(message["content"], str):
                message["content"] = text
            else:
                message["content"][0]["text"] = text
        yield request


def write_multilingual(path: Path, n: int) -> int:
    with open(path, "w", encoding="utf-8") as handle:
        for request in multilingual_dicts(n):
            handle.write(json.dumps(request, ensure_ascii=False) + "\n")
    return path.stat().st_size


def throughput(source: Path, work: Path, repeat: int) -> tuple[float, float]:
    """Fastest validate+shard MB/s without and with the estimate (runs alternate)."""
    size = source.stat().st_size
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeat):
        for estimate in (False, True):
            out = work / f"shards-{estimate}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            if estimate:
                shard_and_tally(source, out)
            else:
                shard_request_file(source, out)
            best[estimate] = min(best[estimate], time.perf_counter() - start)
            shutil.rmtree(out, ignore_errors=True)
    return size / best[False] / 1e6, size / best[True] / 1e6


def line_errors(source: Path, sample: int) -> dict[str, float]:
    """The estimate against the emulator's real token counts, line by line."""
    real_total = central_total = upper_total = 0.0
    ratios: list[float] = []
    short = 0
    with open(source, "rb") as handle:
        for number, raw in enumerate(handle):
            if number >= sample:
                break
            body = request_decoder.decode(raw).body
            cost = BlockCost()
            cost.add(body)
            central, upper = prompt_tokens(cost.models[body.model])
            plain = json.loads(raw)["body"]
            real = prompt_tokens_of(body.model, plain["messages"])
            real_total += real
            central_total += central
            upper_total += upper
            ratios.append(central / real)
            short += upper < real
    ratios.sort()
    return {
        "lines": min(sample, number + 1),
        "central/real": central_total / real_total,
        "upper/real": upper_total / real_total,
        "line p5": ratios[len(ratios) // 20],
        "line median": statistics.median(ratios),
        "line p95": ratios[len(ratios) * 19 // 20],
        "upper short": short,
    }


def language_errors(per_language: int = 300) -> list[tuple[str, int, float, float, float]]:
    """(language, texts, central/llama3, central/qwen, upper/max(real)) over the machine's
    gettext catalogues; empty if it has none."""
    texts: dict[str, list[str]] = {}
    for path in sorted(glob.glob("/usr/share/locale/*/LC_MESSAGES/*.mo")):
        language = path.split("/")[4]
        if language.startswith("en"):
            continue
        try:
            with open(path, "rb") as handle:
                catalogue = gettext.GNUTranslations(handle)
        except Exception:  # noqa: BLE001 - a malformed catalogue is just skipped
            continue
        bucket = texts.setdefault(language, [])
        if len(bucket) < per_language:
            bucket.extend(
                v for v in catalogue._catalog.values() if isinstance(v, str) and len(v) > 20
            )
    rows = []
    for language, items in sorted(texts.items()):
        items = items[:per_language]
        if len(items) < 50:
            continue
        cost = BlockCost()
        llama = qwen = 0
        for text in items:
            cost.add(RequestBody("m", [Message("user", text)]))
            llama += count_tokens("llama", text)
            qwen += count_tokens("qwen", text)
        central, upper = prompt_tokens(cost.models["m"])
        # Only the text: take out the template allowances the estimate adds per line.
        central -= len(items) * (REQUEST_TOKENS[0] + MESSAGE_TOKENS[0])
        upper -= len(items) * (REQUEST_TOKENS[1] + MESSAGE_TOKENS[1])
        rows.append(
            (language, len(items), central / llama, central / qwen, upper / max(llama, qwen))
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sample", type=int, default=20_000)
    parser.add_argument(
        "--languages",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure per language over the machine's gettext catalogues",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cost-bench-"))
    try:
        guide, multi = work / "guide.jsonl", work / "multilingual.jsonl"
        sizes = {"guide-shaped": write_requests(guide, args.n)}
        sizes["multilingual UTF-8"] = write_multilingual(multi, args.n)
        print(f"validate+shard, {args.n:,} lines, fastest of {args.repeat} (MB/s):")
        for name, path in (("guide-shaped", guide), ("multilingual UTF-8", multi)):
            without, with_estimate = throughput(path, work, args.repeat)
            print(
                f"  {name:20s} {sizes[name] / 1e6:7.1f} MB  without estimate {without:6.1f}"
                f"  with {with_estimate:6.1f}  ratio {with_estimate / without:.2f}"
            )
        print(
            f"\nprompt tokens, estimate vs the emulator's real count (first {args.sample:,} lines):"
        )
        for name, path in (("guide-shaped", guide), ("multilingual UTF-8", multi)):
            e = line_errors(path, args.sample)
            print(
                f"  {name:20s} total central/real {e['central/real']:.3f}  upper/real "
                f"{e['upper/real']:.2f}  per line central/real p5 {e['line p5']:.2f} median "
                f"{e['line median']:.2f} p95 {e['line p95']:.2f}  lines where upper < real: "
                f"{int(e['upper short'])}"
            )
        rows = language_errors() if args.languages else []
        if rows:
            central_l = [r[2] for r in rows]
            central_q = [r[3] for r in rows]
            print(
                f"\ntext only, {len(rows)} languages of gettext catalogues (central/real, "
                "per language; upper/real):"
            )
            major = {"de", "es", "fr", "it", "ja", "ko", "pt", "ru", "zh_CN", "ar", "hi", "tr"}
            for language, count, by_llama, by_qwen, upper in rows:
                if language in major:
                    print(
                        f"  {language:6s} {count:4d} texts  llama3 {by_llama:.2f}  "
                        f"qwen {by_qwen:.2f}  upper {upper:.2f}"
                    )
            print(
                f"  all: llama3 median {statistics.median(central_l):.2f} "
                f"(min {min(central_l):.2f}, max {max(central_l):.2f}); qwen median "
                f"{statistics.median(central_q):.2f} (min {min(central_q):.2f}, max "
                f"{max(central_q):.2f}); upper/real min {min(r[4] for r in rows):.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
