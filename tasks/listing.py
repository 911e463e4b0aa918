"""Bounded walks over the service's list endpoints (batches, files).

The openai SDK's list iterators follow ``after`` cursors until a page comes back empty
when the answer declares no ``has_more``: a service that ignored ``after`` would make a
plain ``for item in client.files.list()`` loop forever. Every walk here stops at a count,
at a time budget and when a page repeats one already seen, with a warning that the scan
was cut, so a run always ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

MAX_ITEMS = 5000
MAX_SECONDS = 120.0

_log = logging.getLogger("prefect.kluster.listing")


def _warn(message: str, *args: Any) -> None:
    try:
        from prefect.logging import get_run_logger

        get_run_logger().warning(message, *args)
    except Exception:  # outside a run
        _log.warning(message, *args)


def bounded(
    first_page: Any,
    what: str,
    max_items: int = MAX_ITEMS,
    max_seconds: float = MAX_SECONDS,
) -> Iterator[Any]:
    """The items of an SDK list answer and its following pages, newest first, within
    ``max_items`` items and ``max_seconds`` seconds, stopping when a page repeats."""
    started = time.monotonic()
    seen_pages: set[tuple[str, ...]] = set()
    count = 0
    for page in first_page.iter_pages():
        ids = tuple(str(getattr(item, "id", "")) for item in page.data)
        if not ids:
            return
        if ids in seen_pages:
            _warn(
                "The service's %s list returned a page it had already sent (it ignores the "
                "'after' cursor); the scan stopped after %d item(s)",
                what,
                count,
            )
            return
        seen_pages.add(ids)
        for item in page.data:
            if count >= max_items:
                _warn("Scanned %d %s (the limit); older ones were not looked at", count, what)
                return
            count += 1
            yield item
        if time.monotonic() - started > max_seconds:
            _warn(
                "Scanning the %s list took over %g s; stopped after %d item(s)",
                what,
                max_seconds,
                count,
            )
            return
