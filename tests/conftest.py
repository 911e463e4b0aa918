"""Fixtures: a temporary Prefect backend for the session, and the emulator over real HTTP."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Recognisable, so the secret tests can search every output for it.
TEST_API_KEY = "sk-kluster-TEST-5ecr3t-9f2b7c41"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@pytest.fixture(scope="session", autouse=True)
def prefect_backend() -> Iterator[None]:
    """Flows in tests run against a throwaway SQLite-backed Prefect server."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def emulator() -> Iterator[object]:
    """A fresh emulator on a free loopback port that checks the test API key."""
    from prefect_kluster.emulator import EmulatorConfig, run_emulator

    with run_emulator(EmulatorConfig(api_key=TEST_API_KEY)) as emu:
        yield emu


@pytest.fixture
def credentials(emulator):
    from prefect_kluster.blocks import KlusterCredentials

    return KlusterCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url, timeout=20)


@pytest.fixture
def kluster_env(emulator, monkeypatch):
    """Point the KLUSTER_* settings fallback at the emulator."""
    monkeypatch.setenv("KLUSTER_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("KLUSTER_BASE_URL", emulator.base_url)
    return emulator
