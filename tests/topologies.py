"""The servers the store tests run on: standalone Redis and PostgreSQL, and the topologies.

The standalone servers come from ``SAFE_OPENAI_TEST_REDIS_URL`` / ``_POSTGRES_URL`` (default:
the local ones). The topologies (a Redis Cluster, a Sentinel-managed primary, PgBouncer in
transaction and statement pooling) come from ``SAFE_OPENAI_TEST_REDIS_CLUSTER_URL``,
``_REDIS_SENTINEL_URL``, ``_PGBOUNCER_URL`` and ``_PGBOUNCER_STATEMENT_URL``; when those are
unset, from the env file ``.ci/topologies.sh start`` writes (``.topologies/env``, or under
``SAFE_OPENAI_TOPOLOGY_DIR``). ``.ci/run`` starts them and exports the variables. A missing
server skips its tests, except with ``CI=true``, where it fails them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parents[1]


def _env_file() -> dict[str, str]:
    directory = Path(os.environ.get("SAFE_OPENAI_TOPOLOGY_DIR") or _ROOT / ".topologies")
    try:
        lines = (directory / "env").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


_FILE = _env_file()


def _url(name: str, default: str = "") -> str:
    return os.environ.get(name) or _FILE.get(name) or default


REDIS_URL = _url("SAFE_OPENAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = _url("SAFE_OPENAI_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
REDIS_CLUSTER_URL = _url("SAFE_OPENAI_TEST_REDIS_CLUSTER_URL")
REDIS_SENTINEL_URL = _url("SAFE_OPENAI_TEST_REDIS_SENTINEL_URL")
if REDIS_SENTINEL_URL and "wait_timeout=" not in REDIS_SENTINEL_URL:
    # The store confirms each write on the replica (WAIT, 0.5 s by default). On a CI machine
    # loaded by the rest of the suite a loopback replica can take longer than that to answer,
    # which fails a write the tests expect to succeed; what they test is counting, not latency
    # (tests/stores/test_topologies.py pins the timeout's own behaviour with a client of its own).
    REDIS_SENTINEL_URL += ("&" if "?" in REDIS_SENTINEL_URL else "?") + "wait_timeout=5"
PGBOUNCER_URL = _url("SAFE_OPENAI_TEST_PGBOUNCER_URL")
PGBOUNCER_STATEMENT_URL = _url("SAFE_OPENAI_TEST_PGBOUNCER_STATEMENT_URL")

#: name -> (URL or "" when not running, whether it is a Redis)
TOPOLOGIES: dict[str, tuple[str, bool]] = {
    "redis": (REDIS_URL, True),
    "redis-cluster": (REDIS_CLUSTER_URL, True),
    "redis-sentinel": (REDIS_SENTINEL_URL, True),
    "postgres": (POSTGRES_URL, False),
    "pgbouncer": (PGBOUNCER_URL, False),
}


def params(*, redis: bool = True, postgres: bool = True) -> list[Any]:
    """``pytest.param`` of each topology's name, marked ``redis`` or ``postgres``."""
    return [
        pytest.param(name, id=name, marks=pytest.mark.redis if is_redis else pytest.mark.postgres)
        for name, (_, is_redis) in TOPOLOGIES.items()
        if (redis if is_redis else postgres)
    ]


def unavailable(message: str) -> None:
    """Skip, or fail in CI, where every server and topology must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def first_address(url: str) -> tuple[str, int]:
    """The first host and port of a (possibly multi-host) store URL."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2].split(",")[0]
    host, _, port = netloc.rpartition(":")
    if not host:
        host, port = netloc, ""
    default = 26379 if "sentinel" in scheme else 5432 if scheme.startswith("postgres") else 6379
    return host or "127.0.0.1", int(port or default)


def require(name: str) -> str:
    """The URL of topology ``name``, after checking its first node answers on TCP."""
    import socket

    url, _ = TOPOLOGIES[name]
    if not url:
        unavailable(f"the {name} topology is not running (start it: .ci/topologies.sh start)")
    host, port = first_address(url)
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        unavailable(f"{name} not reachable at {host}:{port}: {exc}")
    return url


def raw_redis(url: str) -> Any:
    """A plain redis-py client (standalone, cluster or Sentinel master) for ``url``."""
    from safe_openai.stores._redis import RedisStore

    return RedisStore.from_url(url, wait_replicas=0).client


def drop_redis_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (on every primary of a cluster)."""
    client = raw_redis(url)
    try:
        for key in list(client.scan_iter(match=f"{prefix}*", count=1000)):
            client.delete(key)
    finally:
        client.close()


def drop_postgres_schema(schema: str) -> None:
    """Drop a test schema, on the PostgreSQL server directly."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def reachable_url(url: str) -> str | None:
    """``None`` when ``url``'s first node answers on TCP, else why not."""
    import socket

    if not url:
        return "not running"
    host, port = first_address(url)
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"not reachable at {host}:{port} ({exc.strerror or exc})"
    return None
