"""Per-limit usage: what a reservation saw when it decided, and the read-only ``quota_usage``.

Every backend, sync and async (the ``store`` fixture of conftest.py). The arithmetic is that of
:func:`safe_openai.stores._types.measure`, which shares :func:`~safe_openai.stores._types.decide`'s
window sums.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from safe_openai.policy import Quota
from safe_openai.stores import LimitUsage
from safe_openai.stores._types import QuotaDemand
from safe_openai.usage import TokenUsage, UsageRecord

from .conftest import StoreDriver

UTC = timezone.utc
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
MIDNIGHT = datetime(2025, 3, 15, tzinfo=UTC)
APRIL = datetime(2025, 4, 1, tzinfo=UTC)
ALL = Quota(requests_per_minute=3, tokens_per_minute=1000, tokens_per_day=5000, usd_per_month=1.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def record(when: datetime, tokens: int, cost: float | None = None) -> UsageRecord:
    return UsageRecord(
        customer_id="acme",
        endpoint="/chat/completions",
        model="gpt-4o-mini",
        outcome="ok",
        tokens=TokenUsage(tokens, 0, 0, 0),
        cost_usd=cost,
        latency_s=0.0,
        created_at=when,
        record_id=uuid.uuid4().hex,
    )


def by_name(usage: tuple[LimitUsage, ...]) -> dict[str, LimitUsage]:
    return {u.name: u for u in usage}


def test_a_reservation_reports_usage_before_its_own_demand(store: StoreDriver) -> None:
    """Admitted: one entry per limit in order, counting what came before, not the demand."""
    store.record_usage(record(at(0), 100, 0.25))
    first = store.reserve("acme", ALL, QuotaDemand(200, 0.125), now=at(10))
    assert first.admitted
    assert first.usage == (
        LimitUsage("requests_per_minute", 1, 3, at(60)),
        LimitUsage("tokens_per_minute", 100, 1000, at(60)),
        LimitUsage("tokens_per_day", 100, 5000, MIDNIGHT),
        LimitUsage("usd_per_month", 0.25, 1.0, APRIL),
    )
    # the pending hold counts for the next one, like decide counts it
    second = store.reserve("acme", ALL, QuotaDemand(1), now=at(20))
    assert [u.used for u in second.usage] == [2, 300, 300, 0.375]
    assert [type(u.used) for u in second.usage[:3]] == [int, int, int]
    assert second.usage[0].remaining == 1
    assert second.usage[3].remaining == pytest.approx(0.625)


def test_a_refused_reservation_reports_usage_too(store: StoreDriver) -> None:
    """Refused by the first limit: every limit's usage is still there, with the refusal."""
    quota = Quota(requests_per_minute=1, tokens_per_day=50)
    store.record_usage(record(at(0), 40))
    refused = store.reserve("acme", quota, QuotaDemand(20), now=at(5))
    assert not refused.admitted
    assert refused.limit == "requests_per_minute"
    assert by_name(refused.usage)["requests_per_minute"].used == 1
    assert by_name(refused.usage)["requests_per_minute"].remaining == 0
    assert by_name(refused.usage)["tokens_per_day"] == LimitUsage(
        "tokens_per_day", 40, 50, MIDNIGHT
    )


def test_quota_usage_reads_and_holds_nothing(store: StoreDriver) -> None:
    """quota_usage counts pending holds but places none: the full quota is still there."""
    quota = Quota(requests_per_minute=2, tokens_per_minute=100)
    assert store.quota_usage("acme", quota, now=at(0)) == (
        LimitUsage("requests_per_minute", 0, 2, None),
        LimitUsage("tokens_per_minute", 0, 100, None),
    )
    held = store.reserve("acme", quota, QuotaDemand(60), now=at(1))
    for _ in range(3):
        usage = store.quota_usage("acme", quota, now=at(2))
    assert usage == (
        LimitUsage("requests_per_minute", 1, 2, at(61)),
        LimitUsage("tokens_per_minute", 60, 100, at(61)),
    )
    assert store.reserve("acme", quota, QuotaDemand(40), now=at(3)).admitted
    store.release(held)
    assert [u.used for u in store.quota_usage("acme", quota, now=at(4))] == [1, 40]


def test_minute_usage_resets_when_its_oldest_entry_leaves(store: StoreDriver) -> None:
    """resets_at of a minute window is when its oldest counting entry leaves; then it drops."""
    quota = Quota(requests_per_minute=10)
    store.record_usage(record(at(0), 0))
    store.record_usage(record(at(30), 0))
    (rpm,) = store.quota_usage("acme", quota, now=at(40))
    assert (rpm.used, rpm.resets_at) == (2, at(60))
    (rpm,) = store.quota_usage("acme", quota, now=at(60))
    assert (rpm.used, rpm.resets_at) == (1, at(90))
    assert store.quota_usage("acme", quota, now=at(95)) == (
        LimitUsage("requests_per_minute", 0, 10, None),
    )


def test_quota_usage_lists_only_the_limits_set(store: StoreDriver) -> None:
    """An unlimited quota has no entries; day and month windows follow UTC midnight."""
    store.record_usage(record(at(-3600), 70, 0.5))
    assert store.quota_usage("acme", Quota(), now=T0) == ()
    usage = store.quota_usage("acme", Quota(usd_per_month=2.0, tokens_per_day=100), now=T0)
    assert usage == (
        LimitUsage("tokens_per_day", 70, 100, MIDNIGHT),
        LimitUsage("usd_per_month", 0.5, 2.0, APRIL),
    )
    assert store.quota_usage("other", Quota(tokens_per_day=100), now=T0) == (
        LimitUsage("tokens_per_day", 0, 100, None),
    )


def test_begin_call_reservations_carry_usage(store: StoreDriver) -> None:
    """begin_call's reservation (on the store's clock) reports the usage it decided on."""
    quota = Quota(requests_per_minute=5, tokens_per_day=10**6)
    first = store.begin_call("acme", quota, QuotaDemand(7))
    assert first.reservation is not None
    assert [(u.name, u.used) for u in first.reservation.usage] == [
        ("requests_per_minute", 0),
        ("tokens_per_day", 0),
    ]
    second = store.begin_call("acme", quota, QuotaDemand(7))
    assert second.reservation is not None
    assert [u.used for u in second.reservation.usage] == [1, 7]
    now_usage = store.quota_usage("acme", quota)  # on the store's own clock
    assert [u.used for u in now_usage] == [2, 14]


def test_the_redis_usage_script_only_reads() -> None:
    """The Redis read of quota usage is a script of reads (no replica WAIT, safe on a replica);
    the reservation script, which shares its window arithmetic, writes."""
    redis_store = pytest.importorskip("safe_openai.stores._redis")
    assert not redis_store._script_writes(redis_store._USAGE)
    assert redis_store._script_writes(redis_store._RESERVE)
