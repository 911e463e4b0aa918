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
from prefect_kluster.flows.jobs import (
    KlusterBatchJob,
    KlusterBatchJobCancelled,
    KlusterBatchJobError,
    KlusterBatchJobExpired,
    KlusterBatchJobFailed,
    KlusterBatchJobIncomplete,
    KlusterBatchJobRun,
    KlusterBatchJobTimedOut,
    run_kluster_batch_job,
)

__all__ = [
    "BatchRunError",
    "BatchRunResult",
    "KlusterBatchJob",
    "KlusterBatchJobCancelled",
    "KlusterBatchJobError",
    "KlusterBatchJobExpired",
    "KlusterBatchJobFailed",
    "KlusterBatchJobIncomplete",
    "KlusterBatchJobRun",
    "KlusterBatchJobTimedOut",
    "KlusterCredentials",
    "KlusterSettings",
    "MissingCredentialsError",
    "batch_inference",
    "cancel_batch_flow",
    "collect_batches",
    "list_batches_flow",
    "list_models_flow",
    "run_kluster_batch_job",
]
