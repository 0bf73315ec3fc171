"""A guarded call talks to its store twice: once before the model request (standing, quota
reservation and the identifier map, in ``begin_call``) and once after (usage and the request
map, in ``finish_call``). The async client runs the first one alongside the moderation request.
Stores without those methods (the protocol before them) get the separate calls they know."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from safe_openai import (
    CustomerSuspended,
    DefaultPolicy,
    ModerationBlocked,
    Quota,
    QuotaExceeded,
)
from safe_openai._guard import KnownIdentifiers, _has_one_trip
from safe_openai._moderation import ModerationInput
from safe_openai.policy import ModerationResult
from safe_openai.stores import QuotaDemand
from safe_openai.stores._memory import AsyncMemoryStore, MemoryStore
from safe_openai.testing import FakeOpenAI

from .conftest import make_async_client, make_client

CLEAN = ModerationResult(flagged=False, categories={"violence": False}, scores={"violence": 0.0})
FLAGGED = ModerationResult(flagged=True, categories={"violence": True}, scores={"violence": 0.99})


def _hello(text: str = "hello") -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


class Counting:
    """A store wrapper that counts the store methods called."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not callable(method):
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return method(*args, **kwargs)

        return counted


class CountingSync(Counting, MemoryStore):
    """A memory store counting its calls (the counting layer sits in front of every method)."""

    def __init__(self) -> None:
        Counting.__init__(self, MemoryStore())

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name == "calls":
            return object.__getattribute__(self, name)
        return Counting.__getattr__(self, name)


