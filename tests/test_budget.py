"""The budget across runs, against the session's Prefect test server: reservations are
atomic increments of a global concurrency limit, so two runs started together cannot both
fit in a budget that has room for one."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone

import pytest
from prefect import flow

from prefect_kluster.tasks.budget import (
    BudgetRefused,
    Reservation,
    SpendingLimit,
    budget_status,
    release,
    release_finished,
    reserve,
    settle,
)


def fresh_limit(limit_usd: float = 10.0, period: str = "monthly") -> SpendingLimit:
    return SpendingLimit(name=f"t-{uuid.uuid4().hex[:10]}", limit_usd=limit_usd, period=period)


def test_two_runs_started_together_only_one_fits() -> None:
    limit = fresh_limit(10.0)
    start = threading.Barrier(2)
    won: list[Reservation] = []
    refused: list[BudgetRefused] = []

    def run(label: str) -> None:
        start.wait()
        try:
            won.append(reserve(limit, 6.0, label, flow_run_id=None))
        except BudgetRefused as error:
            refused.append(error)

    threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(won) == 1 and len(refused) == 1
    winner = won[0]
    message = str(refused[0])
    # The refusal names the budget, the amounts, and who holds the reservation.
    assert f"budget '{limit.name}'" in message and "$10.00" in message and "$6.00" in message
    assert f"$6.00 by run '{winner.run_label}'" in message
    assert "$4.00 is free" in message
    status = budget_status(limit)
    assert status.used_usd == 6.0
    assert [r.run_label for r in status.reservations] == [winner.run_label]

    # The winner ends having spent $2.50: the rest goes back, and a $7.50 run now fits.
    settled = settle(winner, 2.5)
    assert settled.state == "settled" and settled.spent_usd == 2.5
    assert settle(winner, 2.5).state == "settled"  # settling twice changes nothing
    assert budget_status(limit).used_usd == 2.5
    second = reserve(limit, 7.5, "second")
    assert budget_status(limit).used_usd == 10.0
    with pytest.raises(BudgetRefused, match=r"Spent this period: \$2.50 by run 'run-"):
        reserve(limit, 0.01, "third")
    # A failed or cancelled run gives its whole reservation back (and leaves no record).
    assert release(second).state == "released"
    status = budget_status(limit)
    assert status.used_usd == 2.5
    assert [(r.state, r.spent_usd) for r in status.reservations] == [("settled", 2.5)]
    assert release(second).state == "released"  # twice changes nothing
    assert budget_status(limit).used_usd == 2.5


def test_more_than_the_whole_budget_is_refused() -> None:
    limit = fresh_limit(1.0, "daily")
    with pytest.raises(BudgetRefused, match=r"needs up to \$5.00 but \$1.00 is free"):
        reserve(limit, 5.0, "too-big")
    assert budget_status(limit).reservations == []


def test_periods_are_separate() -> None:
    limit = fresh_limit(1.0, "daily")
    day_one = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    day_two = datetime(2026, 1, 2, 12, tzinfo=timezone.utc)
    held = reserve(limit, 1.0, "first", now=day_one)
    assert held.limit_name.endswith(":2026-01-01")
    with pytest.raises(BudgetRefused):
        reserve(limit, 0.5, "same-day", now=day_one)
    assert reserve(limit, 1.0, "next-day", now=day_two).period_key == "2026-01-02"


def test_a_crashed_run_is_released_once_its_flow_run_is_final() -> None:
    @flow(name="budget-failing-run")
    def failing() -> None:
        raise RuntimeError("boom")

    state = failing(return_state=True)
    assert state.is_failed()
    limit = fresh_limit(5.0)
    crashed = reserve(limit, 4.0, "crashed", flow_run_id=str(state.state_details.flow_run_id))
    alive = reserve(limit, 1.0, "no-flow-run")
    released = release_finished(limit)
    assert [r.id for r in released] == [crashed.id]
    assert budget_status(limit).used_usd == 1.0
    release(alive)
    assert budget_status(limit).used_usd == 0.0
