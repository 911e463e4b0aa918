"""Prefect flows for kluster.ai batch inference."""

if __name__ != "flows":  # as `flows`, the checkout's folder only runs `python -m flows.<x>`
    # First: every synchronous flow run in the process returns when its body does.
    from prefect_kluster.flows import _heartbeats  # noqa: F401
    from prefect_kluster.flows.batch_inference import (
        BatchRunError,
        BatchRunResult,
        ShardResult,
        batch_inference,
    )
    from prefect_kluster.flows.manage import cancel_batch_flow, list_batches_flow, list_models_flow
    from prefect_kluster.flows.options import Limits, OutputOptions, RequestOptions, RunOptions
    from prefect_kluster.flows.pending import collect_batches

__all__ = [
    "BatchRunError",
    "BatchRunResult",
    "Limits",
    "OutputOptions",
    "RequestOptions",
    "RunOptions",
    "ShardResult",
    "batch_inference",
    "cancel_batch_flow",
    "collect_batches",
    "list_batches_flow",
    "list_models_flow",
]
