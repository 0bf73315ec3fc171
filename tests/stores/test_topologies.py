"""The stores on the topologies fleets run: Redis Cluster, Redis Sentinel, PgBouncer.

The contract suite and the multi-process tests run on every topology too (their fixtures are
parametrized over :mod:`tests.topologies`); these are the end-to-end and topology-specific
cases: guarded calls with every store round trip, cluster slots, redis-py clients passed as
objects, prepared statements behind PgBouncer, and statement pooling refused clearly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from safe_openai import CustomerSuspended, DefaultPolicy, Quota, QuotaExceeded, SafeClient
from safe_openai.errors import StoreError
from safe_openai.stores import Spool, store_from_url
from safe_openai.testing import FakeOpenAI
from safe_openai.usage import UsageRecord

from ..topologies import (
    PGBOUNCER_STATEMENT_URL,
    POSTGRES_URL,
    drop_postgres_schema,
    drop_redis_prefix,
    first_address,
    require,
    unavailable,
)
from ..topologies import params as topology_params

NOW = datetime.now(timezone.utc)


def _namespace(url: str) -> tuple[dict[str, Any], Any]:
    tag = uuid.uuid4().hex[:10]
    if url.startswith("redis"):
        prefix = f"safe-openai-topo-{tag}"
        return {"prefix": prefix}, lambda: drop_redis_prefix(url, prefix)
    schema = f"safe_openai_topo_{tag}"
    return {"schema": schema}, lambda: drop_postgres_schema(schema)


@pytest.fixture(params=topology_params())
def topology(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    """A topology's URL and the options that give this test its own namespace."""
    url = require(request.param)
    options, cleanup = _namespace(url)
    yield url, options
    cleanup()


