"""Cost through the batch flow: the estimate before paying, the cap, estimate-only, the actual
cost in the result, the summary and the events, and a budget shared by concurrent runs."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest

from prefect_kluster.emulator.pricing import window_price
from prefect_kluster.flows import batch_inference
from prefect_kluster.tasks.budget import BudgetRefused, SpendingLimit, budget_status
from prefect_kluster.tasks.cost import BudgetExceeded
from tests.helpers import read_jsonl
from tests.test_cost import WORKLOADS, write_rows

FAST = {"poll_interval": 0.05}


def _run(tmp_path, rows, name="o", ensure_ascii=True, **groups):
    groups.setdefault("run", dict(FAST))
    return batch_inference(
        input_path=str(write_rows(tmp_path / f"{name}.in.jsonl", rows, ensure_ascii)),
        output_path=str(tmp_path / f"{name}.jsonl"),
        **groups,
    )


def _held(status) -> tuple[float, float]:
    """(dollars still reserved, dollars settled as spent) of a budget's reservations."""
    reserved = sum(r.reserved_usd for r in status.reservations if r.state == "reserved")
    spent = sum(r.spent_usd or 0.0 for r in status.reservations if r.state == "settled")
    return reserved, spent


def _usage_times_price(output, window: str) -> Decimal:
    """The emulator's own token counts (in the results) times its prices, exactly."""
    total = Decimal(0)
    for line in read_jsonl(output):
        if line["status"] != "ok":
            continue
        price_in, price_out = window_price(line["model"], window)
        total += (
            Decimal(line["usage"]["prompt_tokens"]) * Decimal(str(price_in))
            + Decimal(line["usage"]["completion_tokens"]) * Decimal(str(price_out))
        ) / Decimal(1_000_000)
    return total


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("window", ["24h", "72h"])
def test_estimate_bounds_the_actual_cost_which_is_usage_times_price(
    tmp_path, kluster_env, workload, window
):
    make_rows, ensure_ascii = WORKLOADS[workload]
    result = _run(
        tmp_path, make_rows(), ensure_ascii=ensure_ascii, run={**FAST, "completion_window": window}
    )
    assert result.status == "completed"
    expected = _usage_times_price(result.output_path, window)
    assert expected > 0
    assert Decimal(str(result.cost_usd)) == pytest.approx(expected, rel=Decimal("1e-12"))
    assert result.estimate is not None
    assert result.estimate.upper_usd(window) >= result.cost_usd
    assert set(result.estimate.windows) >= {"24h", "48h", "72h"}


def test_a_run_over_max_cost_is_refused_before_any_upload(tmp_path, kluster_env):
    rows = WORKLOADS["image parts"][0]()
    with pytest.raises(BudgetExceeded) as err:
        _run(tmp_path, rows, limits={"max_cost": 0.000001})
    text = str(err.value)
    assert "Refused before any upload" in text and "$0.000001" in text
    assert "Costliest models:" in text
    stats = kluster_env.stats()["requests"]
    assert stats.get("POST /v1/files", 0) == 0 and stats.get("POST /v1/batches", 0) == 0
    assert not (tmp_path / "o.jsonl").exists()


def test_estimate_only_pays_nothing_and_leaves_the_table(tmp_path, kluster_env):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    rows = WORKLOADS["image parts"][0]()
    result = _run(tmp_path, rows, run={**FAST, "estimate_only": True})
    assert result.status == "estimated" and result.batch_ids == []
    assert result.estimate is not None and result.estimate.upper_usd("24h") > 0
    stats = kluster_env.stats()["requests"]
    assert stats.get("POST /v1/files", 0) == 0 and stats.get("POST /v1/batches", 0) == 0
    with get_client(sync_client=True) as client:
        (artifact, *_) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["kluster-cost-estimate"])),
            sort="CREATED_DESC",
            limit=1,
        )
    assert "24h" in artifact.data and "72h" in artifact.data and "Qwen" in artifact.data


def test_without_the_services_prices_the_built_in_table_is_used_and_said(tmp_path, kluster_env):
    from tests.test_cost import LLAMA, line, user

    kluster_env.configure(pricing_unavailable=True)
    rows = [line(f"r{i}", LLAMA, [user("Say hello.")], max_completion_tokens=5) for i in range(3)]
    result = _run(tmp_path, rows)
    assert result.estimate is not None and not result.estimate.prices_from_service
    assert result.cost is not None and "built-in table" in result.cost.price_source
    assert "the service gave no prices" in result.estimate.to_markdown()


