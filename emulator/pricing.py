"""What the emulator says about its models: limits and per-window prices.

``GET /v1/models?extended=true`` on kluster.ai adds, per model, ``name``,
``context_length``, ``output_length``, ``model_purpose`` and ``pricing`` (dollars per
million tokens, realtime and per completion window; longer windows cheaper). The figures
here are the emulator's own, plausible but deliberately not the built-in table of
``prefect_kluster.tasks.cost``, so a test can tell which of the two a price came from.
"""

from __future__ import annotations

from typing import Any

# model -> (purpose, context_length, output_length, realtime (in, out),
#           {window: (in, out)}) in $ per million tokens.
_Price = tuple[float, float]
MODEL_INFO: dict[str, tuple[str, int, int, _Price, dict[str, _Price]]] = {
    "deepseek-ai/DeepSeek-R1": (
        "text",
        163840,
        32768,
        (3.0, 5.0),
        {"24h": (2.0, 3.5), "48h": (1.6, 3.0), "72h": (1.2, 2.5)},
    ),
    "deepseek-ai/DeepSeek-V3": (
        "text",
        163840,
        16384,
        (1.25, 1.25),
        {"24h": (0.8, 1.0), "48h": (0.6, 0.8), "72h": (0.5, 0.7)},
    ),
    "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo": (
        "text",
        131072,
        8192,
        (0.18, 0.18),
        {"24h": (0.06, 0.07), "48h": (0.045, 0.055), "72h": (0.035, 0.04)},
    ),
    "klusterai/Meta-Llama-3.1-405B-Instruct-Turbo": (
        "text",
        131072,
        8192,
        (3.5, 3.5),
        {"24h": (0.99, 1.2), "48h": (0.79, 1.0), "72h": (0.59, 0.8)},
    ),
    "klusterai/Meta-Llama-3.3-70B-Instruct-Turbo": (
        "text",
        131072,
        8192,
        (0.7, 0.7),
        {"24h": (0.2, 0.25), "48h": (0.15, 0.2), "72h": (0.1, 0.15)},
    ),
    "Qwen/Qwen2.5-VL-7B-Instruct": (
        "multimodal",
        32768,
        8192,
        (0.3, 0.3),
        {"24h": (0.1, 0.12), "48h": (0.08, 0.1), "72h": (0.06, 0.08)},
    ),
}
# A model configured into the emulator but not listed above.
DEFAULT_INFO: tuple[str, int, int, _Price, dict[str, _Price]] = (
    "text",
    131072,
    8192,
    (0.5, 0.5),
    {"24h": (0.2, 0.2), "48h": (0.15, 0.15), "72h": (0.1, 0.1)},
)


def _price(pair: _Price) -> dict[str, float]:
    return {"input": pair[0], "output": pair[1]}


def extended_model(model: str) -> dict[str, Any]:
    """The extra fields the real service adds to a model entry with ``extended=true``."""
    purpose, context, output, realtime, windows = MODEL_INFO.get(model, DEFAULT_INFO)
    return {
        "name": model.split("/")[-1],
        "context_length": context,
        "output_length": output,
        "model_purpose": purpose,
        "tags": [],
        "status": "active",
        "pricing": {
            "realtime": _price(realtime),
            "asynchronous": {window: _price(pair) for window, pair in windows.items()},
        },
    }


def window_price(model: str, window: str) -> tuple[float, float] | None:
    """(input, output) $ per million tokens the emulator charges for ``window``."""
    return MODEL_INFO.get(model, DEFAULT_INFO)[4].get(window)
