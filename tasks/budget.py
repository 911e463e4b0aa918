"""A spending limit shared by every run, per day or per month, held on the Prefect server.

Each run reserves its upper-bound estimate before it uploads anything and settles to what
it actually spent when its batches end (or releases everything if it fails or is
cancelled before paying). Two runs started together cannot both pass: the reservation is
an increment of a Prefect global concurrency limit whose slots are money (one slot =
``SLOT_USD``), and the server grants an increment only if the slots in use plus the new
ones stay within the limit, in one conditional UPDATE. So it holds across workers that
share nothing but the Prefect server.

The limit's name carries the period (``kluster-budget:<name>:2026-11`` monthly,
``...:2026-11-25`` daily, UTC), so each period starts empty; a reservation is settled
against the period it was made in. Who holds what is kept beside it, one Prefect Variable
per reservation (tagged with the limit's name), so a refused run can say which runs hold
the budget. A run that crashed without settling keeps its reservation until
``release_finished`` sees its flow run in a final state (or the period ends).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "SLOT_USD",
    "BudgetRefused",
    "BudgetStatus",
    "Reservation",
    "SpendingLimit",
    "budget_status",
    "release",
    "release_finished",
    "reserve",
    "settle",
]

# One slot of the concurrency limit, in dollars: a hundredth of a cent, so small runs are
# counted, and a $1M limit is 10^10 slots (the limit is a 64-bit integer).
SLOT_USD = Decimal("0.0001")
_PREFIX = "kluster-budget"
_VARIABLE_TAG = "kluster-budget"
_FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


class SpendingLimit(BaseModel):
    """How much all runs together may spend per period."""

    name: str = Field(
        "default",
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        max_length=60,
        description="Which budget (runs naming the same one share it).",
    )
    limit_usd: float = Field(gt=0, description="Dollars per period.")
    period: Literal["daily", "monthly"] = Field("monthly", description="UTC day or month.")

    def period_key(self, now: datetime | None = None) -> str:
        moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
        return moment.strftime("%Y-%m-%d" if self.period == "daily" else "%Y-%m")

    def limit_name(self, now: datetime | None = None) -> str:
        return f"{_PREFIX}:{self.name}:{self.period_key(now)}"


class Reservation(BaseModel):
    """One run's hold on a budget; stored as a Prefect Variable named ``variable``."""

    id: str
    budget: str
    limit_name: str
    period_key: str
    run_label: str
    flow_run_id: str | None = None
    reserved_usd: float
    slots: int
    state: Literal["reserved", "settled", "released"] = "reserved"
    spent_usd: float | None = None
    created: str

    @property
    def variable(self) -> str:
        return f"{_PREFIX}-{self.id}"


class BudgetStatus(BaseModel):
    """A period's budget as the server holds it now."""

    limit_name: str
    limit_usd: float
    used_usd: float = Field(description="Reserved by running jobs plus spent by ended ones.")
    reservations: list[Reservation] = Field(default_factory=list)

    @property
    def free_usd(self) -> float:
        return max(0.0, self.limit_usd - self.used_usd)


class BudgetRefused(Exception):
    """The run's upper estimate does not fit in what is left of the period's budget."""

    def __init__(self, limit: SpendingLimit, amount_usd: float, status: BudgetStatus) -> None:
        self.limit = limit
        self.amount_usd = amount_usd
        self.status = status
        holding = [r for r in status.reservations if r.state == "reserved"]
        spent = [r for r in status.reservations if r.state == "settled" and r.spent_usd]
        held = "; ".join(f"{_usd(r.reserved_usd)} by {_who(r)}" for r in holding) or "none"
        paid = "; ".join(f"{_usd(r.spent_usd or 0)} by {_who(r)}" for r in spent) or "none"
        super().__init__(
            f"Refused before any upload: budget '{limit.name}' ({limit.period}, "
            f"{limit.period_key()}) allows {_usd(limit.limit_usd)}; this run needs up to "
            f"{_usd(amount_usd)} but {_usd(status.free_usd)} is free. Reserved by running "
            f"jobs: {held}. Spent this period: {paid}."
        )


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 0.1 or amount == 0 else f"${amount:.4f}"


def _who(reservation: Reservation) -> str:
    run = f"run '{reservation.run_label}'"
    if reservation.flow_run_id:
        run += f" (flow run {reservation.flow_run_id})"
    return run


def _slots(amount_usd: float) -> int:
    """Dollars as slots, rounded up: a budget never counts less than is at stake."""
    return max(1, math.ceil(Decimal(str(amount_usd)) / SLOT_USD))


def _client() -> Any:
    from prefect_kluster.tasks._prefect import prefect_client

    return prefect_client()


def _ensure_limit(client: Any, name: str, slots: int) -> None:
    """The period's concurrency limit, created on first use (its limit kept current)."""
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots)
            )
        except ObjectAlreadyExists:  # another run created it first
            pass
        return
    if existing.limit != slots:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots))


