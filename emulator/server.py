"""Run the emulator: in a background thread for tests, or in the foreground for the CLI."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from .app import create_app
from .config import EmulatorConfig
from .state import Store

START_TIMEOUT = 15.0


class Emulator:
    """Handle on a running emulator: where it listens, and its live options and state."""

    def __init__(self, store: Store, host: str, port: int) -> None:
        self._store = store
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}/v1"

    @property
    def data_dir(self) -> Path:
        """Where files are stored (a temp dir removed on exit unless config.data_dir was set)."""
        return self._store.data_dir

    @property
    def config(self) -> EmulatorConfig:
        """The live config object (changes through configure() show here)."""
        return self._store.config

    def configure(self, **changes: Any) -> EmulatorConfig:
        """Change options at runtime, e.g. turn faults on or off; all-or-nothing."""
        return self._store.configure(**changes)

    def stats(self) -> dict[str, Any]:
        return self._store.stats()

    def reset(self) -> None:
        """Drop all files, batches and counters."""
        self._store.reset()


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so port 0 resolves to a known free port up front."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets that say TCP, and
    # without it every response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def uvicorn_config(
    app: Any, log_level: str = "warning", access_log: bool = False
) -> uvicorn.Config:
    # h11 explicitly: dropping a connection relies on its request cycle's transport.
    return uvicorn.Config(
        app,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=5,
    )


def _wait_until_answering(host: str, port: int, thread: threading.Thread) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("emulator server thread exited during startup")
        conn = http.client.HTTPConnection(host, port, timeout=1)
        try:
            conn.request("GET", "/_emulator/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.01)
    raise RuntimeError(f"emulator did not answer on {host}:{port} within {START_TIMEOUT}s")


@contextmanager
def run_emulator(
    config: EmulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[Emulator]:
    """Serve the emulator from a background thread; stops server and workers on exit."""
    app = create_app(config)
    store: Store = app.state.store
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="emulator-server", daemon=True
    )
    thread.start()
    try:
        _wait_until_answering(host, bound_port, thread)
        yield Emulator(store, host, bound_port)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        store.close()
        sock.close()
