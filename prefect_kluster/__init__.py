"""prefect-kluster: kluster.ai batch inference (an OpenAI-compatible Batch API) as Prefect flows.

The repository keeps the design card's folders (``blocks/``, ``tasks/``, ``flows/``); installed,
they are the subpackages ``prefect_kluster.blocks``, ``prefect_kluster.tasks`` and
``prefect_kluster.flows``. What a user imports is listed here.

Names load on first use, so the command line (``prefect_kluster.cli``) checks its arguments
in a second instead of importing Prefect first. Loaded by Prefect itself (the
``prefect.collections`` entry point, ``prefect block register -m prefect_kluster``), the
blocks are defined at once so Prefect finds them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

_WHERE = {
    "KlusterCredentials": "blocks",
    "KlusterSettings": "blocks",
    "MissingCredentialsError": "blocks",
    "BatchRunError": "flows",
    "BatchRunResult": "flows",
    "Limits": "flows",
    "OutputOptions": "flows",
    "RequestOptions": "flows",
    "RunOptions": "flows",
    "batch_inference": "flows",
    "cancel_batch_flow": "flows",
    "collect_batches": "flows",
    "list_batches_flow": "flows",
    "list_models_flow": "flows",
    "KlusterBatchJob": "flows.jobs",
    "KlusterBatchJobCancelled": "flows.jobs",
    "KlusterBatchJobError": "flows.jobs",
    "KlusterBatchJobExpired": "flows.jobs",
    "KlusterBatchJobFailed": "flows.jobs",
    "KlusterBatchJobIncomplete": "flows.jobs",
    "KlusterBatchJobRun": "flows.jobs",
    "KlusterBatchJobTimedOut": "flows.jobs",
    "run_kluster_batch_job": "flows.jobs",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if "prefect" in sys.modules:  # loaded by Prefect: define the blocks now so they register
    for _name in __all__:
        __getattr__(_name)
