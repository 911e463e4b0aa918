"""Fixtures: a temporary Prefect backend for the session, the emulator over real HTTP, and
(for the end-to-end modules) one real Prefect server and emulator process per session."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn

# Recognisable, so the secret tests can search every output for it.
TEST_API_KEY = "sk-kluster-TEST-5ecr3t-9f2b7c41"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@pytest.fixture(scope="session")
def prefect_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database already at Prefect's schema head, made once per pytest run (under
    xdist, once for all workers: in the run's shared temporary folder, under a file lock).
    The real server and the CLI's temporary servers start on a copy and skip Prefect's
    migrations (a server start took 19.4 s on a new file, 10.3 s on a copy); the session
    harness does not wait for it (see ``prefect_backend``)."""
    return _migrated_template(tmp_path_factory)


def _migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.server import VENV_TEMPLATE, migrated_sqlite_template

    if VENV_TEMPLATE.is_file():  # made by `make test`, once per virtual environment
        return VENV_TEMPLATE
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/, the parent of every worker's popen-gwN/
    return migrated_sqlite_template(shared)


@pytest.fixture(scope="session")
def _real_backend_starter(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """Start the real server and emulator processes in the background as soon as the session
    begins, if any collected test needs them: they boot while the in-process tests run, and
    ``real_backend`` only waits for what is left of that. Nothing starts otherwise."""
    from tests.server import BackgroundBackend

    if not any("real_backend" in getattr(i, "fixturenames", ()) for i in request.session.items):
        yield None
        return
    # The migrated template is made (or waited for) in the backend's own thread, when it starts.
    template = functools.partial(_migrated_template, tmp_path_factory)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Every xdist worker collects every test but runs only its share: start the processes
        # on first use, so only the worker that runs those modules pays for them.
        with _OnFirstUse(tmp_path_factory, template) as starter:
            yield starter
        return
    base = tmp_path_factory.mktemp("real-backend")
    with BackgroundBackend(base, TEST_API_KEY, db_template=template) as starter:
        yield starter


class _OnFirstUse:
    """A ``BackgroundBackend`` that starts when its ``result()`` is first asked for."""

    def __init__(
        self, tmp_path_factory: pytest.TempPathFactory, db_template: Callable[[], Path]
    ) -> None:
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
    "test_deployments.py",  # with test_ui_browser.py, on the same worker (see below)
    "test_production.py",
    "test_long_wait.py",
    "test_resilience.py",
    "test_flow.py",
    "test_bench_smoke.py",
    "test_production_infra.py",
    "test_storage.py",
    "test_cost_flow.py",
    "test_tasks.py",
    "test_cli.py",
    "test_ui_browser.py",
    "test_wait_calls.py",
    "test_packaging.py",
)


# Modules that use the session's real server and emulator (``real_backend``) run on one xdist
# worker, one after the other: the real processes start once per pytest run, not once per
# worker, and the two modules, which each delete the other's deployments, never overlap.
_SAME_WORKER_AS = {"test_ui_browser.py": "test_deployments.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadfile`` with the modules of ``_SAME_WORKER_AS`` in one work unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedBackendScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            folder, _, name = scope.rpartition("/")
            alias = _SAME_WORKER_AS.get(name)
            return scope if alias is None else f"{folder}/{alias}" if folder else alias

    return SharedBackendScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def prefect_backend(_real_backend_starter: object) -> Iterator[None]:
    """Flows in tests run against a throwaway SQLite-backed Prefect server.

    It starts on a copy of the migrated database `make test` made for the virtual
    environment. Without one, it migrates its own new database, not a copy of
    ``prefect_db_template``: both xdist workers start one at once, and waiting for the
    template first (made by one process, 13-20 s) then starting on copies made the session
    start 14 s later (35 s, not 21 s)."""
    from prefect.testing.utilities import prefect_test_harness

    from tests.server import VENV_TEMPLATE, prefect_test_harness_on

    if VENV_TEMPLATE.is_file():
        with prefect_test_harness_on(VENV_TEMPLATE, 240):
            yield
        return
    with prefect_test_harness(server_startup_timeout=240):
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
