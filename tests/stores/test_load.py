"""Under load no store turns concurrency into errors: 64 threads on a sync store and 500 calls in
flight on an async store all complete, waiting for a pooled connection when every one is busy
(up to the pool's wait), and every call is counted once."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pytest

from safe_openai.errors import ConfigurationError, StoreError
from safe_openai.policy import Quota
from safe_openai.stores import async_store_from_url, store_from_url
from safe_openai.stores._types import QuotaDemand
from safe_openai.usage import TokenUsage, UsageRecord

from .conftest import POSTGRES_URL, REDIS_URL
from .test_redis_postgres_processes import _drop_postgres, _drop_redis, _reachable

THREADS = 64
IN_FLIGHT = 500
QUOTA = Quota(requests_per_minute=100_000, tokens_per_day=10**9)


def _record(customer: str) -> UsageRecord:
    return UsageRecord(
        customer,
        "/responses",
        "m",
        "ok",
        TokenUsage(1, 0, 1),
        created_at=datetime.now(timezone.utc),
        record_id=uuid.uuid4().hex,
    )


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def opened(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """(url, options) of a fresh namespace of each backend, dropped afterwards."""
    name = f"safe_openai_load_{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        yield "memory://", {}
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/load.db", {}
    elif request.param == "redis":
        _reachable(REDIS_URL)
        # a small pool, so most calls wait for a connection
        yield f"{REDIS_URL}?max_connections=8", {"prefix": name}
        _drop_redis(name)
    else:
        _reachable(POSTGRES_URL)
        yield f"{POSTGRES_URL}?max_size=4&pool_timeout=30", {"schema": name}
        _drop_postgres(name)


def test_64_threads_on_a_sync_store_complete_without_errors(opened: Any) -> None:
    url, options = opened
    store = store_from_url(url, **options)

    def one_call(i: int) -> bool:
        customer = f"c{i % 8}"
        start = store.begin_call(customer, QUOTA, QuotaDemand(2), identifier=f"sid-{customer}")
        assert start.reservation is not None
        store.finish_call(start.reservation, _record(customer), request_id=f"req-{i}")
        return start.admitted

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            admitted = list(pool.map(one_call, range(THREADS * 4)))
        assert all(admitted)
        assert sum(row.requests for row in store.usage_report()) == THREADS * 4
    finally:
        store.close()


def test_500_calls_in_flight_on_an_async_store_complete_without_errors(opened: Any) -> None:
    url, options = opened

    async def run() -> None:
        store = async_store_from_url(url, **options)

        async def one_call(i: int) -> bool:
            customer = f"c{i % 8}"
            start = await store.begin_call(customer, QUOTA, QuotaDemand(2))
            assert start.reservation is not None
            await store.finish_call(start.reservation, _record(customer), request_id=f"r{i}")
            return start.admitted

        try:
            admitted = await asyncio.gather(*(one_call(i) for i in range(IN_FLIGHT)))
            assert all(admitted)
            report = await store.usage_report()
            assert sum(row.requests for row in report) == IN_FLIGHT
        finally:
            await store.close()

    asyncio.run(run())


@pytest.mark.redis
def test_an_exhausted_redis_pool_waits_then_fails_with_store_error() -> None:
    """A call that finds every pooled connection busy for longer than pool_timeout gets a
    StoreError (never redis' MaxConnectionsError)."""
    _reachable(REDIS_URL)
    store = store_from_url(REDIS_URL, max_connections=1, pool_timeout=0.2)
    held = store.client.connection_pool.get_connection()
    try:
        with pytest.raises(StoreError):
            store.customer_for_identifier(f"never-{uuid.uuid4().hex}")
    finally:
        store.client.connection_pool.release(held)
        store.close()


@pytest.mark.parametrize(
    "query", ["max_connections=0", "pool_timeout=0", "max_connections=lots", "pool_timeout=-1"]
)
def test_bad_redis_pool_options_are_configuration_errors(query: str) -> None:
    pytest.importorskip("redis")
    with pytest.raises(ConfigurationError):
        store_from_url(f"redis://127.0.0.1:6379/15?{query}")


def test_pool_options_in_the_url_reach_the_pools() -> None:
    pytest.importorskip("redis")
    pytest.importorskip("psycopg_pool")
    redis_store = store_from_url("redis://127.0.0.1:6379/15?max_connections=7&pool_timeout=2")
    assert (
        redis_store.client.connection_pool.max_connections,  # type: ignore[attr-defined]
        redis_store.client.connection_pool.timeout,  # type: ignore[attr-defined]
    ) == (7, 2.0)
    redis_store.close()
    pg = store_from_url("postgresql://127.0.0.1:5432/test?max_size=3&min_size=0&pool_timeout=4")
    assert (pg._pool.max_size, pg._pool.min_size, pg._timeout) == (3, 0, 4.0)  # type: ignore[attr-defined]
    pg.close()