def test_guarded_calls_quota_strikes_webhook_lookups_and_spool_drain(
    topology: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Every store round trip of a guarded call works: quota, usage, identifier and request
    maps, strikes to a suspension, reports over all customers, and a spool drained into it."""
    url, options = topology
    store = store_from_url(url, **options)
    spool = Spool(tmp_path / "spool")
    left_behind = UsageRecord(
        "left-behind", "/chat/completions", "m", "ok", created_at=NOW, record_id="spooled-1"
    )
    spool.append(left_behind)  # a record an earlier process could not write
    fake = FakeOpenAI(reply="ok")
    policy = DefaultPolicy(quota=Quota(requests_per_minute=3), strike_limit=2)
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret="topology-test-secret-0123",
        store=store,
        spool=spool,
        policy=policy,
    )
    try:
        acme = client.for_customer("acme")
        for _ in range(3):
            acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(QuotaExceeded):
            acme.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert len(spool) == 0, "the first successful write drains the spool"

        sent = fake.model_requests[-1]
        assert sent.json is not None
        assert store.customer_for_identifier(str(sent.json["safety_identifier"])) == "acme"
        assert store.customer_for_request(f"req_{len(fake.requests):04d}") in ("acme", None)

        globex = client.for_customer("globex")
        for text in ("I will kill them", "kill everyone now"):
            with pytest.raises(Exception, match=r"moderation|flagged|blocked"):
                globex.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
                )
        with pytest.raises(CustomerSuspended):
            globex.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert [s.customer_id for s in store.suspensions(now=datetime.now(timezone.utc))] == [
            "globex"
        ]

        report = {row.customer: row for row in store.usage_report()}
        assert report["acme"].requests == 3
        assert report["acme"].denied == 1
        assert report["globex"].blocked == 2
        assert report["globex"].violations == 2
        assert report["globex"].suspended
        assert report["left-behind"].requests == 1
        assert len(fake.model_requests) == 3
        lease = timedelta(minutes=1)
        assert store.claim_event("evt_t", token="one", now=NOW, lease=lease) == "claimed"
        assert store.claim_event("evt_t", token="two", now=NOW, lease=lease) == "held"
        assert store.finish_event("evt_t", token="one")
        assert store.claim_event("evt_t", token="two", now=NOW, lease=lease) == "done"
    finally:
        client.close()
        store.close()


# --- Redis Cluster ---------------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[tuple[str, str]]:
    url = require("redis-cluster")
    prefix = f"safe-openai-slots-{uuid.uuid4().hex[:10]}"
    yield url, prefix
    drop_redis_prefix(url, prefix)


@pytest.mark.redis
def test_cluster_keeps_each_customer_in_one_slot_and_spreads_customers_over_nodes(
    cluster: tuple[str, str],
) -> None:
    """Per-customer keys share a slot; customers land on several masters, so the cross-slot
    operations (customer set, reports over all customers, maps, claims) really cross nodes."""
    from safe_openai.policy import Quota as Q
    from safe_openai.stores import QuotaDemand, Violation

    url, prefix = cluster
    store = store_from_url(url, prefix=prefix)
    customers = [f"tenant-{n}" for n in range(24)] + ["", "with{braces}"]
    try:
        for customer in customers:
            held = store.reserve(customer, Q(tokens_per_day=10**6), QuotaDemand(5), now=NOW)
            store.commit(held, UsageRecord(customer, "/x", "m", "ok", created_at=NOW))
            store.record_violation(Violation(customer, NOW, "moderation"))
            store.suspend(customer, reason="t", until=None, now=NOW)
            store.remember_identifier(f"sid-{customer}", customer)
        client = store.client
        slots: dict[str, set[int]] = {}
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            text = key.decode()
            if text.startswith(f"{prefix}:{{"):  # a customer's key (not an identifier's)
                tag = text[len(prefix) + 2 : text.index("}", len(prefix) + 2)]
                slots.setdefault(tag, set()).add(client.keyslot(text))
        assert len(slots) == len(customers)
        assert all(len(s) == 1 for s in slots.values())
        nodes = {
            client.nodes_manager.get_node_from_slot(next(iter(s))).name for s in slots.values()
        }
        assert len(nodes) >= 2, "the cluster test must cross nodes"

        assert sorted(r.customer for r in store.usage_report()) == sorted(customers)
        assert len(store.suspensions(now=NOW)) == len(customers)
        assert len(store.violations(limit=100)) == len(customers)
        assert store.customer_for_identifier("sid-tenant-7") == "tenant-7"
    finally:
        store.close()


@pytest.mark.redis
def test_cluster_clients_passed_as_objects_work_sync_and_async(cluster: tuple[str, str]) -> None:
    """A redis.cluster.RedisCluster (and the asyncio one) passed to the store works."""
    import redis.asyncio.cluster
    import redis.cluster

    from safe_openai.stores._redis import AsyncRedisStore, RedisStore

    url, prefix = cluster
    host, port = first_address(url)
    sync_client = redis.cluster.RedisCluster(host=host, port=port)
    store = RedisStore(sync_client, prefix=prefix)
    try:
        store.record_usage(UsageRecord("a", "/x", "m", "ok", created_at=NOW, record_id="r-a"))
        assert [r.customer for r in store.usage_report()] == ["a"]
    finally:
        sync_client.close()

    async def run() -> list[str]:
        client = redis.asyncio.cluster.RedisCluster(host=host, port=port)
        astore = AsyncRedisStore(client, prefix=prefix)
        try:
            await astore.record_usage(
                UsageRecord("b", "/x", "m", "ok", created_at=NOW, record_id="r-b")
            )
            return [r.customer for r in await astore.usage_report()]
        finally:
            await client.aclose()

    assert asyncio.run(run()) == ["a", "b"]


# --- PgBouncer -------------------------------------------------------------------------------


def _hammer(store: Any, calls: int = 240) -> list[str]:
    """Many statements at once over a pool wider than PgBouncer's server pool."""
    errors: list[str] = []

    def work(n: int) -> None:
        try:
            store.record_usage(
                UsageRecord("acme", "/x", "m", "ok", created_at=NOW, record_id=f"r{n}")
            )
            store.customer_for_identifier("nobody")
        except StoreError as exc:
            errors.append(str(exc))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(calls)))
    return errors


@pytest.mark.postgres
def test_pgbouncer_transaction_pooling_works_because_nothing_is_prepared() -> None:
    """Behind PgBouncer (transaction pooling) concurrent calls all succeed by default; the same
    load with psycopg's automatic prepare (the opt-in) breaks, which is why it is off."""
    url = require("pgbouncer")
    schema = f"safe_openai_bouncer_{uuid.uuid4().hex[:10]}"
    try:
        store = store_from_url(url, schema=schema, max_size=8)
        try:
            assert _hammer(store) == []
            assert store.usage_report()[0].requests == 240
        finally:
            store.close()
        opted = store_from_url(f"{url}?prepare_threshold=1", schema=schema, max_size=8)
        try:
            errors = _hammer(opted)
        finally:
            opted.close()
        assert errors, "with prepared statements PgBouncer's shared server connections fail"
        assert any("prepared statement" in e for e in errors)
    finally:
        drop_postgres_schema(schema)


