"""An async store built from a sync one, for backends whose driver has no async API."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ..policy import Quota
from ..usage import UsageRecord
from ._types import (
    CallStart,
    CustomerReport,
    EventClaim,
    LimitUsage,
    QuotaDemand,
    Reservation,
    Suspension,
    Violation,
)

__all__ = ["AsyncAdapter"]

T = TypeVar("T")

# Releases of reservations whose caller was cancelled, kept alive until they finish.
_RELEASES: set[asyncio.Future[None]] = set()


class AsyncAdapter:
    """Serve the :class:`~safe_openai.stores.AsyncUsageStore` contract from a sync store.

    Each call runs in a worker thread (``asyncio.to_thread``) so a blocking driver never stalls
    the event loop; subclasses that do no I/O set :attr:`run_in_thread` to ``False``.

    Attributes:
        sync: The wrapped synchronous store.
    """

    run_in_thread: bool = True

    def __init__(self, sync: Any) -> None:
        self.sync = sync

    @property
    def identity(self) -> str:
        """The wrapped store's identity: the sync and async stores of one database are one."""
        return str(self.sync.identity)

    async def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self.run_in_thread:
            return method(*args, **kwargs)
        return await asyncio.to_thread(functools.partial(method, *args, **kwargs))

    async def reserve(
        self, customer_id: str, quota: Quota, demand: QuotaDemand, *, now: datetime
    ) -> Reservation:
        if not self.run_in_thread:
            return self.sync.reserve(customer_id, quota, demand, now=now)  # type: ignore[no-any-return]
        work = asyncio.ensure_future(
            asyncio.to_thread(self.sync.reserve, customer_id, quota, demand, now=now)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The caller went away while the thread was reserving: give the capacity back
            # instead of holding it until the reservation expires.
            work.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, work: asyncio.Future[Reservation]) -> None:
        if work.cancelled() or work.exception() is not None:
            return
        reservation = work.result()
        if reservation.admitted:
            task = asyncio.ensure_future(asyncio.to_thread(self.sync.release, reservation))
            _RELEASES.add(task)
            task.add_done_callback(_RELEASES.discard)

    async def quota_usage(
        self, customer_id: str, quota: Quota, *, now: datetime | None = None
    ) -> tuple[LimitUsage, ...]:
        return await self._call(self.sync.quota_usage, customer_id, quota, now=now)

    async def begin_call(
        self,
        customer_id: str,
        quota: Quota | None,
        demand: QuotaDemand,
        *,
        identifier: str | None = None,
    ) -> CallStart:
        return await self._call(
            self.sync.begin_call, customer_id, quota, demand, identifier=identifier
        )

    async def finish_call(
        self, reservation: Reservation | None, record: UsageRecord, *, request_id: str | None = None
    ) -> None:
        await self._call(self.sync.finish_call, reservation, record, request_id=request_id)

    async def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        await self._call(self.sync.commit, reservation, record)

    async def release(self, reservation: Reservation) -> None:
        await self._call(self.sync.release, reservation)

    async def record_usage(self, record: UsageRecord) -> None:
        await self._call(self.sync.record_usage, record)

    async def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        return await self._call(
            self.sync.usage_records, customer_id=customer_id, since=since, limit=limit
        )

    async def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        return await self._call(self.sync.usage_report, since=since, customer_id=customer_id)

    async def record_violation(self, violation: Violation) -> bool:
        return await self._call(self.sync.record_violation, violation)

    async def count_violations(self, customer_id: str, *, since: datetime) -> int:
        return await self._call(self.sync.count_violations, customer_id, since=since)

    async def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        return await self._call(
            self.sync.violations, customer_id=customer_id, since=since, limit=limit
        )

    async def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        await self._call(self.sync.suspend, customer_id, reason=reason, until=until, now=now)

    async def unsuspend(self, customer_id: str) -> bool:
        return await self._call(self.sync.unsuspend, customer_id)

    async def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        return await self._call(self.sync.suspension, customer_id, now=now)

    async def suspensions(self, *, now: datetime) -> list[Suspension]:
        return await self._call(self.sync.suspensions, now=now)

    async def remember_identifier(self, identifier: str, customer_id: str) -> None:
        await self._call(self.sync.remember_identifier, identifier, customer_id)

    async def customer_for_identifier(self, identifier: str) -> str | None:
        return await self._call(self.sync.customer_for_identifier, identifier)

    async def remember_request(self, request_id: str, customer_id: str) -> None:
        await self._call(self.sync.remember_request, request_id, customer_id)

    async def customer_for_request(self, request_id: str) -> str | None:
        return await self._call(self.sync.customer_for_request, request_id)

    async def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        return await self._call(self.sync.claim_event, event_id, token=token, now=now, lease=lease)

    async def finish_event(self, event_id: str, *, token: str) -> bool:
        return await self._call(self.sync.finish_event, event_id, token=token)

    async def release_event(self, event_id: str, *, token: str) -> None:
        await self._call(self.sync.release_event, event_id, token=token)

    async def close(self) -> None:
        await self._call(self.sync.close)
