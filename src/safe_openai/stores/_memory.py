"""The in-memory store: one process, nothing kept. The reference for the store contract.

Each customer's quota state is a handful of buckets (see :mod:`safe_openai.stores._types`):
seconds of the minute windows, minutes of pending holds, and day totals, so a reservation costs
the same however many records the customer, or any other customer, has.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from ..policy import Quota
from ..usage import UsageRecord
from ._adapter import AsyncAdapter
from ._types import (
    EVENT_KEEP,
    EVENT_PRUNE_BATCH,
    KEEP_HOLD_MINUTES,
    KEEP_SECONDS,
    MINUTE_US,
    RESERVATION_TTL,
    SECOND_US,
    Bucket,
    CallStart,
    CustomerReport,
    DayTotal,
    EventClaim,
    LimitUsage,
    QuotaDemand,
    QuotaState,
    Reservation,
    Suspension,
    Violation,
    add_to_report,
    assess,
    day_of,
    finish_report,
    from_us,
    measure,
    to_us,
)

__all__ = ["AsyncMemoryStore", "MemoryStore"]

#: Day totals older than this many days are dropped (a month window needs at most 31).
_KEEP_DAYS = 40
_GC_US = int((RESERVATION_TTL + timedelta(hours=1)) / timedelta(microseconds=1))


@dataclass(slots=True)
class _Hold:
    customer_id: str
    at_us: int
    tokens: int
    cost_usd: float


@dataclass(slots=True)
class _Ledger:
    """One customer's quota state: ``index -> [requests, tokens, cost, last_us]``."""

    seconds: dict[int, list[Any]] = field(default_factory=dict)
    holds: dict[int, list[Any]] = field(default_factory=dict)
    days: dict[int, list[Any]] = field(default_factory=dict)

    def prune(self, now_us: int) -> None:
        """Drop buckets that can no longer count at ``now_us`` or later (a few dozen at most)."""
        oldest = now_us // SECOND_US - KEEP_SECONDS
        for index in [i for i in self.seconds if i < oldest]:
            del self.seconds[index]
        oldest = now_us // MINUTE_US - KEEP_HOLD_MINUTES
        for index in [i for i in self.holds if i < oldest]:
            del self.holds[index]
        oldest = day_of(now_us) - _KEEP_DAYS
        for index in [i for i in self.days if i < oldest]:
            del self.days[index]

    def state(self) -> QuotaState:
        return QuotaState(
            seconds=[Bucket(i, b[0], b[1], 0.0, b[3]) for i, b in self.seconds.items()],
            holds=[Bucket(i, b[0], b[1], b[2], b[3]) for i, b in self.holds.items()],
            days=[DayTotal(i, d[0], d[1]) for i, d in self.days.items()],
        )

    @staticmethod
    def _add(buckets: dict[int, list[Any]], index: int, tokens: int, cost: float, at: int) -> None:
        bucket = buckets.setdefault(index, [0, 0, 0.0, at])
        bucket[0] += 1
        bucket[1] += tokens
        bucket[2] += cost
        bucket[3] = max(bucket[3], at)

    def hold(self, hold: _Hold) -> None:
        self._add(self.seconds, hold.at_us // SECOND_US, hold.tokens, 0.0, hold.at_us)
        self._add(self.holds, hold.at_us // MINUTE_US, hold.tokens, hold.cost_usd, hold.at_us)

    def unhold(self, hold: _Hold, settled_tokens: int | None) -> None:
        """Take a hold out of its hold bucket; ``settled_tokens`` replace its tokens in its
        minute bucket (the call counts there), or ``None`` takes it out of that too."""
        bucket = self.holds.get(hold.at_us // MINUTE_US)
        if bucket is not None:
            bucket[0] = max(bucket[0] - 1, 0)
            bucket[1] -= hold.tokens
            bucket[2] -= hold.cost_usd
            if bucket[0] == 0:
                bucket[1], bucket[2] = 0, 0.0
        second = self.seconds.get(hold.at_us // SECOND_US)
        if second is not None:
            if settled_tokens is None:
                second[0] = max(second[0] - 1, 0)
                second[1] = max(second[1] - hold.tokens, 0)
            else:
                second[1] = max(second[1] - hold.tokens + settled_tokens, 0)

    def count(self, at_us: int, tokens: int, cost: float, *, in_minute: bool) -> None:
        """Count a usage record that reached the model at ``at_us``."""
        if in_minute:
            self._add(self.seconds, at_us // SECOND_US, tokens, 0.0, at_us)
        day = self.days.setdefault(day_of(at_us), [0, 0.0])
        day[0] += tokens
        day[1] += cost


class MemoryStore:
    """A thread-safe store held in this process's memory.

    Good for tests and single-process tools; everything is lost when the process exits.
    """

    def __init__(self) -> None:
        #: Names this store's data: each memory store is its own.
        self.identity = f"memory://{uuid.uuid4().hex}"
        self._lock = threading.Lock()
        self._records: dict[str, UsageRecord] = {}
        self._by_customer: dict[str, list[UsageRecord]] = {}
        self._ledgers: dict[str, _Ledger] = {}
        # insertion order is (nearly) time order, so abandoned holds are dropped from the front
        self._holds: OrderedDict[str, _Hold] = OrderedDict()
        self._violations: list[Violation] = []
        self._violation_ids: set[str] = set()
        self._suspensions: dict[str, Suspension] = {}
        self._identifiers: dict[str, str] = {}
        self._requests: dict[str, str] = {}
        # event id -> (token, lease end, claimed at); a finished event has no token. Each claim
        # moves its event to the end, so the oldest claims are at the front.
        self._events: dict[str, tuple[str | None, datetime | None, datetime]] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        """Open a store from a ``memory://`` URL (each call gives a new, empty store)."""
        return cls(**options)

    def _ledger(self, customer_id: str) -> _Ledger:
        ledger = self._ledgers.get(customer_id)
        if ledger is None:
            ledger = self._ledgers[customer_id] = _Ledger()
        return ledger

    def reserve(
        self,
        customer_id: str,
        quota: Quota,
        demand: QuotaDemand,
        *,
        now: datetime | None = None,
    ) -> Reservation:
        """Check ``demand`` against ``quota`` and, if admitted, hold it as pending.

        ``now`` defaults to this process's clock.
        """
        now_us = to_us(now if now is not None else datetime.now(timezone.utc))
        with self._lock:
            ledger = self._ledger(customer_id)
            # never prune past this process's clock: a caller's `now` far ahead would drop
            # what still counts for everyone else
            prune_us = min(now_us, to_us(datetime.now(timezone.utc)))
            ledger.prune(prune_us)
            limit, retry_after, usage = assess(quota, demand, ledger.state(), now_us)
            if limit is not None:
                return Reservation("", customer_id, False, limit, retry_after, usage=usage)
            while self._holds:
                oldest = next(iter(self._holds.values()))
                if oldest.at_us >= prune_us - _GC_US:
                    break
                self._holds.popitem(last=False)  # abandoned by a caller that never came back
            reservation_id = uuid.uuid4().hex
            hold = _Hold(customer_id, now_us, int(demand.tokens), float(demand.cost_usd))
            self._holds[reservation_id] = hold
            ledger.hold(hold)
            return Reservation(reservation_id, customer_id, True, at=from_us(now_us), usage=usage)

    def quota_usage(
        self, customer_id: str, quota: Quota, *, now: datetime | None = None
    ) -> tuple[LimitUsage, ...]:
        """What the customer has used of each limit ``quota`` sets at ``now`` (default: this
        process's clock), pending holds included. Reads only: nothing is held."""
        if quota.is_unlimited:
            return ()
        now_us = to_us(now if now is not None else datetime.now(timezone.utc))
        with self._lock:
            ledger = self._ledgers.get(customer_id)
            state = ledger.state() if ledger is not None else QuotaState()
        return measure(quota, state, now_us)

    def begin_call(
        self,
        customer_id: str,
        quota: Quota | None,
        demand: QuotaDemand,
        *,
        identifier: str | None = None,
    ) -> CallStart:
        """Standing, reservation and identifier map of a call about to be sent, in one step.

        A suspended customer gets no reservation. ``quota`` ``None`` reserves nothing.
        """
        now = datetime.now(timezone.utc)
        if identifier is not None:
            self.remember_identifier(identifier, customer_id)
        suspension = self.suspension(customer_id, now=now)
        if suspension is not None or quota is None:
            return CallStart(suspension, None)
        return CallStart(None, self.reserve(customer_id, quota, demand, now=now))

    def finish_call(
        self, reservation: Reservation | None, record: UsageRecord, *, request_id: str | None = None
    ) -> None:
        """Settle a call in one step: commit (or record) its usage, map its request id."""
        with self._lock:
            self._settle(reservation, record)
            if request_id:
                self._requests[request_id] = record.customer_id

    def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        with self._lock:
            self._settle(reservation, record)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            hold = self._holds.pop(reservation.id, None) if reservation.id else None
            if hold is not None:
                self._ledger(hold.customer_id).unhold(hold, None)

    def record_usage(self, record: UsageRecord) -> None:
        with self._lock:
            self._settle(None, record)

    def _settle(self, reservation: Reservation | None, record: UsageRecord) -> None:
        """Drop the reservation's hold and keep the record once per ``record_id``; a new
        record that reached the model counts where its hold did (or at its own time)."""
        hold = None
        if reservation is not None and reservation.id:
            hold = self._holds.pop(reservation.id, None)
        if not record.record_id:
            record = replace(record, record_id=uuid.uuid4().hex)
        new = record.record_id not in self._records
        if new:
            self._records[record.record_id] = record
            self._by_customer.setdefault(record.customer_id, []).append(record)
        counts = new and record.counts_as_request
        tokens, cost = record.tokens.total_tokens, record.cost_usd or 0.0
        if hold is not None:
            settles = counts and hold.customer_id == record.customer_id
            self._ledger(hold.customer_id).unhold(hold, tokens if settles else None)
            if settles:
                self._ledger(record.customer_id).count(hold.at_us, tokens, cost, in_minute=False)
                return
        if counts:
            at = reservation.at if reservation is not None and reservation.at else None
            at_us = to_us(at if at is not None else record.created_at)
            self._ledger(record.customer_id).count(at_us, tokens, cost, in_minute=True)

    def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        with self._lock:
            if customer_id is None:
                pool: list[UsageRecord] = list(self._records.values())
            else:
                pool = list(self._by_customer.get(customer_id, ()))
            records = [r for r in pool if since is None or r.created_at >= since]
        records.sort(key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        sums: dict[str, dict[str, float | int]] = {}
        violations: dict[str, int] = {}
        strikes: dict[str, int] = {}
        with self._lock:
            pool = (
                self._records.values()
                if customer_id is None
                else self._by_customer.get(customer_id, [])
            )
            for record in pool:
                if since is None or record.created_at >= since:
                    add_to_report(sums, record)
            for violation in self._violations:
                if (customer_id is None or violation.customer_id == customer_id) and (
                    since is None or violation.created_at >= since
                ):
                    who = violation.customer_id
                    violations[who] = violations.get(who, 0) + 1
                    strikes[who] = strikes.get(who, 0) + int(violation.strike)
            now = datetime.now(timezone.utc)
            suspended = {
                c
                for c, s in self._suspensions.items()
                if s.active_at(now) and (customer_id is None or c == customer_id)
            }
        return finish_report(sums, violations, suspended, strikes)

    def record_violation(self, violation: Violation) -> bool:
        with self._lock:
            if violation.violation_id:
                if violation.violation_id in self._violation_ids:
                    return False
                self._violation_ids.add(violation.violation_id)
            self._violations.append(violation)
            return True

    def count_violations(self, customer_id: str, *, since: datetime) -> int:
        with self._lock:
            return sum(
                1
                for v in self._violations
                if v.customer_id == customer_id and v.created_at >= since and v.strike
            )

    def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        with self._lock:
            found = [
                v
                for v in self._violations
                if (customer_id is None or v.customer_id == customer_id)
                and (since is None or v.created_at >= since)
            ]
        found.sort(key=lambda v: v.created_at, reverse=True)
        return found[:limit]

    def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        with self._lock:
            self._suspensions[customer_id] = Suspension(customer_id, now, until, reason)

    def unsuspend(self, customer_id: str) -> bool:
        with self._lock:
            return self._suspensions.pop(customer_id, None) is not None

    def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        with self._lock:
            found = self._suspensions.get(customer_id)
        return found if found is not None and found.active_at(now) else None

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        with self._lock:
            active = [s for s in self._suspensions.values() if s.active_at(now)]
        return sorted(active, key=lambda s: s.customer_id)

    def remember_identifier(self, identifier: str, customer_id: str) -> None:
        with self._lock:
            self._identifiers[identifier] = customer_id

    def customer_for_identifier(self, identifier: str) -> str | None:
        with self._lock:
            return self._identifiers.get(identifier)

    def remember_request(self, request_id: str, customer_id: str) -> None:
        with self._lock:
            self._requests[request_id] = customer_id

    def customer_for_request(self, request_id: str) -> str | None:
        with self._lock:
            return self._requests.get(request_id)

    def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        with self._lock:
            self._prune_events(now)
            found = self._events.get(event_id)
            if found is not None:
                holder, until, _ = found
                if holder is None:
                    return "done"
                if until is not None and until > now:
                    return "held"
                del self._events[event_id]
            self._events[event_id] = (token, now + lease, now)
            return "claimed"

    def _prune_events(self, now: datetime) -> None:
        """Forget up to EVENT_PRUNE_BATCH claims older than EVENT_KEEP, from the front (the
        oldest claims), stopping at the first younger one; a live lease stays."""
        cutoff = min(now, datetime.now(timezone.utc)) - EVENT_KEEP  # never past the clock
        old: list[str] = []
        for event_id, (holder, until, claimed_at) in self._events.items():
            if claimed_at >= cutoff or len(old) >= EVENT_PRUNE_BATCH:
                break
            if holder is None or until is None or until <= now:
                old.append(event_id)
        for event_id in old:
            del self._events[event_id]

    def finish_event(self, event_id: str, *, token: str) -> bool:
        with self._lock:
            found = self._events.get(event_id)
            if found is None or found[0] != token:
                return False
            self._events[event_id] = (None, None, found[2])
            return True

    def release_event(self, event_id: str, *, token: str) -> None:
        with self._lock:
            found = self._events.get(event_id)
            if found is not None and found[0] == token:
                del self._events[event_id]

    def close(self) -> None:
        """Nothing to release."""


class AsyncMemoryStore(AsyncAdapter):
    """The async twin of :class:`MemoryStore`; it does no I/O, so it calls straight through."""

    run_in_thread = False

    def __init__(self) -> None:
        super().__init__(MemoryStore())

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncMemoryStore:
        """Open a store from a ``memory://`` URL (each call gives a new, empty store)."""
        return cls(**options)
