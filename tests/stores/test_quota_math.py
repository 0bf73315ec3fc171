"""The quota arithmetic every backend shares: ``decide`` over buckets, table-driven, no store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from safe_openai.policy import Quota
from safe_openai.stores._memory import _Ledger
from safe_openai.stores._types import (
    Bucket,
    DayTotal,
    QuotaDemand,
    QuotaState,
    assess,
    day_of,
    decide,
    measure,
    to_us,
)

UTC = timezone.utc
NOW = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class WindowEntry:
    """A usage record that reached the model: when, its tokens and its cost."""

    at: datetime
    tokens: int
    cost_usd: float


def evaluate_quota(
    quota: Quota,
    demand: QuotaDemand,
    entries: tuple[WindowEntry, ...] | list[WindowEntry],
    now: datetime,
) -> tuple[str | None, float | None]:
    """``decide`` on the state a store keeps for these entries."""
    ledger = _Ledger()
    for entry in entries:
        ledger.count(to_us(entry.at), entry.tokens, entry.cost_usd, in_minute=True)
    return decide(quota, demand, ledger.state(), to_us(now))


def ago(seconds: float, tokens: int = 0, cost: float = 0.0, *, now: datetime = NOW) -> WindowEntry:
    """An entry ``seconds`` before ``now``."""
    return WindowEntry(now - timedelta(seconds=seconds), tokens, cost)


@dataclass(frozen=True)
class Case:
    quota: Quota
    entries: tuple[WindowEntry, ...]
    expected: tuple[str | None, float | None]
    demand: QuotaDemand = QuotaDemand()  # noqa: RUF009 (frozen, so sharing it is safe)
    now: datetime = NOW


RPM, TPM, TPD, USD = "requests_per_minute", "tokens_per_minute", "tokens_per_day", "usd_per_month"
ADMIT = (None, None)

CASES = {
    # requests per minute
    "no limits admit anything": Case(Quota(), (ago(1, 10**9, 10**6),), ADMIT, QuotaDemand(10**9)),
    "rpm: room for one more": Case(Quota(requests_per_minute=2), (ago(30),), ADMIT),
    "rpm: full, oldest frees in 15 s": Case(
        Quota(requests_per_minute=2), (ago(45), ago(30)), (RPM, 15.0)
    ),
    "rpm: unsorted entries are sorted first": Case(
        Quota(requests_per_minute=2), (ago(30), ago(45)), (RPM, 15.0)
    ),
    "rpm: over a lowered limit, the 2nd oldest must go": Case(
        Quota(requests_per_minute=2), (ago(50), ago(40), ago(30)), (RPM, 20.0)
    ),
    "rpm: zero never admits": Case(Quota(requests_per_minute=0), (), (RPM, None)),
    "rpm: entry exactly 60 s old is out": Case(Quota(requests_per_minute=1), (ago(60),), ADMIT),
    "rpm: entry 59.999 s old is in": Case(
        Quota(requests_per_minute=1), (ago(59.999),), (RPM, 0.001)
    ),
    "rpm: entry at now is in": Case(Quota(requests_per_minute=1), (ago(0),), (RPM, 60.0)),
    "rpm: entry stamped after now counts": Case(
        Quota(requests_per_minute=1), (ago(-1),), (RPM, 61.0)
    ),
    # tokens per minute
    "tpm: exactly the limit is admitted": Case(
        Quota(tokens_per_minute=1000), (ago(10, 600),), ADMIT, QuotaDemand(400)
    ),
    "tpm: one over, the only entry frees": Case(
        Quota(tokens_per_minute=1000), (ago(10, 600),), (TPM, 50.0), QuotaDemand(401)
    ),
    "tpm: frees when enough tokens left, zero-token entries skipped": Case(
        Quota(tokens_per_minute=100), (ago(50, 0), ago(40, 100)), (TPM, 20.0), QuotaDemand(1)
    ),
    "tpm: demand above the limit cannot wait": Case(
        Quota(tokens_per_minute=100), (), (TPM, None), QuotaDemand(101)
    ),
    "tpm: old tokens are out of the minute": Case(
        Quota(tokens_per_minute=100), (ago(61, 100),), ADMIT, QuotaDemand(100)
    ),
    # tokens per day
    "tpd: yesterday does not count": Case(
        Quota(tokens_per_day=100), (ago(12 * 3600 + 1, 100),), ADMIT, QuotaDemand(100)
    ),
    "tpd: midnight itself counts, retry at next midnight": Case(
        Quota(tokens_per_day=100), (ago(12 * 3600, 100),), (TPD, 12 * 3600.0), QuotaDemand(1)
    ),
    "tpd: demand above the limit cannot wait": Case(
        Quota(tokens_per_day=100), (), (TPD, None), QuotaDemand(101)
    ),
    "tpd: days are UTC days whatever now's timezone": Case(
        Quota(tokens_per_day=100),
        (ago(11 * 3600, 100),),
        (TPD, 12 * 3600.0),
        QuotaDemand(1),
        NOW.astimezone(timezone(timedelta(hours=-11))),  # 01:00 local, 12:00 UTC
    ),
    # usd per month
    "usd: cost counts for the month, retry at the 1st": Case(
        Quota(usd_per_month=1.0),
        (ago(13 * 86400, 0, 0.75),),
        (USD, (datetime(2025, 4, 1, tzinfo=UTC) - NOW).total_seconds()),
        QuotaDemand(0, 0.5),
    ),
    "usd: last month does not count": Case(
        Quota(usd_per_month=1.0), (ago(14 * 86400, 0, 5.0),), ADMIT, QuotaDemand(0, 1.0)
    ),
    "usd: December rolls into January": Case(
        Quota(usd_per_month=1.0),
        (WindowEntry(datetime(2025, 12, 1, tzinfo=UTC), 0, 1.0),),
        (USD, 3600.0),
        QuotaDemand(0, 0.01),
        datetime(2025, 12, 31, 23, 0, tzinfo=UTC),
    ),
    "usd: leap February has 29 days": Case(
        Quota(usd_per_month=1.0),
        (WindowEntry(datetime(2024, 2, 1, tzinfo=UTC), 0, 1.0),),
        (USD, 86400.0),
        QuotaDemand(0, 0.01),
        datetime(2024, 2, 29, tzinfo=UTC),
    ),
    "usd: demand above the limit cannot wait": Case(
        Quota(usd_per_month=1.0), (), (USD, None), QuotaDemand(0, 1.5)
    ),
    # order of the checks
    "order: rpm before tpm": Case(
        Quota(requests_per_minute=1, tokens_per_minute=1), (ago(1, 5),), (RPM, 59.0), QuotaDemand(1)
    ),
    "order: tpm before tpd": Case(
        Quota(tokens_per_minute=5, tokens_per_day=5), (ago(1, 5),), (TPM, 59.0), QuotaDemand(1)
    ),
    "order: tpd before usd": Case(
        Quota(tokens_per_day=5, usd_per_month=1.0),
        (ago(1, 5, 1.0),),
        (TPD, 12 * 3600.0),
        QuotaDemand(1, 1.0),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_evaluate_quota(case: Case) -> None:
    """Each row: the limit that refuses (or None) and its retry_after, to the microsecond."""
    limit, retry_after = evaluate_quota(case.quota, case.demand, case.entries, case.now)
    assert limit == case.expected[0]
    if case.expected[1] is None:
        assert retry_after is None
    else:
        assert retry_after == pytest.approx(case.expected[1], abs=1e-6)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_measure_shows_the_sums_decide_compares(case: Case) -> None:
    """For every case: a limit refuses exactly when ``used + demand`` exceeds it in measure's
    numbers, so the usage reported and the decision cannot disagree; assess is both at once."""
    ledger = _Ledger()
    for entry in case.entries:
        ledger.count(to_us(entry.at), entry.tokens, entry.cost_usd, in_minute=True)
    now_us = to_us(case.now)
    usage = measure(case.quota, ledger.state(), now_us)
    demand = {
        "requests_per_minute": 1,
        "tokens_per_minute": case.demand.tokens,
        "tokens_per_day": case.demand.tokens,
        "usd_per_month": case.demand.cost_usd,
    }
    first_over = next(
        (u.name for u in usage if round(u.used + demand[u.name] - u.limit, 9) > 0), None
    )
    assert first_over == case.expected[0]
    assert assess(case.quota, case.demand, ledger.state(), now_us) == (*case.expected, usage)


def test_minute_window_slides_across_the_month_boundary() -> None:
    """The minute window is (now - 60 s, now] even when it straddles the first of the month."""
    now = datetime(2025, 4, 1, 0, 0, 5, tzinfo=UTC)
    entries = [WindowEntry(datetime(2025, 3, 31, 23, 59, 50, tzinfo=UTC), 0, 0.0)]
    limit, retry_after = evaluate_quota(Quota(requests_per_minute=1), QuotaDemand(), entries, now)
    assert (limit, retry_after) == (RPM, pytest.approx(45.0))


NOW_US = to_us(NOW)


def test_buckets_of_one_second_count_until_their_latest_entry_leaves() -> None:
    """A bucket holding entries at 0.0 s and 0.9 s counts until the later one is 60 s old."""
    start = NOW_US - 59_500_000  # t = -59.5 s
    bucket = Bucket(start // 1_000_000, 2, 0, 0.0, start + 400_000)  # latest at -59.1 s
    state = QuotaState(seconds=[bucket])
    assert decide(Quota(requests_per_minute=2), QuotaDemand(), state, NOW_US) == (
        "requests_per_minute",
        pytest.approx(0.9),
    )
    assert decide(Quota(requests_per_minute=2), QuotaDemand(), state, NOW_US + 900_000) == (
        None,
        None,
    )


def test_buckets_starting_beyond_the_skew_allowance_are_ignored() -> None:
    """A bucket stamped more than CLOCK_SKEW after now is a clock error and does not count."""
    ahead = NOW_US + 61_000_000
    state = QuotaState(seconds=[Bucket(ahead // 1_000_000, 5, 0, 0.0, ahead)])
    assert decide(Quota(requests_per_minute=1), QuotaDemand(), state, NOW_US) == (None, None)


@pytest.mark.parametrize(("age_s", "counted"), [(599, True), (600, False)])
def test_holds_count_in_the_day_until_their_bucket_is_a_ttl_old(age_s: int, counted: bool) -> None:
    """A bucket of holds counts toward the day until its latest hold is RESERVATION_TTL old."""
    at = NOW_US - age_s * 1_000_000
    state = QuotaState(holds=[Bucket(at // 60_000_000, 1, 100, 0.0, at)])
    limit, _ = decide(Quota(tokens_per_day=100), QuotaDemand(1), state, NOW_US)
    assert (limit == "tokens_per_day") is counted


def test_released_holds_count_nothing() -> None:
    """A bucket whose holds were all committed or released counts no tokens or cost."""
    state = QuotaState(holds=[Bucket(NOW_US // 60_000_000, 0, 0, 0.0, NOW_US)])
    assert decide(Quota(tokens_per_day=1), QuotaDemand(1), state, NOW_US) == (None, None)


def test_day_totals_of_tomorrow_count_within_the_skew_allowance() -> None:
    """In the last minute of a day, records already stamped tomorrow count toward today."""
    late = to_us(datetime(2025, 3, 14, 23, 59, 30, tzinfo=UTC))
    tomorrow = DayTotal(day_of(late) + 1, 100, 1.0)
    state = QuotaState(days=[tomorrow])
    assert decide(Quota(tokens_per_day=100), QuotaDemand(1), state, late)[0] == "tokens_per_day"
    early = late - 3600 * 1_000_000
    assert decide(Quota(tokens_per_day=100), QuotaDemand(1), state, early) == (None, None)
