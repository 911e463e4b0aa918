"""The production shape for end-to-end tests (issue 9): PostgreSQL, a Prefect server on it
that can be killed and started again, an S3-compatible object store (moto's server) and
process workers that share nothing but the Prefect server and the object store.

Built on tests/server.py: every process runs in its own session with its output in a log
file under ``base_dir/logs``, is stopped when its context exits, and every wait is bounded.

Which worker ran a flow run: when a Prefect 3.9 worker submits a flow run it gives the run
the labels ``prefect.worker.name`` and ``prefect.worker.type`` (``BaseWorker.
_give_worker_labels_to_flow_run``); ``ran_by`` reads them back from the server. The flow
run's ``infrastructure_pid`` (``hostname:pid``-style) only names a process, and the
``prefect.worker.submitted-flow-run`` event names the worker only through its related
resources, so the labels are the record to use.

Process workers start each flow run in a new session of its own (Prefect isolates its
process group), so killing a worker's process group does not kill its runs. Every process
of a "machine" carries ``MACHINE_ENV=<machine id>`` in its environment (the flow-run
processes inherit it); ``Worker.kill`` finds them all by it and SIGKILLs them.
"""

from __future__ import annotations

import importlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from tests.server import (
    PREFECT,
    SERVER_START_TIMEOUT,
    PrefectServer,
    Process,
    clean_env,
    free_port,
    http_json,
    process,
    wait_for,
)

PG_ROOT = Path("/usr/lib/postgresql")
PG_VERSION = "15"
PG_SYSTEM_USER = "kluster-pg"  # created once when the machine has no `postgres` user
PG_ROLE = "kluster"
STOP_PG_TIMEOUT = 30.0
MACHINE_ENV = "KLUSTER_TEST_MACHINE"
S3_KEY_ID = "kluster-test-key"
S3_SECRET = "kluster-test-secret"  # moto accepts any pair; not a real credential
S3_REGION = "us-east-1"


# --- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class Postgres:
    url: str  # postgresql+asyncpg://kluster:PASSWORD@127.0.0.1:PORT/DATABASE (for Prefect)
    dsn: str  # postgresql://... (for psql and libpq tools)
    port: int
    data_dir: Path
    process: Process
    started_in: float  # seconds from initdb to accepting connections (database created)


