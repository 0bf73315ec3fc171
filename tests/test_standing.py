"""client.standing(): per-limit usage, suspension and strikes, sync and async through one flow;
the X-RateLimit headers built from it; and the honest refusal (QuotaExceeded's used, allowed,
user_message, headers) with the output reservation of calls without a cap."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from safe_openai import (
    CustomerRequired,
    DefaultPolicy,
    LimitUsage,
    ModerationBlocked,
    Quota,
    QuotaExceeded,
    SafeClient,
    Standing,
    customer,
    rate_limit_headers,
)
from safe_openai.standing import read_standing
from safe_openai.stores._memory import MemoryStore
from safe_openai.stores._types import QuotaDemand
from safe_openai.testing import FakeOpenAI

from .conftest import make_async_client, make_client

UTC = timezone.utc
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


def ask(client: SafeClient, text: str = "hello", **extra: Any) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": text}],
        **extra,
    )


def test_standing_reports_each_limit_suspension_and_strikes(fake: FakeOpenAI) -> None:
    quota = Quota(requests_per_minute=10, tokens_per_day=100_000)
    with make_client(fake, policy=DefaultPolicy(quota=quota, strike_limit=3)) as client:
        acme = client.for_customer("acme")
        ask(acme, max_tokens=50)
        ask(acme, max_tokens=50)
        with pytest.raises(ModerationBlocked):
            ask(acme, "I will kill him")
        used = sum(r.tokens.total_tokens for r in client.store.usage_records(customer_id="acme"))

        standing = acme.standing()
        assert isinstance(standing, Standing)
        assert standing.customer_id == "acme"
        rpm, tpd = standing.limits
        assert (rpm.name, rpm.used, rpm.limit, rpm.remaining) == ("requests_per_minute", 2, 10, 8)
        assert rpm.resets_at is not None
        assert timedelta(0) < rpm.resets_at - standing.at <= timedelta(seconds=60)
        assert (tpd.name, tpd.used, tpd.limit) == ("tokens_per_day", used, 100_000)
        assert tpd.resets_at is not None and tpd.resets_at.time() == datetime.min.time()
        assert (standing.strikes, standing.strike_limit) == (1, 3)
        assert standing.strike_window == timedelta(hours=24)
        assert standing.suspension is None and not standing.suspended
        assert standing.usage_known
        # the same read for another customer, by id, from the unbound client
        other = client.standing("initech")
        assert [u.used for u in other.limits] == [0, 0]
        assert other.strikes == 0


def test_standing_shows_a_suspension_and_reads_only(fake: FakeOpenAI) -> None:
    with make_client(fake, policy=DefaultPolicy(quota=Quota(requests_per_minute=1))) as client:
        client.suspend("acme", reason="chargeback", duration=timedelta(hours=1))
        for _ in range(3):
            standing = client.standing("acme")
        assert standing.suspension is not None
        assert standing.suspension.reason == "chargeback"
        assert standing.limits == (LimitUsage("requests_per_minute", 0, 1, None),)
        client.unsuspend("acme")
        ask(client.for_customer("acme"))  # reading standing held nothing: the one request fits


def test_standing_needs_a_customer(client: SafeClient) -> None:
    with pytest.raises(CustomerRequired, match="standing"):
        client.standing()
    with customer("ctx-customer"):
        assert client.standing().customer_id == "ctx-customer"


def test_async_standing_is_the_same_flow(fake: FakeOpenAI) -> None:
    async def main() -> Standing:
        policy = DefaultPolicy(quota=Quota(requests_per_minute=5))
        async with make_async_client(fake, policy=policy) as client:
            acme = client.for_customer("acme")
            await acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            return await acme.standing()

    standing = asyncio.run(main())
    assert [(u.name, u.used, u.remaining) for u in standing.limits] == [
        ("requests_per_minute", 1, 4)
    ]


def test_a_store_without_quota_usage_lists_limits_without_usage() -> None:
    class Minimal:
        def __init__(self) -> None:
            self.inner = MemoryStore()

        def suspension(self, customer_id: str, *, now: datetime) -> Any:
            return self.inner.suspension(customer_id, now=now)

        def count_violations(self, customer_id: str, *, since: datetime) -> int:
            return self.inner.count_violations(customer_id, since=since)

    store = Minimal()
    flow = read_standing(
        "acme",
        quota=Quota(tokens_per_minute=100),
        strike_limit=None,
        strike_window=timedelta(hours=1),
        now=T0,
        store_reports_usage=False,
    )
    from safe_openai._guard import drive, on_store

    standing = drive(flow, on_store(store))
    assert standing.limits == (LimitUsage("tokens_per_minute", 0, 100, None),)
    assert not standing.usage_known
    assert rate_limit_headers(standing) == {"X-RateLimit-Limit": "100"}


# --- headers -------------------------------------------------------------------------------------


def standing_with(*limits: LimitUsage) -> Standing:
    return Standing("acme", T0, limits, None, 0, 3, timedelta(hours=24))


def test_rate_limit_headers_describe_the_most_constrained_limit() -> None:
    standing = standing_with(
        LimitUsage("requests_per_minute", 2, 10, T0 + timedelta(seconds=12.2)),
        LimitUsage("tokens_per_day", 90_000, 100_000, T0 + timedelta(hours=12)),
        LimitUsage("usd_per_month", 0.5, 5.0, None),
    )
    assert rate_limit_headers(standing) == {
        "X-RateLimit-Limit": "100000",
        "X-RateLimit-Remaining": "10000",
        "X-RateLimit-Reset": str(12 * 3600),
    }
    per_limit = rate_limit_headers(standing, per_limit=True)
    assert per_limit["X-RateLimit-Remaining-Requests-Per-Minute"] == "8"
    assert per_limit["X-RateLimit-Reset-Requests-Per-Minute"] == "13"  # rounded up
    assert per_limit["X-RateLimit-Limit-Usd-Per-Month"] == "5"
    assert per_limit["X-RateLimit-Remaining-Usd-Per-Month"] == "4.5"
    assert per_limit["X-RateLimit-Reset-Usd-Per-Month"] == "0"  # nothing to wait for
    assert rate_limit_headers(standing_with()) == {}


def test_quota_exceeded_headers_carry_retry_after() -> None:
    waiting = QuotaExceeded(
        "acme", limit="requests_per_minute", retry_after=14.2, used=10, allowed=10
    )
    assert waiting.headers() == {
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "15",
        "Retry-After": "15",
    }
    assert "try again later" in waiting.user_message
    too_big = QuotaExceeded("acme", limit="tokens_per_day", retry_after=None, used=0, allowed=500)
    assert "Retry-After" not in too_big.headers()
    assert too_big.user_message == "This request is larger than your plan allows."
    assert "try again" not in too_big.user_message
    soon = QuotaExceeded("acme", limit="requests_per_minute", retry_after=0.2)
    assert soon.headers() == {"Retry-After": "1"}  # never "0": that invites a busy loop
    legacy = QuotaExceeded("acme", limit="requests_per_minute", retry_after=3.0)
    assert (legacy.used, legacy.allowed) == (None, None)
    assert legacy.headers() == {"Retry-After": "3"}


# --- honest refusals and output reservation ------------------------------------------------------


def test_a_refusal_says_how_much_was_used_of_what(fake: FakeOpenAI) -> None:
    with make_client(fake, policy=DefaultPolicy(quota=Quota(requests_per_minute=2))) as client:
        acme = client.for_customer("acme")
        ask(acme)
        ask(acme)
        with pytest.raises(QuotaExceeded) as caught:
            ask(acme)
    exc = caught.value
    assert (exc.limit, exc.used, exc.allowed) == ("requests_per_minute", 2, 2)
    assert exc.retry_after is not None and exc.retry_after > 0
    assert "try again later" in exc.user_message
    assert "2 of 2 used" in str(exc)


@pytest.mark.parametrize("flavour", ["one-trip", "separate"])
def test_a_small_uncapped_call_fits_a_small_token_budget(fake: FakeOpenAI, flavour: str) -> None:
    """No output cap, a 1,000-token budget: the call is admitted holding what remains (it
    used to reserve 4,096 output tokens and be refused with nothing to wait for)."""
    store: Any = MemoryStore()
    if flavour == "separate":

        class Separate(MemoryStore):
            def reserve(self, *args: Any, **kwargs: Any) -> Any:  # no one-trip begin_call
                return super().reserve(*args, **kwargs)

        store = Separate()
    for limit in ("tokens_per_minute", "tokens_per_day"):
        policy = DefaultPolicy(quota=Quota(**{limit: 1000}))
        with make_client(fake, policy=policy, store=store) as client:
            acme = client.for_customer(f"acme-{limit}")
            ask(acme)
            standing = acme.standing()
            assert 0 < standing.limits[0].used < 1000


def test_an_uncapped_call_under_a_cost_budget_fits_what_remains(fake: FakeOpenAI) -> None:
    """$0.001 a month on gpt-4o-mini: 4,096 output tokens cost more, a short answer does not."""
    policy = DefaultPolicy(quota=Quota(usd_per_month=0.001))
    with make_client(fake, policy=policy) as client:
        ask(client.for_customer("acme"))


def test_a_call_larger_than_the_budget_is_still_refused_for_good(fake: FakeOpenAI) -> None:
    """An explicit cap beyond the budget, or an input beyond it, cannot wait its way in."""
    with make_client(fake, policy=DefaultPolicy(quota=Quota(tokens_per_day=1000))) as client:
        acme = client.for_customer("acme")
        with pytest.raises(QuotaExceeded) as capped:
            ask(acme, max_tokens=2000)
        assert (capped.value.limit, capped.value.retry_after) == ("tokens_per_day", None)
        assert capped.value.user_message == "This request is larger than your plan allows."
        with pytest.raises(QuotaExceeded) as long_input:
            ask(acme, "word " * 2000)
        assert long_input.value.retry_after is None
        assert fake.model_requests == []


def test_an_overshoot_refuses_the_next_call_until_the_window_frees(fake: FakeOpenAI) -> None:
    """Admitted on what remained, the call may use more than that; the next one then waits."""
    big = FakeOpenAI(reply="word " * 400)  # ~400 output tokens, more than remains
    with make_client(big, policy=DefaultPolicy(quota=Quota(tokens_per_minute=300))) as client:
        acme = client.for_customer("acme")
        ask(acme)
        (tpm,) = acme.standing().limits
        assert tpm.used > 300 and tpm.remaining == 0
        with pytest.raises(QuotaExceeded) as caught:
            ask(acme)
        assert caught.value.limit == "tokens_per_minute"
        assert caught.value.retry_after is not None  # waiting helps
        assert "try again later" in caught.value.user_message


def test_reservation_usage_reaches_quota_exceeded_from_begin_call() -> None:
    store = MemoryStore()
    quota = Quota(tokens_per_minute=10)
    store.reserve("acme", quota, QuotaDemand(8), now=datetime.now(UTC))
    start = store.begin_call("acme", quota, QuotaDemand(5))
    assert start.reservation is not None and not start.reservation.admitted
    assert start.reservation.usage == (
        LimitUsage("tokens_per_minute", 8, 10, start.reservation.usage[0].resets_at),
    )


def test_async_small_uncapped_call_fits_a_small_budget_and_is_refused_honestly(
    fake: FakeOpenAI,
) -> None:
    """The async client runs the same reservation flow: admitted on what remains, then a
    capped call beyond the whole budget is refused for good."""

    async def main() -> QuotaExceeded:
        policy = DefaultPolicy(quota=Quota(tokens_per_day=1000))
        async with make_async_client(fake, policy=policy) as client:
            acme = client.for_customer("acme")
            await acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            try:
                await acme.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=5000,
                )
            except QuotaExceeded as exc:
                return exc
            raise AssertionError("not refused")

    refused = asyncio.run(main())
    assert (refused.limit, refused.retry_after, refused.allowed) == ("tokens_per_day", None, 1000)
    assert refused.used is not None and 0 < refused.used < 1000
