"""prefect-kluster: kluster.ai batch inference (an OpenAI-compatible Batch API) as Prefect flows.

The repository keeps the design card's folders (``blocks/``, ``tasks/``, ``flows/``); installed,
they are the subpackages ``prefect_kluster.blocks``, ``prefect_kluster.tasks`` and
``prefect_kluster.flows``. What a user imports is listed here.
"""

from prefect_kluster.blocks import KlusterCredentials, KlusterSettings, MissingCredentialsError
from prefect_kluster.flows import (
    BatchRunError,
    BatchRunResult,
    batch_inference,
    cancel_batch_flow,
    collect_batches,
    list_batches_flow,
    list_models_flow,
)

__all__ = [
    "BatchRunError",
    "BatchRunResult",
    "KlusterCredentials",
    "KlusterSettings",
    "MissingCredentialsError",
    "batch_inference",
    "cancel_batch_flow",
    "collect_batches",
    "list_batches_flow",
    "list_models_flow",
]