def pg_bin() -> Path:
    """Debian's PostgreSQL binaries: version 15 if present, else the newest installed."""
    preferred = PG_ROOT / PG_VERSION / "bin"
    if (preferred / "initdb").exists():
        return preferred
    found = sorted(PG_ROOT.glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError(
            f"no PostgreSQL under {PG_ROOT}: `make test` installs Debian's postgresql"
        )
    return found[-1].parent


def pg_user() -> str:
    """The unprivileged user PostgreSQL runs as (it refuses to run as root).

    As root: ``postgres`` if it exists, else a system user created once. Otherwise: us."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", PG_SYSTEM_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
        capture_output=True,
        text=True,
    )
    if result.returncode not in (0, 9):  # 9: created meanwhile by another test process
        raise RuntimeError(f"useradd {PG_SYSTEM_USER} failed: {result.stderr}")
    return PG_SYSTEM_USER


def _as_user(user: str, cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *cmd]
    return cmd


@contextmanager
def postgres(
    base_dir: Path, database: str = "prefect", timeout: float = 60.0
) -> Iterator[Postgres]:
    """A throwaway PostgreSQL on a free loopback port with an empty ``database``.

    Its files live in a fresh directory under the system temp dir owned by the server's user
    (pytest's base_dir is private to root); ``pg_ctl stop -m immediate`` and removal at exit."""
    started = time.monotonic()
    bin_dir = pg_bin()
    user = pg_user()
    entry = pwd.getpwnam(user)
    root = Path(tempfile.mkdtemp(prefix="kluster-pg-"))
    try:
        data_dir, sock_dir, pw_file = root / "data", root / "sock", root / "pw"
        sock_dir.mkdir()
        password = secrets.token_hex(12)
        pw_file.write_text(password + "\n")
        for path in (root, sock_dir, pw_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(root, 0o700)
        initdb = [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            PG_ROLE,
            f"--pwfile={pw_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        result = subprocess.run(
            _as_user(user, initdb), cwd=root, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stderr[-4000:]}")
        port = free_port()
        server_cmd = [
            str(bin_dir / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={sock_dir}",
            # Throwaway data: no durability against power loss needed, only against a
            # killed client, which PostgreSQL gives regardless.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]
        pg_env = clean_env(PGPASSWORD=password)
        with process(
            "postgres", _as_user(user, server_cmd), clean_env(), base_dir / "logs", root
        ) as proc:
            try:

                def ready() -> bool:
                    check = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
                    return subprocess.run(check, timeout=10).returncode == 0

                wait_for(ready, timeout, f"PostgreSQL on 127.0.0.1:{port}", 0.2, proc)
                createdb = [
                    str(bin_dir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    PG_ROLE,
                    database,
                ]
                subprocess.run(createdb, env=pg_env, check=True, capture_output=True, timeout=30)
                auth = f"{PG_ROLE}:{password}@127.0.0.1:{port}/{database}"
                yield Postgres(
                    url=f"postgresql+asyncpg://{auth}",
                    dsn=f"postgresql://{auth}",
                    port=port,
                    data_dir=data_dir,
                    process=proc,
                    started_in=time.monotonic() - started,
                )
            finally:
                stop = [str(bin_dir / "pg_ctl"), "stop", "-D", str(data_dir), "-m", "immediate"]
                subprocess.run(
                    _as_user(user, stop), cwd=root, capture_output=True, timeout=STOP_PG_TIMEOUT
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- A Prefect server on that database, killable and restartable -------------------------------


@dataclass
class ProductionServer(PrefectServer):
    """A ``prefect server start`` on PostgreSQL that a test can SIGKILL and start again on
    the same database and port (``kill``, ``start``, ``restart``)."""

    port: int = 0
    db_url: str = ""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    start_timeout: float = SERVER_START_TIMEOUT
    start_times: list[float] = field(default_factory=list)  # seconds each start took
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    def healthy(self) -> bool:
        try:
            return http_json("GET", f"{self.api_url}/health", timeout=2) is True
        except OSError:
            return False

    def start(self) -> float:
        """Start the server (again) on the same port and database; seconds until healthy."""
        if self.process is not None and self.process.popen.poll() is None:
            raise RuntimeError("the Prefect server is already running")
        began = time.monotonic()
        number = len(self.start_times) + 1
        name = "prefect-server" if number == 1 else f"prefect-server-{number}"
        cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self._stack = ExitStack()
        self.process = self._stack.enter_context(process(name, cmd, self.env, self.log_dir))
        wait_for(
            self.healthy,
            self.start_timeout,
            f"the Prefect server's /api/health on {self.url}",
            0.3,
            self.process,
        )
        self.start_times.append(time.monotonic() - began)
        return self.start_times[-1]

    def kill(self) -> None:
        """SIGKILL the server's whole process group, as a crash would; wait until it is gone."""
        os.killpg(self.process.popen.pid, signal.SIGKILL)
        self.process.popen.wait(timeout=10)
        self._stack.close()
        wait_for(lambda: not self.healthy(), 10, "the killed Prefect server to stop answering")

    def restart(self) -> float:
        """Kill, then start again on the same database and port; seconds until healthy."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        self._stack.close()


@contextmanager
def prefect_server_on(
    db_url: str,
    base_dir: Path,
    timeout: float = SERVER_START_TIMEOUT,
    **settings: str,
) -> Iterator[ProductionServer]:
    """A real ``prefect server start`` with its database at ``db_url`` on a free loopback
    port; ``settings`` add or override PREFECT_* variables of the server process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = base_dir / "prefect-server-home"
    home.mkdir(parents=True, exist_ok=True)
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=db_url,
        PREFECT_UI_API_URL=f"{url}/api",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_LOGGING_SERVER_LEVEL="WARNING",
        **settings,
    )
    server = ProductionServer(
        url=url,
        home=home,
        process=None,  # type: ignore[arg-type]  # set by start()
        log_dir=base_dir / "logs",
        port=port,
        db_url=db_url,
        env=env,
        start_timeout=timeout,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- An S3-compatible object store -------------------------------------------------------------


@dataclass
class S3Store:
    endpoint_url: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # the standard AWS variables that point boto3/s3fs at this store
    process: Process
    started_in: float

    def client(self) -> Any:
        """A boto3 S3 client on this store."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        )

    def filesystem(self) -> Any:
        """An s3fs filesystem on this store (fsspec, over HTTP), with no listing cache."""
        import s3fs

        return s3fs.S3FileSystem(
            key=S3_KEY_ID,
            secret=S3_SECRET,
            endpoint_url=self.endpoint_url,
            client_kwargs={"region_name": S3_REGION},
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (a valid S3 name such as ``kluster-test``); ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` under ``prefix``, sorted (all pages)."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@contextmanager
def moto_s3(base_dir: Path, timeout: float = 60.0) -> Iterator[S3Store]:
    """moto's server (``python -m moto.server``) on a free loopback port, as a subprocess so
    every worker reaches the same store over HTTP."""
    started = time.monotonic()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with process("moto-s3", cmd, clean_env(), base_dir / "logs") as proc:

        def answering() -> bool:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2) as response:
                return response.status == 200

        wait_for(answering, timeout, f"moto's server on {endpoint}", 0.2, proc)
        no_file = str(base_dir / "no-aws-config")  # no ~/.aws profile may leak in
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask a metadata address for anything
            "AWS_CONFIG_FILE": no_file,
            "AWS_SHARED_CREDENTIALS_FILE": no_file,
        }
        yield S3Store(
            endpoint_url=endpoint, env=env, process=proc, started_in=time.monotonic() - started
        )


# --- Workers: separate "machines" -------------------------------------------------------------


def machine_pids(machine_id: str) -> list[int]:
    """Every live process whose environment carries ``MACHINE_ENV=machine_id``."""
    needle = f"{MACHINE_ENV}={machine_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return sorted(pids)


def _kill_machine(machine_id: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process (and process group) of a machine until none is left."""
    killed: set[int] = set()

    def gone() -> bool:
        pids = machine_pids(machine_id)
        for pid in pids:
            killed.add(pid)
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)  # its group: helpers it started
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return not pids

    wait_for(gone, timeout, f"every process of {machine_id} to die", 0.1)
    return sorted(killed)


@dataclass
class Worker:
    """A ``prefect worker start --type process`` on its own "machine": its own working
    directory, HOME, PREFECT_HOME and TMPDIR (the process worker runs each flow run in a
    temporary directory under TMPDIR)."""

    name: str
    pool: str
    machine_id: str  # the value of MACHINE_ENV in every process of this machine
    machine_dir: Path  # base_dir/NAME: everything below is this machine's local disk
    work_dir: Path  # the worker's working directory
    home: Path
    prefect_home: Path
    tmp_dir: Path
    env: dict[str, str] = field(repr=False)
    process: Process
    server: PrefectServer = field(repr=False)
    spawned_at: float = 0.0  # time.monotonic() when its process started
    started_in: float | None = None  # seconds from spawn to ONLINE in its pool

    def pids(self) -> list[int]:
        """The worker and every process it started (flow runs included), alive now."""
        return machine_pids(self.machine_id)

    def local_files(self) -> list[Path]:
        """Every file on this machine's local disk (work dir, HOME, PREFECT_HOME, TMPDIR)."""
        return sorted(p for p in self.machine_dir.rglob("*") if p.is_file())

    def alive(self) -> bool:
        return self.process.popen.poll() is None

    def status(self) -> str | None:
        """The worker's status in its pool as the server sees it (ONLINE / OFFLINE)."""
        for row in self.server.api("POST", f"/work_pools/{self.pool}/workers/filter", {}):
            if row["name"] == self.name:
                return row["status"]
        return None

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until the server lists this worker ONLINE; seconds since it was spawned."""
        began = self.spawned_at
        wait_for(
            lambda: self.status() == "ONLINE",
            timeout,
            f"worker {self.name} ONLINE in pool {self.pool}",
            0.3,
            self.process,
        )
        self.started_in = time.monotonic() - began
        return self.started_in

    def kill(self) -> list[int]:
        """``kill -9`` the worker and its flow-run processes (each in its own session); the
        pids killed."""
        os.killpg(self.process.popen.pid, signal.SIGKILL)
        self.process.popen.wait(timeout=10)
        return sorted({self.process.popen.pid, *_kill_machine(self.machine_id)})


def create_process_pool(server: PrefectServer, pool: str) -> None:
    """A process work pool with the default job template, as ``prefect work-pool create
    POOL --type process`` makes it (through the API: the CLI takes seconds to start)."""
    from prefect.workers.process import ProcessWorker

    body = {
        "name": pool,
        "type": "process",
        "base_job_template": ProcessWorker.get_default_base_job_template(),
    }
    server.api("POST", "/work_pools/", body)


@contextmanager
def worker(
    server: PrefectServer,
    pool: str,
    name: str,
    base_dir: Path,
    env: dict[str, str] | None = None,
    limit: int | None = None,
    wait: bool = True,
    timeout: float = 60.0,
    work_queues: Sequence[str] = (),
) -> Iterator[Worker]:
    """A process worker named ``name`` polling ``pool`` every second, on a machine of its own
    under ``base_dir/name``. ``env`` adds variables (S3 store env, KLUSTER_* settings);
    ``limit`` caps its concurrent flow runs; ``work_queues`` limits it to those queues of
    the pool (a run started on a queue goes to its worker); ``wait=False`` returns at once (call
    ``wait_ready``) so several workers can start together. Everything it started is killed
    at exit."""
    machine = base_dir / name
    work_dir, home, prefect_home, tmp_dir = (
        machine / "work",
        machine / "home",
        machine / "prefect-home",
        machine / "tmp",
    )
    for path in (work_dir, home, prefect_home, tmp_dir):
        path.mkdir(parents=True, exist_ok=True)
    machine_id = f"{name}-{uuid4().hex[:12]}"
    worker_env = server.client_env(
        home=prefect_home,
        HOME=str(home),
        TMPDIR=str(tmp_dir),
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_HEARTBEAT_SECONDS="5",
        **{MACHINE_ENV: machine_id},
        **(env or {}),
    )
    cmd = [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    for queue in work_queues:
        cmd += ["--work-queue", queue]
    spawned = time.monotonic()
    with process(f"worker-{name}", cmd, worker_env, base_dir / "logs", work_dir) as proc:
        handle = Worker(
            name=name,
            pool=pool,
            machine_id=machine_id,
            machine_dir=machine,
            work_dir=work_dir,
            home=home,
            prefect_home=prefect_home,
            tmp_dir=tmp_dir,
            env=worker_env,
            process=proc,
            server=server,
            spawned_at=spawned,
        )
        try:
            if wait:
                handle.wait_ready(timeout)
            yield handle
        finally:
            # Flow runs live in sessions of their own: the group stop below misses them.
            _kill_machine(machine_id)


# --- Deployments and flow runs -----------------------------------------------------------------


def deploy(
    server: PrefectServer,
    entrypoint: str,
    name: str,
    pool: str,
    parameters: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
) -> str:
    """Register a deployment of the flow at module path ``entrypoint`` (``package.module.
    flow_function``) on ``pool``, with no pull step: each worker imports the flow from the
    installed code and runs it in its own working directory. Returns the deployment id."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.utilities.callables import parameter_schema

    module_name, _, attribute = entrypoint.rpartition(".")
    flow_obj = getattr(importlib.import_module(module_name), attribute)
    with SyncPrefectClient(server.api_url) as client:
        flow_id = client.create_flow_from_name(flow_obj.name)
        deployment_id = client.create_deployment(
            flow_id=flow_id,
            name=name,
            entrypoint=entrypoint,
            work_pool_name=pool,
            parameters=parameters or {},
            parameter_openapi_schema=parameter_schema(flow_obj.fn).model_dump_for_openapi(),
            job_variables=job_variables or {},
            pull_steps=[],
        )
    return str(deployment_id)


def flow_run(server: PrefectServer, flow_run_id: str) -> dict[str, Any]:
    """The flow run as the server has it (JSON)."""
    return server.api("GET", f"/flow_runs/{flow_run_id}")


def ran_by(server: PrefectServer, flow_run_id: str) -> str | None:
    """The name of the worker that submitted the flow run (its ``prefect.worker.name``
    label), or None if no worker has taken it yet."""
    return (flow_run(server, flow_run_id).get("labels") or {}).get("prefect.worker.name")


def wait_for_state(
    server: PrefectServer, flow_run_id: str, states: set[str], timeout: float
) -> dict[str, Any]:
    """Wait until the flow run's state type is one of ``states`` (e.g. {"COMPLETED"});
    fail on a final state outside them."""
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

    def reached() -> dict[str, Any] | None:
        run = flow_run(server, flow_run_id)
        return run if run.get("state_type") in states | final else None

    run = wait_for(reached, timeout, f"flow run {flow_run_id} in {sorted(states)}", 0.5)
    if run["state_type"] not in states:
        raise AssertionError(f"flow run {flow_run_id} ended {run['state_type']}: {run['state']}")
    return run
