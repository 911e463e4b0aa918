"""The API key is a secret everywhere: logs, parameters, results, artifacts, events, errors."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import pickle
import time
from pathlib import Path

import httpx
import openai
import pytest
from prefect import flow

from prefect_kluster.blocks import KlusterCredentials, resolve_credentials
from prefect_kluster.flows import batch_inference, cancel_batch_flow, list_models_flow
from prefect_kluster.tasks import cancel_batch
from tests.conftest import TEST_API_KEY
from tests.helpers import requests
from tests.server import drain_events


@flow
def cancel_without_retries(batch_id: str):
    return cancel_batch.with_options(retries=0)(resolve_credentials(), batch_id)


SECRET_PARTS = [TEST_API_KEY, TEST_API_KEY[-12:]]


def assert_no_secret(text: str, where: str) -> None:
    for part in SECRET_PARTS:
        assert part not in text, f"the API key leaked into {where}"


def _prefect_api_dump() -> dict[str, str]:
    """Everything the Prefect server stored: flow/task runs, logs, artifacts, events."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL

    # Logs and events reach the server in batches (logs every 2 s): send what is queued
    # first, or a quick test reads the server before its runs' logs are there.
    APILogWorker.drain_all(timeout=10)
    drain_events()

    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(limit=200)
        task_runs = client.read_task_runs(limit=200)
        logs = client.read_logs(limit=200)
        artifacts = client.read_artifacts(limit=200)
        blocks = client.read_block_documents(include_secrets=False)  # as the UI shows them
    events = []
    with httpx.Client(base_url=PREFECT_API_URL.value(), timeout=30) as http:
        page = http.post("/events/filter", json={"limit": 50}).json()
        events.extend(page["events"])
        for _ in range(20):
            if not page.get("next_page"):
                break
            page = http.get(page["next_page"]).json()
            events.extend(page["events"])
    dumped = {
        "flow run parameters and states": "".join(r.model_dump_json() for r in flow_runs),
        "task runs": "".join(r.model_dump_json() for r in task_runs),
        "logs": "".join(r.model_dump_json() for r in logs),
        "artifacts": "".join(a.model_dump_json() for a in artifacts),
        "events": json.dumps(events),
        "block documents as read back": "".join(b.model_dump_json() for b in blocks),
    }
    assert flow_runs and task_runs and logs, "the dump found the runs it must search"
    return dumped


def _stored_since(started: float) -> dict[str, bytes]:
    """What Prefect wrote to its local result storage since ``started``: a failed task's
    exception is persisted there (pickled, and base64-encoded), decoded where it decodes."""
    from prefect.settings import get_current_settings

    root = Path(get_current_settings().results.local_storage_path)
    stored = {}
    for path in root.glob("*") if root.is_dir() else []:
        if path.is_file() and path.stat().st_mtime >= started:
            raw = path.read_bytes()
            try:
                raw += base64.b64decode(raw, validate=False)
            except (binascii.Error, ValueError):
                pass
            stored[str(path)] = raw
    return stored


def test_key_appears_nowhere(tmp_path, emulator, monkeypatch, caplog):
    started = time.time() - 1
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore", "prefect"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    errors: list[BaseException] = []

    # 1. a saved block, used by name
    KlusterCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url).save(
        "secret-test", overwrite=True
    )
    result = batch_inference(
        output_path=str(tmp_path / "a.jsonl"),
        credentials_block="secret-test",
        requests={"requests": requests(3)},
        run={"poll_interval": 0.05},
    )
    # 2. the KLUSTER_* environment fallback
    monkeypatch.setenv("KLUSTER_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("KLUSTER_BASE_URL", emulator.base_url)
    models = list_models_flow()
    # 3. an HTTP error (404) from the service
    with pytest.raises(openai.NotFoundError) as not_found:
        cancel_batch_flow("batch_does_not_exist")
    errors.append(not_found.value)
    # 4. an auth failure: the service was given another key than the one we hold
    emulator.configure(api_key="sk-some-other-key")
    with pytest.raises(openai.AuthenticationError) as denied:
        list_models_flow()
    errors.append(denied.value)
    # 5. a connection failure
    monkeypatch.setenv("KLUSTER_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("KLUSTER_MAX_RETRIES", "0")
    with pytest.raises(openai.APIConnectionError) as unreachable:
        cancel_without_retries("batch_x")
    errors.append(unreachable.value)

    assert_no_secret(result.model_dump_json(), "the flow result")
    assert_no_secret(repr(result), "the flow result's repr")
    assert_no_secret("".join(m.model_dump_json() for m in models), "the models result")
    for exc in errors:
        assert_no_secret(str(exc), "an exception message")
        assert_no_secret(repr(exc), "an exception repr")
        assert_no_secret(str(getattr(exc, "body", "")), "an exception body")
        # the request it keeps (headers and all) goes wherever the exception is pickled
        assert_no_secret(pickle.dumps(exc).decode("latin-1"), "a pickled exception")
    stored = _stored_since(started)
    failures = [raw for raw in stored.values() if b"openai" in raw and b"Error" in raw]
    assert failures, "the failed task runs' exceptions are in Prefect's result storage"
    for path, raw in stored.items():
        assert_no_secret(raw.decode("latin-1"), f"Prefect's result storage ({path})")
    assert caplog.records
    for record in caplog.records:
        assert_no_secret(record.getMessage(), f"log record {record.name}")
    for where, text in _prefect_api_dump().items():
        assert_no_secret(text, where)
    creds = KlusterCredentials.load("secret-test")
    assert_no_secret(repr(creds), "the block's repr")
    assert_no_secret(str(creds.model_dump()), "the block's model_dump")
