"""The in-memory store: one process, nothing kept. The reference for the store contract."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from ..policy import Quota
from ..usage import UsageRecord
from ._adapter import AsyncAdapter
from ._types import (
    RESERVATION_TTL,
    CustomerReport,
    QuotaDemand,
    Reservation,
    Suspension,
    Violation,
    WindowEntry,
    add_to_report,
    earliest_entry,
    evaluate_quota,
    finish_report,
)

__all__ = ["AsyncMemoryStore", "MemoryStore"]


class MemoryStore:
    """A thread-safe store held in this process's memory.

    Good for tests and single-process tools; everything is lost when the process exits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, UsageRecord] = {}
        self._pending: dict[str, tuple[str, WindowEntry]] = {}
        self._violations: list[Violation] = []
        self._suspensions: dict[str, Suspension] = {}
        self._identifiers: dict[str, str] = {}
        self._requests: dict[str, str] = {}
        self._events: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        """Open a store from a ``memory://`` URL (each call gives a new, empty store)."""
        return cls(**options)

    def reserve(
        self, customer_id: str, quota: Quota, demand: QuotaDemand, *, now: datetime
    ) -> Reservation:
        with self._lock:
            since = earliest_entry(now)
            stale = now - RESERVATION_TTL
            entries = [
                WindowEntry(r.created_at, r.tokens.total_tokens, r.cost_usd or 0.0)
                for r in self._records.values()
                if r.customer_id == customer_id and r.counts_as_request and r.created_at >= since
            ]
            entries += [
                entry
                for owner, entry in self._pending.values()
                if owner == customer_id and entry.at > stale
            ]
            limit, retry_after = evaluate_quota(quota, demand, entries, now)
            if limit is not None:
                return Reservation("", customer_id, False, limit, retry_after)
            reservation_id = uuid.uuid4().hex
            for key in [k for k, (_, entry) in self._pending.items() if entry.at <= stale]:
                del self._pending[key]  # abandoned by a caller that never came back
            self._pending[reservation_id] = (
                customer_id,
                WindowEntry(now, demand.tokens, demand.cost_usd),
            )
            return Reservation(reservation_id, customer_id, True)

    def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        with self._lock:
            self._pending.pop(reservation.id, None)
            self._keep(record)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._pending.pop(reservation.id, None)

    def record_usage(self, record: UsageRecord) -> None:
        with self._lock:
            self._keep(record)

    def _keep(self, record: UsageRecord) -> None:
        """Store a record once per ``record_id`` (one is made up when it has none)."""
        if not record.record_id:
            record = replace(record, record_id=uuid.uuid4().hex)
        self._records.setdefault(record.record_id, record)

    def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        with self._lock:
            records = [
                r
                for r in self._records.values()
                if (customer_id is None or r.customer_id == customer_id)
                and (since is None or r.created_at >= since)
            ]
        records.sort(key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        sums: dict[str, dict[str, float | int]] = {}
        violations: dict[str, int] = {}
        with self._lock:
            for record in self._records.values():
                if (customer_id is None or record.customer_id == customer_id) and (
                    since is None or record.created_at >= since
                ):
                    add_to_report(sums, record)
            for violation in self._violations:
                if (customer_id is None or violation.customer_id == customer_id) and (
                    since is None or violation.created_at >= since
                ):
                    violations[violation.customer_id] = violations.get(violation.customer_id, 0) + 1
            now = datetime.now(timezone.utc)
            suspended = {
                c
                for c, s in self._suspensions.items()
                if s.active_at(now) and (customer_id is None or c == customer_id)
            }
        return finish_report(sums, violations, suspended)

    def record_violation(self, violation: Violation) -> None:
        with self._lock:
            self._violations.append(violation)

    def count_violations(self, customer_id: str, *, since: datetime) -> int:
        with self._lock:
            return sum(
                1
                for v in self._violations
                if v.customer_id == customer_id and v.created_at >= since
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

    def claim_event(self, event_id: str) -> bool:
        with self._lock:
            if event_id in self._events:
                return False
            self._events.add(event_id)
            return True

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
