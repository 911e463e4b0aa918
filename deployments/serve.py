"""Serve the kluster.ai flows from this process: no work pool, no worker.

    prefect server start                     # in another terminal; then, from here:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py              # credentials from KLUSTER_API_KEY / a block
    python deployments/serve.py --emulator   # offline: an embedded local emulator

Creates the same deployments as deployments/prefect.yaml (same names, parameters and
schedule), then runs whatever is triggered from the Prefect UI or `prefect deployment run`
until stopped with Ctrl-C. Runs start in the project root, so relative paths such as
deployments/sample-requests.jsonl resolve the same way as under a worker.

Use this or prefect.yaml on one server, not both: the deployment names are the same, and a
deployment first made by `prefect deploy` keeps its work pool when served, so its runs fail
to load their code. Delete the deployments (or use another server) before switching.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python deployments/serve.py` puts deployments/ first
    sys.path.insert(0, str(ROOT))

from prefect import serve  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.schedules import Cron, Interval  # noqa: E402

from prefect_kluster.flows.batch_inference import batch_inference  # noqa: E402
from prefect_kluster.flows.fanout import shard_group  # noqa: E402
from prefect_kluster.flows.manage import cancel_batch_flow, list_batches_flow, list_models_flow  # noqa: E402
from prefect_kluster.flows.pending import collect_batches  # noqa: E402

TAGS = ["kluster"]
NIGHTLY_CRON = "0 2 * * *"
COLLECT_EVERY_SECONDS = 300


def build_deployments() -> list[RunnerDeployment]:
    """The deployments, as in deployments/prefect.yaml."""
    return [
        batch_inference.to_deployment(
            name="kluster-batch-on-demand",
            description="Run a batch request file on kluster.ai; trigger it from the UI with "
            '"Custom run".',
            tags=TAGS,
            parameters={"run": {"poll_interval": 10.0}},
        ),
        batch_inference.to_deployment(
            name="kluster-batch-nightly",
            description="Every night, run the sample request file and replace the previous "
            "results.",
            tags=TAGS,
            schedules=[Cron(NIGHTLY_CRON, timezone="UTC")],
            parameters={
                "input_path": "deployments/sample-requests.jsonl",
                "output_path": "out/nightly/results.jsonl",
                "output": {"overwrite": True},
                "run": {
                    "completion_window": "24h",
                    "poll_interval": 60.0,
                    "metadata": {"source": "kluster-batch-nightly"},
                },
            },
        ),
        list_models_flow.to_deployment(
            name="kluster-list-models",
            description="List the models kluster.ai offers (a table artifact on the run).",
            tags=TAGS,
        ),
        list_batches_flow.to_deployment(
            name="kluster-list-batches",
            description="List the newest batches with status and progress (a table artifact "
            "on the run).",
            tags=TAGS,
            parameters={"limit": 20},
        ),
        cancel_batch_flow.to_deployment(
            name="kluster-cancel-batch",
            description="Cancel a running batch by id; lines already done stay in its output.",
            tags=TAGS,
        ),
        collect_batches.to_deployment(
            name="kluster-collect-batches",
            description="Finish runs started with wait=false once their batches have ended "
            "(the long-wait mode: no flow run or worker is held while a batch runs).",
            tags=TAGS,
            concurrency_limit=1,
            schedules=[Interval(COLLECT_EVERY_SECONDS)],
        ),
        shard_group.to_deployment(
            name="kluster-shard-group",
            description="One group of shards of a job run with limits.distribute, started by "
            "the batch run (not by hand): spreads one large job over the pool's workers.",
            tags=TAGS,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deployments/serve.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="start an embedded kluster.ai emulator and point the runs at it (offline demo)",
    )
    parser.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    # Runs (child processes) may read and write only under these roots: the environment's
    # KLUSTER_STORAGE_ROOTS (comma-separated paths or URLs), else the project root.
    os.environ["KLUSTER_STORAGE_ROOTS"] = os.environ.get("KLUSTER_STORAGE_ROOTS") or str(ROOT)
    with ExitStack() as stack:
        if args.emulator:
            from prefect_kluster.emulator import EmulatorConfig, run_emulator

            emu = stack.enter_context(run_emulator(EmulatorConfig()))
            # Runs are child processes: they inherit these.
            os.environ["KLUSTER_BASE_URL"] = emu.base_url
            os.environ["KLUSTER_API_KEY"] = "emulator-key"
            print(f"Runs use the embedded kluster.ai emulator at {emu.base_url}", flush=True)
        serve(*build_deployments(), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
