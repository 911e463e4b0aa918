"""Deployments end to end: a real Prefect server, `prefect deploy` of deployments/prefect.yaml,
a process worker, and the emulator, all as separate processes over real HTTP.

Also covers flows/reporting.py (artifacts and events) against the same server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from prefect_kluster.flows import reporting
from prefect_kluster.tasks.join import JoinSummary, ShardSummary
from prefect_kluster.tasks.types import BatchInfo, ModelInfo, RequestCounts, TokenUsage
from tests.conftest import TEST_API_KEY
from tests.helpers import read_jsonl, requests, write_jsonl
from tests.server import (
    PREFECT,
    ROOT,
    PrefectServer,
    RealBackend,
    create_process_pool,
    delete_deployments,
    pause_deployment,
    prefect_api,
    process,
    run_cli,
    wait_for,
)

PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
BATCH_FLOW = "kluster-batch-inference"
COLLECT_FLOW = "kluster-collect-batches"
RUN_TIMEOUT = 300  # seconds for one deployment run, worker pick-up included (busy machine)


@dataclass
class Stack:
    server: PrefectServer
    emulator_url: str
    env: dict[str, str]
    work: Path


@pytest.fixture(scope="module")
def stack(real_backend: RealBackend) -> Iterator[Stack]:
    """Deployments from prefect.yaml and a worker, on the session's real server and emulator
    (shared with the UI test); the worker is stopped when the module ends."""
    server, base = real_backend.server, real_backend.work
    env = real_backend.client_env(
        TEST_API_KEY,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        # `prefect deploy` puts these roots in the deployments (prefect.yaml's build step)
        KLUSTER_STORAGE_ROOTS=f"{base},{ROOT}",
    )
    with ExitStack() as stack:
        # This process's Prefect client (run_deployment, get_client, test flows) uses it too.
        stack.enter_context(prefect_api(server.api_url))
        delete_deployments()  # whatever another module served on the shared server
        create_process_pool("kluster-pool")
        # The worker boots (a Prefect import, seconds) while `prefect deploy` runs.
        stack.enter_context(
            process(
                "worker",
                [PREFECT, "worker", "start", "--pool", "kluster-pool", "--type", "process"],
                env,
                server.log_dir,
            )
        )
        run_cli(
            ["--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)],
            env,
            timeout=300,
        )
        pause_deployment(f"{BATCH_FLOW}/kluster-batch-nightly")  # no 02:00 surprise
        pause_deployment(f"{COLLECT_FLOW}/kluster-collect-batches")  # the test collects itself
        yield Stack(server=server, emulator_url=real_backend.emulator_url, env=env, work=base)


def _deployments_in_yaml() -> dict[str, dict]:
    config = yaml.safe_load(PREFECT_FILE.read_text())
    return {d["name"]: d for d in config["deployments"]}


def _artifacts(flow_run_id: UUID) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _run(deployment: str, parameters: dict | None = None, timeout: float = RUN_TIMEOUT) -> FlowRun:
    # Polled every 0.25 s (was 1 s): a finished run is seen within a quarter of a second.
    run = run_deployment(
        deployment, parameters=parameters or {}, timeout=timeout, poll_interval=0.25
    )
    assert run.state is not None and run.state.is_final(), (
        f"{deployment} run {run.id} not finished after {timeout}s: {run.state}"
    )
    return run


def _related_to(event: dict, flow_run_id: UUID) -> bool:
    wanted = f"prefect.flow-run.{flow_run_id}"
    return any(r.get("prefect.resource.id") == wanted for r in event.get("related") or [])


def _batch_events_of(stack: Stack, flow_run_id: UUID) -> list[dict]:
    """The kluster.batch.* events related to one flow run (the shared server holds other
    tests' events too, more than a page of them)."""
    body = {
        "filter": {
            "event": {"prefix": ["kluster.batch."]},
            "related": {"id": [f"prefect.flow-run.{flow_run_id}"]},
        },
        "limit": 50,
    }
    page = stack.server.api("POST", "/events/filter", body)
    return [e for e in page.get("events") or [] if _related_to(e, flow_run_id)]


def _logs_of(stack: Stack) -> str:
    return (stack.server.log_dir / "worker.log").read_text(errors="replace")[-6000:]


# --- deployments from prefect.yaml ---------------------------------------------------------------


def test_prefect_yaml_deploys_every_deployment(stack: Stack) -> None:
    wanted = _deployments_in_yaml()
    assert set(wanted) == {
        "kluster-batch-on-demand",
        "kluster-batch-nightly",
        "kluster-list-models",
        "kluster-list-batches",
        "kluster-cancel-batch",
        "kluster-collect-batches",
        "kluster-shard-group",
    }
    with get_client(sync_client=True) as client:
        found = {d.name: d for d in client.read_deployments()}
    assert set(found) == set(wanted)
    for name, spec in wanted.items():
        deployment = found[name]
        assert deployment.entrypoint == spec["entrypoint"]
        assert deployment.work_pool_name == "kluster-pool"
        assert deployment.parameters == spec.get("parameters", {})
        # The pull step makes the project root (where `prefect deploy` ran) the working dir.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
        assert TEST_API_KEY not in json.dumps(deployment.model_dump(mode="json"))
    nightly = found["kluster-batch-nightly"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert (ROOT / nightly.parameters["input_path"]).is_file()
    assert not found["kluster-batch-on-demand"].schedules


def test_serve_script_matches_prefect_yaml() -> None:
    """deployments/serve.py serves the same deployments, parameters and schedule."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kluster_serve", ROOT / "deployments/serve.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    served = {d.name: d for d in module.build_deployments()}
    wanted = _deployments_in_yaml()
    assert set(served) == set(wanted)
    for name, spec_ in wanted.items():
        assert (served[name].parameters or {}) == spec_.get("parameters", {}), name
        assert served[name].entrypoint.split(":")[1] == spec_["entrypoint"].split(":")[1]
        crons = [getattr(s.schedule, "cron", None) for s in served[name].schedules or []]
        assert crons == [s.get("cron") for s in spec_.get("schedules", [])], name
        every = [getattr(s.schedule, "interval", None) for s in served[name].schedules or []]
        assert [i.total_seconds() if i else None for i in every] == [
            s.get("interval") for s in spec_.get("schedules", [])
        ], name


# --- running a deployment through the worker -----------------------------------------------------


@pytest.fixture(scope="module")
def on_demand_run(stack: Stack) -> tuple[FlowRun, Path, list[str]]:
    """One run of the on-demand deployment over a small request file, through the worker."""
    rows = requests(6, prefix="deploy-")
    source = write_jsonl(stack.work / "requests.jsonl", rows)
    output = stack.work / "out" / "results.jsonl"
    started = time.monotonic()
    run = _run(
        f"{BATCH_FLOW}/kluster-batch-on-demand",
        {
            "input_path": str(source),
            "output_path": str(output),
            "run": {"poll_interval": 0.2, "metadata": {"origin": "test_deployments"}},
        },
    )
    print(f"on-demand deployment run took {time.monotonic() - started:.1f}s")
    return run, output, [r["custom_id"] for r in rows]


def test_on_demand_deployment_completes(stack: Stack, on_demand_run) -> None:
    run, output, custom_ids = on_demand_run
    assert run.state.is_completed(), f"{run.state}\nworker log:\n{_logs_of(stack)}"
    assert output.is_file()
    assert sorted(line["custom_id"] for line in read_jsonl(output)) == sorted(custom_ids)


def test_on_demand_run_leaves_artifacts_and_events(stack: Stack, on_demand_run) -> None:
    """The batch flow reports through flows/reporting.py: summary, shard table, progress,
    and kluster.batch.* events for its batch; none of them holds the API key."""
    run, output, custom_ids = on_demand_run
    artifacts = {a.key: a for a in _artifacts(run.id) if a.key}
    assert reporting.SUMMARY_KEY in artifacts, sorted(artifacts)
    summary = artifacts[reporting.SUMMARY_KEY]
    assert summary.type == "markdown"
    assert str(output) in summary.data and "completed" in summary.data
    shards = artifacts[reporting.SUMMARY_KEY + reporting.SHARDS_KEY_SUFFIX]
    assert shards.type == "table"
    table = json.loads(shards.data) if isinstance(shards.data, str) else shards.data
    assert sum(row["completed"] for row in table) >= len(custom_ids)
    progress = artifacts[reporting.PROGRESS_KEY]
    assert progress.type == "progress" and float(progress.data) == 100.0
    for artifact in artifacts.values():
        assert TEST_API_KEY not in json.dumps(artifact.model_dump(mode="json"))

    def events_of_run() -> list[dict]:
        found = _batch_events_of(stack, run.id)
        names = {e["event"] for e in found}
        return found if {"kluster.batch.submitted", "kluster.batch.completed"} <= names else []

    events = wait_for(events_of_run, 120, f"kluster.batch.* events of flow run {run.id}")
    completed = [e for e in events if e["event"] == "kluster.batch.completed"]
    assert completed[0]["resource"]["prefect.resource.id"].startswith("kluster.batch.")
    assert completed[0]["payload"]["status"] == "completed"
    assert TEST_API_KEY not in json.dumps(events)


def test_list_flows_publish_tables(stack: Stack, on_demand_run) -> None:
    """List-models and list-batches deployments, run at once, each leave a table artifact."""
    runs = {
        name: run_deployment(f"{flow_name}/{name}", timeout=0)
        for flow_name, name in (
            ("kluster-list-models", "kluster-list-models"),
            ("kluster-list-batches", "kluster-list-batches"),
        )
    }

    def finished() -> dict[str, FlowRun] | None:
        with get_client(sync_client=True) as client:
            now = {name: client.read_flow_run(r.id) for name, r in runs.items()}
        return now if all(r.state and r.state.is_final() for r in now.values()) else None

    done = wait_for(finished, RUN_TIMEOUT, "the list flows to finish", interval=0.25)
    for name, run in done.items():
        assert run.state.is_completed(), f"{name}: {run.state}\n{_logs_of(stack)}"
    models = {a.key: a for a in _artifacts(done["kluster-list-models"].id)}
    table = json.loads(models[reporting.MODELS_KEY].data)
    assert "klusterai/Meta-Llama-3.1-8B-Instruct-Turbo" in {row["model"] for row in table}
    batches = {a.key: a for a in _artifacts(done["kluster-list-batches"].id)}
    rows = json.loads(batches[reporting.BATCHES_KEY].data)
    assert rows and all(row["batch_id"] and row["status"] for row in rows)


# --- flows/reporting.py on its own -------------------------------------------------------------


def _batch(batch_id: str, status: str, index: int, done: int, failed: int = 0) -> BatchInfo:
    return BatchInfo(
        id=batch_id,
        status=status,
        input_file_id=f"file-in-{index}",
        output_file_id=f"file-out-{index}",
        request_counts=RequestCounts(total=done + failed, completed=done, failed=failed),
        metadata={"shard_index": str(index)},
        errors=["server_error: boom (line 3)"] if failed else [],
    )


@task
def _report_from_a_task(batch: BatchInfo) -> bool:
    return reporting.emit_batch_event(batch, "failed") is not None


@flow(name="reporting-check")
def _reporting_flow(batches: list[BatchInfo], summary: JoinSummary) -> dict:
    progress = reporting.create_batch_progress(total=10)
    updated = [
        reporting.update_batch_progress(progress, done=4, total=10),
        reporting.update_batch_progress(progress, done=10, total=10),
    ]
    ids = reporting.publish_run_summary(batches, summary, key="reporting-check")
    submitted = reporting.emit_batch_event(batches[0], "submitted")
    from_task = _report_from_a_task(batches[1])
    tables = (
        reporting.publish_batches_table(batches),
        reporting.publish_models_table([ModelInfo(id="m-1", owned_by="kluster")]),
    )
    return {
        "progress": progress,
        "updated": updated,
        "summary": ids,
        "event": submitted is not None,
        "task_event": from_task,
        "tables": tables,
    }


def test_reporting_functions_inside_a_flow(stack: Stack) -> None:
    batches = [_batch("batch-r0", "completed", 0, 7), _batch("batch-r1", "failed", 1, 1, 2)]
    summary = JoinSummary(
        output_path="/tmp/results | odd.jsonl",
        requests=10,
        succeeded=8,
        failed=2,
        retryable=2,
        usage=TokenUsage(prompt_tokens=100, completion_tokens=50, total_tokens=150),
        shards=[ShardSummary(index=0, requests=7), ShardSummary(index=1, requests=3)],
    )
    state = _reporting_flow(batches, summary, return_state=True)
    out = state.result()
    assert out["progress"] and out["summary"] and out["event"] and out["task_event"]
    assert out["updated"] == [True, True]
    assert all(out["tables"])
    run_id = state.state_details.flow_run_id
    artifacts = {a.key: a for a in _artifacts(run_id)}
    assert float(artifacts[reporting.PROGRESS_KEY].data) == 100.0
    assert artifacts[reporting.PROGRESS_KEY].description == "10 of 10 requests done"
    markdown = artifacts["reporting-check"].data
    assert "**failed**" in markdown and "| Requests | 10 |" in markdown
    assert "results \\| odd.jsonl" in markdown and "server_error: boom" in markdown
    shard_rows = json.loads(artifacts["reporting-check-shards"].data)
    assert shard_rows == [
        {
            "batch_id": "batch-r0",
            "shard": 0,
            "lines": 7,
            "status": "completed",
            "completed": 7,
            "failed": 0,
        },
        {
            "batch_id": "batch-r1",
            "shard": 1,
            "lines": 3,
            "status": "failed",
            "completed": 1,
            "failed": 2,
        },
    ]
    assert len(json.loads(artifacts[reporting.BATCHES_KEY].data)) == 2
    assert json.loads(artifacts[reporting.MODELS_KEY].data)[0]["model"] == "m-1"

    def events() -> dict[str, dict] | None:
        mine = {e["event"]: e for e in _batch_events_of(stack, run_id)}
        return mine if len(mine) == 2 else None

    found = wait_for(events, 120, "the reporting flow's events")
    submitted = found["kluster.batch.submitted"]
    assert submitted["resource"] == {
        "prefect.resource.id": "kluster.batch.batch-r0",
        "prefect.resource.name": "batch-r0",
    }
    assert submitted["payload"]["request_counts"] == {"total": 7, "completed": 7, "failed": 0}
    failed = found["kluster.batch.failed"]
    assert failed["payload"]["status"] == "failed" and failed["payload"]["shard_index"] == "1"
    related = {r["prefect.resource.id"] for r in failed["related"]}
    assert "kluster.file.file-in-1" in related
    assert any(r.startswith("prefect.task-run.") for r in related)


def test_reporting_is_a_no_op_outside_a_run() -> None:
    batch = _batch("batch-x", "completed", 0, 1)
    summary = JoinSummary(output_path="x.jsonl", requests=1, succeeded=1)
    assert reporting.create_batch_progress(5) is None
    assert reporting.update_batch_progress(UUID(int=1), 1, 5) is False
    assert reporting.update_batch_progress(None, 1, 5) is False
    assert reporting.publish_run_summary([batch], summary) is None
    assert reporting.emit_batch_event(batch, "completed") is None
    assert reporting.publish_batches_table([batch]) is None
    assert reporting.publish_models_table([ModelInfo(id="m")]) is None
    # The pure parts still work, for callers that want the text.
    assert "| Succeeded | 1 |" in reporting.summary_markdown([batch], summary)
    assert reporting.artifact_key("Nightly Run_2") == "nightly-run-2"


# --- cancellation and the long-wait mode, through the worker -------------------------------------


def _emulator_admin(stack: Stack, path: str, body: dict | None = None) -> dict:
    import httpx

    root = stack.emulator_url.rsplit("/v1", 1)[0]
    with httpx.Client(base_url=root, timeout=10) as http:
        if body is None:
            return http.get(path).json()
        response = http.post(path, json=body)
        response.raise_for_status()
        return response.json()


def _batches(stack: Stack, ids: set[str] | None = None) -> list[dict]:
    rows = _emulator_admin(stack, "/_emulator/stats")["batches"]
    return [b for b in rows if ids is None or b["id"] in ids]


def _flow_run(run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def test_cancelling_the_flow_run_cancels_its_remote_batches(stack: Stack) -> None:
    from prefect.states import Cancelling

    before = {b["id"] for b in _batches(stack)}
    _emulator_admin(stack, "/_emulator/config", {"lines_per_second": 5})
    try:
        source = write_jsonl(stack.work / "cancel.jsonl", requests(200, prefix="cancel-"))
        run = run_deployment(
            f"{BATCH_FLOW}/kluster-batch-on-demand",
            parameters={
                "input_path": str(source),
                "output_path": str(stack.work / "cancel-out" / "results.jsonl"),
                "run": {"poll_interval": 0.2},
            },
            timeout=0,
        )
        mine = wait_for(
            lambda: [
                b
                for b in _batches(stack)
                if b["id"] not in before and b["status"] == "in_progress" and b["completed"]
            ],
            RUN_TIMEOUT,
            "the run's batch to be in progress",
        )
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(), force=True)
        final = wait_for(
            lambda: (r := _flow_run(run.id)).state.is_final() and r,
            180,
            "the cancelled run to end",
            interval=0.5,
        )
        assert final.state.is_cancelled(), final.state
        ended = wait_for(
            lambda: [b for b in _batches(stack, {mine[0]["id"]}) if b["status"] == "cancelled"],
            120,
            "the remote batch to be cancelled",
            interval=0.2,
        )
        assert 0 < ended[0]["completed"] < 200, ended
    finally:
        _emulator_admin(stack, "/_emulator/config", {"lines_per_second": None})


def test_long_wait_mode_holds_no_flow_run_and_matches_the_waiting_output(stack: Stack) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.objects import StateType

    rows = requests(40, prefix="later-")
    source = write_jsonl(stack.work / "later.jsonl", rows)
    later = stack.work / "later-out" / "results.jsonl"
    before = {b["id"] for b in _batches(stack)}
    # Slow enough that the batches still run when the submitting run has ended, however long
    # a busy machine takes to start and end that run; sped up again before collecting.
    _emulator_admin(stack, "/_emulator/config", {"lines_per_second": 0.5})
    try:
        submitted = _run(
            f"{BATCH_FLOW}/kluster-batch-on-demand",
            {
                "input_path": str(source),
                "output_path": str(later),
                "run": {"wait": False},
                "limits": {"max_requests_per_file": 20},
            },
        )
        assert submitted.state.is_completed(), submitted.state
        mine = {b["id"] for b in _batches(stack)} - before
        assert len(mine) == 2
        running = [b for b in _batches(stack, mine) if b["status"] != "completed"]
        assert running, "the batches are still running after the submitting run ended"
        with get_client(sync_client=True) as client:
            holding = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type={"any_": [StateType.RUNNING]})
                )
            )
        assert holding == [], "no flow run stays Running while the batches wait"
        assert not later.exists()
        _emulator_admin(stack, "/_emulator/config", {"lines_per_second": None})
        collected = wait_for(
            lambda: (
                _run(f"{COLLECT_FLOW}/kluster-collect-batches").state.is_completed()
                and later.exists()
            ),
            RUN_TIMEOUT,
            "a collector run to finish the pending run",
            interval=1,
        )
        assert collected
    finally:
        _emulator_admin(stack, "/_emulator/config", {"lines_per_second": None})
    waited = stack.work / "waited-out" / "results.jsonl"
    run = _run(
        f"{BATCH_FLOW}/kluster-batch-on-demand",
        {
            "input_path": str(source),
            "output_path": str(waited),
            "run": {"poll_interval": 0.2},
            "limits": {"max_requests_per_file": 20},
        },
    )
    assert run.state.is_completed(), run.state
    assert waited.read_bytes() == later.read_bytes()
    assert sorted(r["custom_id"] for r in read_jsonl(later)) == sorted(r["custom_id"] for r in rows)
    assert {b["id"] for b in _batches(stack)} - before == mine, "the waiting run reused them"


def test_block_register_puts_the_credentials_block_in_the_catalog(stack: Stack) -> None:
    run_cli(["block", "register", "-m", "prefect_kluster"], stack.env)
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("kluster-ai-credentials")
        schemas = client.read_block_schemas()
    assert block_type.name == "kluster.ai Credentials"
    schema = next(s for s in schemas if s.block_type_id == block_type.id)
    assert "api_key" in schema.fields["properties"]
    assert schema.fields["properties"]["api_key"].get("format") == "password"


# --- storage roots ------------------------------------------------------------------------------


def test_a_run_outside_the_storage_roots_is_refused_before_reading_anything(
    stack: Stack, tmp_path: Path
) -> None:
    """A UI user (here: the API call the UI makes) cannot make the worker write elsewhere."""
    with get_client(sync_client=True) as client:
        on_demand = client.read_deployment_by_name(f"{BATCH_FLOW}/kluster-batch-on-demand")
    roots = on_demand.job_variables["env"]["KLUSTER_STORAGE_ROOTS"]
    assert roots == f"{stack.work},{ROOT}"
    outside = tmp_path / "elsewhere" / "results.jsonl"  # pytest's per-test folder: not a root
    assert not str(outside).startswith(str(stack.work))
    source = write_jsonl(stack.work / "roots.jsonl", requests(3, prefix="roots-"))
    uploads = _emulator_admin(stack, "/_emulator/stats")["requests"].get("POST /v1/files", 0)
    run = _run(
        f"{BATCH_FLOW}/kluster-batch-on-demand",
        {"input_path": str(source), "output_path": str(outside)},
    )
    assert run.state.is_failed(), run.state
    message = run.state.message or ""
    assert str(outside) in message and "outside the storage roots" in message, message
    assert str(stack.work) in message
    assert (
        _emulator_admin(stack, "/_emulator/stats")["requests"].get("POST /v1/files", 0) == uploads
    )
    assert not outside.parent.exists()


def test_the_run_form_shows_the_grouped_sections(stack: Stack) -> None:
    """The UI builds its run form from the deployment's parameter schema: three plain fields,
    then one section per group, each with its own described fields."""
    with get_client(sync_client=True) as client:
        on_demand = client.read_deployment_by_name(f"{BATCH_FLOW}/kluster-batch-on-demand")
    schema = on_demand.parameter_openapi_schema
    props = schema["properties"]
    assert list(props)[:3] == ["input_path", "output_path", "credentials_block"]
    sections = {"requests": "RequestOptions", "output": "OutputOptions", "run": "RunOptions"}
    sections["limits"] = "Limits"
    for name, model in sections.items():
        assert props[name]["description"].strip(), name
        ref = props[name].get("$ref") or props[name]["allOf"][0]["$ref"]
        assert ref.endswith(f"/{model}"), (name, ref)
        fields = schema["definitions"][model]["properties"]
        assert fields and all(f.get("description", "").strip() for f in fields.values()), model
    run_fields = schema["definitions"]["RunOptions"]["properties"]
    assert {"wait", "poll_interval", "completion_window", "estimate_only"} <= set(run_fields)
    assert {"max_cost", "max_concurrency"} <= set(schema["definitions"]["Limits"]["properties"])
