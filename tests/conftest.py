"""Fixtures: a temporary Prefect backend for the session, the emulator over real HTTP, and
(for the end-to-end modules) one real Prefect server and emulator process per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

# Recognisable, so the secret tests can search every output for it.
TEST_API_KEY = "sk-kluster-TEST-5ecr3t-9f2b7c41"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def pytest_configure(config: pytest.Config) -> None:
    """In the first pytest process (the xdist controller, or the only one), start making the
    migrated database template in the background: it is made while workers boot and collect,
    instead of after. ``prefect_db_template`` waits for it (the maker holds the file lock), or
    makes it itself if the maker did not (the template is written whole or not at all)."""
    factory = getattr(config, "_tmp_path_factory", None)  # the tmp_path plugin's own
    if os.environ.get("PYTEST_XDIST_WORKER") or factory is None or config.option.collectonly:
        return
    make = (
        "import sys, pathlib, tests.server as s; "
        "s.migrated_sqlite_template(pathlib.Path(sys.argv[1]))"
    )
    config.stash[_TEMPLATE_MAKER] = subprocess.Popen(
        [sys.executable, "-c", make, str(factory.getbasetemp())],
        cwd=config.rootpath,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    maker = config.stash.get(_TEMPLATE_MAKER, None)
    if maker is not None and maker.poll() is None:  # the run ended (or failed) before it did
        with contextlib.suppress(ProcessLookupError):
            os.killpg(maker.pid, signal.SIGKILL)  # its own session: the prefect CLI with it
        maker.wait(timeout=30)


_TEMPLATE_MAKER = pytest.StashKey[subprocess.Popen]()


@pytest.fixture(scope="session")
def prefect_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database already at Prefect's schema head, made once per pytest run (under
    xdist, once for all workers: in the run's shared temporary folder, under a file lock).
    Every SQLite-backed Prefect server the tests start gets a copy, so none of them runs
    Prefect's migrations again (a harness start took 19.4 s on a new file, 10.3 s on a copy)."""
    from tests.server import migrated_sqlite_template

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/, the parent of every worker's popen-gwN/
    return migrated_sqlite_template(shared)


@pytest.fixture(scope="session")
def _real_backend_starter(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    prefect_db_template: Path,
) -> Iterator[object]:
    """Start the real server and emulator processes in the background as soon as the session
    begins, if any collected test needs them: they boot while the in-process tests run, and
    ``real_backend`` only waits for what is left of that. Nothing starts otherwise."""
    from tests.server import BackgroundBackend

    if not any("real_backend" in getattr(i, "fixturenames", ()) for i in request.session.items):
        yield None
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Every xdist worker collects every test but runs only its share: start the processes
        # on first use, so only the worker that runs those modules pays for them.
        with _OnFirstUse(tmp_path_factory, prefect_db_template) as starter:
            yield starter
        return
    base = tmp_path_factory.mktemp("real-backend")
    with BackgroundBackend(base, TEST_API_KEY, db_template=prefect_db_template) as starter:
        yield starter


class _OnFirstUse:
    """A ``BackgroundBackend`` that starts when its ``result()`` is first asked for."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, db_template: Path) -> None:
        self._factory = tmp_path_factory
        self._db_template = db_template
        self._started: object | None = None

    def __enter__(self) -> _OnFirstUse:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._started is not None:
            self._started.__exit__(*exc_info)

    def result(self) -> object:
        from tests.server import BackgroundBackend

        if self._started is None:
            base = self._factory.mktemp("real-backend")
            self._started = BackgroundBackend(
                base, TEST_API_KEY, db_template=self._db_template
            ).__enter__()
        return self._started.result()


# The modules that take longest, longest first (from the CI logs' durations). With
# ``make test``'s ``--dist loadfile`` each module runs whole on one xdist worker, and workers
# take modules in this order: the long ones start at once instead of ending the run alone.
_SLOWEST_MODULES = (
    "test_fanout.py",
    "test_production.py",
    "test_bench_smoke.py",
    "test_long_wait.py",
    "test_deployments.py",
    "test_production_infra.py",
    "test_flow.py",
    "test_resilience.py",
    "test_storage.py",
    "test_cost_flow.py",
    "test_tasks.py",
    "test_cli.py",
    "test_ui_browser.py",
    "test_wait_calls.py",
    "test_packaging.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def prefect_backend(_real_backend_starter: object, prefect_db_template: Path) -> Iterator[None]:
    """Flows in tests run against a throwaway SQLite-backed Prefect server."""
    import prefect.testing.utilities as harness

    def mkdtemp_with_migrated_db() -> str:
        # prefect_test_harness puts its database at mkdtemp()/prefect-test.db and has no
        # setting for it: hand it a folder that already holds a migrated copy there.
        folder = tempfile.mkdtemp()
        shutil.copyfile(prefect_db_template, Path(folder) / "prefect-test.db")
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "mkdtemp", mkdtemp_with_migrated_db)
        with harness.prefect_test_harness(server_startup_timeout=240):
            patch.undo()
            yield


@pytest.fixture(scope="session")
def session_emulator() -> Iterator[object]:
    """One in-process emulator for the session: a uvicorn thread per test costs about a third
    of a second each, more on a busy machine. Tests use ``emulator``, which resets it.

    Served as ``run_emulator`` does, but from a thread named ``session-emulator``: tests that
    count the ``emulator-*`` threads their own emulators leave behind must not see it."""
    from prefect_kluster.emulator import Emulator, EmulatorConfig, create_app
    from prefect_kluster.emulator.server import bind_socket, uvicorn_config
    from tests.server import http_json, wait_for

    app = create_app(EmulatorConfig(api_key=TEST_API_KEY))
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="session-emulator", daemon=True
    )
    thread.start()
    try:
        wait_for(
            lambda: http_json("GET", f"http://127.0.0.1:{port}/_emulator/health", timeout=2),
            120,
            "the session emulator's health endpoint",
            0.05,
        )
        yield Emulator(app.state.store, "127.0.0.1", port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.store.close()
        sock.close()


def _as_new(emu) -> None:
    """Back to a fresh emulator's state: no files, batches or counters, default options."""
    from prefect_kluster.emulator import EmulatorConfig

    emu.reset()
    emu.configure(**EmulatorConfig(api_key=TEST_API_KEY).model_dump(exclude={"data_dir"}))


@pytest.fixture
def emulator(session_emulator) -> Iterator[object]:
    """The emulator as new (reset, default options, checking the test API key) on a free
    loopback port; shared by the session, so it is reset before and after each test."""
    _as_new(session_emulator)
    yield session_emulator
    _as_new(session_emulator)


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


@pytest.fixture(scope="session")
def real_backend(_real_backend_starter) -> object:
    """A real ``prefect server start`` and a ``python -m emulator`` process, started once
    for the modules that need real processes (deployments, the UI) and shared by them."""
    assert _real_backend_starter is not None, "collected tests did not ask for real_backend"
    return _real_backend_starter.result()