@pytest.mark.postgres
def test_prepared_statements_opt_in_prepares_on_a_direct_connection() -> None:
    """prepare_threshold in the URL reaches psycopg: the server session holds prepared
    statements; by default it holds none."""
    require("postgres")
    schema = f"safe_openai_prepare_{uuid.uuid4().hex[:10]}"
    try:
        for url, expect_prepared in (
            (POSTGRES_URL, False),
            (f"{POSTGRES_URL}?prepare_threshold=0", True),
        ):
            store = store_from_url(url, schema=schema, min_size=1, max_size=1)
            try:
                for _ in range(3):
                    store.customer_for_identifier("nobody")
                with store._pool.connection() as conn:  # the store's one pooled connection
                    prepared = conn.execute(
                        "SELECT count(*) FROM pg_prepared_statements"
                    ).fetchone()
                assert prepared is not None
                assert (prepared[0] > 0) is expect_prepared
            finally:
                store.close()
    finally:
        drop_postgres_schema(schema)


@pytest.mark.postgres
def test_pgbouncer_statement_pooling_is_refused_with_a_clear_error() -> None:
    """Statement pooling cannot run a reservation's transaction: the error says what to use."""
    if not PGBOUNCER_STATEMENT_URL:
        unavailable("the pgbouncer topology is not running (.ci/topologies.sh start)")
    require("pgbouncer")
    schema = f"safe_openai_stmt_{uuid.uuid4().hex[:10]}"
    store = store_from_url(PGBOUNCER_STATEMENT_URL, schema=schema, timeout=5)
    try:
        with pytest.raises(StoreError, match="use transaction pooling"):
            store.customer_for_identifier("nobody")
    finally:
        store.close()
        drop_postgres_schema(schema)


# --- waiting for replicas --------------------------------------------------------------------


@pytest.mark.redis
def test_a_write_no_replica_confirmed_raises_so_it_is_spooled_not_trusted() -> None:
    """With wait_replicas, a write fewer replicas confirmed raises StoreError (the client
    spools the record and writes it again later); reads never wait."""
    import redis

    from safe_openai.stores._redis import RedisStore

    url = require("redis")
    client = redis.Redis.from_url(url)
    replicas = int(client.info("replication")["connected_slaves"])
    prefix = f"safe-openai-wait-{uuid.uuid4().hex[:10]}"
    store = RedisStore(client, prefix=prefix, wait_replicas=replicas + 1, wait_timeout=0.05)
    record = UsageRecord("acme", "/x", "m", "ok", created_at=NOW, record_id="w-1")
    try:
        with pytest.raises(StoreError, match=f"confirmed by {replicas} of {replicas + 1}"):
            store.record_usage(record)
        with pytest.raises(StoreError, match="may not survive a failover"):
            store.suspend("acme", reason="x", until=None, now=NOW)
        assert store.customer_for_identifier("nobody") is None  # a read: no WAIT
        assert [r.record_id for r in store.usage_records()] == ["w-1"]  # written, unconfirmed
        # written again (as a spool drain does) with nothing waited for: counted once
        RedisStore(client, prefix=prefix).record_usage(record)
        assert store.usage_report()[0].requests == 1
    finally:
        client.close()
        drop_redis_prefix(url, prefix)


