"""The store contract: every backend, sync and async, must pass these cases unchanged.

The ``store`` fixture (see conftest.py) is parametrized over every store URL and both flavours.
Times are fixed and passed in; records are timestamped on the same timeline. The quota semantics
pinned here are those of :mod:`safe_openai.stores._types`.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from safe_openai.policy import Quota
from safe_openai.stores import AsyncUsageStore, UsageStore
from safe_openai.stores._memory import MemoryStore
from safe_openai.stores._types import (
    EVENT_KEEP,
    EVENT_PRUNE_BATCH,
    RESERVATION_TTL,
    CustomerReport,
    QuotaDemand,
    Reservation,
    Suspension,
    Violation,
)
from safe_openai.usage import Outcome, TokenUsage, UsageRecord

from .conftest import Backend, StoreDriver, call, run_in_parallel

UTC = timezone.utc
#: A Friday in the middle of a month, at noon: far from every day and month boundary.
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


def at(seconds: float, base: datetime = T0) -> datetime:
    """``seconds`` after ``base``."""
    return base + timedelta(seconds=seconds)


def record(
    customer: str = "acme",
    *,
    when: datetime = T0,
    outcome: Outcome = "ok",
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    cost: float | None = None,
    record_id: str | None = None,
    model: str | None = "gpt-4o-mini",
    request_id: str | None = None,
    latency_s: float = 0.0,
) -> UsageRecord:
    """A usage record with a unique id unless one is given."""
    return UsageRecord(
        customer_id=customer,
        endpoint="/chat/completions",
        model=model,
        outcome=outcome,
        tokens=TokenUsage(input_tokens, cached_tokens, output_tokens, reasoning_tokens),
        cost_usd=cost,
        latency_s=latency_s,
        created_at=when,
        request_id=request_id,
        record_id=uuid.uuid4().hex if record_id is None else record_id,
    )


def violation(customer: str = "acme", *, when: datetime = T0, detail: str = "") -> Violation:
    return Violation(customer, when, "moderation", ("violence",), 0.9, "/chat/completions", detail)


def admitted(reservation: Reservation) -> bool:
    """Whether a reservation was admitted, checking its fields agree."""
    if reservation.admitted:
        assert reservation.id
        assert (reservation.limit, reservation.retry_after) == (None, None)
    else:
        assert reservation.id == ""
        assert reservation.limit is not None
    return reservation.admitted


def refused_by(reservation: Reservation) -> tuple[str | None, float | None]:
    """``(limit, retry_after)`` of a refused reservation."""
    assert not admitted(reservation)
    return reservation.limit, reservation.retry_after


# --- protocol -----------------------------------------------------------------------------------


def test_store_satisfies_its_protocol(store: StoreDriver) -> None:
    """The opened store is a UsageStore (sync) or an AsyncUsageStore (async)."""
    protocol = AsyncUsageStore if store.is_async else UsageStore
    assert isinstance(store.store, protocol)


# --- usage records ------------------------------------------------------------------------------


def test_usage_record_round_trips_every_field(store: StoreDriver) -> None:
    """A stored record comes back equal, with an aware datetime for the same instant."""
    original = UsageRecord(
        customer_id="acme",
        endpoint="/responses",
        model="gpt-4o",
        outcome="estimated",
        tokens=TokenUsage(1200, 300, 450, 120),
        cost_usd=0.012345,
        latency_s=1.25,
        created_at=datetime(2025, 3, 14, 12, 0, 1, 123456, tzinfo=UTC),
        request_id="req_abc",
        record_id="rec-1",
    )
    anonymous = record("", model=None, cost=None, record_id="rec-2", when=at(-5))
    store.record_usage(original)
    store.record_usage(anonymous)
    back = store.usage_records()
    assert back == [original, anonymous]
    assert back[0].created_at.utcoffset() == timedelta(0)


def test_usage_records_are_newest_first(store: StoreDriver) -> None:
    """usage_records orders by created_at descending, whatever the insertion order."""
    for offset in (10, 30, 20, 0):
        store.record_usage(record(when=at(offset), record_id=f"r{offset}"))
    assert [r.record_id for r in store.usage_records()] == ["r30", "r20", "r10", "r0"]


def test_usage_records_filter_by_customer_and_inclusive_since(store: StoreDriver) -> None:
    """customer_id selects one customer; since keeps records at or after it."""
    store.record_usage(record("acme", when=at(0), record_id="a0"))
    store.record_usage(record("acme", when=at(10), record_id="a10"))
    store.record_usage(record("beta", when=at(20), record_id="b20"))
    assert [r.record_id for r in store.usage_records(customer_id="acme")] == ["a10", "a0"]
    assert [r.record_id for r in store.usage_records(since=at(10))] == ["b20", "a10"]
    assert [r.record_id for r in store.usage_records(customer_id="beta", since=at(21))] == []
    assert store.usage_records(customer_id="nobody") == []


def test_usage_records_limit_keeps_the_newest(store: StoreDriver) -> None:
    """limit cuts the list after the newest records."""
    for offset in range(5):
        store.record_usage(record(when=at(offset), record_id=f"r{offset}"))
    assert [r.record_id for r in store.usage_records(limit=2)] == ["r4", "r3"]


def test_recording_the_same_record_id_twice_stores_it_once(store: StoreDriver) -> None:
    """record_usage is idempotent on record_id: a replayed record is neither doubled nor changed."""
    first = record(record_id="dup", input_tokens=10)
    store.record_usage(first)
    store.record_usage(first)
    store.record_usage(record(record_id="dup", input_tokens=999))
    assert store.usage_records() == [first]
    assert store.usage_report()[0].requests == 1
    assert store.usage_report()[0].input_tokens == 10


def test_records_without_a_record_id_are_each_kept(store: StoreDriver) -> None:
    """An empty record_id never deduplicates: each such record is stored."""
    store.record_usage(record(record_id="", input_tokens=1))
    store.record_usage(record(record_id="", input_tokens=1))
    assert len(store.usage_records()) == 2


def test_commit_of_an_already_recorded_record_id_stores_it_once(store: StoreDriver) -> None:
    """commit is idempotent on record_id too (a record replayed after commit is not doubled)."""
    done = record(record_id="once", input_tokens=5, output_tokens=5)
    reservation = store.reserve("acme", Quota(), QuotaDemand(10), now=T0)
    store.commit(reservation, done)
    store.record_usage(done)
    store.commit(reservation, done)
    assert store.usage_records() == [done]


# --- usage report -------------------------------------------------------------------------------


def test_report_sums_tokens_and_cost_and_counts_each_outcome(store: StoreDriver) -> None:
    """Requests count ok/error/estimated; each outcome has its column; tokens and cost sum all."""
    acme = [
        record(
            outcome="ok",
            input_tokens=100,
            cached_tokens=40,
            output_tokens=50,
            reasoning_tokens=10,
            cost=0.1,
        ),
        record(outcome="error", input_tokens=10, cost=None),
        record(outcome="estimated", input_tokens=20, output_tokens=30, cost=0.2),
        record(outcome="blocked"),
        record(outcome="denied", input_tokens=5),
        record(outcome="denied"),
    ]
    for item in [*acme, record("beta", cost=0.5), record("beta", outcome="blocked")]:
        store.record_usage(item)
    assert store.usage_report() == [
        CustomerReport(
            customer="acme",
            requests=3,
            input_tokens=135,
            cached_tokens=40,
            output_tokens=80,
            reasoning_tokens=10,
            cost_usd=0.3,  # 0.1 + 0.2, rounded to 9 places
            blocked=1,
            denied=2,
            errors=1,
            estimated=1,
        ),
        CustomerReport(customer="beta", requests=1, cost_usd=0.5, blocked=1),
    ]


def test_report_since_filters_records_and_violations(store: StoreDriver) -> None:
    """since drops records and violations before it (and keeps those exactly at it)."""
    store.record_usage(record(when=at(-60), input_tokens=1000))
    store.record_usage(record(when=at(0), input_tokens=7))
    store.record_violation(violation(when=at(-60)))
    store.record_violation(violation(when=at(0)))
    store.record_violation(violation("beta", when=at(-60)))
    assert store.usage_report(since=T0) == [
        CustomerReport(customer="acme", requests=1, input_tokens=7, violations=1, strikes=1)
    ]
    assert store.usage_report(since=at(1)) == []


def test_report_filters_by_customer(store: StoreDriver) -> None:
    """customer_id limits the report to one customer's row."""
    store.record_usage(record("acme", input_tokens=1))
    store.record_usage(record("beta", input_tokens=2))
    store.record_violation(violation("beta"))
    assert store.usage_report(customer_id="beta") == [
        CustomerReport(customer="beta", requests=1, input_tokens=2, violations=1, strikes=1)
    ]
    assert store.usage_report(customer_id="nobody") == []


