"""Under load no store turns concurrency into errors: 64 threads on a sync store and 500 calls in
flight on an async store all complete, on every backend and topology, waiting for a pooled connection when every one is busy
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

from ..topologies import drop_postgres_schema, drop_redis_prefix, require
from ..topologies import params as topology_params
from .conftest import REDIS_URL
from .test_redis_postgres_processes import _reachable

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


@pytest.fixture(params=["memory", "sqlite", *topology_params()])
def opened(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """(url, options) of a fresh namespace of each backend and topology (standalone Redis, Redis
    Cluster, Redis Sentinel, PostgreSQL, PgBouncer), with small pools so most calls wait for a
    connection; dropped afterwards."""
    name = f"safe_openai_load_{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        yield "memory://", {}
        return
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/load.db", {}
        return
    url = require(request.param)
    joiner = "&" if "?" in url else "?"
    if url.startswith("redis"):
        yield f"{url}{joiner}max_connections=8", {"prefix": name}
        drop_redis_prefix(url, name)
    else:
        yield f"{url}{joiner}max_size=4&pool_timeout=30", {"schema": name}
        drop_postgres_schema(name)


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


@pytest.mark.redis
@pytest.mark.parametrize("topology", ["redis-cluster", "redis-sentinel"])
def test_cluster_and_sentinel_stores_wait_for_a_connection_then_fail_with_store_error(
    topology: str,
) -> None:
    """redis-py's cluster and Sentinel pools fail at once when every connection is busy; the
    store waits for one up to pool_timeout (from the URL), then raises StoreError."""
    url = require(topology)
    joiner = "&" if "?" in url else "?"
    store = store_from_url(f"{url}{joiner}max_connections=1&pool_timeout=0.2")
    gate = store._gate  # type: ignore[attr-defined]
    assert gate is not None and store._gate_wait == 0.2  # type: ignore[attr-defined]
    assert gate.acquire(timeout=1)  # every connection busy
    try:
        with pytest.raises(StoreError, match=r"busy for 0\.2 s"):
            store.customer_for_identifier(f"never-{uuid.uuid4().hex}")
    finally:
        gate.release()
    assert store.customer_for_identifier(f"never-{uuid.uuid4().hex}") is None
    store.close()
