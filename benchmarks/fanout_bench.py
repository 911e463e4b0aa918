"""Benchmark (f), issue 10: one large job on one worker and on two (``limits.distribute``).

    .venv/bin/python benchmarks/fanout_bench.py [--n 1000000] [--quick] [--workdir DIR]

The production shape, started once and stopped at the end (also on Ctrl-C or an error):
PostgreSQL, a Prefect server on it, the emulator as a subprocess processing batches as fast
as it can, a process work pool, and process workers A and B, each on a "machine" of its own
(tests/production.py) sharing nothing but the server and a local directory that stands in
for shared storage (``KLUSTER_STORAGE_ROOTS``). Everything listens on 127.0.0.1.

One request file of N real-world-shaped requests (benchmarks/data.py, the shapes of (d))
is written once. Then the same job runs twice, on a fresh output path and work directory
and a reset emulator (so the second run finds no batch of the first):

  1. one worker: only A is started; the job without ``distribute``;
  2. two workers: B is started too; the same job with ``distribute=3``.

Both workers take at most 2 flow runs at once (``--limit 2``): the parent run holds one
slot of the worker it lands on, so of its three children that worker takes one and the other
worker two. Three groups with that limit is the split that puts children on both workers
every time (with two groups, both children can land on the worker without the parent).

Shards: N/20 requests each (50,000 at 1M: about 44 MB of these requests, under the 100 MB
file limit), so 20 batches and about a hundred task runs, whatever N; ``max_concurrency``
20, so every batch can run at once and the cap is not what limits the run.

Measured for each run: wall time from the submission of the flow run to its end time as the
server records it (COMPLETED; it includes the worker's pick-up and the flow-run process's
start, which "in run", the server's start -> end, leaves out), and per worker machine the
peak of the summed RSS of all its processes (the worker, its flow-run processes and their
helpers), sampled every 0.2 s from /proc (a sum of RSS counts pages the processes share,
such as the interpreter's, once per process); plus the CPU time of each machine's processes
and of the emulator over the run. A warm-up job of 1,000 requests runs on A first (not with
--quick), so that neither run pays for a cold emulator tokenizer or cold file caches. Both
outputs must have N lines, in input order, and be byte-identical, or the benchmark fails.

On one machine both "machines" share the same CPUs (2 here) with the emulator, the server
and PostgreSQL: "two workers" shows what fan-out costs and how the memory splits, not the
speed-up separate machines would give. No target: the figures are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from data import write_realistic_requests  # noqa: E402
from steps import proc_stat  # noqa: E402

from tests.production import (  # noqa: E402
    MACHINE_ENV,
    ProductionServer,
    Worker,
    create_process_pool,
    deploy,
    postgres,
    prefect_server_on,
    ran_by,
    wait_for_state,
    worker,
)
from tests.server import emulator_process, http_json, prefect_api  # noqa: E402

DEFAULT_N = 1_000_000
QUICK_N = 2_000
SHARDS = 20  # max_requests_per_file = ceil(N / SHARDS): 50,000 at 1M
GROUPS = 3  # distribute= in the two-worker run (see the module docstring)
WORKER_LIMIT = 2  # flow runs each worker takes at once
MAX_CONCURRENCY = SHARDS
SAMPLE_SECONDS = 0.2
WARM_UP_N = 1_000
POOL = "kluster-bench-pool"
BATCH_ENTRYPOINT = "prefect_kluster.flows.batch_inference.batch_inference"
GROUP_ENTRYPOINT = "prefect_kluster.flows.fanout.shard_group"
BATCH_DEPLOYMENT = "kluster-batch-inference/batch"
GROUP_DEPLOYMENT_NAME = "kluster-shard-group"  # SHARD_GROUP_DEPLOYMENT is flow/this
API_KEY = "kluster-bench-key"  # the emulator's, on 127.0.0.1 only
PAGE = os.sysconf("SC_PAGE_SIZE")


def mb(size: float) -> float:
    return size / 1e6


def run_timeout(n: int) -> float:
    return 600.0 + n * 0.004  # 1M: 77 minutes at most, on a busy 2-CPU machine


# --- sampling /proc --------------------------------------------------------------------------


def _rss(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _machine_of(pid: str, machines: dict[bytes, str]) -> str | None:
    """The machine whose MACHINE_ENV entry the process's environment holds, or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry in machines:
            return machines[entry]
    return ""  # read, and on no machine