def test_report_shows_violations_and_suspensions_in_force(store: StoreDriver) -> None:
    """Customers with only violations or a live suspension get rows; an expired one does not."""
    real_now = datetime.now(UTC)
    store.record_violation(violation("viol"))
    store.record_violation(violation("viol"))
    store.suspend("held", reason="strikes", until=None, now=real_now)
    store.suspend("later", reason="strikes", until=real_now + timedelta(hours=1), now=real_now)
    store.suspend("expired", reason="strikes", until=real_now - timedelta(hours=1), now=at(0))
    store.record_usage(record("expired"))
    assert store.usage_report() == [
        CustomerReport(customer="expired", requests=1, suspended=False),
        CustomerReport(customer="held", suspended=True),
        CustomerReport(customer="later", suspended=True),
        CustomerReport(customer="viol", violations=2, strikes=2),
    ]


def test_report_counts_violations_and_the_strikes_among_them(store: StoreDriver) -> None:
    """``violations`` counts every violation since ``since``, ``strikes`` only the strikes."""
    store.record_violation(violation("acme", when=at(0)))
    store.record_violation(replace(violation("acme", when=at(10)), strike=False))
    store.record_violation(replace(violation("acme", when=at(20)), strike=False))
    store.record_violation(replace(violation("beta", when=at(20)), strike=False))
    assert [(r.customer, r.violations, r.strikes) for r in store.usage_report()] == [
        ("acme", 3, 1),
        ("beta", 1, 0),
    ]
    [row] = store.usage_report(since=at(5), customer_id="acme")
    assert (row.violations, row.strikes) == (2, 0)


def test_report_of_an_empty_store_is_empty(store: StoreDriver) -> None:
    """No data, no rows."""
    assert store.usage_report() == []


# --- violations ---------------------------------------------------------------------------------


def test_violations_round_trip_newest_first(store: StoreDriver) -> None:
    """A violation comes back equal, every field included, newest first."""
    full = Violation(
        "acme", at(10), "safety_identifier.blocked", ("hate", "violence"), 0.97, None, "evt_1"
    )
    bare = Violation("acme", at(0), "safety.warning_issued")
    store.record_violation(bare)
    store.record_violation(full)
    assert store.violations() == [full, bare]


def test_a_violation_that_is_not_a_strike_round_trips_with_its_flag(store: StoreDriver) -> None:
    """Every violation is stored with whether it is a strike; the flag comes back as written,
    and a violation written without it is a strike."""
    assert violation().strike is True
    struck = violation("acme", when=at(0), detail="struck")
    spared = replace(violation("acme", when=at(5), detail="spared"), strike=False)
    store.record_violation(struck)
    store.record_violation(spared)
    assert store.violations() == [spared, struck]
    assert [v.strike for v in store.violations(customer_id="acme", since=at(1))] == [False]


def test_count_violations_counts_strikes_only(store: StoreDriver) -> None:
    """count_violations drives suspension: violations that are not strikes are not counted."""
    for offset in (0, 10, 20):
        store.record_violation(violation("acme", when=at(offset)))
        store.record_violation(replace(violation("acme", when=at(offset + 1)), strike=False))
    assert store.count_violations("acme", since=at(0)) == 3
    assert store.count_violations("acme", since=at(10)) == 2
    assert len(store.violations(customer_id="acme")) == 6


def test_a_violation_id_is_stored_once_whatever_its_flag(store: StoreDriver) -> None:
    """Writing one violation id again, even flagged otherwise, stores nothing new."""
    first = replace(violation("acme", when=at(0)), violation_id="v-1", strike=False)
    assert store.record_violation(first) is True
    assert store.record_violation(replace(first, strike=True)) is False
    assert store.violations() == [first]
    assert store.count_violations("acme", since=at(-1)) == 0


def test_violations_filter_by_customer_since_and_limit(store: StoreDriver) -> None:
    """violations() honours customer_id, an inclusive since, and limit (keeping the newest)."""
    for offset in range(4):
        store.record_violation(violation("acme", when=at(offset), detail=f"a{offset}"))
    store.record_violation(violation("beta", when=at(10), detail="b"))
    assert [v.detail for v in store.violations(customer_id="acme")] == ["a3", "a2", "a1", "a0"]
    assert [v.detail for v in store.violations(since=at(2))] == ["b", "a3", "a2"]
    assert [v.detail for v in store.violations(customer_id="acme", limit=2)] == ["a3", "a2"]


def test_count_violations_counts_one_customer_since_inclusive(store: StoreDriver) -> None:
    """count_violations counts the customer's violations at or after since."""
    for offset in (0, 10, 20):
        store.record_violation(violation("acme", when=at(offset)))
    store.record_violation(violation("beta", when=at(20)))
    assert store.count_violations("acme", since=at(10)) == 2
    assert store.count_violations("acme", since=at(0)) == 3
    assert store.count_violations("acme", since=at(21)) == 0
    assert store.count_violations("nobody", since=at(-100)) == 0


