"""One measured benchmark step, run in a fresh process: ``python steps.py STEP JSON-ARGS``.

Each step prints one JSON object on its last line of output: ``seconds`` (the step's wall
time, imports and setup excluded), ``peak_rss_mb`` (this process's VmHWM, plus the largest
VmHWM seen of any helper process it started), and step-specific figures. A fresh process
per step keeps one step's memory out of another's figures.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

GUIDE_URL = "/v1/chat/completions"
GUIDE_ROLES = {"system", "developer", "user", "assistant", "tool"}


# --- memory -----------------------------------------------------------------------------


def _hwm_mb(pid: int | str = "self") -> float:
    """VmHWM (peak resident set) of a process, in MB (10^6 bytes); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int | str) -> tuple[int, int, float, str] | None:
    """(parent pid, start time in ticks, CPU seconds user+system, state) of a process from
    /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state is field 3 of stat(5), ppid 4; utime 14, stime 15, start 22.
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICKS, fields[0]


def _children_cpu_seconds(exclude: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process's child processes that are
    still running (the temporary Prefect server of ``prefect_backend``), from /proc, but
    for ``exclude`` and its own children (the emulator's process); 0 where there is none or
    no /proc. Read twice around a run, not by a thread: a watcher would take CPU the
    guide's script does not pay."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return 0.0
    stats = {pid: stat for pid in pids if (stat := proc_stat(pid)) is not None}
    me, total = os.getpid(), 0.0
    for pid, (parent, _, cpu, _) in stats.items():
        if pid == exclude:
            continue
        while parent not in (me, exclude) and parent in stats:
            parent = stats[parent][0]
        if parent == me:
            total += cpu
    return total


class HelperWatch:
    """Keeps the largest VmHWM of the helper processes (``tasks._lines.Helper``) started
    while it watches.

    VmHWM is per address space, so a helper started by fork+exec reports its own peak,
    not the parent's (ru_maxrss of children would include the parent's pages at fork).
    The watch is told of each helper as it starts and reads only that helper's status: a
    thread that scanned every task's children every 20 ms took 0.1-0.2 s of CPU in a 2 s
    run of the flow, time the guide's script (which is not watched) did not pay.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self._pids: list[int] = []
        self._started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._original_init: Any = None

    def __enter__(self) -> HelperWatch:
        from prefect_kluster.tasks import _lines

        original = self._original_init = _lines.Helper.__init__
        watch = self

        def init(helper: Any, *args: Any, **kwargs: Any) -> None:
            original(helper, *args, **kwargs)
            watch._pids.append(helper._proc.pid)
            watch._started.set()

        _lines.Helper.__init__ = init  # type: ignore[method-assign]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from prefect_kluster.tasks import _lines

        _lines.Helper.__init__ = self._original_init  # type: ignore[method-assign]
        self._stop.set()
        self._started.set()
        self._thread.join()

    def _run(self) -> None:
        self._started.wait()  # no helper, no polling
        while not self._stop.is_set():
            for pid in list(self._pids):
                self.peak_mb = max(self.peak_mb, _hwm_mb(pid))
            self._stop.wait(self.interval)