# --- a budget shared by runs ---------------------------------------------------------------------


def test_concurrent_runs_share_a_period_budget(tmp_path, kluster_env, monkeypatch):
    """A budget that fits one run: of two started together one runs, the other is refused
    before paying; the first one's reservation is settled when it ends."""
    from tests.test_cost import LLAMA, line, user

    name = f"t{tmp_path.name[-20:].lower().replace('_', '-')}"

    def rows(prefix: str) -> list[dict]:
        return [
            line(f"{prefix}{i}", LLAMA, [user("Tell me a story.")], max_completion_tokens=2000)
            for i in range(50)
        ]

    estimate = _run(tmp_path, rows("p"), name="probe", run={**FAST, "estimate_only": True}).estimate
    upper = estimate.upper_usd("24h")
    monkeypatch.setenv("KLUSTER_BUDGET_USD", str(upper * 1.5))  # room for one run, not two
    monkeypatch.setenv("KLUSTER_BUDGET_NAME", name)
    kluster_env.configure(lines_per_second=5)  # the first run still holds its reservation
    outcomes: dict[str, object] = {}
    start = threading.Barrier(2)

    def run(which: str) -> None:
        start.wait()
        try:
            outcomes[which] = _run(tmp_path, rows(which), name=which)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcomes[which] = exc

    threads = [threading.Thread(target=run, args=(w,)) for w in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    refused = [o for o in outcomes.values() if isinstance(o, BudgetRefused)]
    done = [o for o in outcomes.values() if not isinstance(o, BaseException)]
    assert len(refused) == 1 and len(done) == 1, outcomes
    assert "reserved" in str(refused[0]).lower()
    assert kluster_env.stats()["requests"]["POST /v1/batches"] == 1, "the refused run paid nothing"
    reserved, spent = _held(budget_status(SpendingLimit(name=name, limit_usd=upper * 1.5)))
    assert reserved == 0, "the finished run's reservation was settled"
    assert spent == pytest.approx(done[0].cost_usd, abs=1e-4)


def test_a_failed_run_gives_its_reservation_back(tmp_path, kluster_env, monkeypatch):
    from tests.test_cost import LLAMA, line, user

    name = f"f{tmp_path.name[-20:].lower().replace('_', '-')}"
    monkeypatch.setenv("KLUSTER_BUDGET_USD", "10")
    monkeypatch.setenv("KLUSTER_BUDGET_NAME", name)
    kluster_env.configure(fail_batches=True)
    rows = [line(f"r{i}", LLAMA, [user("Hi")], max_completion_tokens=5) for i in range(3)]
    with pytest.raises(Exception, match="did not complete"):
        _run(tmp_path, rows, run={**FAST, "max_attempts": 1})
    reserved, spent = _held(budget_status(SpendingLimit(name=name, limit_usd=10)))
    assert reserved == 0 and spent == 0


def test_a_cancelled_run_gives_its_reservation_back(tmp_path, kluster_env, monkeypatch):
    """A run not waiting keeps its reservation while its batches run; cancelling its flow
    run (the on_cancellation hook) gives it back and cancels the batches."""
    from types import SimpleNamespace

    from prefect.variables import Variable

    from prefect_kluster.flows.batch_inference import cancel_remote_batches_hook
    from prefect_kluster.tasks.pending import list_pending
    from tests.test_cost import LLAMA, line, user

    name = f"c{tmp_path.name[-20:].lower().replace('_', '-')}"
    monkeypatch.setenv("KLUSTER_BUDGET_USD", "10")
    monkeypatch.setenv("KLUSTER_BUDGET_NAME", name)
    kluster_env.configure(lines_per_second=1)  # still running when cancelled
    rows = [line(f"r{i}", LLAMA, [user("Hi")], max_completion_tokens=5) for i in range(20)]
    pending = _run(tmp_path, rows, run={**FAST, "wait": False})
    assert pending.status == "pending"
    limit = SpendingLimit(name=name, limit_usd=10)
    reserved, _ = _held(budget_status(limit))
    assert reserved == pytest.approx(pending.estimate.upper_usd("24h"), rel=1e-3)
    try:
        flow_run = SimpleNamespace(parameters={"output_path": str(tmp_path / "o.jsonl")})
        cancel_remote_batches_hook(None, flow_run, None)
        assert _held(budget_status(limit)) == (0, 0)
        statuses = {b["status"] for b in kluster_env.stats()["batches"]}
        assert statuses <= {"cancelling", "cancelled"}, statuses
    finally:
        for variable in list_pending():
            Variable.unset(variable)