# --- suspensions --------------------------------------------------------------------------------


def test_suspend_then_suspension_returns_it(store: StoreDriver) -> None:
    """suspension() returns what suspend() stored, with since = the now passed in."""
    store.suspend("acme", reason="strikes", until=at(3600), now=T0)
    assert store.suspension("acme", now=at(1)) == Suspension("acme", T0, at(3600), "strikes")
    assert store.suspension("beta", now=at(1)) is None


def test_suspend_replaces_the_current_suspension(store: StoreDriver) -> None:
    """A second suspend() replaces the first."""
    store.suspend("acme", reason="first", until=None, now=T0)
    store.suspend("acme", reason="second", until=at(60), now=at(10))
    assert store.suspension("acme", now=at(20)) == Suspension("acme", at(10), at(60), "second")


@pytest.mark.parametrize(
    ("until_offset", "in_force"),
    [(-1.0, False), (0.0, False), (0.001, True), (None, True)],
    ids=["ended", "ends-now", "ends-soon", "until-lifted"],
)
def test_suspension_is_in_force_only_before_until(
    store: StoreDriver, until_offset: float | None, in_force: bool
) -> None:
    """A suspension whose until is at or before now is no longer in force (None, not listed)."""
    until = None if until_offset is None else at(until_offset)
    store.suspend("acme", reason="r", until=until, now=at(-100))
    found = store.suspension("acme", now=T0)
    assert (found is not None) is in_force
    assert [s.customer_id for s in store.suspensions(now=T0)] == (["acme"] if in_force else [])


def test_unsuspend_returns_whether_a_suspension_was_in_place(store: StoreDriver) -> None:
    """unsuspend() lifts the suspension, True the first time, False after."""
    store.suspend("acme", reason="r", until=None, now=T0)
    assert store.unsuspend("acme") is True
    assert store.suspension("acme", now=T0) is None
    assert store.unsuspend("acme") is False
    assert store.unsuspend("never") is False


def test_suspensions_lists_those_in_force_sorted_by_customer(store: StoreDriver) -> None:
    """suspensions() is sorted by customer id and leaves out the expired ones."""
    store.suspend("zeta", reason="z", until=None, now=T0)
    store.suspend("alpha", reason="a", until=at(60), now=T0)
    store.suspend("mid", reason="m", until=at(5), now=T0)
    assert store.suspensions(now=at(1)) == [
        Suspension("alpha", T0, at(60), "a"),
        Suspension("mid", T0, at(5), "m"),
        Suspension("zeta", T0, None, "z"),
    ]
    assert [s.customer_id for s in store.suspensions(now=at(10))] == ["alpha", "zeta"]


# --- identifier and request maps, webhook events ------------------------------------------------


def test_identifier_map_returns_the_latest_customer(store: StoreDriver) -> None:
    """customer_for_identifier finds what remember_identifier stored; unknown ids give None."""
    store.remember_identifier("sid-1", "acme")
    store.remember_identifier("sid-2", "beta")
    assert store.customer_for_identifier("sid-1") == "acme"
    assert store.customer_for_identifier("sid-2") == "beta"
    assert store.customer_for_identifier("sid-3") is None
    store.remember_identifier("sid-1", "acme")
    store.remember_identifier("sid-2", "gamma")
    assert store.customer_for_identifier("sid-2") == "gamma"


def test_request_map_returns_the_latest_customer(store: StoreDriver) -> None:
    """customer_for_request finds what remember_request stored; unknown ids give None."""
    store.remember_request("req_1", "acme")
    assert store.customer_for_request("req_1") == "acme"
    assert store.customer_for_request("req_2") is None
    store.remember_request("req_1", "beta")
    assert store.customer_for_request("req_1") == "beta"


LEASE = timedelta(minutes=5)


def claim(store: StoreDriver, event_id: str, token: str, when: datetime = T0) -> str:
    return str(store.claim_event(event_id, token=token, now=when, lease=LEASE))


def test_a_claimed_event_is_held_until_finished_then_done_for_everyone(store: StoreDriver) -> None:
    """One token claims an event; others see it held while the lease runs, done once finished."""
    assert claim(store, "evt_1", "a") == "claimed"
    assert claim(store, "evt_1", "b", at(60)) == "held"
    assert claim(store, "evt_2", "b") == "claimed"  # events are independent
    assert store.finish_event("evt_1", token="a") is True
    assert [claim(store, "evt_1", t, at(3600)) for t in ("a", "b")] == ["done", "done"]
    # a finished event never lapses: it is done until EVENT_KEEP has passed
    assert claim(store, "evt_1", "c", T0 + EVENT_KEEP - timedelta(seconds=1)) == "done"


def test_a_released_claim_lets_the_next_delivery_claim_at_once(store: StoreDriver) -> None:
    """release_event gives the event back (a failed action); a stranger's release does not."""
    assert claim(store, "evt_1", "a") == "claimed"
    store.release_event("evt_1", token="intruder")
    assert claim(store, "evt_1", "b", at(1)) == "held"
    store.release_event("evt_1", token="a")
    assert claim(store, "evt_1", "b", at(2)) == "claimed"
    assert store.finish_event("evt_1", token="a") is False  # no longer its claim
    assert store.finish_event("evt_1", token="b") is True
    store.release_event("evt_1", token="b")  # a finished event stays done
    assert claim(store, "evt_1", "c", at(3)) == "done"


def test_a_lapsed_lease_can_be_claimed_again_and_the_old_holder_cannot_finish(
    store: StoreDriver,
) -> None:
    """A holder that died keeps the event only for its lease."""
    assert claim(store, "evt_1", "a") == "claimed"
    lease_s = LEASE.total_seconds()
    assert claim(store, "evt_1", "b", at(lease_s - 1)) == "held"
    assert claim(store, "evt_1", "b", at(lease_s + 1)) == "claimed"
    assert store.finish_event("evt_1", token="a") is False
    store.release_event("evt_1", token="a")  # nor release the new holder's claim
    assert claim(store, "evt_1", "c", at(lease_s + 2)) == "held"
    assert store.finish_event("evt_1", token="b") is True
    assert store.finish_event("evt_unknown", token="b") is False


KEEP_S = EVENT_KEEP.total_seconds()


def _redis_ttl_s(store: StoreDriver, event_id: str) -> float:
    """Seconds until a Redis store's key of ``event_id`` expires (-2: no key)."""
    from safe_openai.stores._redis import _cmd

    def op() -> Any:
        (ms,) = yield [_cmd("pttl", store.store._keys.event(event_id))]
        return int(ms) / 1000 if int(ms) >= 0 else int(ms)

    return float(store._run(op()))


