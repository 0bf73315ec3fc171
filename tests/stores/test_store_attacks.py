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

from safe_openai.errors import StoreError
from safe_openai.policy import Quota
from safe_openai.stores import QuotaDemand
from safe_openai.usage import TokenUsage, UsageRecord

from .conftest import POSTGRES_URL, REDIS_URL, Backend, StoreDriver, call

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


ODD_CUSTOMERS = [
    "{acme}",
    "}{",
    "%7B",
    "{",
    "%",
    "",
    "a:b:{c}",
    "line\nbreak",
    "tab\there",
    "ünïcødé-客户-🙂",
    "x" * 5000,
    "'; DROP TABLE usage_records; --",
    "safe_openai:customers",
    "*",
    "[a-z]?",
]


def test_odd_customer_ids_keep_their_own_quota_usage_and_standing(store: StoreDriver) -> None:
    """Braces (Redis Cluster hash tags), colons, newlines, unicode, very long and SQL-ish ids,
    and ids that spell another's escaping: each keeps its own window, records and suspension."""
    now = datetime.now(UTC)
    quota = Quota(requests_per_minute=1)
    for customer in ODD_CUSTOMERS:
        held = store.reserve(customer, quota, QuotaDemand(tokens=5), now=now)
        assert held.admitted, repr(customer)
        store.commit(held, _record(customer, tokens=7))
    for customer in ODD_CUSTOMERS:
        again = store.reserve(customer, quota, QuotaDemand(), now=now + timedelta(seconds=1))
        assert (again.admitted, again.limit) == (False, "requests_per_minute"), repr(customer)
    store.suspend("{acme}", reason="test", until=None, now=now)
    report = {row.customer: row for row in store.usage_report()}
    assert set(report) == set(ODD_CUSTOMERS)
    for customer in ODD_CUSTOMERS:
        assert (report[customer].requests, report[customer].output_tokens) == (1, 5)
        records = store.usage_records(customer_id=customer)
        assert [r.customer_id for r in records] == [customer]
        assert report[customer].suspended == (customer == "{acme}")
        assert (store.suspension(customer, now=now) is not None) == (customer == "{acme}")
    assert [s.customer_id for s in store.suspensions(now=now)] == ["{acme}"]


@pytest.mark.xfail(
    strict=True,
    reason="a hold counts for RESERVATION_TTL (10 minutes), shorter than one attempt of the "
    "SDK's default timeout (600 s, retried twice): a call still running after 10 minutes "
    "loses its hold, so the day and month windows admit past their limit until it commits. "
    "Needs a TTL beyond the longest call (or a hold the guard renews); not done here.",
)
def test_a_hold_counts_for_as_long_as_the_sdk_may_still_be_running_its_call(
    store: StoreDriver,
) -> None:
    now = datetime.now(UTC)
    quota = Quota(tokens_per_day=1000)
    assert store.reserve("slow", quota, QuotaDemand(tokens=900), now=now).admitted
    # 11 minutes later the first call is still in its first attempt (timeout 600 s + retries)
    later = store.reserve("slow", quota, QuotaDemand(tokens=900), now=now + timedelta(minutes=11))
    assert not later.admitted


def test_concurrent_duplicates_of_one_commit_and_one_record_count_once(store: StoreDriver) -> None:
    """The same commit (a client retrying while a spool drain replays it) and the same record
    at once, from eight threads: each counts once, and the hold goes once."""
    now = datetime.now(UTC)
    quota = Quota(requests_per_minute=3, tokens_per_minute=1000)
    held = store.reserve("dup", quota, QuotaDemand(tokens=500), now=now)
    record = _record("dup", tokens=100)
    other = _record("dup", tokens=100)
    calls = [call("commit", held, record) for _ in range(4)]
    calls += [call("record_usage", other) for _ in range(4)]
    calls += [call("release", held) for _ in range(2)]
    store.concurrently(calls)
    # two calls counted, 200 tokens: a third call fits, a fourth does not
    later = now + timedelta(seconds=1)
    assert store.reserve("dup", quota, QuotaDemand(tokens=800), now=later).admitted
    refused = store.reserve("dup", quota, QuotaDemand(), now=later)
    assert (refused.admitted, refused.limit) == (False, "requests_per_minute")
    [row] = store.usage_report(customer_id="dup")
    assert (row.requests, row.input_tokens + row.output_tokens) == (2, 200)


@pytest.mark.parametrize("store_url", [pytest.param(REDIS_URL, marks=pytest.mark.redis)])
def test_redis_refuses_to_decide_for_a_host_more_than_a_day_off(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Redis script names the day and month counters around the host's clock, so a host
    more than a day from the server's clock fails closed with StoreError (docs/stores.md)."""
    import safe_openai.stores._redis as module

    real = datetime

    class SkewedClock(real):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return real.now(tz) + timedelta(days=2)

    store = backend.open()
    quota = Quota(requests_per_minute=1)
    assert store.reserve("ahead", quota, QuotaDemand()).admitted
    monkeypatch.setattr(module, "datetime", SkewedClock)
    with pytest.raises(StoreError, match="more than a day"):
        store.reserve("ahead", quota, QuotaDemand())