def _cpu() -> float:
    """CPU seconds (user + system) of this process and of its children that have ended."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class Clock:
    """Wall and CPU time of a step (CPU: this process and its helper, once it has ended)."""

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self._cpu = _cpu()
        self._start = time.perf_counter()

    def stop(self) -> float:
        seconds = time.perf_counter() - self._start
        self.cpu_seconds = _cpu() - self._cpu
        return seconds


def _result(
    seconds: float, clock: Clock, watch: HelperWatch | None = None, **extra: Any
) -> dict[str, Any]:
    own = _hwm_mb()
    helpers = watch.peak_mb if watch is not None else 0.0
    return {
        "seconds": seconds,
        "cpu_seconds": clock.cpu_seconds,
        "peak_rss_mb": own + helpers,
        "own_rss_mb": own,
        "helper_rss_mb": helpers,
        **extra,
    }


# --- data -------------------------------------------------------------------------------


def gen_requests(path: str, n: int) -> dict[str, Any]:
    from data import write_requests

    return {"bytes": write_requests(Path(path), n)}


def gen_results(output_path: str, error_path: str, n: int) -> dict[str, Any]:
    from data import write_results

    out, err = write_results(n, Path(output_path), Path(error_path))
    return {"bytes": out + err}


def gen_real_requests(path: str, n: int) -> dict[str, Any]:
    from data import write_realistic_requests

    return {"bytes": write_realistic_requests(Path(path), n)}


def gen_real_results(output_path: str, error_path: str, n: int) -> dict[str, Any]:
    from data import write_results

    out, err = write_results(n, Path(output_path), Path(error_path), realistic=True)
    return {"bytes": out + err}


def _plain_read(paths: list[str]) -> float:
    """Seconds to read every line of ``paths`` in Python and do nothing with them: the
    floor any line-by-line step stands on (the issue's yardstick)."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as handle:
            for _ in handle:
                pass
    return time.perf_counter() - start


def page_cache_writes(directory: str, mb: int, idle: float) -> dict[str, Any]:
    """Seconds to write ``mb`` MiB into a new file three times: in 1 MiB writes after
    ``idle`` s in which nothing was freed; again at once, into the pages the first file (now
    deleted) gave back; and after ``idle`` s more, in the pieces our steps write
    (``WRITE_PIECE_BYTES``). See ``tasks._lines.write_all``."""
    from prefect_kluster.tasks._lines import WRITE_PIECE_BYTES, write_all

    block = os.urandom(1 << 20)
    path = Path(directory) / "page-cache-probe.bin"
    figures: dict[str, Any] = {"piece_bytes": WRITE_PIECE_BYTES}
    for name, pause, write in (
        ("idle_seconds", idle, lambda handle: handle.write(block)),
        ("recycled_seconds", 0.0, lambda handle: handle.write(block)),
        ("pieces_idle_seconds", idle, lambda handle: write_all(handle, block)),
    ):
        time.sleep(pause)
        start = time.perf_counter()
        with open(path, "wb") as handle:
            for _ in range(mb):
                write(handle)
        figures[name] = time.perf_counter() - start
        path.unlink()
    return figures


def warm_memory(mb: int) -> dict[str, Any]:
    """Take ``mb`` MiB of memory, every page at once (``MAP_POPULATE``), and give it back,
    so that the steps after it write into pages the machine has touched before (why:
    bench.py's note on the warm-up). Capped at half of what the kernel calls available."""
    import mmap

    available = _available_mb()
    mb = max(0, min(mb, available // 2))
    chunk = 256
    maps = []
    start = time.perf_counter()
    try:
        for taken in range(0, mb, chunk):
            size = min(chunk, mb - taken) << 20
            maps.append(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE))
    finally:
        for region in maps:
            region.close()
    return {"mb": mb, "seconds": time.perf_counter() - start, "available_mb": available}


def _available_mb() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


# --- (a) validate + shard ---------------------------------------------------------------


def ours_shard(source: str, out_dir: str) -> dict[str, Any]:
    from prefect_kluster.tasks.build import shard_request_file

    with HelperWatch() as watch:
        start = Clock()
        shards = shard_request_file(source, out_dir)
        seconds = start.stop()
    return _result(seconds, start, watch, shards=[s.model_dump() for s in shards])


def _guide_problem(request: Any) -> str | None:
    """The fields a careful guide-style script checks, in plain Python."""
    if not isinstance(request, dict):
        return "not an object"
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id"
    if request.get("method") != "POST":
        return "method"
    if request.get("url") != GUIDE_URL:
        return "url"
    body = request.get("body")
    if not isinstance(body, dict):
        return "body"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "model"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages"
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in GUIDE_ROLES:
            return "message role"
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            return "message content"
        for part in content:
            if not isinstance(part, dict):
                return "content part"
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url" and isinstance(part.get("image_url"), dict):
                url = part["image_url"].get("url")
                if isinstance(url, str) and url:
                    continue
            return "content part"
    return None


def baseline_shard(source: str, out_dir: str, max_file_bytes: int) -> dict[str, Any]:
    """The guide's way: a list of dicts, checks in Python, json.dumps into capped files."""
    start = Clock()
    with open(source, encoding="utf-8") as handle:
        requests = [json.loads(line) for line in handle]
    seen: set[str] = set()
    for number, request in enumerate(requests, start=1):
        problem = _guide_problem(request)
        if problem is None and request["custom_id"] in seen:
            problem = "duplicate custom_id"
        if problem is not None:
            raise ValueError(f"line {number}: {problem}")
        seen.add(request["custom_id"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = 0
    size = 0
    handle = None
    for request in requests:
        line = (json.dumps(request) + "\n").encode("utf-8")
        if handle is None or size + len(line) > max_file_bytes:
            if handle is not None:
                handle.close()
            handle = open(out / f"batch-{files:05d}.jsonl", "wb")  # noqa: SIM115
            files += 1
            size = 0
        handle.write(line)
        size += len(line)
    if handle is not None:
        handle.close()
    seconds = start.stop()
    return _result(seconds, start, files=files)


def real_shard(source: str, out_dir: str, without_estimate: bool = True) -> dict[str, Any]:
    """Validate + shard + cost tally (what the flow runs) on real-world-shaped requests,
    beside a plain line read of the same file in this process (before and after; the
    faster read counts), and, if asked, the same pass without the estimate."""
    import shutil

    from prefect_kluster.tasks.build import shard_and_tally, shard_request_file

    reads = [_plain_read([source])]
    with HelperWatch() as watch:
        start = Clock()
        shards, tally = shard_and_tally(source, out_dir)
        seconds = start.stop()
    reads.append(_plain_read([source]))
    extra: dict[str, Any] = {}
    if without_estimate:
        shutil.rmtree(out_dir)
        began = time.perf_counter()
        shard_request_file(source, out_dir)
        extra["seconds_without_estimate"] = time.perf_counter() - began
        reads.append(_plain_read([source]))
    return _result(
        seconds,
        start,
        watch,
        read_seconds=min(reads),
        lines=sum(s.lines for s in shards),
        models=len(tally.models),
        shards=[s.model_dump() for s in shards],
        **extra,
    )


# --- (b) join ---------------------------------------------------------------------------


def ours_join(shards_json: str, result_paths: list[str], output: str) -> dict[str, Any]:
    from prefect_kluster.tasks.join import join_result_files
    from prefect_kluster.tasks.types import Shard

    shards = [Shard.model_validate(s) for s in json.loads(Path(shards_json).read_text())]
    with HelperWatch() as watch:
        start = Clock()
        summary = join_result_files(shards, result_paths, output, overwrite=True)
        seconds = start.stop()
    return _result(
        seconds,
        start,
        watch,
        requests=summary.requests,
        succeeded=summary.succeeded,
        failed=summary.failed,
    )


def real_join(shards_json: str, result_paths: list[str], output: str) -> dict[str, Any]:
    """``ours_join`` on real-world-shaped results, beside a plain line read of the result
    files in this process (before and after; the faster read counts)."""
    reads = [_plain_read(result_paths)]
    result = ours_join(shards_json, result_paths, output)
    reads.append(_plain_read(result_paths))
    return {**result, "read_seconds": min(reads)}


def _guide_joined(custom_id: str, result: dict[str, Any] | None) -> dict[str, Any]:
    if result is None:
        return {
            "custom_id": custom_id,
            "status": "error",
            "content": None,
            "finish_reason": None,
            "usage": None,
            "model": None,
            "error": {"message": "no result", "code": "not_processed"},
        }
    response = result.get("response") or {}
    body = response.get("body") or {}
    status_code = response.get("status_code")
    if result.get("error") is None and not body.get("error") and status_code == 200:
        choice = (body.get("choices") or [{}])[0]
        return {
            "custom_id": custom_id,
            "status": "ok",
            "content": (choice.get("message") or {}).get("content"),
            "finish_reason": choice.get("finish_reason"),
            "usage": body.get("usage"),
            "model": body.get("model"),
            "error": None,
        }
    error = result.get("error") or {}
    return {
        "custom_id": custom_id,
        "status": "error",
        "content": None,
        "finish_reason": None,
        "usage": None,
        "model": body.get("model"),
        "error": {
            "message": error.get("message"),
            "code": error.get("code"),
            "status_code": status_code,
        },
    }


def baseline_join(ids_paths: list[str], result_paths: list[str], output: str) -> dict[str, Any]:
    """The guide's way: whole files in memory, a dict by custom_id, json.dumps per line."""
    start = Clock()
    by_id: dict[str, dict[str, Any]] = {}
    for path in result_paths:
        with open(path, "rb") as handle:
            content = handle.read()  # as `client.files.content(id).content` would give it
        for line in content.decode("utf-8").splitlines():
            if line.strip():
                result = json.loads(line)
                by_id[result["custom_id"]] = result
    requests = ok = 0
    with open(output, "w", encoding="utf-8") as out:
        for ids_path in ids_paths:
            with open(ids_path, encoding="utf-8") as handle:
                for line in handle:
                    custom_id = json.loads(line)
                    joined = _guide_joined(custom_id, by_id.get(custom_id))
                    out.write(json.dumps(joined) + "\n")
                    requests += 1
                    ok += joined["status"] == "ok"
    seconds = start.stop()
    return _result(seconds, start, requests=requests, succeeded=ok)


# --- (c) end to end ---------------------------------------------------------------------


class _EmulatorProcess:
    """The emulator in a process of its own (``python -m emulator``): its work shares the
    machine's cores with the client, not the client's interpreter."""

    def __init__(self, base_url: str, pid: int) -> None:
        self.base_url = base_url
        self.pid = pid

    def stats(self) -> dict[str, Any]:
        from tests.server import http_json

        return http_json("GET", self.base_url.removesuffix("/v1") + "/_emulator/stats")


@contextlib.contextmanager
def bench_emulator(where: str, lines_per_second: float | None = None) -> Iterator[Any]:
    """The emulator for (c) and (c2), ``in-process`` (a thread of the step's process, on its
    interpreter) or in a ``subprocess``; each batch paced at ``lines_per_second`` if given.
    Yields a handle with ``base_url`` and ``stats()`` (and ``pid``, in a subprocess)."""
    if where == "in-process":
        from prefect_kluster.emulator import EmulatorConfig, run_emulator

        with run_emulator(EmulatorConfig(lines_per_second=lines_per_second)) as emu:
            yield emu
        return
    if where != "subprocess":
        raise ValueError(f"emulator: in-process or subprocess, not {where!r}")
    from tests.server import emulator_process

    options = [] if lines_per_second is None else ["--lines-per-second", str(lines_per_second)]
    with (
        tempfile.TemporaryDirectory(prefix="kluster-bench-emulator-") as logs,
        emulator_process(Path(logs), *options) as (url, proc),
    ):
        yield _EmulatorProcess(url, proc.popen.pid)


def _emulator_figures(emu: Any) -> dict[str, Any]:
    batches = emu.stats()["batches"]
    processing = [b["processing_seconds"] or 0.0 for b in batches]
    return {
        "batches": len(batches),
        "emulator_processing_sum": sum(processing),
        "emulator_processing_max": max(processing, default=0.0),
        "emulator_validation_sum": sum(b["validation_seconds"] or 0.0 for b in batches),
        "statuses": sorted({b["status"] for b in batches}),
    }


def prefect_backend() -> Any:
    """The Prefect server the flow steps run against: ``PREFECT_API_URL`` when bench.py was
    given one (``--prefect-api-url``), else a temporary one (about 25 s to start here)."""
    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    # imported only here: it imports Prefect's server (sqlalchemy, FastAPI; about 6 s and
    # 150 MB), which a flow run against a running server never loads
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(server_startup_timeout=120)


def _task_runs(flow_run_id: Any, called_at: float) -> list[list[Any]]:
    """[name, start, end] of the flow run's task runs and the run's own end, in seconds
    from ``called_at`` (the wall clock when the flow was called), as the Prefect server
    recorded them. It records task runs from their events, a moment after they happen: read
    until the join's task run (a completed run's last) is there, every one has ended and a
    second read finds no other (15 s at most)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: list[Any] = []
    seen: set[Any] = set()
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 15.0
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=this_run)
            ids = {r.id for r in runs}
            done = all(r.start_time and r.end_time for r in runs)
            if done and ids == seen and any(r.name.startswith("join-round") for r in runs):
                break
            seen = ids
            time.sleep(0.3)
        flow_run = client.read_flow_run(flow_run_id)
    rows = [
        [
            r.name.rsplit("-", 1)[0],
            r.start_time.timestamp() - called_at,
            r.end_time.timestamp() - called_at,
        ]
        for r in runs
        if r.start_time and r.end_time
    ]
    rows.sort(key=lambda row: row[1])
    if flow_run.end_time is not None:
        end = flow_run.end_time.timestamp() - called_at
        rows.append(["flow run end", end, end])
    return rows


def ours_e2e(
    source: str,
    output: str,
    lines_per_second: float | None = None,
    max_file_bytes: int | None = None,
    emulator: str = "in-process",
) -> dict[str, Any]:
    """The flow on ``source`` against the emulator (``in-process`` or ``subprocess``; each
    batch paced at ``lines_per_second`` if given; shards of at most ``max_file_bytes`` if
    given)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect import flow

    from prefect_kluster.flows.batch_inference import batch_inference

    @flow
    def warm_up() -> int:
        return 1

    limits = {} if max_file_bytes is None else {"max_file_bytes": max_file_bytes}
    with prefect_backend(), bench_emulator(emulator, lines_per_second) as emu:
        emulator_pid = getattr(emu, "pid", None)  # not the Prefect server's CPU
        os.environ["KLUSTER_API_KEY"] = "emulator-key"
        os.environ["KLUSTER_BASE_URL"] = emu.base_url
        warm_up()  # the temporary Prefect server and the flow machinery, before timing
        with HelperWatch() as watch:
            server_cpu = _children_cpu_seconds(exclude=emulator_pid)
            called_at = time.time()
            start = Clock()
            state = batch_inference(
                input_path=source,
                output_path=output,
                output={"overwrite": True},
                run={"poll_interval": 0.2},
                limits=limits,
                return_state=True,
            )
            seconds = start.stop()
            server_cpu = _children_cpu_seconds(exclude=emulator_pid) - server_cpu
        result = state.result()
        figures = _emulator_figures(emu)
        timeline = _task_runs(state.state_details.flow_run_id, called_at)
    return _result(
        seconds,
        start,
        watch,
        status=result.status,
        requests=result.summary.requests,
        succeeded=result.summary.succeeded,
        timeline=timeline,
        server_cpu_seconds=server_cpu,
        **figures,
    )


def split_parts(source: str, part_bytes: int, out_dir: Path) -> list[Path]:
    """``source`` cut at line ends into files of at most ``part_bytes`` (what a user of the
    guide does with a file over the 100 MB limit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    handle = None
    size = 0
    with open(source, "rb") as src:
        for line in src:
            if handle is None or size + len(line) > part_bytes:
                if handle is not None:
                    handle.close()
                parts.append(out_dir / f"part-{len(parts):03d}.jsonl")
                handle = open(parts[-1], "wb")  # noqa: SIM115
                size = 0
            handle.write(line)
            size += len(line)
    if handle is not None:
        handle.close()
    return parts


def _guide_script(client: Any, path: Path, marks: list[tuple[str, float]]) -> tuple[str, int]:
    """The guide's script on one file: upload, create, poll every 0.2 s, ``.content``.
    ``marks`` gets (step, perf_counter at its end) for each step."""
    with open(path, "rb") as handle:
        batch_input_file = client.files.create(file=handle, purpose="batch")
    marks.append(("upload", time.perf_counter()))
    batch_request = client.batches.create(
        input_file_id=batch_input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    marks.append(("create", time.perf_counter()))
    while True:
        batch_status = client.batches.retrieve(batch_request.id)
        if batch_status.status.lower() in ["completed", "failed", "cancelled"]:
            break
        time.sleep(0.2)
    marks.append(("poll until done", time.perf_counter()))
    results = client.files.content(batch_status.output_file_id).content
    marks.append(("download (.content)", time.perf_counter()))
    return batch_status.status, len(results)


def baseline_e2e(
    source: str,
    lines_per_second: float | None = None,
    part_bytes: int | None = None,
    emulator: str = "in-process",
) -> dict[str, Any]:
    """The guide's script shape through the openai SDK on ``source``, or (``part_bytes``)
    on each part of it in turn, cut first (the cut and making the client are timed too),
    against the emulator (``in-process`` or ``subprocess``)."""
    from openai import OpenAI

    scratch = Path(tempfile.mkdtemp(prefix="kluster-guide-parts-"))
    try:
        with bench_emulator(emulator, lines_per_second) as emu:
            start = Clock()
            began = time.perf_counter()
            # The script's own client, timed as the flow's is (its TLS context: 40-55 ms here)
            client = OpenAI(base_url=emu.base_url, api_key="emulator-key")
            marks = [("client", time.perf_counter())]
            parts = [Path(source)]
            if part_bytes is not None:
                parts = split_parts(source, part_bytes, scratch)
                marks.append(("cut", time.perf_counter()))
            runs = [_guide_script(client, part, marks) for part in parts]
            seconds = start.stop()
            figures = _emulator_figures(emu)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    status = "completed" if all(s == "completed" for s, _ in runs) else "failed"
    return _result(
        seconds,
        start,
        status=status,
        parts=len(parts),
        result_bytes=sum(n for _, n in runs),
        timeline=[[step, at - began] for step, at in marks],
        **figures,
    )


# --- (g) the 50-shard hour: status calls and progress updates ----------------------------


def poll_hour(shards: int, scale: float, hour: float = 3600.0) -> dict[str, Any]:
    """A run of ``shards`` batches that wait an hour on a queued service, with every clock
    divided by ``scale``: the emulator holds each batch in ``validating`` for hour/scale s and
    the flow polls at its defaults (10 s, backing off to 60 s) over ``scale``. The counts of
    status calls (the emulator's, per endpoint) and progress updates do not depend on the
    scale, only on how many poll cycles fit in the hour."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from data import MODELS

    from prefect_kluster.emulator import EmulatorConfig, run_emulator
    from prefect_kluster.flows.options import RunOptions
    from prefect_kluster.tasks.wait import RunWatch

    # the module (the package's `batch_inference` attribute is the flow of that name)
    flow_module = importlib.import_module("prefect_kluster.flows.batch_inference")

    updates = 0
    original = flow_module.update_batch_progress

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal updates
        updates += 1
        return original(*args, **kwargs)

    flow_module.update_batch_progress = counted  # the flow's own progress reports
    defaults = RunOptions()
    poll = defaults.poll_interval / scale
    longest = 6 * defaults.poll_interval / scale  # the default backoff cap: 60 s
    work = Path(tempfile.mkdtemp(prefix="kluster-poll-hour-"))
    source = work / "in.jsonl"
    with open(source, "w", encoding="utf-8") as out:
        for i in range(shards * 2):
            body = {"model": MODELS[0], "messages": [{"role": "user", "content": f"q {i}"}]}
            line = {"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**line, "body": body}) + "\n")
    config = EmulatorConfig(lines_per_second=1e-6)  # held: no progress until released
    with prefect_backend(), run_emulator(config) as emu:
        os.environ["KLUSTER_API_KEY"] = "emulator-key"
        os.environ["KLUSTER_BASE_URL"] = emu.base_url
        # The hour: every batch is made and waits, showing no progress, for hour/scale real
        # seconds; then they run to the end. The calls and updates within it are the hour's
        # (the uploads and submits before it would be minutes at full scale, not an hour).
        window: dict[str, tuple[float, int, int, int]] = {}

        def point() -> tuple[float, int, int, int]:
            calls = emu.stats()["requests"]
            return (
                time.monotonic(),
                calls.get("GET /v1/batches", 0),
                calls.get("GET /v1/batches/{id}", 0),
                updates,
            )

        def watched() -> int:  # batches the run's status loop looks at
            return sum(len(w.waiting) for w in list(RunWatch._watches.values()))

        def sample() -> None:
            # The hour starts once every batch runs and the flow watches them all (its wait
            # tasks start one by one: seconds at any scale, so not part of the hour).
            while True:
                statuses = [b["status"] for b in emu.stats()["batches"]]
                if len(statuses) == shards and set(statuses) == {"in_progress"}:
                    if watched() == shards:
                        break
                time.sleep(0.02)
            window["start"] = point()
            time.sleep(hour / scale)
            window["end"] = point()
            emu.configure(lines_per_second=None)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = Clock()
        result = flow_module.batch_inference(
            input_path=str(source),
            output_path=str(work / "out.jsonl"),
            run={"poll_interval": poll, "max_poll_interval": longest},
            limits={"max_requests_per_file": 2, "max_concurrency": shards},
        )
        seconds = start.stop()
        sampler.join()
    shutil.rmtree(work, ignore_errors=True)
    (t0, l0, r0, u0), (t1, l1, r1, u1) = window["start"], window["end"]
    before = {"lists": l0, "retrieves": r0, "progress_updates": u0}
    per_hour = (hour / scale) / (t1 - t0)  # simulated hours per real second of the window
    return _result(
        seconds,
        start,
        status=result.status,
        batches=len(result.batch_ids),
        window_seconds=t1 - t0,
        simulated_window_seconds=(t1 - t0) * scale,
        lists_per_hour=(l1 - l0) * per_hour,
        retrieves_per_hour=(r1 - r0) * per_hour,
        progress_updates_per_hour=(u1 - u0) * per_hour,
        per_batch_polling_per_hour=shards * hour / (6 * defaults.poll_interval),
        start_up=before,  # up to the hour: uploads, submits, the first looks (not scaled)
    )


STEPS = {
    "gen-requests": gen_requests,
    "gen-results": gen_results,
    "gen-real-requests": gen_real_requests,
    "gen-real-results": gen_real_results,
    "real-shard": real_shard,
    "real-join": real_join,
    "ours-shard": ours_shard,
    "baseline-shard": baseline_shard,
    "ours-join": ours_join,
    "baseline-join": baseline_join,
    "ours-e2e": ours_e2e,
    "baseline-e2e": baseline_e2e,
    "poll-hour": poll_hour,
    "page-cache": page_cache_writes,
    "warm-memory": warm_memory,
}


def run_in_process(step: str, args: dict[str, Any]) -> dict[str, Any]:
    """A step in the calling process (``bench.py --in-process``): no interpreter start or
    Prefect import per step, but its peak RSS is the whole process's so far. For checking
    the benchmark, not for figures. The result goes through JSON as a fresh process's does."""
    return json.loads(json.dumps(STEPS[step](**args)))


def main() -> None:
    step, args = sys.argv[1], json.loads(sys.argv[2])
    result = STEPS[step](**args)
    sys.stdout.flush()
    print("\n" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