def test_a_claim_is_done_for_event_keep_then_forgotten(
    store: StoreDriver, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished claim is "done" for EVENT_KEEP (a month window's alert id claimed 10 days
    ago among them), then forgotten: the id can be claimed again. Redis lets the key expire;
    the other stores delete it as they claim (their expiry follows ``now``)."""
    assert claim(store, "alert:month:2025-03", "a") == "claimed"
    assert store.finish_event("alert:month:2025-03", token="a") is True
    assert claim(store, "lapsed", "a") == "claimed"  # its holder dies: the lease lapses
    assert claim(store, "alert:month:2025-03", "b", at(10 * 86400)) == "done"
    assert claim(store, "young", "a", at(10 * 86400)) == "claimed"
    assert store.finish_event("young", token="a") is True
    if backend.scheme == "redis":
        # the key lives EVENT_KEEP from when it was finished (give the test a minute)
        for event_id in ("alert:month:2025-03", "young"):
            assert KEEP_S - 60 < _redis_ttl_s(store, event_id) <= KEEP_S
        assert claim(store, "live", "a") == "claimed"
        assert KEEP_S - 60 < _redis_ttl_s(store, "live") <= KEEP_S
        # with a short retention, a finished claim's key expires and the id is claimable again
        from safe_openai.stores import _redis

        monkeypatch.setattr(_redis, "_EVENT_CLAIM_TTL_S", 1)
        assert store.finish_event("live", token="a") is True
        deadline = time.monotonic() + 10
        while _redis_ttl_s(store, "live") != -2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert claim(store, "live", "b", at(60)) == "claimed"
        return
    assert claim(store, "alert:month:2025-03", "b", at(KEEP_S - 1)) == "done"
    assert claim(store, "probe", "b", at(KEEP_S + 1)) == "claimed"  # prunes what is older
    assert store.finish_event("lapsed", token="a") is False  # its lapsed claim is gone too
    assert claim(store, "alert:month:2025-03", "c", at(KEEP_S + 2)) == "claimed"
    assert claim(store, "young", "c", at(KEEP_S + 2)) == "done"


def test_pruning_is_bounded_per_claim_and_never_takes_a_live_lease(
    store: StoreDriver, backend: Backend
) -> None:
    """One claim forgets at most EVENT_PRUNE_BATCH old claims; a live lease, however old its
    claim, stays held."""
    if backend.scheme == "redis":
        pytest.skip("Redis expires each claim's key by itself")
    assert store.claim_event("live", token="a", now=T0, lease=2 * EVENT_KEEP) == "claimed"
    old = [f"evt_{i}" for i in range(EVENT_PRUNE_BATCH + 50)]
    for event_id in old:
        assert claim(store, event_id, "a") == "claimed"
        assert store.finish_event(event_id, token="a") is True
    assert claim(store, "probe", "b", at(KEEP_S + 1)) == "claimed"
    # claims at T0 prune nothing more: each old id says whether the probe forgot it
    again = [claim(store, event_id, "c", at(LEASE.total_seconds() + 1)) for event_id in old]
    assert again.count("claimed") == EVENT_PRUNE_BATCH
    assert again.count("done") == len(old) - EVENT_PRUNE_BATCH
    assert claim(store, "live", "b", at(KEEP_S + 2)) == "held"


def test_concurrent_claims_of_one_event_have_one_winner(store: StoreDriver) -> None:
    """Of many concurrent claims with distinct tokens, exactly one is "claimed"."""
    results = store.concurrently(
        [call("claim_event", "evt_race", token=f"t{i}", now=T0, lease=LEASE) for i in range(12)]
    )
    assert sorted(results) == ["claimed"] + ["held"] * 11


def test_a_violation_id_is_stored_once(store: StoreDriver) -> None:
    """The same violation_id written again (a replay) adds nothing; violations without one
    are each kept; the id round-trips."""
    first = Violation("acme", at(0), "moderation", ("violence",), 0.9, "/chat", "", "v-1")
    assert store.record_violation(first) is True
    assert store.record_violation(first) is False
    assert store.record_violation(violation()) is True
    assert store.record_violation(violation()) is True
    assert store.count_violations("acme", since=at(-1)) == 3
    assert [v for v in store.violations() if v.violation_id] == [first]
    report = store.usage_report()
    assert [(r.customer, r.violations) for r in report] == [("acme", 3)]


def test_concurrent_writes_of_one_violation_id_store_it_once(store: StoreDriver) -> None:
    replayed = Violation("acme", at(0), "moderation", violation_id="v-race")
    results = store.concurrently([call("record_violation", replayed) for _ in range(8)])
    assert sorted(results) == [False] * 7 + [True]
    assert store.count_violations("acme", since=at(-1)) == 1


# --- quotas: admission, requests per minute -----------------------------------------------------


def test_unlimited_quota_admits_with_a_fresh_reservation_id(store: StoreDriver) -> None:
    """Quota() admits every demand; each reservation gets its own id."""
    first = store.reserve("acme", Quota(), QuotaDemand(10**9, 10**6), now=T0)
    second = store.reserve("acme", Quota(), QuotaDemand(10**9, 10**6), now=T0)
    assert admitted(first)
    assert admitted(second)
    assert first.id != second.id
    assert first.customer_id == "acme"


def test_requests_per_minute_refuses_with_retry_after(store: StoreDriver) -> None:
    """rpm=2: a third request within the minute waits until the oldest leaves the window."""
    quota = Quota(requests_per_minute=2)
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(0)))
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(30)))
    refused = store.reserve("acme", quota, QuotaDemand(), now=at(45))
    assert refused.customer_id == "acme"
    limit, retry_after = refused_by(refused)
    assert limit == "requests_per_minute"
    assert retry_after == pytest.approx(15.0, abs=1e-6)


def test_minute_window_slides_so_no_double_burst_at_a_minute_boundary(store: StoreDriver) -> None:
    """Two requests just before xx:01:00 block two more just after it (sliding, not fixed).

    Both fall in the one-second bucket [59, 60), which leaves the window with its latest entry
    (t=59.95): the documented bound, at most one bucket later than the exact window (59.9).
    """
    quota = Quota(requests_per_minute=2)
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(59.9)))
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(59.95)))
    limit, retry_after = refused_by(store.reserve("acme", quota, QuotaDemand(), now=at(60.05)))
    assert limit == "requests_per_minute"
    assert retry_after == pytest.approx(59.9, abs=1e-6)  # 59.95 + 60 - 60.05
    limit, retry_after = refused_by(store.reserve("acme", quota, QuotaDemand(), now=at(119.9)))
    assert retry_after == pytest.approx(0.05, abs=1e-6)  # exact: admitted; bound: 1 bucket
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(119.95)))


def test_entries_sharing_a_bucket_never_count_longer_than_one_bucket(store: StoreDriver) -> None:
    """Entries in one second count until the latest of them is 60 s old, never longer."""
    quota = Quota(requests_per_minute=3)
    for offset in (10.0, 10.5, 10.999):
        assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(offset)))
    limit, retry_after = refused_by(store.reserve("acme", quota, QuotaDemand(), now=at(30)))
    assert (limit, retry_after) == ("requests_per_minute", pytest.approx(40.999, abs=1e-6))
    assert not admitted(store.reserve("acme", quota, QuotaDemand(), now=at(70.998)))
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(70.999)))


def test_an_entry_exactly_sixty_seconds_old_no_longer_counts(store: StoreDriver) -> None:
    """The minute window is (now - 60 s, now]: at t=60 the request of t=0 has left it."""
    quota = Quota(requests_per_minute=2)
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(0)))
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(59.9)))
    limit, retry_after = refused_by(store.reserve("acme", quota, QuotaDemand(), now=at(59.999)))
    assert retry_after == pytest.approx(0.001, abs=1e-6)
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(60)))
    limit, retry_after = refused_by(store.reserve("acme", quota, QuotaDemand(), now=at(60.5)))
    assert limit == "requests_per_minute"
    assert retry_after == pytest.approx(59.4, abs=1e-6)  # the t=59.9 entry frees at 119.9


def test_lowered_request_limit_waits_for_enough_entries_to_expire(store: StoreDriver) -> None:
    """Three requests in the window and rpm=2: the second-oldest must leave before a new one."""
    for offset in (0, 10, 20):
        store.record_usage(record(when=at(offset)))
    limit, retry_after = refused_by(
        store.reserve("acme", Quota(requests_per_minute=2), QuotaDemand(), now=at(30))
    )
    assert (limit, retry_after) == ("requests_per_minute", pytest.approx(40.0, abs=1e-6))


@pytest.mark.parametrize(
    ("outcome", "counts"),
    [("ok", True), ("error", True), ("estimated", True), ("blocked", False), ("denied", False)],
)
def test_only_records_that_reached_the_model_count_against_quotas(
    store: StoreDriver, outcome: Outcome, counts: bool
) -> None:
    """ok, error and estimated records use quota; blocked and denied ones do not."""
    store.record_usage(record(when=at(0), outcome=outcome, input_tokens=600, cost=1.0))
    for quota, demand in [
        (Quota(requests_per_minute=1), QuotaDemand()),
        (Quota(tokens_per_minute=1000), QuotaDemand(500)),
        (Quota(tokens_per_day=1000), QuotaDemand(500)),
        (Quota(usd_per_month=1.5), QuotaDemand(cost_usd=1.0)),
    ]:
        reservation = store.reserve("acme", quota, demand, now=at(10))
        assert admitted(reservation) is not counts, quota
        if reservation.admitted:
            store.release(reservation)


@pytest.mark.parametrize(
    ("quota", "demand", "expected"),
    [
        (Quota(requests_per_minute=1), QuotaDemand(), ("requests_per_minute", 80.0)),
        (Quota(tokens_per_minute=1000), QuotaDemand(1), ("tokens_per_minute", 80.0)),
        (Quota(tokens_per_day=1000), QuotaDemand(1), ("tokens_per_day", 12 * 3600.0 - 10)),
        (Quota(usd_per_month=5.0), QuotaDemand(0, 0.5), ("usd_per_month", 17 * 86400.0 + 43190)),
    ],
    ids=["rpm", "tpm", "tpd", "usd"],
)
def test_entries_stamped_after_now_count(
    store: StoreDriver, quota: Quota, demand: QuotaDemand, expected: tuple[str, float]
) -> None:
    """A record stamped later than now (a caller whose clock read came later) still counts."""
    store.record_usage(record(when=at(30), input_tokens=1000, cost=5.0))
    limit, retry_after = refused_by(store.reserve("acme", quota, demand, now=at(10)))
    assert (limit, retry_after) == (expected[0], pytest.approx(expected[1], abs=1e-6))


def test_a_reservation_made_at_a_later_instant_counts(store: StoreDriver) -> None:
    """Two racing callers: the one that read the clock first but reserves second is refused."""
    quota = Quota(requests_per_minute=1)
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=at(0.5)))
    assert refused_by(store.reserve("acme", quota, QuotaDemand(), now=at(0)))[0] == (
        "requests_per_minute"
    )


@pytest.mark.parametrize(
    ("quota", "demand", "limit"),
    [
        (Quota(requests_per_minute=0), QuotaDemand(), "requests_per_minute"),
        (Quota(tokens_per_minute=100), QuotaDemand(101), "tokens_per_minute"),
        (Quota(tokens_per_day=100), QuotaDemand(101), "tokens_per_day"),
        (Quota(usd_per_month=1.0), QuotaDemand(cost_usd=1.5), "usd_per_month"),
    ],
    ids=["rpm-zero", "tpm", "tpd", "usd"],
)
def test_demand_larger_than_the_limit_is_refused_with_no_retry_after(
    store: StoreDriver, quota: Quota, demand: QuotaDemand, limit: str
) -> None:
    """Waiting cannot help a demand above the limit itself: retry_after is None."""
    assert refused_by(store.reserve("acme", quota, demand, now=T0)) == (limit, None)


# --- quotas: tokens, days, months ---------------------------------------------------------------


def test_tokens_per_minute_counts_input_plus_output_up_to_the_limit(store: StoreDriver) -> None:
    """Token quotas count input + output (cached and reasoning are inside them); equal is ok."""
    store.record_usage(
        record(
            when=at(0), input_tokens=400, cached_tokens=300, output_tokens=200, reasoning_tokens=150
        )
    )
    assert admitted(
        store.reserve("acme", Quota(tokens_per_minute=1000), QuotaDemand(400), now=at(10))
    )
    limit, retry_after = refused_by(
        store.reserve("acme", Quota(tokens_per_minute=1000), QuotaDemand(1), now=at(20))
    )
    assert limit == "tokens_per_minute"
    assert retry_after == pytest.approx(40.0, abs=1e-6)  # the 600 tokens of t=0 free at t=60


def test_tokens_per_minute_waits_until_enough_tokens_leave_the_window(store: StoreDriver) -> None:
    """retry_after is when the oldest entries holding the excess have all left the window."""
    for offset in (0, 10, 20):
        store.record_usage(record(when=at(offset), input_tokens=300))
    # 900 used + 500 demanded - 1000 = 400 excess: t=0 frees 300, t=10 brings it to 600.
    limit, retry_after = refused_by(
        store.reserve("acme", Quota(tokens_per_minute=1000), QuotaDemand(500), now=at(30))
    )
    assert (limit, retry_after) == ("tokens_per_minute", pytest.approx(40.0, abs=1e-6))
    assert admitted(
        store.reserve("acme", Quota(tokens_per_minute=1000), QuotaDemand(500), now=at(70))
    )


def test_tokens_per_day_rolls_over_at_utc_midnight(store: StoreDriver) -> None:
    """The day window starts at 00:00 UTC: yesterday's tokens stop counting at midnight."""
    midnight = datetime(2025, 3, 15, tzinfo=UTC)
    quota = Quota(tokens_per_day=1000)
    store.record_usage(record(when=at(-3600, midnight), input_tokens=900))
    limit, retry_after = refused_by(
        store.reserve("acme", quota, QuotaDemand(200), now=at(-1, midnight))
    )
    assert (limit, retry_after) == ("tokens_per_day", pytest.approx(1.0, abs=1e-6))
    first = store.reserve("acme", quota, QuotaDemand(200), now=midnight)
    assert admitted(first)
    store.commit(first, record(when=midnight, input_tokens=200))
    second = store.reserve("acme", quota, QuotaDemand(800), now=at(30, midnight))
    assert admitted(second)
    store.commit(second, record(when=at(30, midnight), output_tokens=800))
    limit, retry_after = refused_by(
        store.reserve("acme", quota, QuotaDemand(1), now=at(3600, midnight))
    )
    assert (limit, retry_after) == ("tokens_per_day", pytest.approx(86400 - 3600, abs=1e-6))


def test_tokens_per_day_counts_the_whole_day_not_only_the_last_minute(
    store: StoreDriver,
) -> None:
    """Tokens from hours ago and from seconds ago both count toward the day."""
    quota = Quota(requests_per_minute=100, tokens_per_day=1000)
    store.record_usage(record(when=at(-6 * 3600), input_tokens=500))
    store.record_usage(record(when=at(-5), input_tokens=400))
    assert refused_by(store.reserve("acme", quota, QuotaDemand(101), now=T0))[0] == "tokens_per_day"
    assert admitted(store.reserve("acme", quota, QuotaDemand(100), now=T0))


def test_a_now_in_another_timezone_means_the_same_instant(store: StoreDriver) -> None:
    """Days follow UTC whatever the timezone of the now passed in."""
    plus_two = timezone(timedelta(hours=2))
    quota = Quota(tokens_per_day=1000)
    store.record_usage(record(when=datetime(2025, 3, 14, 23, 0, tzinfo=UTC), input_tokens=900))
    # 00:30 on the 15th at +02:00 is 22:30 UTC on the 14th: still the same UTC day.
    refused = store.reserve(
        "acme", quota, QuotaDemand(200), now=datetime(2025, 3, 15, 1, 30, tzinfo=plus_two)
    )
    assert refused_by(refused) == ("tokens_per_day", pytest.approx(1800.0, abs=1e-6))


@pytest.mark.parametrize(
    ("last_day", "first_of_next"),
    [
        (datetime(2025, 3, 31, 23, 30, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)),
        (datetime(2025, 2, 28, 12, 0, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)),
        (datetime(2024, 2, 29, 12, 0, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
        (datetime(2025, 12, 31, 23, 59, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
    ],
    ids=["march-april", "february", "leap-february", "new-year"],
)
def test_usd_per_month_rolls_over_on_the_first_at_utc_midnight(
    store: StoreDriver, last_day: datetime, first_of_next: datetime
) -> None:
    """Spend counts from the first of the month; retry_after reaches the next month's start."""
    quota = Quota(usd_per_month=1.0)
    month_begins = last_day.replace(day=1, hour=0, minute=0)
    store.record_usage(record(when=month_begins, cost=0.5))
    store.record_usage(record(when=last_day - timedelta(hours=1), cost=0.25))
    store.record_usage(record(when=month_begins - timedelta(seconds=1), cost=100.0))
    assert admitted(store.reserve("acme", quota, QuotaDemand(cost_usd=0.125), now=last_day))
    limit, retry_after = refused_by(
        store.reserve("acme", quota, QuotaDemand(cost_usd=0.25), now=last_day)
    )
    assert limit == "usd_per_month"
    assert retry_after == pytest.approx((first_of_next - last_day).total_seconds(), abs=1e-6)
    assert admitted(store.reserve("acme", quota, QuotaDemand(cost_usd=1.0), now=first_of_next))


def test_unknown_cost_counts_as_zero_spend(store: StoreDriver) -> None:
    """A record with cost_usd None uses no money quota."""
    store.record_usage(record(cost=None, input_tokens=10))
    assert admitted(
        store.reserve("acme", Quota(usd_per_month=0.5), QuotaDemand(cost_usd=0.5), now=at(1))
    )


_ALL = {"tokens_per_minute": 1000, "tokens_per_day": 1000, "usd_per_month": 1.0}


@pytest.mark.parametrize(
    ("quota", "limit"),
    [
        (Quota(requests_per_minute=1, **_ALL), "requests_per_minute"),  # type: ignore[arg-type]
        (Quota(**_ALL), "tokens_per_minute"),  # type: ignore[arg-type]
        (Quota(tokens_per_day=1000, usd_per_month=1.0), "tokens_per_day"),
        (Quota(usd_per_month=1.0), "usd_per_month"),
    ],
    ids=["rpm-first", "then-tpm", "then-tpd", "then-usd"],
)
def test_limits_are_checked_in_order(store: StoreDriver, quota: Quota, limit: str) -> None:
    """When several limits fail, the first of rpm, tpm, tpd, usd is the one reported."""
    store.record_usage(record(when=at(0), input_tokens=1000, cost=1.0))
    assert refused_by(store.reserve("acme", quota, QuotaDemand(1, 0.5), now=at(1)))[0] == limit


# --- quotas: pending reservations ---------------------------------------------------------------


def test_pending_reservation_holds_capacity_until_released(store: StoreDriver) -> None:
    """An admitted demand counts while pending; release frees it at once."""
    quota = Quota(requests_per_minute=1, tokens_per_day=1000, usd_per_month=1.0)
    held = store.reserve("acme", quota, QuotaDemand(600, 0.75), now=at(0))
    assert admitted(held)
    assert refused_by(store.reserve("acme", quota, QuotaDemand(), now=at(1)))[0] == (
        "requests_per_minute"
    )
    later = at(120)
    assert refused_by(store.reserve("acme", quota, QuotaDemand(600), now=later))[0] == (
        "tokens_per_day"
    )
    assert refused_by(store.reserve("acme", quota, QuotaDemand(0, 0.5), now=later))[0] == (
        "usd_per_month"
    )
    store.release(held)
    assert admitted(store.reserve("acme", quota, QuotaDemand(600, 0.75), now=at(2)))


def test_commit_replaces_the_reservation_by_the_actual_usage(store: StoreDriver) -> None:
    """After commit, the window holds the record's tokens and cost, not the demand's."""
    quota = Quota(tokens_per_minute=1000, usd_per_month=1.0)
    held = store.reserve("acme", quota, QuotaDemand(900, 0.9), now=at(0))
    assert admitted(held)
    assert refused_by(store.reserve("acme", quota, QuotaDemand(200), now=at(1)))[0] == (
        "tokens_per_minute"
    )
    store.commit(held, record(when=at(0), input_tokens=60, output_tokens=40, cost=0.25))
    assert admitted(store.reserve("acme", quota, QuotaDemand(900, 0.75), now=at(2)))
    assert [r.tokens.total_tokens for r in store.usage_records()] == [100]


def test_a_reservation_counts_at_its_own_time(store: StoreDriver) -> None:
    """A pending reservation leaves the minute window 60 s after it was made."""
    quota = Quota(tokens_per_minute=1000)
    assert admitted(store.reserve("acme", quota, QuotaDemand(800), now=at(0)))
    limit, retry_after = refused_by(store.reserve("acme", quota, QuotaDemand(800), now=at(25)))
    assert (limit, retry_after) == ("tokens_per_minute", pytest.approx(35.0, abs=1e-6))
    assert admitted(store.reserve("acme", quota, QuotaDemand(800), now=at(60)))


@pytest.mark.parametrize(
    ("age", "counted"),
    [
        (RESERVATION_TTL - timedelta(seconds=1), True),
        (RESERVATION_TTL, False),
        (RESERVATION_TTL + timedelta(seconds=1), False),
    ],
    ids=["younger", "exactly-ttl", "older"],
)
def test_stale_pending_reservation_is_ignored_after_the_ttl(
    store: StoreDriver, age: timedelta, counted: bool
) -> None:
    """A reservation never committed or released stops counting once RESERVATION_TTL old."""
    quota = Quota(tokens_per_day=1000)
    assert admitted(store.reserve("acme", quota, QuotaDemand(1000), now=T0))
    assert admitted(store.reserve("acme", quota, QuotaDemand(1), now=T0 + age)) is not counted


def test_reservations_are_per_customer(store: StoreDriver) -> None:
    """One customer's usage and reservations never count against another's quota."""
    quota = Quota(requests_per_minute=1, tokens_per_day=100)
    store.record_usage(record("acme", input_tokens=100))
    assert admitted(store.reserve("beta", quota, QuotaDemand(100), now=at(1)))
    assert not admitted(store.reserve("acme", quota, QuotaDemand(1), now=at(1)))
    assert admitted(store.reserve("gamma", quota, QuotaDemand(100), now=at(1)))


def test_releasing_twice_or_an_unknown_reservation_is_harmless(store: StoreDriver) -> None:
    """release() of a released, refused or unknown reservation changes nothing."""
    quota = Quota(requests_per_minute=2)
    kept = store.reserve("acme", quota, QuotaDemand(), now=T0)
    gone = store.reserve("acme", quota, QuotaDemand(), now=T0)
    refused = store.reserve("acme", quota, QuotaDemand(), now=T0)
    store.release(gone)
    store.release(gone)
    store.release(refused)
    store.release(Reservation(uuid.uuid4().hex, "acme", True))
    assert admitted(kept)
    assert admitted(store.reserve("acme", quota, QuotaDemand(), now=T0))
    assert not admitted(store.reserve("acme", quota, QuotaDemand(), now=T0))


# --- quotas: against the reference, and under concurrency ---------------------------------------


def test_quota_decisions_match_the_reference_store_on_a_random_timeline(
    store: StoreDriver,
) -> None:
    """Reserve/commit/release/record in a seeded random order, across UTC midnight and the
    reservation TTL, some records stamped ahead of now: every decision, retry_after, record and
    report row equals MemoryStore's."""
    rng = random.Random(20250314)
    reference = MemoryStore()
    # A customer's quota may change between calls (a tier change): mixing them makes every
    # limit bite somewhere on the timeline.
    quotas = [
        Quota(requests_per_minute=4, tokens_per_minute=3000),
        Quota(tokens_per_day=20_000),
        Quota(usd_per_month=1.0),
        Quota(requests_per_minute=6, tokens_per_minute=4000, tokens_per_day=30_000,
              usd_per_month=2.0),
    ]  # fmt: skip
    now = datetime(2025, 3, 14, 23, 45, tzinfo=UTC)
    open_: list[tuple[Reservation, Reservation, datetime, QuotaDemand, str]] = []
    refusals: dict[str | None, int] = {}
    for step in range(420):
        now += timedelta(milliseconds=rng.randint(100, 8000))
        customer = rng.choice(["acme", "beta"])
        action = rng.random()
        if action < 0.55:
            demand = QuotaDemand(rng.randint(0, 1500), rng.randint(0, 4) / 64)
            quota = rng.choice(quotas)
            got = store.reserve(customer, quota, demand, now=now)
            want = reference.reserve(customer, quota, demand, now=now)
            assert (got.admitted, got.limit) == (want.admitted, want.limit), f"step {step}"
            assert got.retry_after == pytest.approx(want.retry_after, abs=1e-6), f"step {step}"
            refusals[got.limit] = refusals.get(got.limit, 0) + 1
            if got.admitted:
                open_.append((got, want, now, demand, customer))
        elif action < 0.8 and open_:
            got, want, made, demand, owner = open_.pop(rng.randrange(len(open_)))
            fate = rng.random()
            if fate < 0.6:
                done = record(
                    owner,
                    when=made,
                    outcome=rng.choice(["ok", "error", "estimated"]),
                    input_tokens=rng.randint(0, demand.tokens),
                    cost=rng.randint(0, int(demand.cost_usd * 64)) / 64,
                )
                store.commit(got, done)
                reference.commit(want, done)
            elif fate < 0.85:
                store.release(got)
                reference.release(want)
            # else: abandoned, as by a crashed worker, until the TTL retires it
        else:
            extra = record(
                customer,
                when=now + timedelta(milliseconds=rng.randint(-30_000, 5_000)),  # some ahead
                outcome=rng.choice(["ok", "ok", "error", "blocked", "denied"]),
                input_tokens=rng.randint(0, 800),
                output_tokens=rng.randint(0, 400),
                cost=rng.choice([None, 1 / 64, 3 / 64]),
            )
            store.record_usage(extra)
            reference.record_usage(extra)
    # The script must exercise every limit, or it proves less than it claims.
    limits = {"requests_per_minute", "tokens_per_minute", "tokens_per_day", "usd_per_month"}
    assert limits <= set(refusals), refusals
    assert refusals[None] > 50, refusals

    def by_id(records: list[UsageRecord]) -> list[UsageRecord]:
        return sorted(records, key=lambda r: r.record_id)

    assert by_id(store.usage_records(limit=10_000)) == by_id(reference.usage_records(limit=10_000))
    assert store.usage_report() == reference.usage_report()


@pytest.mark.parametrize(
    ("quota", "demand"),
    [
        (Quota(requests_per_minute=5), QuotaDemand()),
        (Quota(tokens_per_minute=500), QuotaDemand(100)),
        (Quota(tokens_per_day=500), QuotaDemand(100)),
        (Quota(usd_per_month=0.5), QuotaDemand(0, 0.1)),
    ],
    ids=["rpm", "tpm", "tpd", "usd"],
)
def test_concurrent_reserves_admit_exactly_the_budget(
    store: StoreDriver, quota: Quota, demand: QuotaDemand
) -> None:
    """20 reserves racing (threads, or gathered coroutines) for a budget of 5: exactly 5 pass."""
    results = store.concurrently(
        [call("reserve", "acme", quota, demand, now=T0) for _ in range(20)]
    )
    assert sum(admitted(r) for r in results) == 5
    assert len({r.id for r in results if r.admitted}) == 5


def test_concurrent_commits_and_records_are_all_kept(store: StoreDriver) -> None:
    """Racing writes lose nothing: every record and every commit is in the report."""
    reservations = [store.reserve("acme", Quota(), QuotaDemand(5), now=T0) for _ in range(10)]
    calls = [call("record_usage", record(input_tokens=1)) for _ in range(30)]
    calls += [call("commit", r, record(output_tokens=2)) for r in reservations]
    store.concurrently(calls)
    [row] = store.usage_report()
    assert (row.requests, row.input_tokens, row.output_tokens) == (40, 30, 20)
    # 50 tokens recorded; the commits dropped their pending 10 x 5, so 1 more still fits in 51
    assert admitted(store.reserve("acme", Quota(tokens_per_day=51), QuotaDemand(1), now=T0))


def _shared_only(backend: Backend) -> None:
    if not backend.shared:
        pytest.skip(f"two stores on {backend.url} do not share data")


def test_a_second_store_on_the_same_url_sees_the_same_data(
    backend: Backend, store: StoreDriver
) -> None:
    """Stores opened separately on one URL (other workers, replicas) share their data."""
    _shared_only(backend)
    other = backend.open()
    store.record_usage(record(record_id="seen"))
    store.remember_identifier("sid", "acme")
    held = store.reserve("acme", Quota(requests_per_minute=2), QuotaDemand(), now=T0)
    assert [r.record_id for r in other.usage_records()] == ["seen"]
    assert other.customer_for_identifier("sid") == "acme"
    assert not admitted(other.reserve("acme", Quota(requests_per_minute=2), QuotaDemand(), now=T0))
    other.release(held)
    assert admitted(other.reserve("acme", Quota(requests_per_minute=2), QuotaDemand(), now=T0))


def test_store_instances_racing_admit_exactly_the_budget(
    backend: Backend, store: StoreDriver
) -> None:
    """Four separately opened stores, each in its own thread, 5 attempts each, budget 6: 6 pass."""
    _shared_only(backend)
    drivers = [store] + [backend.open() for _ in range(3)]
    quota = Quota(tokens_per_minute=600)

    def attempts(driver: StoreDriver) -> list[Any]:
        return [driver.reserve("acme", quota, QuotaDemand(100), now=T0) for _ in range(5)]

    results = [r for batch in run_in_parallel(drivers, attempts) for r in batch]
    assert sum(admitted(r) for r in results) == 6


# --- one round trip before and after a call --------------------------------------------------


def test_begin_call_reserves_on_the_stores_clock_and_maps_the_identifier(
    store: StoreDriver,
) -> None:
    """begin_call: standing, a reservation at the store's own time, the identifier map."""
    before = datetime.now(UTC)
    quota = Quota(requests_per_minute=1)
    start = store.begin_call("acme", quota, QuotaDemand(5), identifier="sid-acme")
    assert start.suspension is None
    assert start.reservation is not None and admitted(start.reservation)
    assert start.reservation.at is not None
    assert (
        before - timedelta(seconds=5)
        <= start.reservation.at
        <= datetime.now(UTC) + (timedelta(seconds=5))
    )
    assert store.customer_for_identifier("sid-acme") == "acme"
    again = store.begin_call("acme", quota, QuotaDemand(5))
    assert again.reservation is not None
    limit, retry_after = refused_by(again.reservation)
    assert limit == "requests_per_minute"
    assert retry_after is not None and 0 < retry_after <= 61
    assert not again.admitted


def test_begin_call_of_a_suspended_customer_reserves_nothing(store: StoreDriver) -> None:
    """A suspended customer gets its suspension back and no hold; its quota stays free."""
    store.suspend("acme", reason="strikes", until=None, now=datetime.now(UTC))
    start = store.begin_call("acme", Quota(requests_per_minute=1), QuotaDemand())
    assert start.suspension is not None and start.suspension.reason == "strikes"
    assert start.reservation is None
    store.unsuspend("acme")
    first = store.begin_call("acme", Quota(requests_per_minute=1), QuotaDemand())
    assert first.reservation is not None and admitted(first.reservation)


def test_begin_call_without_a_quota_only_checks_standing(store: StoreDriver) -> None:
    """quota=None: no reservation, no suspension; the identifier is mapped exactly when the
    answer says so (SQLite leaves it to the caller, to stay a read)."""
    start = store.begin_call("acme", None, QuotaDemand(), identifier="sid")
    assert (start.suspension, start.reservation) == (None, None)
    assert (store.customer_for_identifier("sid") == "acme") is start.identifier_saved


def test_finish_call_settles_the_hold_records_once_and_maps_the_request(
    store: StoreDriver,
) -> None:
    """finish_call: the hold becomes the record, the request id maps to the customer; the
    same record again counts nothing more."""
    quota = Quota(tokens_per_day=100)
    start = store.begin_call("acme", quota, QuotaDemand(90))
    assert start.reservation is not None and admitted(start.reservation)
    assert not store.begin_call("acme", quota, QuotaDemand(20)).admitted
    done = record(when=datetime.now(UTC), input_tokens=10, record_id="once")
    store.finish_call(start.reservation, done, request_id="req_1")
    store.finish_call(None, done, request_id="req_1")
    assert store.customer_for_request("req_1") == "acme"
    assert [r.record_id for r in store.usage_records()] == ["once"]
    assert store.begin_call("acme", quota, QuotaDemand(90)).admitted
    assert not store.begin_call("acme", quota, QuotaDemand(1)).admitted


def test_finish_call_without_a_reservation_records_usage(store: StoreDriver) -> None:
    """finish_call(None, record) stores the record and counts it at its own time."""
    store.finish_call(None, record(when=datetime.now(UTC), input_tokens=100))
    assert not store.begin_call("acme", Quota(tokens_per_minute=100), QuotaDemand(1)).admitted