@pytest.mark.redis
def test_cluster_round_trips_are_those_docs_stores_md_lists(cluster: tuple[str, str]) -> None:
    """Each operation's pipelined round trips on a cluster, as the Deploying table says."""
    from safe_openai.policy import Quota as Q
    from safe_openai.stores import QuotaDemand, Violation

    url, prefix = cluster
    store = store_from_url(url, prefix=prefix)
    sent: list[int] = []
    send = store._send

    def counting(batch: Any) -> Any:
        sent.append(len(batch))
        return send(batch)

    store._send = counting

    def trips(operation: Any) -> int:
        sent.clear()
        operation()
        return len(sent)

    try:
        held = store.reserve("acme", Q(requests_per_minute=10), QuotaDemand(), now=NOW)
        assert trips(lambda: store.suspension("acme", now=NOW)) == 1
        assert trips(lambda: store.count_violations("acme", since=NOW)) == 1
        assert (
            trips(lambda: store.reserve("acme", Q(requests_per_minute=10), QuotaDemand(), now=NOW))
            == 1
        )
        record = UsageRecord("acme", "/x", "m", "ok", created_at=NOW, record_id="rt-1")
        assert trips(lambda: store.commit(held, record)) == 1
        quota = Q(requests_per_minute=10)
        started: list[Any] = []
        assert (
            trips(
                lambda: started.append(
                    store.begin_call("acme", quota, QuotaDemand(), identifier="sid-rt")
                )
            )
            == 1
        )
        begun = started[0].reservation
        assert begun is not None and begun.admitted
        finished = UsageRecord("acme", "/x", "m", "ok", created_at=NOW, record_id="rt-2")
        assert trips(lambda: store.finish_call(begun, finished, request_id="req-rt")) == 1
        assert store.customer_for_request("req-rt") == "acme"
        assert store.customer_for_identifier("sid-rt") == "acme"
        spare = store.reserve("acme", Q(requests_per_minute=10), QuotaDemand(), now=NOW)
        assert trips(lambda: store.release(spare)) == 1
        assert trips(lambda: store.record_violation(Violation("acme", NOW, "moderation"))) == 1
        assert trips(lambda: store.remember_identifier("sid", "acme")) == 1
        lease = timedelta(minutes=1)
        assert trips(lambda: store.claim_event("evt", token="t", now=NOW, lease=lease)) == 1
        assert trips(lambda: store.release_event("evt", token="t")) == 1
        assert trips(lambda: store.suspend("acme", reason="x", until=None, now=NOW)) == 1
        assert trips(lambda: store.unsuspend("acme")) == 1
        for n in range(600):  # more than one batch of 500 customers
            store.record_usage(UsageRecord(f"c{n}", "/x", "m", "ok", created_at=NOW))
        # scanning 601 customers takes a couple of SSCAN pages, then one trip per 500
        report_trips = trips(store.usage_report)
        assert 2 + 1 <= report_trips <= 2 + 4
        assert sent[-2:] == [500, 101]
    finally:
        store.close()


@pytest.mark.redis
def test_sentinel_master_clients_passed_as_objects_work_sync_and_async() -> None:
    """A Sentinel(...).master_for(service) client (and the asyncio one) passed to the store
    works, waiting for a replica as the URL form does."""
    import redis.asyncio.sentinel
    import redis.sentinel

    from safe_openai.stores._redis import AsyncRedisStore, RedisStore

    url = require("redis-sentinel")
    service = url.partition("://")[2].split("/")[1].split("?")[0]
    prefix = f"safe-openai-sentinel-{uuid.uuid4().hex[:10]}"
    sentinel = redis.sentinel.Sentinel([first_address(url)], socket_timeout=2)
    master = sentinel.master_for(service)
    try:
        store = RedisStore(master, prefix=prefix)
        assert store._wait == (1, 500)
        store.record_usage(UsageRecord("a", "/x", "m", "ok", created_at=NOW, record_id="s-a"))
        assert [r.customer for r in store.usage_report()] == ["a"]

        async def run() -> list[str]:
            asentinel = redis.asyncio.sentinel.Sentinel([first_address(url)], socket_timeout=2)
            amaster = asentinel.master_for(service)
            astore = AsyncRedisStore(amaster, prefix=prefix)
            try:
                await astore.record_usage(
                    UsageRecord("b", "/x", "m", "ok", created_at=NOW, record_id="s-b")
                )
                return [r.customer for r in await astore.usage_report()]
            finally:
                await amaster.aclose()
                await asentinel.aclose()

        assert asyncio.run(run()) == ["a", "b"]
    finally:
        master.close()
        sentinel.close()
        drop_redis_prefix(url, prefix)


@pytest.mark.redis
def test_cluster_reloads_scripts_a_node_lost(cluster: tuple[str, str]) -> None:
    """After SCRIPT FLUSH on every primary (a restart, a new node), scripts load again."""
    from safe_openai.policy import Quota as Q
    from safe_openai.stores import QuotaDemand

    url, prefix = cluster
    store = store_from_url(url, prefix=prefix)
    try:
        store.client.script_flush()
        held = store.reserve("acme", Q(requests_per_minute=1), QuotaDemand(), now=NOW)
        assert held.admitted
        store.release(held)
        assert store.reserve("acme", Q(requests_per_minute=1), QuotaDemand(), now=NOW).admitted
    finally:
        store.close()