@dataclass
class Usage:
    peak_rss: int = 0  # bytes: the largest sum of RSS seen in one sample
    procs_at_peak: int = 0
    most_procs: int = 0
    cpu: float = 0.0  # seconds of user+system over the sampled time


class Sampler:
    """Every ``interval`` s: the summed RSS of each machine's processes (found by
    MACHINE_ENV in their environment) and of named single processes (the emulator); the
    peak of each sum, and the CPU time each group spent while sampled (processes that end
    between two samples lose at most an interval of their CPU time)."""

    def __init__(
        self,
        workers: list[Worker],
        pids: dict[str, int] | None = None,
        interval: float = SAMPLE_SECONDS,
    ):
        self.machines = {f"{MACHINE_ENV}={w.machine_id}".encode(): w.name for w in workers}
        self.pids = {str(pid): name for name, pid in (pids or {}).items()}
        self.interval = interval
        self.usage = {name: Usage() for name in [*self.machines.values(), *self.pids.values()]}
        self.samples = 0
        self._owner: dict[tuple[str, int], str] = {}  # (pid, start) -> group ("" = none)
        self._cpu_base: dict[tuple[str, int], float] = {}
        self._cpu_last: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fanout-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()
        for key, last in self._cpu_last.items():
            self.usage[self._owner[key]].cpu += last - self._cpu_base.get(key, 0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        rss = dict.fromkeys(self.usage, 0)
        count = dict.fromkeys(self.usage, 0)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            stat = proc_stat(pid)
            if stat is None or stat[3] == "Z":
                continue
            _, started, cpu, _ = stat
            key = (pid, started)
            owner = self._owner.get(key)
            if owner is None:
                owner = self.pids.get(pid) or _machine_of(pid, self.machines)
                if owner is None:
                    continue  # gone, or unreadable: ask again next time
                self._owner[key] = owner
            if not owner:
                continue
            if first:
                self._cpu_base[key] = cpu  # CPU spent before the run is not the run's
            self._cpu_last[key] = cpu
            rss[owner] += _rss(pid)
            count[owner] += 1
        for name, usage in self.usage.items():
            usage.most_procs = max(usage.most_procs, count[name])
            if rss[name] > usage.peak_rss:
                usage.peak_rss, usage.procs_at_peak = rss[name], count[name]
        self.samples += 1


# --- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    base: Path
    shared: Path  # the "shared storage" every worker reaches (KLUSTER_STORAGE_ROOTS)
    server: ProductionServer
    emulator_url: str  # ends in /v1
    emulator_pid: int
    env: dict[str, str]
    group_deployment_id: str
    exits: ExitStack
    workers: dict[str, Worker] = field(default_factory=dict)

    def emulator(self, method: str, path: str, body: Any = None) -> Any:
        return http_json(method, self.emulator_url.removesuffix("/v1") + path, body)

    def start_worker(self, name: str) -> Worker:
        w = self.exits.enter_context(
            worker(self.server, POOL, name, self.base, env=self.env, limit=WORKER_LIMIT)
        )
        self.workers[name] = w
        return w


@contextmanager
def production_stack(base: Path) -> Iterator[Stack]:
    """PostgreSQL, a Prefect server, the emulator, a process pool and both deployments; no
    worker yet (``Stack.start_worker``). Everything stops when the block is left."""
    shared = base / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    emulator_data = base / "emulator-data"
    emulator_data.mkdir(exist_ok=True)
    with ExitStack() as exits:
        pg = exits.enter_context(postgres(base))
        server = exits.enter_context(prefect_server_on(pg.url, base))
        emulator_url, emulator = exits.enter_context(
            emulator_process(base / "logs", "--api-key", API_KEY, "--data-dir", str(emulator_data))
        )
        create_process_pool(server, POOL)
        deploy(server, BATCH_ENTRYPOINT, "batch", POOL)
        group_id = deploy(server, GROUP_ENTRYPOINT, GROUP_DEPLOYMENT_NAME, POOL)
        exits.enter_context(prefect_api(server.api_url))
        env = {
            "KLUSTER_API_KEY": API_KEY,
            "KLUSTER_BASE_URL": emulator_url,
            "KLUSTER_STORAGE_ROOTS": str(shared),
        }
        stack = Stack(base, shared, server, emulator_url, emulator.popen.pid, env, group_id, exits)
        yield stack


# --- one run ---------------------------------------------------------------------------------


@dataclass
class RunFigures:
    label: str
    wall: float  # submission -> the run's end time on the server
    in_run: float  # the run's start time -> end time on the server
    load: float
    usage: dict[str, Usage]
    output: Path
    placement: dict[str, str]  # run -> worker
    samples: int


def job(stack: Stack, source: Path, tag: str, n: int, distribute: int | None) -> dict[str, Any]:
    out = stack.shared / tag
    out.mkdir(parents=True, exist_ok=True)
    return {
        "input_path": str(source),
        "output_path": str(out / "out.jsonl"),
        "output": {"work_dir": str(out / "work"), "overwrite": True},
        "run": {"poll_interval": 0.5, "max_poll_interval": 1.0},
        "limits": {
            "max_requests_per_file": max(1, -(-n // SHARDS)),
            "max_concurrency": MAX_CONCURRENCY,
            "distribute": distribute,
        },
    }


def _server_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def run_job(stack: Stack, label: str, parameters: dict[str, Any], timeout: float) -> RunFigures:
    """Start the batch deployment with ``parameters`` and wait until it completed, sampling
    every worker machine and the emulator meanwhile."""
    from prefect.deployments import run_deployment

    stack.emulator("POST", "/_emulator/reset")  # no batch of an earlier run to attach to
    load = os.getloadavg()[0]
    before = {r["id"] for r in _group_runs(stack)}
    with Sampler(list(stack.workers.values()), {"emulator": stack.emulator_pid}) as sampler:
        submitted = time.time()
        run_id = str(run_deployment(BATCH_DEPLOYMENT, parameters=parameters, timeout=0).id)
        run = wait_for_state(stack.server, run_id, {"COMPLETED"}, timeout)
    wall = _server_time(run["end_time"]) - submitted
    in_run = _server_time(run["end_time"]) - _server_time(run["start_time"])
    placement = {"parent": ran_by(stack.server, run_id) or "?"}
    for child in sorted(_group_runs(stack), key=lambda r: r["name"]):
        if child["id"] not in before:
            group = child["name"].split("-")[2]  # shard-group-{g}-r{round}-{job}
            placement[f"group {group}"] = ran_by(stack.server, child["id"]) or "?"
    return RunFigures(
        label,
        wall,
        in_run,
        load,
        sampler.usage,
        Path(parameters["output_path"]),
        placement,
        sampler.samples,
    )


def _group_runs(stack: Stack) -> list[dict[str, Any]]:
    body = {"deployments": {"id": {"any_": [stack.group_deployment_id]}}, "limit": 200}
    return stack.server.api("POST", "/flow_runs/filter", body)


# --- checks ----------------------------------------------------------------------------------


def same_bytes(a: Path, b: Path, chunk: int = 1 << 22) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def check_outputs(source: Path, outputs: list[Path], n: int) -> dict[str, int]:
    """Both outputs byte-identical, N lines, each line's custom_id that of the request on
    the same line of the input; the count of each status. Raises SystemExit otherwise."""
    import msgspec

    class Line(msgspec.Struct):
        custom_id: str
        status: str | None = None

    class Request(msgspec.Struct):
        custom_id: str

    first, *others = outputs
    for other in others:
        if not same_bytes(first, other):
            raise SystemExit(f"fan-out: outputs differ: {first} vs {other}")
    line_decoder, request_decoder = msgspec.json.Decoder(Line), msgspec.json.Decoder(Request)
    statuses: dict[str, int] = {}
    lines = 0
    with open(source, "rb") as requests, open(first, "rb") as results:
        for number, (request, result) in enumerate(zip(requests, results, strict=False), 1):
            expected = request_decoder.decode(request).custom_id
            row = line_decoder.decode(result)
            if row.custom_id != expected:
                raise SystemExit(
                    f"fan-out: output line {number} is {row.custom_id!r}, input {expected!r}"
                )
            statuses[str(row.status)] = statuses.get(str(row.status), 0) + 1
            lines = number
        extra = results.readline()
    if lines != n or extra:
        raise SystemExit(f"fan-out: output has {lines}{'+' if extra else ''} lines, not {n:,}")
    return statuses


# --- the benchmark ---------------------------------------------------------------------------


def _rss_text(figures: RunFigures, name: str) -> str:
    usage = figures.usage.get(name)
    if usage is None or not usage.most_procs:
        return f"{name} -"
    return f"{name} {mb(usage.peak_rss):.1f} MB ({usage.procs_at_peak} proc.)"


def _cpu_text(figures: RunFigures) -> str:
    return ", ".join(f"{name} {u.cpu:.1f} s" for name, u in figures.usage.items() if u.most_procs)


def run_fanout(work: Path, n: int, quick: bool = False, source: Path | None = None) -> dict:
    """Both runs on one stack; prints the block and returns the figures."""
    began = time.monotonic()
    base = work / "fanout"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    per_shard = max(1, -(-n // SHARDS))
    print(
        f"\n(f) fan-out: one job of N={n:,} real-world requests, {SHARDS} shards of "
        f"{per_shard:,} (max_concurrency {MAX_CONCURRENCY}), on one worker and on two "
        f"(distribute={GROUPS}, --limit {WORKER_LIMIT} per worker)",
        flush=True,
    )
    with production_stack(base) as stack:
        requests = stack.shared / "requests.jsonl"
        if source is not None and source.exists() and _lines(source) == n:
            try:  # the bench's (d) file: the same generator and N
                os.link(source, requests)
            except OSError:
                shutil.copyfile(source, requests)
        else:
            write_realistic_requests(requests, n)
        size = requests.stat().st_size
        print(
            f"  stack up in {time.monotonic() - began:.1f} s: PostgreSQL, Prefect server, "
            f"emulator (as fast as it can), pool {POOL}; requests {mb(size):.1f} MB",
            flush=True,
        )
        stack.start_worker("A")
        timeout = run_timeout(n)
        if not quick:  # first flow-run process on the machine: imports from a cold cache
            warm = stack.shared / "warm-up.jsonl"
            with open(requests, "rb") as src, open(warm, "wb") as dst:
                for _, line in zip(range(WARM_UP_N), src, strict=False):
                    dst.write(line)
            w = run_job(stack, "warm-up", job(stack, warm, "warm-up", WARM_UP_N, None), timeout)
            print(f"  warm-up ({WARM_UP_N:,} requests on A): {w.wall:.1f} s", flush=True)
        one = run_job(stack, "one worker", job(stack, requests, "one", n, None), timeout)
        print(
            f"  one worker (A; B not started): {one.wall:.2f} s  [load {one.load:.2f}]  "
            f"peak RSS {_rss_text(one, 'A')}",
            flush=True,
        )
        shutil.rmtree(stack.shared / "one" / "work", ignore_errors=True)
        stack.start_worker("B")
        two = run_job(stack, "two workers", job(stack, requests, "two", n, GROUPS), timeout)
        print(
            f"  two workers (A + B): {two.wall:.2f} s  [load {two.load:.2f}]  peak RSS "
            f"{_rss_text(two, 'A')}, {_rss_text(two, 'B')}",
            flush=True,
        )
        shutil.rmtree(stack.shared / "two" / "work", ignore_errors=True)
        statuses = check_outputs(requests, [one.output, two.output], n)
    ratio = one.wall / two.wall
    where = ", ".join(f"{what} on {name}" for what, name in two.placement.items())
    print(
        f"\n  fan-out, N={n:,} ({mb(size):.1f} MB), {SHARDS} shards of {per_shard:,}:\n"
        f"    one worker : wall {one.wall:8.2f} s (in run {one.in_run:.2f} s)  "
        f"peak RSS {_rss_text(one, 'A')}\n"
        f"    two workers: wall {two.wall:8.2f} s (in run {two.in_run:.2f} s)  "
        f"peak RSS {_rss_text(two, 'A')}, {_rss_text(two, 'B')}\n"
        f"    one / two workers: {ratio:.2f}x  (distribute={GROUPS}: {where})\n"
        f"    CPU over the run, one worker: {_cpu_text(one)}\n"
        f"    CPU over the run, two workers: {_cpu_text(two)}\n"
        f"    outputs: {n:,} lines each, in input order, byte-identical "
        f"({mb(one.output.stat().st_size):.1f} MB; statuses {statuses})\n"
        f"    wall: from submitting the flow run to its end time on the server; peak RSS: the "
        f"largest sum of VmRSS of a machine's processes (worker, flow runs, helpers), sampled "
        f"every {SAMPLE_SECONDS} s ({one.samples} and {two.samples} samples)\n"
        f"    note: both workers share this machine's {os.cpu_count()} CPUs with the "
        f"emulator, the Prefect server and PostgreSQL, so two workers cannot show the "
        f"speed-up of separate machines. No target: reported.\n"
        f"  fan-out section: {time.monotonic() - began:.1f} s in all",
        flush=True,
    )
    return {"n": n, "bytes": size, "one": one, "two": two, "ratio": ratio}


def _lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 22), b""))


def bench_fanout(
    report: Any, work: Path, n: int, quick: bool = False, source: Path | None = None
) -> dict:
    """Section (f) of benchmarks/bench.py: the runs, and two rows and a line in ``report``."""
    figures = run_fanout(work, n, quick, source)
    one, two, size = figures["one"], figures["two"], figures["bytes"]
    for run, ratio, machines in (
        (one, "1.00x", ["A"]),
        (two, f"{figures['ratio']:.2f}x", ["A", "B"]),
    ):
        cpu = sum(u.cpu for name, u in run.usage.items() if name in machines)
        rss = " + ".join(f"{m} {mb(run.usage[m].peak_rss):.0f}" for m in machines)
        report.rows.append(
            ("f fan-out", run.label, f"{n:,}", f"{run.wall:.2f}", f"{cpu:.1f}",
             f"{mb(size) / run.wall:.1f}", rss, ratio, f"{run.load:.2f}")
        )  # fmt: skip
    report.verdicts.append(
        f"fan-out N={n:,}: one worker {one.wall:.1f} s, two workers {two.wall:.1f} s "
        f"({figures['ratio']:.2f}x), peak RSS A {mb(one.usage['A'].peak_rss):.0f} MB alone, "
        f"A {mb(two.usage['A'].peak_rss):.0f} + B {mb(two.usage['B'].peak_rss):.0f} MB "
        f"together (cpu s in the table: the worker machines' processes): no target, "
        f"reported; both workers share this machine's {os.cpu_count()} CPUs"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="requests in the job")
    parser.add_argument(
        "--quick", action="store_true", help=f"N={QUICK_N:,}, no warm-up: a check, not a figure"
    )
    parser.add_argument("--workdir", help="where data goes (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    n = QUICK_N if args.quick else args.n
    if n < SHARDS:
        parser.error(f"--n must be at least {SHARDS}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kluster-fanout-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(
        f"fan-out benchmark: N={n:,}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, workdir {work}",
        flush=True,
    )
    try:
        run_fanout(work, n, args.quick)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