class CountingAsync(AsyncMemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if (
            name.startswith("_")
            or name in ("calls", "sync", "run_in_thread")
            or not callable(value)
        ):
            return value
        calls = object.__getattribute__(self, "calls")

        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return await value(*args, **kwargs)

        return counted


QUOTA = DefaultPolicy(quota=Quota(requests_per_minute=10))


def test_a_guarded_call_makes_one_store_round_trip_before_and_one_after(fake: FakeOpenAI) -> None:
    """Sync: begin_call (with the identifier map, the first time) and finish_call, no more."""
    store = CountingSync()
    with make_client(fake, store=store, policy=QUOTA) as client:
        acme = client.for_customer("acme")
        acme.chat.completions.create(**_hello())
        acme.chat.completions.create(**_hello("again"))
    assert store.calls == ["begin_call", "finish_call"] * 2
    [first, second] = store._store.usage_records()
    assert store._store.customer_for_request(first.request_id) == "acme"
    assert store._store.customer_for_request(second.request_id) == "acme"


async def test_async_guarded_call_makes_one_round_trip_before_and_one_after(
    fake: FakeOpenAI,
) -> None:
    store = CountingAsync()
    async with make_async_client(fake, store=store, policy=QUOTA) as client:
        acme = client.for_customer("acme")
        await acme.chat.completions.create(**_hello())
        await acme.chat.completions.create(**_hello("again"))
    assert store.calls == ["begin_call", "finish_call"] * 2


class _Rendezvous(AsyncMemoryStore):
    """begin_call answers only once the moderation request has started: it would never answer
    if the client ran them one after the other."""

    def __init__(self, started: asyncio.Event) -> None:
        super().__init__()
        self._started = started

    async def begin_call(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.wait_for(self._started.wait(), 5)
        return await super().begin_call(*args, **kwargs)


class _Moderator:
    def __init__(self, started: asyncio.Event, verdict: ModerationResult = CLEAN) -> None:
        self._started = started
        self._verdict = verdict

    async def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        self._started.set()
        await asyncio.sleep(0)
        return [self._verdict for _ in inputs]


async def test_async_store_round_trip_overlaps_the_moderation_request(fake: FakeOpenAI) -> None:
    """The store's begin_call and the moderation request run at the same time."""
    started = asyncio.Event()
    store = _Rendezvous(started)
    async with make_async_client(
        fake, store=store, policy=QUOTA, moderator=_Moderator(started)
    ) as client:
        await client.for_customer("acme").chat.completions.create(**_hello())
    assert len(fake.model_requests) == 1


async def test_a_quota_refusal_discards_the_overlapping_verdict(fake: FakeOpenAI) -> None:
    """Over quota, a flagged verdict that came back meanwhile is not acted on: no strike."""
    started = asyncio.Event()
    store = _Rendezvous(started)
    policy = DefaultPolicy(quota=Quota(requests_per_minute=0))
    async with make_async_client(
        fake, store=store, policy=policy, moderator=_Moderator(started, FLAGGED)
    ) as client:
        with pytest.raises(QuotaExceeded):
            await client.for_customer("acme").chat.completions.create(**_hello())
    assert await store.violations() == []
    [record] = await store.usage_records()
    assert record.outcome == "denied"


async def test_a_suspension_discards_the_overlapping_verdict(fake: FakeOpenAI) -> None:
    started = asyncio.Event()
    store = _Rendezvous(started)
    await store.suspend("acme", reason="strikes", until=None, now=datetime.now(timezone.utc))
    async with make_async_client(
        fake, store=store, policy=QUOTA, moderator=_Moderator(started, FLAGGED)
    ) as client:
        with pytest.raises(CustomerSuspended):
            await client.for_customer("acme").chat.completions.create(**_hello())
    assert await store.violations() == []
    assert fake.model_requests == []


async def test_a_block_after_the_overlap_releases_the_reservation(fake: FakeOpenAI) -> None:
    """A flagged verdict still blocks, and gives back the hold begin_call placed."""
    started = asyncio.Event()
    store = _Rendezvous(started)
    policy = DefaultPolicy(quota=Quota(requests_per_minute=1))
    async with make_async_client(
        fake, store=store, policy=policy, moderator=_Moderator(started, FLAGGED)
    ) as client:
        with pytest.raises(ModerationBlocked):
            await client.for_customer("acme").chat.completions.create(**_hello())
        client._safe.moderator = _Moderator(started)
        await client.for_customer("acme").chat.completions.create(**_hello("fine"))
    assert len(fake.model_requests) == 1


class _OldCommit(MemoryStore):
    """A custom store written against the protocol before begin_call: it overrides commit."""

    commits = 0

    def commit(self, reservation: Any, record: Any) -> None:
        type(self).commits += 1
        super().commit(reservation, record)


def test_a_subclass_overriding_an_old_method_keeps_the_separate_calls(fake: FakeOpenAI) -> None:
    """begin_call/finish_call are used only when they stand for the store's own methods."""
    assert _has_one_trip(MemoryStore)
    assert not _has_one_trip(_OldCommit)
    store = _OldCommit()
    with make_client(fake, store=store, policy=QUOTA) as client:
        client.for_customer("acme").chat.completions.create(**_hello())
    assert _OldCommit.commits == 1


class _Protocol:
    """A store with only the methods of the UsageStore protocol, delegating to memory."""

    def __init__(self) -> None:
        self._store = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        if name in ("begin_call", "finish_call"):
            raise AttributeError(name)
        return getattr(self._store, name)


def test_a_store_without_the_round_trip_methods_still_works(fake: FakeOpenAI) -> None:
    store = _Protocol()
    assert not _has_one_trip(type(store))
    with make_client(
        fake, store=store, policy=DefaultPolicy(quota=Quota(requests_per_minute=1))
    ) as (client):
        acme = client.for_customer("acme")
        acme.chat.completions.create(**_hello())
        with pytest.raises(QuotaExceeded):
            acme.chat.completions.create(**_hello())
    assert [r.outcome for r in store.usage_records()] == ["denied", "ok"]


def test_known_identifiers_are_bounded_least_recently_used_first_out() -> None:
    known = KnownIdentifiers(maxsize=2)
    known.add(("a", "1"))
    known.add(("b", "2"))
    assert ("a", "1") in known  # used: now the most recent
    known.add(("c", "3"))
    assert ("b", "2") not in known
    assert ("a", "1") in known and ("c", "3") in known
    assert len(known) == 2


def test_a_customer_whose_identifier_fell_out_is_mapped_again(fake: FakeOpenAI) -> None:
    store = CountingSync()
    with make_client(fake, store=store) as client:
        client._safe.known_identifiers = KnownIdentifiers(maxsize=1)
        for customer in ("acme", "beta", "acme"):
            client.for_customer(customer).chat.completions.create(**_hello())
    assert store.calls.count("begin_call") == 3
    assert "remember_identifier" not in store.calls  # rode along with begin_call each time
    assert (
        store._store.customer_for_identifier(
            fake.model_requests[2].json["safety_identifier"]  # type: ignore[index]
        )
        == "acme"
    )


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def shared_store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """A fresh store of each backend, in its own namespace, dropped afterwards."""
    import uuid

    from safe_openai.stores import store_from_url

    from .stores.conftest import POSTGRES_URL, REDIS_URL
    from .stores.test_redis_postgres_processes import _drop_postgres, _drop_redis, _reachable

    name = f"safe_openai_skew_{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        store = store_from_url(f"sqlite:///{tmp_path}/skew.db")
        yield store
        store.close()
    elif request.param == "redis":
        _reachable(REDIS_URL)
        store = store_from_url(REDIS_URL, prefix=name)
        yield store
        store.close()
        _drop_redis(name)
    else:
        _reachable(POSTGRES_URL)
        store = store_from_url(POSTGRES_URL, schema=name)
        yield store
        store.close()
        _drop_postgres(name)


def test_hosts_with_skewed_clocks_share_one_window(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, shared_store: Any
) -> None:
    """Issue 10, defect 10: a host whose clock runs 61 s ahead does not get a quota of its own:
    Redis and PostgreSQL decide on their own clock, SQLite and memory on the host's (one host,
    one clock), never on the time each client stamps its call with."""
    from safe_openai import _guard

    policy = DefaultPolicy(quota=Quota(requests_per_minute=3))
    real = _guard._now
    admitted = 0
    for skew in (0, 61, -61):
        monkeypatch.setattr(_guard, "_now", lambda skew=skew: real() + timedelta(seconds=skew))
        with make_client(fake, store=shared_store, policy=policy) as client:
            for _ in range(3):
                try:
                    client.for_customer("acme").embeddings.create(
                        model="text-embedding-3-small", input="hi"
                    )
                    admitted += 1
                except QuotaExceeded:
                    pass
    assert admitted == 3


def test_standing_counts_usage_on_the_clock_the_store_decides_on(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, shared_store: Any
) -> None:
    """client.standing() on a host whose clock is 61 s off: the usage is read on the clock the
    store's reservations decide on, not at the host's time (which put the minute's calls
    outside the window: 0 used, all remaining, while the next call is refused)."""
    from safe_openai import _client, standing

    quota = Quota(requests_per_minute=5)
    with make_client(fake, store=shared_store, policy=DefaultPolicy(quota=quota)) as client:
        acme = client.for_customer("acme")
        for _ in range(2):
            acme.embeddings.create(model="text-embedding-3-small", input="hi")
        for skew in (61, -61):

            class Skewed(datetime):
                @classmethod
                def now(cls, tz: Any = None) -> Any:
                    return datetime.now(tz) + timedelta(seconds=skew)  # noqa: B023

            monkeypatch.setattr(_client, "datetime", Skewed)
            monkeypatch.setattr(standing, "datetime", Skewed)
            [rpm] = acme.standing().limits
            assert (skew, rpm.used, rpm.remaining) == (skew, 2, 3)


def test_postgres_sends_a_guarded_calls_statements_in_three_batches() -> None:
    """PostgreSQL: begin_call yields the lock, standing and quota state as one step and the
    hold as the transaction's last (sent with its COMMIT); finish_call one step: the
    customer's lock, the statement and COMMIT."""
    pytest.importorskip("psycopg")
    from safe_openai.stores import _postgres

    q = _postgres._Sql("s")
    op = _postgres._begin_call(q, "acme", Quota(requests_per_minute=5), QuotaDemand(), None)
    first = next(op)
    assert isinstance(first, tuple) and len(first) == 2
    hold = op.send([[("", None, None, None)], [("n", 1_700_000_000_000_000, 0, 0, 0.0, 0)]])
    assert isinstance(hold, _postgres._Query) and hold.last
    with pytest.raises(StopIteration) as done:
        op.send([])
    assert done.value.value.admitted

    settle = _postgres._commit(q, done.value.value.reservation, _record_for_test())
    step = next(settle)
    assert isinstance(step, tuple) and step[-1].last  # its lock, itself and COMMIT at once
    with pytest.raises(StopIteration):
        settle.send([[], []])


def _record_for_test() -> Any:
    from safe_openai.usage import TokenUsage, UsageRecord

    return UsageRecord(
        "acme", "/responses", "m", "ok", TokenUsage(1, 0, 1), created_at=datetime.now(timezone.utc)
    )
