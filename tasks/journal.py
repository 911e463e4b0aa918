"""The run's record of intent before each paid call, kept in its work directory.

Before an upload or a batch create, the journal gets an ``*_intent`` record; after it, the
id. A run that dies between the two still knows what it may have paid for, and a rerun
(on any machine that reaches the work directory) looks the batch up on the service (by
the shard key in its metadata) instead of paying again. The service stays the source of
truth: the journal only narrows the search.

Object stores have no append, so each record is an object of its own, written once:
``<state dir>/<shard key>/<time ns>-<event>-<random>.json``. Reading a shard's records
lists its folder only.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from prefect_kluster.tasks import storage


def _folder(key: str) -> str:
    return key.replace(":", "_").replace("/", "_")


class Journal:
    def __init__(self, state_dir: str):
        self.state_dir = str(state_dir)

    def record(self, event: str, key: str, **fields: Any) -> None:
        """Write one record; it is durable when this returns."""
        at = time.time()
        body = json.dumps({"event": event, "key": key, "at": at, **fields}).encode()
        name = f"{time.time_ns():020d}-{event}-{uuid.uuid4().hex[:8]}.json"
        storage.create_once(storage.join(self.state_dir, _folder(key), name), body)

    def _read(self, paths: list[str]) -> list[dict[str, Any]]:
        out = []
        for _, raw in sorted(storage.read_many(paths).items()):
            try:
                out.append(json.loads(raw))
            except ValueError:  # never written whole; skip it
                continue
        return out

    def events(self, key: str | None = None) -> list[dict[str, Any]]:
        if key is not None:
            return self._read(storage.listdir(storage.join(self.state_dir, _folder(key))))
        paths = [p for folder in storage.listdir(self.state_dir) for p in storage.listdir(folder)]
        events = self._read(paths)
        events.sort(key=lambda e: e.get("at", 0))
        return events

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
