"""Real processes for end-to-end tests: a Prefect server, the emulator, workers and servers.

Every process starts in its own process group (session) with its output in a log file, and
is stopped as a group (SIGTERM, then SIGKILL) so nothing outlives the test. Every wait is
bounded and says what it was waiting for when it gives up, with the log's tail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect") if (BIN / "prefect").exists() else "prefect"
T = TypeVar("T")

SERVER_START_TIMEOUT = 240.0  # a busy 2-CPU machine boots a Prefect server slowly
STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_for(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.2,
    proc: Process | None = None,
) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds, or
    at once if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # keep the last error for the failure message
            last_error = exc
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n"
                f"{tail(proc.log)}"
            )
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_error!r})" if last_error else ""
            logs = f"\n{proc.name} log tail:\n{tail(proc.log)}" if proc else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{extra}{logs}")
        time.sleep(interval)


def recorded_task_runs(flow_run_id: Any, last_task: str, timeout: float = 60) -> list[Any]:
    """A finished flow run's task runs on the Prefect server, which records them from their
    events a moment after the flow call returns: read until one named ``last_task`` is there
    and every one has ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))

    def recorded() -> list[Any] | None:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=this_run)
        ended = all(r.state and r.state.is_final() for r in runs)
        last = any(r.name.startswith(last_task) for r in runs)
        return runs if ended and last else None

    return wait_for(recorded, timeout, f"the task runs of flow run {flow_run_id}", 0.1)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the whole process group, then SIGKILL it if it is still there."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Children may linger after the leader is gone: kill what is left of the group.
        _signal_group(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def process(
    name: str, cmd: Sequence[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT
) -> Iterator[Process]:
    """Run ``cmd`` in a new session with stdout+stderr in ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            list(cmd),
            cwd=str(cwd),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = Process(name, popen, log)
    try:
        yield proc
    finally:
        proc.stop()


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without Prefect or kluster settings, plus ``overrides``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "KLUSTER_")) and k != "PYTEST_CURRENT_TEST"
    }
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    env.update(overrides)
    return env


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text else None


@dataclass
class PrefectServer:
    url: str  # http://127.0.0.1:PORT
    home: Path
    process: Process
    log_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def client_env(self, home: Path | None = None, **overrides: str) -> dict[str, str]:
        """Environment for a process that talks to this server (CLI, worker, serve)."""
        return clean_env(
            PREFECT_API_URL=self.api_url,
            PREFECT_HOME=str(home or self.home / "client"),
            **overrides,
        )

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return http_json(method, f"{self.api_url}{path}", body)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


# Made by `make test` once per virtual environment (``python -m tests.server template``):
# a pytest run then migrates no database of its own.
VENV_TEMPLATE = Path(sys.prefix) / "prefect-migrated-template.db"


def migrated_sqlite_template(shared_dir: Path, timeout: float = SERVER_START_TIMEOUT) -> Path:
    """A SQLite database migrated to this Prefect's schema, made once in ``shared_dir``.

    Every Prefect server start on a new SQLite file runs all of Prefect's migrations (about
    10 s of CPU here); a server started on a copy of this file finds it at the head revision
    and skips them. Processes sharing ``shared_dir`` (pytest-xdist workers) take a file lock,
    so the first one makes it and the others wait for it and reuse it."""
    import fcntl
    import sqlite3

    template = shared_dir / "prefect-migrated-template.db"
    with open(shared_dir / "prefect-migrated-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.exists():
            return template
        work = shared_dir / "prefect-migrated-template.work"
        work.mkdir(parents=True, exist_ok=True)
        db = work / "migrated.db"
        run_cli(
            ["server", "database", "upgrade", "-y"],
            clean_env(
                PREFECT_HOME=str(work / "home"),
                PREFECT_SERVER_DATABASE_CONNECTION_URL=sqlite_url(db),
            ),
            timeout=timeout,
        )
        # One self-contained file (no -wal/-shm beside it), put in place whole.
        partial = shared_dir / "prefect-migrated-template.partial"
        src, dst = sqlite3.connect(db), sqlite3.connect(partial)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        os.replace(partial, template)
        return template


@contextmanager
def prefect_test_harness_on(
    template: Path, timeout: int = int(SERVER_START_TIMEOUT)
) -> Iterator[None]:
    """Prefect's own test harness, its temporary server started on a copy of ``template``
    (already migrated) instead of a new SQLite file it would migrate first: the harness
    puts its database in a new ``mkdtemp()`` folder, which gets the copy."""
    import shutil
    import tempfile
    from unittest import mock

    import prefect.testing.utilities as testing

    def folder_with_copy() -> str:
        folder = tempfile.mkdtemp(prefix="prefect-harness-")
        shutil.copyfile(template, Path(folder) / "prefect-test.db")
        return folder

    with ExitStack() as stack:
        with mock.patch.object(testing, "mkdtemp", folder_with_copy):  # while it starts only
            stack.enter_context(testing.prefect_test_harness(server_startup_timeout=timeout))
        yield


def copy_of(template: Path, path: Path) -> str:
    """Copy ``template`` to ``path``; return its database URL for Prefect."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return sqlite_url(path)


@contextmanager
def prefect_server(
    base_dir: Path, timeout: float = SERVER_START_TIMEOUT, db_template: Path | None = None
) -> Iterator[PrefectServer]:
    """A real ``prefect server start`` on a free loopback port, SQLite in ``base_dir``
    (a copy of ``db_template``, already migrated, if given)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = base_dir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    database = {}
    if db_template is not None:
        database["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = copy_of(
            db_template, home / "prefect.db"
        )
    env = clean_env(
        **database,
        PREFECT_HOME=str(home),
        PREFECT_UI_API_URL=f"{url}/api",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_LOGGING_SERVER_LEVEL="WARNING",
    )
    cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with process("prefect-server", cmd, env, base_dir / "logs") as proc:

        def healthy() -> bool:
            return http_json("GET", f"{url}/api/health", timeout=2) is True

        wait_for(healthy, timeout, f"the Prefect server's /api/health on {url}", 0.3, proc)
        yield PrefectServer(url=url, home=home, process=proc, log_dir=base_dir / "logs")


@contextmanager
def emulator_process(
    log_dir: Path, *options: str, timeout: float = 30.0
) -> Iterator[tuple[str, Process]]:
    """``python -m emulator --port 0 [options]``; yields (base URL ending in /v1, process)."""
    cmd = [sys.executable, "-m", "emulator", "--host", "127.0.0.1", "--port", "0", *options]
    with process("emulator", cmd, clean_env(), log_dir) as proc:
        prefix = "emulator listening on "

        def base_url() -> str | None:
            for line in tail(proc.log, 100_000).splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            return None

        url = wait_for(base_url, timeout, "the emulator's listening line", 0.1, proc)
        wait_for(
            lambda: (
                http_json("GET", url.removesuffix("/v1") + "/_emulator/health", timeout=2)
                is not None
            ),
            timeout,
            "the emulator's health endpoint",
            0.1,
            proc,
        )
        yield url, proc


def server_and_emulator(
    stack: ExitStack,
    base_dir: Path,
    api_key: str,
    db_template: Path | None = None,
    **env: str,
) -> tuple[PrefectServer, str, dict[str, str]]:
    """A Prefect server and an emulator that checks ``api_key``, both stopped by ``stack``;
    returns them with the environment for a worker or serve process that uses both."""
    server = stack.enter_context(prefect_server(base_dir, db_template=db_template))
    emulator_url, _ = stack.enter_context(emulator_process(server.log_dir, "--api-key", api_key))
    client_env = server.client_env(KLUSTER_API_KEY=api_key, KLUSTER_BASE_URL=emulator_url, **env)
    return server, emulator_url, client_env


@dataclass
class RealBackend:
    """The session's real Prefect server and emulator process (see conftest.real_backend)."""

    server: PrefectServer
    emulator_url: str  # ends in /v1
    work: Path  # a folder of the session's own, for the runs' files

    def client_env(self, api_key: str, **overrides: str) -> dict[str, str]:
        """Environment for a worker, serve or CLI process that uses both."""
        return self.server.client_env(
            KLUSTER_API_KEY=api_key, KLUSTER_BASE_URL=self.emulator_url, **overrides
        )


class BackgroundBackend:
    """``server_and_emulator`` entered in a thread, so the processes boot while the caller
    does other work; ``result()`` waits for them (bounded) and re-raises a failed start.
    Leaving the context stops both processes."""

    def __init__(
        self,
        base_dir: Path,
        api_key: str,
        timeout: float = 2 * SERVER_START_TIMEOUT,
        db_template: Callable[[], Path] | None = None,
    ):
        self._base, self._key, self._timeout = base_dir, api_key, timeout
        self._db_template = db_template
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._value: RealBackend | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="real-backend", daemon=True)

    def _run(self) -> None:
        try:
            # The template is made (or waited for) here, not by the caller.
            template = self._db_template() if self._db_template is not None else None
            with ExitStack() as stack:
                server, url, _ = server_and_emulator(stack, self._base, self._key, template)
                self._value = RealBackend(server=server, emulator_url=url, work=self._base)
                self._ready.set()
                self._stop.wait()
        except BaseException as exc:  # handed to result()
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> BackgroundBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=STOP_TIMEOUT * 3)

    def result(self) -> RealBackend:
        if not self._ready.wait(self._timeout):
            raise TimeoutError(
                f"timed out after {self._timeout:g}s waiting for the real server and emulator"
            )
        if self._value is None:
            raise RuntimeError("the real server and emulator did not start") from self._error
        return self._value


