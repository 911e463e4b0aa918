"""Prefect flows for kluster.ai batch inference.

Names load on first use, so the command line can check its arguments before Prefect is
imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BatchRunError": "batch_inference",
    "BatchRunResult": "batch_inference",
    "ShardResult": "batch_inference",
    "batch_inference": "batch_inference",
    "Limits": "options",
    "OutputOptions": "options",
    "RequestOptions": "options",
    "RunOptions": "options",
    "cancel_batch_flow": "manage",
    "list_batches_flow": "manage",
    "list_models_flow": "manage",
    "collect_batches": "pending",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"prefect_kluster.flows.{_WHERE[name]}"), name)
