"""``python -m emulator``: serve the emulator in the foreground.

The first stdout line is ``emulator listening on http://HOST:PORT/v1`` (flushed) so a parent
process can learn the port chosen for ``--port 0``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

import uvicorn

from .app import create_app
from .config import EmulatorConfig
from .server import bind_socket, uvicorn_config
from .state import Store


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse options for one EmulatorConfig field type."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if isinstance(annotation, types.UnionType) and args else annotation
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is list:
        return {"nargs": "+", "metavar": "VALUE"}
    if base in (int, float):
        return {"type": base}
    return {"type": str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emulator", description="Local kluster.ai-compatible Batch API server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--access-log", action="store_true")
    for name, field in EmulatorConfig.model_fields.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"{field.description} (default: {field.get_default(call_default_factory=True)})",
            **_flag_kwargs(field.annotation),
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {
        name: getattr(args, name)
        for name in EmulatorConfig.model_fields
        if getattr(args, name) is not None
    }
    config = EmulatorConfig(**options)
    app = create_app(config)
    store: Store = app.state.store
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    print(f"emulator listening on http://{args.host}:{port}/v1", flush=True)
    # uvicorn re-raises the signal it caught once it has stopped; make that a no-op so
    # SIGTERM/SIGINT end in a clean exit (status 0) instead of a kill or a traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = uvicorn.Server(uvicorn_config(app, args.log_level, args.access_log))
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