def delete_deployments() -> None:
    """Remove every deployment from the server this process talks to,
    so a module that deploys starts from none whatever ran on the shared server before."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            client.delete_deployment(deployment.id)


def run_cli(
    args: Sequence[str], env: dict[str, str], timeout: float = 120.0, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run a ``prefect`` CLI command to completion; raise with its output if it fails."""
    result = subprocess.run(
        [PREFECT, *args],
        cwd=str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"prefect {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def read_events(server: PrefectServer, prefix: str, limit: int = 50) -> list[dict]:
    """Events whose name starts with ``prefix``, read back through POST /api/events/filter."""
    body = {"filter": {"event": {"prefix": [prefix]}}, "limit": limit}
    page = server.api("POST", "/events/filter", body)
    return list(page.get("events") or [])


def drain_events(timeout: float = 10.0) -> None:
    """Flush this process's queued Prefect events (before their server goes away)."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout, at_exit=False)


@contextmanager
def prefect_api(api_url: str) -> Iterator[None]:
    """Point this process's Prefect client at ``api_url`` for the block.

    Prefect keeps one events worker per process, keyed without the API URL, so a worker started
    earlier (say, by a flow run on the session's test harness) would go on sending this block's
    events to the old server. Draining it on the way in makes the next event start one for
    ``api_url``; draining on the way out flushes this block's events while their server is up.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    drain_events()
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            yield
        finally:
            drain_events()


def pause_deployment(name: str) -> None:
    """Pause ``flow-name/deployment-name`` so its schedule starts nothing during the tests."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.pause_deployment(client.read_deployment_by_name(name).id)


def create_process_pool(name: str) -> None:
    """What ``prefect work-pool create NAME --type process --overwrite`` does (the process
    worker's default job template), through the API rather than one more CLI process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name=name, type="process", base_job_template=template), overwrite=True
        )


if __name__ == "__main__":  # `python -m tests.server template`: what `make test` runs first
    if sys.argv[1:] != ["template"]:
        raise SystemExit("usage: python -m tests.server template")
    import shutil

    VENV_TEMPLATE.unlink(missing_ok=True)
    made = migrated_sqlite_template(VENV_TEMPLATE.parent)
    shutil.rmtree(VENV_TEMPLATE.parent / "prefect-migrated-template.work", ignore_errors=True)
    print(f"Prefect's database schema, migrated once for the tests: {made}")