def _save(client: Any, reservation: Reservation, create: bool = False) -> None:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    value = reservation.model_dump(mode="json")
    if create:
        client.create_variable(
            VariableCreate(
                name=reservation.variable,
                value=value,
                tags=[_VARIABLE_TAG, reservation.limit_name],
            )
        )
    else:
        client.update_variable(VariableUpdate(name=reservation.variable, value=value))


def _reservations(client: Any, limit_name: str | None) -> list[Reservation]:
    tags = [_VARIABLE_TAG] + ([limit_name] if limit_name else [])
    found: list[Reservation] = []
    offset = 0
    while True:
        response = client.request(
            "POST",
            "/variables/filter",
            json={"variables": {"tags": {"all_": tags}}, "offset": offset, "limit": 200},
        )
        page = response.json()
        for variable in page:
            try:
                found.append(Reservation.model_validate(variable["value"]))
            except ValueError:
                continue
        if len(page) < 200:
            break
        offset += 200
    found.sort(key=lambda r: r.created)
    return found


def budget_status(limit: SpendingLimit, now: datetime | None = None) -> BudgetStatus:
    """What the period's budget allows, what is used, and by which runs."""
    from prefect.exceptions import ObjectNotFound

    name = limit.limit_name(now)
    with _client() as client:
        try:
            used = client.read_global_concurrency_limit_by_name(name).active_slots
        except ObjectNotFound:
            used = 0
        reservations = _reservations(client, name)
    return BudgetStatus(
        limit_name=name,
        limit_usd=limit.limit_usd,
        used_usd=float(Decimal(used) * SLOT_USD),
        reservations=reservations,
    )


def reserve(
    limit: SpendingLimit,
    amount_usd: float,
    run_label: str,
    flow_run_id: str | None = None,
    now: datetime | None = None,
) -> Reservation:
    """Hold ``amount_usd`` (the run's upper estimate) of the period's budget, or raise
    ``BudgetRefused`` naming what is reserved and by which runs. Atomic on the server."""
    moment = now or datetime.now(timezone.utc)
    name = limit.limit_name(moment)
    reservation = Reservation(
        id=uuid.uuid4().hex,
        budget=limit.name,
        limit_name=name,
        period_key=limit.period_key(moment),
        run_label=run_label,
        flow_run_id=flow_run_id,
        reserved_usd=amount_usd,
        slots=_slots(amount_usd),
        created=moment.isoformat(),
    )
    with _client() as client:
        _ensure_limit(client, name, int(Decimal(str(limit.limit_usd)) / SLOT_USD))
        # The record first, so a run refused because of this one can already name it.
        _save(client, reservation, create=True)
        try:
            client.increment_concurrency_slots(
                names=[name], slots=reservation.slots, mode="concurrency"
            )
        except Exception as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            client.delete_variable_by_name(reservation.variable)
            if status in (422, 423):  # more than the limit / not that much free
                raise BudgetRefused(limit, amount_usd, budget_status(limit, moment)) from None
            raise
    return reservation


def settle(reservation: Reservation, spent_usd: float) -> Reservation:
    """The run ended having spent ``spent_usd``: keep that much of the budget used and give
    back the rest of the reservation. Settling twice changes nothing. A reservation
    settled at nothing is released: its record is deleted, as it holds nothing."""
    with _client() as client:
        current = client.read_variable_by_name(reservation.variable)
        if current is None:
            return reservation.model_copy(update={"state": "released", "spent_usd": 0.0})
        stored = Reservation.model_validate(current.value)
        if stored.state != "reserved":
            return stored
        spent_slots = math.ceil(Decimal(str(spent_usd)) / SLOT_USD) if spent_usd > 0 else 0
        settled = reservation.model_copy(
            update={"state": "settled" if spent_usd > 0 else "released", "spent_usd": spent_usd}
        )
        # The record first: if the release below is lost, the budget errs on the safe side.
        if spent_slots:
            _save(client, settled)
        else:
            client.delete_variable_by_name(reservation.variable)
        give_back = reservation.slots - spent_slots
        if give_back > 0:
            client.release_concurrency_slots(
                names=[reservation.limit_name], slots=give_back, occupancy_seconds=1.0
            )
        elif give_back < 0:  # spent more than reserved: count it, as far as the limit goes
            try:
                client.increment_concurrency_slots(
                    names=[reservation.limit_name], slots=-give_back, mode="concurrency"
                )
            except Exception:  # noqa: S110 - over the limit already; the record says so
                pass
    return settled


def release(reservation: Reservation) -> Reservation:
    """Give the whole reservation back: the run failed or was cancelled before paying."""
    return settle(reservation, 0.0)


def release_finished(limit: SpendingLimit, now: datetime | None = None) -> list[Reservation]:
    """Release the reservations of runs that ended without settling (crashed, killed):
    their flow run is in a final state on the server. Returns what was released."""
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        held = [r for r in _reservations(client, limit.limit_name(now)) if r.state == "reserved"]
        ended = []
        for reservation in held:
            if not reservation.flow_run_id:
                continue
            try:
                run = client.read_flow_run(uuid.UUID(reservation.flow_run_id))
            except (ObjectNotFound, ValueError):
                continue
            if run.state is not None and run.state.type.value in _FINAL_STATES:
                ended.append(reservation)
    return [release(r) for r in ended]
