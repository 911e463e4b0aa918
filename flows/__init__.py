"""Prefect flows for kluster.ai batch inference."""

import warnings

from flows.batch_inference import BatchRunError, BatchRunResult, ShardResult, batch_inference
from flows.manage import cancel_batch_flow, list_batches_flow, list_models_flow
from flows.pending import collect_batches

# `python -m flows.batch_inference` imports this package, and so that module, before
# running the file again as __main__; its __main__ block hands over to the copy imported
# here, so one copy is used and runpy's warning about the second is only noise.
warnings.filterwarnings(
    "ignore", message="'flows.batch_inference' found in sys.modules", category=RuntimeWarning
)

__all__ = [
    "BatchRunError",
    "BatchRunResult",
    "ShardResult",
    "batch_inference",
    "cancel_batch_flow",
    "collect_batches",
    "list_batches_flow",
    "list_models_flow",
]
