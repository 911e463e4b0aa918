"""A local, append-only record of intent before each paid call.

Before an upload or a batch create, the journal gets an ``*_intent`` line; after it, the
id. A run that dies between the two still knows what it may have paid for, and a rerun
looks the batch up on the service (by the shard key in its metadata) instead of paying
again. The service stays the source of truth: the journal only narrows the search.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()


class Journal:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def record(self, event: str, key: str, **fields: Any) -> None:
        """Append one event and force it to disk before the caller goes on."""
        line = json.dumps({"event": event, "key": key, "at": time.time(), **fields})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def events(self, key: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        with _lock, open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if key is None or event.get("key") == key:
                    out.append(event)
        return out

    def latest(self, key: str, field: str) -> Any:
        for event in reversed(self.events(key)):
            if event.get(field):
                return event[field]
        return None

    def first_intent_time(self, key: str) -> float | None:
        times = [e["at"] for e in self.events(key) if e["event"].endswith("_intent")]
        return min(times) if times else None

    def first_intent_time_any(self) -> float | None:
        times = [e["at"] for e in self.events() if e["event"].endswith("_intent")]
        return min(times) if times else None

    def batch_ids(self, round_no: int | None = None) -> list[str]:
        """Every batch id this run recorded (of one round, if given), oldest first,
        without repeats. Keys are shard identities: ``sha256:round[:label]``."""
        seen: dict[str, None] = {}
        for event in self.events():
            if not event.get("batch_id"):
                continue
            if round_no is not None and event["key"].split(":")[1:2] != [str(round_no)]:
                continue
            seen[event["batch_id"]] = None
        return list(seen)
