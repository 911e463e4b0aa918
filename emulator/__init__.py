"""A local kluster.ai-compatible Batch API (files, batches, models) for tests and demos.

It speaks the same JSON as the real service (so the openai SDK works unchanged), processes
batches in background threads with a deterministic responder, and can reproduce each known
quirk of the real service and inject faults on demand.
"""

from .app import create_app
from .config import EmulatorConfig
from .server import Emulator, run_emulator

__all__ = ["Emulator", "EmulatorConfig", "create_app", "run_emulator"]
