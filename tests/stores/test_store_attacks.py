"""Stores under hostile timing: concurrent writers of one customer's buckets, skewed clocks.

Each test here was written against a defect found by attacking the stores, and failed before
its fix.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from safe_openai.policy import Quota
from safe_openai.stores import QuotaDemand
from safe_openai.usage import TokenUsage, UsageRecord

from .conftest import POSTGRES_URL, Backend, StoreDriver

UTC = timezone.utc


def _record(customer: str, tokens: int = 30, cost_usd: float = 0.001) -> UsageRecord:
    return UsageRecord(
        record_id=uuid.uuid4().hex,
        customer_id=customer,
        endpoint="/chat/completions",
        model="gpt-4o-mini",
        outcome="ok",
        tokens=TokenUsage(tokens // 3, 0, tokens - tokens // 3, 0),
        cost_usd=cost_usd,
        latency_s=0.1,
        created_at=datetime.now(UTC),
    )


@pytest.fixture
def flavour() -> str:
    """Threads drive the sync flavour (the async one runs the same statements)."""
    return "sync"


def test_concurrent_reserve_commit_and_release_of_one_customer_never_fail(
    backend: Backend,
) -> None:
    """Reservations, commits and releases of one customer at once, within the same second and
    minute buckets: none fails (PostgreSQL used to deadlock between a reservation, which locks
    the second's bucket and then the minute's, and a commit or release, which locked them the
    other way round), and the buckets end where they started."""
    store = backend.open()
    quota = Quota(requests_per_minute=100_000, tokens_per_day=10**12)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8, timeout=60)

    def work(worker: int) -> None:
        barrier.wait()
        # odd workers take the guard's path: one round trip before the call, one after
        whole_calls = worker % 2 == 1 and hasattr(store.store, "begin_call")
        for i in range(25):
            try:
                demand = QuotaDemand(tokens=100, cost_usd=0.01)
                if whole_calls:
                    held = store.begin_call("busy", quota, demand).reservation
                else:
                    held = store.reserve("busy", quota, demand)
                if (worker + i) % 3 == 0:
                    store.release(held)
                elif whole_calls:
                    store.finish_call(held, _record("busy"))
                else:
                    store.commit(held, _record("busy"))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    committed = sum(1 for w in range(8) for i in range(25) if (w + i) % 3)
    # every commit counted once in the minute, every release taken out
    tight = Quota(requests_per_minute=committed + 1)
    assert store.reserve("busy", tight, QuotaDemand()).admitted
    assert not store.reserve("busy", tight, QuotaDemand()).admitted


@pytest.mark.parametrize("store_url", [pytest.param(POSTGRES_URL, marks=pytest.mark.postgres)])
@pytest.mark.parametrize("skew", [timedelta(hours=2), timedelta(days=-20), timedelta(days=12)])
def test_postgres_window_follows_the_server_clock_however_far_the_host_clock_is(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    """With ``now=None`` PostgreSQL decides on its own clock, for hosts whose clocks disagree by
    any amount (docs/stores.md). The rows read used to be picked around the host's clock: a
    host two hours ahead saw an empty minute window, one twelve days ahead an empty month."""
    import safe_openai.stores._postgres as module

    real = datetime

    class SkewedClock(real):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return real.now(tz) + skew

    store = backend.open()
    monkeypatch.setattr(module, "datetime", SkewedClock)
    quota = Quota(requests_per_minute=2)
    assert store.reserve("far", quota, QuotaDemand()).admitted
    assert store.reserve("far", quota, QuotaDemand()).admitted
    refused = store.reserve("far", quota, QuotaDemand())
    assert (refused.admitted, refused.limit) == (False, "requests_per_minute")
    held = store.reserve("month", Quota(usd_per_month=1.0), QuotaDemand(cost_usd=0.8))
    store.commit(held, _record("month", cost_usd=0.8))
    refused = store.reserve("month", Quota(usd_per_month=1.0), QuotaDemand(cost_usd=0.8))
    assert (refused.admitted, refused.limit) == (False, "usd_per_month")


def test_a_reservation_far_ahead_does_not_prune_what_counts_now(store: StoreDriver) -> None:
    """A caller whose clock is minutes ahead (``now=`` passed by the caller) used to prune the
    buckets that still count at the store's own time: the other callers' minute window came up
    empty on their next reservation, again and again (docs/stores.md promises each clock at
    least its own minute window, and day and month limits shared)."""
    now = datetime.now(UTC)
    quota = Quota(requests_per_minute=2, tokens_per_day=1000)
    assert store.reserve("skewed", quota, QuotaDemand(tokens=400), now=now).admitted
    assert store.reserve("skewed", quota, QuotaDemand(tokens=400), now=now).admitted
    ahead = Quota(tokens_per_day=10**9)
    assert store.reserve("skewed", ahead, QuotaDemand(), now=now + timedelta(minutes=15)).admitted
    refused = store.reserve(
        "skewed", quota, QuotaDemand(tokens=100), now=now + timedelta(seconds=1)
    )
    assert (refused.admitted, refused.limit) == (False, "requests_per_minute")
    refused = store.reserve(
        "skewed",
        Quota(tokens_per_day=1000),
        QuotaDemand(tokens=300),
        now=now + timedelta(seconds=2),
    )
    assert (refused.admitted, refused.limit) == (False, "tokens_per_day")
