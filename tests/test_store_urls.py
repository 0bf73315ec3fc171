"""Store URLs of the Redis and PostgreSQL topologies: parsing, options, refusals (offline)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.sentinel

from safe_openai import ConfigurationError
from safe_openai.stores import async_store_from_url, store_from_url
from safe_openai.stores._postgres import AsyncPostgresStore, PostgresStore, _split_url
from safe_openai.stores._redis import AsyncRedisStore, RedisStore
from safe_openai.stores._redis_topology import parse_redis_url


def test_cluster_url_lists_every_startup_node_with_default_ports() -> None:
    parsed = parse_redis_url("redis+cluster://u:p%40ss@h1:7000,h2,[::1]:7002,[fe80::2]", {})
    assert parsed.topology == "cluster"
    assert not parsed.tls
    assert parsed.nodes == (("h1", 7000), ("h2", 6379), ("::1", 7002), ("fe80::2", 6379))
    assert (parsed.connection["username"], parsed.connection["password"]) == ("u", "p@ss")


def test_cluster_url_query_options_are_typed_and_split_by_owner() -> None:
    parsed = parse_redis_url(
        "rediss+cluster://h1:7000/?socket_timeout=0.5&require_full_coverage=no"
        "&prefix=app&reinitialize_steps=2",
        {"socket_connect_timeout": 1.0},
    )
    assert parsed.tls
    assert parsed.store == {"prefix": "app"}
    assert parsed.topology_options == {"require_full_coverage": False, "reinitialize_steps": 2}
    assert parsed.connection == {"socket_timeout": 0.5, "socket_connect_timeout": 1.0}


def test_sentinel_url_names_service_db_and_sentinel_credentials() -> None:
    parsed = parse_redis_url(
        "redis+sentinel://:secret@s1,s2:26380/main/3?sentinel_password=other&wait_replicas=2",
        {},
    )
    assert parsed.topology == "sentinel"
    assert parsed.nodes == (("s1", 26379), ("s2", 26380))
    assert parsed.service == "main"
    assert parsed.connection == {"password": "secret", "db": 3}
    assert parsed.topology_options == {"sentinel_password": "other"}
    assert parsed.store == {"wait_replicas": 2}


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        pytest.param("redis+sentinel://s1:26379", {}, "service name", id="no-service"),
        pytest.param("redis+sentinel://s1/a/1/x", {}, "service name", id="deep-path"),
        pytest.param("redis+cluster://h1:7000/2", {}, "one database", id="cluster-db"),
        pytest.param("redis+cluster://h1:x", {}, "not a port", id="bad-port"),
        pytest.param("redis+cluster://h1:0", {}, "not a port", id="port-0"),
        pytest.param("redis+cluster://,h2", {}, "without a host", id="empty-node"),
        pytest.param("redis+cluster://h1?wait_timeout=soon", {}, "not a valid value", id="type"),
        pytest.param(
            "redis+cluster://h1?prefix=a", {"prefix": "b"}, "both in the URL", id="prefix-twice"
        ),
        pytest.param(
            "redis+sentinel://s1/m?socket_timeout=1",
            {"socket_timeout": 2.0},
            "both in the URL",
            id="timeout-twice",
        ),
        pytest.param(
            "redis://h1/0?socket_timeout=1",
            {"socket_timeout": 2.0},
            "both in the URL",
            id="server-twice",
        ),
        pytest.param("redis+memcached://h1", {}, "scheme", id="scheme"),
    ],
)
def test_malformed_redis_urls_are_refused_before_connecting(
    url: str, options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem) as caught:
        parse_redis_url(url, options)
    assert "secret" not in str(caught.value)


def test_a_password_never_appears_in_a_refusal() -> None:
    with pytest.raises(ConfigurationError) as caught:
        store_from_url("redis+cluster://user:hunter2@h1:7000/5")
    assert "hunter2" not in str(caught.value)
    assert "user:***@" in str(caught.value)


def test_same_option_twice_with_the_same_value_is_fine() -> None:
    parsed = parse_redis_url("redis+cluster://h1?prefix=a&socket_timeout=1", {"prefix": "a"})
    assert parsed.store == {"prefix": "a"}


def test_unknown_redis_variant_is_an_unknown_scheme() -> None:
    with pytest.raises(ConfigurationError, match="Unknown store URL scheme"):
        store_from_url("redis+proxy://h1:6379")


def test_cluster_refuses_unknown_options_instead_of_dropping_them() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option.*sokcet_timeout"):
        async_store_from_url("redis+cluster://127.0.0.1:1", sokcet_timeout=1)


def test_prefix_in_the_query_string_names_the_store_not_the_connection() -> None:
    store = store_from_url("redis://127.0.0.1:1/0?prefix=billing&socket_timeout=0.25")
    try:
        assert isinstance(store, RedisStore)
        assert store.prefix == "billing"
        kwargs = store.client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 0.25
        assert "prefix" not in kwargs
    finally:
        store.close()


def test_sentinel_url_opens_a_master_client_that_waits_for_one_replica() -> None:
    store = store_from_url(
        "redis+sentinel://127.0.0.1:1,127.0.0.1:2/main?socket_timeout=0.3&sentinel_password=s"
    )
    try:
        assert isinstance(store, RedisStore)
        pool = store.client.connection_pool
        assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
        assert pool.service_name == "main"
        sentinels = pool.sentinel_manager.sentinels
        assert len(sentinels) == 2
        assert sentinels[0].connection_pool.connection_kwargs["password"] == "s"
        assert store._wait == (1, 500)
    finally:
        store.close()


def test_a_sentinel_master_client_passed_as_an_object_waits_for_a_replica_too() -> None:
    client = redis.sentinel.Sentinel([("127.0.0.1", 1)]).master_for("main")
    assert RedisStore(client)._wait == (1, 500)
    assert RedisStore(client, wait_replicas=0)._wait is None
    assert RedisStore(client, wait_replicas=2, wait_timeout=0.05)._wait == (2, 50)
    assert RedisStore(redis.Redis(port=1))._wait is None


def test_async_cluster_url_opens_an_asyncio_cluster_client_lazily() -> None:
    store = async_store_from_url("redis+cluster://127.0.0.1:1,127.0.0.1:2?prefix=p")
    assert isinstance(store, AsyncRedisStore)
    assert isinstance(store.client, redis.asyncio.cluster.RedisCluster)
    assert store.prefix == "p"
    asyncio.run(store.close())


def test_waiting_for_replicas_is_refused_on_a_cluster_client() -> None:
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=1)
    with pytest.raises(ConfigurationError, match="not supported on a Redis Cluster"):
        AsyncRedisStore(client, wait_replicas=1)
    for bad in ({"wait_replicas": -1}, {"wait_replicas": "1"}, {"wait_timeout": 0}):
        with pytest.raises(ConfigurationError, match="wait_replicas must be"):
            RedisStore(redis.Redis(port=1), **bad)


def test_postgres_never_prepares_statements_unless_asked() -> None:
    default = PostgresStore.from_url("postgresql://127.0.0.1:1/x")
    assert default._pool.kwargs["prepare_threshold"] is None
    opted = store_from_url("postgresql://127.0.0.1:1/x?prepare_threshold=5&schema=billing")
    assert isinstance(opted, PostgresStore)
    assert opted._pool.kwargs["prepare_threshold"] == 5
    assert opted.schema == "billing"
    keyword = AsyncPostgresStore.from_url("postgres://127.0.0.1:1/x", prepare_threshold=0)
    assert keyword._pool.kwargs["prepare_threshold"] == 0


def test_postgres_query_keeps_libpq_parameters_for_libpq() -> None:
    conninfo, options = _split_url(
        "postgresql+psycopg://u@h/db?sslmode=require&schema=s&options=-c%20x%3Dy&max_size=3",
        {"timeout": 2.0},
    )
    assert conninfo == "postgresql://u@h/db?sslmode=require&options=-c%20x%3Dy"
    assert options == {"timeout": 2.0, "schema": "s", "max_size": 3}
    untouched = "postgresql://h/db?options=-c+x"
    assert _split_url(untouched, {}) == (untouched, {})
    assert _split_url("postgresql://h/db?prepare_threshold=none", {})[1] == {
        "prepare_threshold": None
    }


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        pytest.param("postgresql://h/db?max_size=many", {}, "not valid", id="type"),
        pytest.param("postgresql://h/db?schema=a", {"schema": "b"}, "both", id="twice"),
    ],
)
def test_malformed_postgres_options_are_refused(
    url: str, options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        store_from_url(url, **options)
