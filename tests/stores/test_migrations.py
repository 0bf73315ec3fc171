"""Stores written by earlier releases open with their data intact.

Each test builds a store in the version 1 layout (the frozen first migration step, with rows
written as version 1 wrote them), opens it with this release, and checks that the quota windows,
pending holds, reports and record listings carry forward.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from safe_openai.policy import Quota
from safe_openai.stores import store_from_url
from safe_openai.stores._types import QuotaDemand, Reservation, Violation
from safe_openai.usage import TokenUsage, UsageRecord

from .conftest import POSTGRES_URL

UTC = timezone.utc


def _v1_rows(now: datetime) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Records (id, customer, outcome, input, output, cost, created_at) and pending holds
    (id, customer, at, tokens, cost) as a busy version 1 store held them."""
    records = [
        ("r1", "acme", "ok", 60, 40, 0.25, now - timedelta(seconds=30)),
        ("r2", "acme", "ok", 60, 40, 0.25, now - timedelta(seconds=20)),
        ("r3", "acme", "blocked", 0, 0, 0.0, now - timedelta(seconds=15)),
        ("r4", "acme", "ok", 500, 0, 0.5, now - timedelta(hours=2)),
        ("r5", "beta", "ok", 10, 0, 0.01, now - timedelta(seconds=5)),
    ]
    pending = [("held-1", "acme", now - timedelta(seconds=10), 50, 0.125)]
    return records, pending


def _check_carried_forward(store: Any, now: datetime) -> None:
    """What a version 1 store held still counts, and its holds can be settled."""
    # two records and one hold in the minute window: a 4th call fits under 4, not under 3
    assert store.reserve("acme", Quota(requests_per_minute=3), QuotaDemand(), now=now).limit == (
        "requests_per_minute"
    )
    if now.date() == (now - timedelta(hours=2)).date():
        # 700 tokens today (r1, r2, r4) plus the 50 held
        refused = store.reserve("acme", Quota(tokens_per_day=800), QuotaDemand(51), now=now)
        assert refused.limit == "tokens_per_day"
        assert store.reserve("acme", Quota(tokens_per_day=800), QuotaDemand(50), now=now).admitted
    if now.month == (now - timedelta(hours=2)).month:
        refused = store.reserve("acme", Quota(usd_per_month=1.0), QuotaDemand(0, 0.126), now=now)
        assert refused.limit == "usd_per_month"
    # the version 1 hold settles: it leaves the window and its record counts instead
    store.commit(
        Reservation("held-1", "acme", True),
        UsageRecord(
            "acme",
            "/responses",
            "m",
            "ok",
            TokenUsage(5, 0, 5),
            cost_usd=0.0,
            created_at=now - timedelta(seconds=10),
            record_id="r6",
        ),
    )
    [row] = store.usage_report(customer_id="acme")
    assert (row.requests, row.blocked, row.input_tokens, row.output_tokens) == (4, 1, 625, 85)
    assert {r.record_id for r in store.usage_records(customer_id="acme")} == {
        "r1",
        "r2",
        "r3",
        "r4",
        "r6",
    }
    assert store.reserve("beta", Quota(requests_per_minute=1), QuotaDemand(), now=now).limit == (
        "requests_per_minute"
    )


def test_sqlite_file_of_schema_version_1_is_migrated(tmp_path: Path) -> None:
    """A version 1 SQLite file opens with its minute windows, holds and totals counted."""
    from safe_openai.stores import _sqlite

    path = tmp_path / "v1.db"
    now = datetime.now(UTC)
    records, pending = _v1_rows(now)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    _sqlite._migrate_to_1(conn)  # the frozen first step: exactly version 1's schema
    conn.execute("PRAGMA user_version = 1")
    for rid, customer, outcome, input_tokens, output_tokens, cost, at in records:
        conn.execute(
            "INSERT INTO usage_records VALUES (?, ?, '/responses', 'm', ?, ?, 0, ?, 0, ?, 0.1, ?, "
            "NULL)",
            (rid, customer, outcome, input_tokens, output_tokens, cost, at.timestamp()),
        )
    for hid, customer, at, tokens, cost in pending:
        conn.execute(
            "INSERT INTO pending VALUES (?, ?, ?, ?, ?)",
            (hid, customer, at.timestamp(), tokens, cost),
        )
    conn.execute("COMMIT")
    conn.close()

    store = store_from_url(f"sqlite:///{path}")
    try:
        _check_carried_forward(store, now)
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == _sqlite.SCHEMA_VERSION >= 2
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
        assert "usage_hourly" not in tables
    finally:
        raw.close()


@pytest.mark.postgres
def test_postgres_schema_version_1_is_migrated() -> None:
    """A version 1 PostgreSQL schema opens with its minute windows, holds and totals counted."""
    psycopg = pytest.importorskip("psycopg")
    from psycopg import sql

    from safe_openai.stores import _postgres

    from .test_redis_postgres_processes import _drop_postgres, _reachable

    _reachable(POSTGRES_URL)
    schema = f"safe_openai_v1_{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    records, pending = _v1_rows(now)
    ident = sql.Identifier(schema)
    try:
        with psycopg.connect(POSTGRES_URL) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {}.schema_version (version integer PRIMARY KEY, "
                    "applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(ident)
            )
            for statement in _postgres._MIGRATIONS[0]:  # the frozen first step
                conn.execute(sql.SQL(statement).format(schema=ident))  # type: ignore[arg-type]
            conn.execute(sql.SQL("INSERT INTO {}.schema_version VALUES (1)").format(ident))
            days: dict[tuple[str, Any], list[float]] = {}
            for rid, customer, outcome, input_tokens, output_tokens, cost, at in records:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {}.usage_records VALUES (%s, %s, '/responses', 'm', %s, %s, "
                        "0, %s, 0, %s, 0.1, %s, NULL)"
                    ).format(ident),
                    (rid, customer, outcome, input_tokens, output_tokens, cost, at),
                )
                if outcome == "ok":  # version 1 kept quota_days with each record it stored
                    day = days.setdefault((customer, at.date()), [0, 0.0])
                    day[0] += input_tokens + output_tokens
                    day[1] += cost
            for (customer, day_), (tokens, cost) in days.items():
                conn.execute(
                    sql.SQL("INSERT INTO {}.quota_days VALUES (%s, %s, %s, %s)").format(ident),
                    (customer, day_, int(tokens), cost),
                )
            for hid, customer, at, tokens, cost in pending:
                conn.execute(
                    sql.SQL("INSERT INTO {}.reservations VALUES (%s, %s, %s, %s, %s)").format(
                        ident
                    ),
                    (hid, customer, at, tokens, cost),
                )
        store = store_from_url(POSTGRES_URL, schema=schema)
        try:
            _check_carried_forward(store, now)
        finally:
            store.close()
        with psycopg.connect(POSTGRES_URL) as conn:
            versions = conn.execute(
                sql.SQL("SELECT version FROM {}.schema_version ORDER BY version").format(ident)
            ).fetchall()
        assert versions == [(v,) for v in range(1, _postgres.SCHEMA_VERSION + 1)]
    finally:
        _drop_postgres(schema)


@pytest.mark.redis
def test_redis_keys_of_the_layout_before_buckets_are_read_once_and_dropped() -> None:
    """A version 1 minute window and pending hash count, then are gone; counters carry on."""
    redis = pytest.importorskip("redis")

    from .conftest import REDIS_URL
    from .test_redis_postgres_processes import _drop_redis, _reachable

    _reachable(REDIS_URL)
    prefix = f"safe-openai-v1-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    us = int(now.timestamp() * 1_000_000)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    key = f"{prefix}:{{acme}}"
    try:
        # as version 1 wrote them: two calls in the window, one hold, the day's counter
        client.zadd(f"{key}:win", {"100|0.25|r1": us - 30_000_000, "100|0.25|r2": us - 20_000_000})
        client.expire(f"{key}:win", 180)
        client.hset(f"{key}:pending", "held-1", f"{us - 10_000_000}|50|0.125")
        client.expire(f"{key}:pending", 660)
        client.set(f"{key}:day:{now:%Y%m%d}", 700, ex=86400)
        store = store_from_url(REDIS_URL, prefix=prefix)
        try:
            refused = store.reserve("acme", Quota(requests_per_minute=3), QuotaDemand(), now=now)
            assert refused.limit == "requests_per_minute"
            assert client.exists(f"{key}:win", f"{key}:pending") == 0
            # read once: the second reservation decides on the buckets alone, the same way
            again = store.reserve("acme", Quota(requests_per_minute=3), QuotaDemand(), now=now)
            assert again.limit == "requests_per_minute"
            if (now + timedelta(minutes=1)).date() == now.date():
                day = store.reserve("acme", Quota(tokens_per_day=750), QuotaDemand(1), now=now)
                assert day.limit == "tokens_per_day"  # 700 committed + 50 held
                assert store.reserve(
                    "acme", Quota(tokens_per_day=751), QuotaDemand(1), now=now
                ).admitted
        finally:
            store.close()
    finally:
        client.close()
        _drop_redis(prefix)


# --- version 3 -> 4: every violation stored, with whether it is a strike ------------------------


def _check_v3_violations_are_strikes(store: Any, now: datetime) -> None:
    """Violations a version 3 store held are strikes (every one was); new ones keep their flag."""
    assert [(v.violation_id, v.strike) for v in store.violations(customer_id="acme")] == [
        ("v3-b", True),
        ("v3-a", True),
    ]
    assert store.count_violations("acme", since=now - timedelta(hours=1)) == 2
    spared = Violation("acme", now, "output", ("violence",), violation_id="v4-c", strike=False)
    assert store.record_violation(spared)
    assert store.violations(customer_id="acme")[0] == spared
    assert store.count_violations("acme", since=now - timedelta(hours=1)) == 2
    [row] = store.usage_report(customer_id="acme")
    assert (row.violations, row.strikes) == (3, 2)


def test_sqlite_file_of_schema_version_3_keeps_its_violations_as_strikes(tmp_path: Path) -> None:
    """A version 3 SQLite file gains the strike flag; its violations count as strikes."""
    from safe_openai.stores import _sqlite

    path = tmp_path / "v3.db"
    now = datetime.now(UTC)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    for step in _sqlite._MIGRATIONS[:3]:  # the frozen steps: exactly version 3's schema
        step(conn)
    conn.execute("PRAGMA user_version = 3")
    for vid, minutes in (("v3-a", 20), ("v3-b", 10)):
        conn.execute(
            "INSERT INTO violations (customer_id, created_at, source, categories, top_score, "
            "endpoint, detail, violation_id) VALUES ('acme', ?, 'moderation', '[\"violence\"]', "
            "0.9, '/chat/completions', '', ?)",
            ((now - timedelta(minutes=minutes)).timestamp(), vid),
        )
    conn.execute("COMMIT")
    conn.close()

    store = store_from_url(f"sqlite:///{path}")
    try:
        _check_v3_violations_are_strikes(store, now)
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == _sqlite.SCHEMA_VERSION >= 4
    finally:
        raw.close()


@pytest.mark.postgres
def test_postgres_schema_version_3_keeps_its_violations_as_strikes() -> None:
    """A version 3 PostgreSQL schema gains the strike flag; its violations count as strikes."""
    psycopg = pytest.importorskip("psycopg")
    from psycopg import sql

    from safe_openai.stores import _postgres

    from .test_redis_postgres_processes import _drop_postgres, _reachable

    _reachable(POSTGRES_URL)
    schema = f"safe_openai_v3_{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    ident = sql.Identifier(schema)
    try:
        with psycopg.connect(POSTGRES_URL) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {}.schema_version (version integer PRIMARY KEY, "
                    "applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(ident)
            )
            for number, step in enumerate(_postgres._MIGRATIONS[:3], start=1):
                for statement in step:  # the frozen steps
                    conn.execute(sql.SQL(statement).format(schema=ident))  # type: ignore[arg-type]
                conn.execute(
                    sql.SQL("INSERT INTO {}.schema_version VALUES (%s)").format(ident), (number,)
                )
            for vid, minutes in (("v3-a", 20), ("v3-b", 10)):
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {}.violations (customer_id, created_at, source, categories, "
                        "top_score, endpoint, detail, violation_id) VALUES ('acme', %s, "
                        "'moderation', ARRAY['violence'], 0.9, '/chat/completions', '', %s)"
                    ).format(ident),
                    (now - timedelta(minutes=minutes), vid),
                )
        store = store_from_url(POSTGRES_URL, schema=schema)
        try:
            _check_v3_violations_are_strikes(store, now)
        finally:
            store.close()
        with psycopg.connect(POSTGRES_URL) as conn:
            versions = conn.execute(
                sql.SQL("SELECT version FROM {}.schema_version ORDER BY version").format(ident)
            ).fetchall()
        assert versions == [(v,) for v in range(1, _postgres.SCHEMA_VERSION + 1)]
    finally:
        _drop_postgres(schema)


@pytest.mark.redis
def test_redis_violations_written_before_the_flag_are_strikes() -> None:
    """Violation members written without the strike flag read and count as strikes."""
    redis = pytest.importorskip("redis")

    from .conftest import REDIS_URL
    from .test_redis_postgres_processes import _drop_redis, _reachable

    _reachable(REDIS_URL)
    prefix = f"safe-openai-v3-{uuid.uuid4().hex[:10]}"
    now = datetime.now(UTC)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    key = f"{prefix}:{{acme}}"
    try:
        client.sadd(f"{prefix}:customers", "acme")
        for vid, minutes in (("v3-a", 20), ("v3-b", 10)):
            when = now - timedelta(minutes=minutes)
            member = json.dumps(
                {
                    "id": vid,
                    "violation_id": vid,
                    "customer_id": "acme",
                    "created_at": when.isoformat(),
                    "source": "moderation",
                    "categories": ["violence"],
                    "top_score": 0.9,
                    "endpoint": "/chat/completions",
                    "detail": "",
                }
            )
            client.zadd(f"{key}:viol", {member: int(when.timestamp() * 1_000_000)})
            client.sadd(f"{key}:violids", vid)
        store = store_from_url(REDIS_URL, prefix=prefix)
        try:
            _check_v3_violations_are_strikes(store, now)
        finally:
            store.close()
    finally:
        client.close()
        _drop_redis(prefix)


# --- the index of event claims by age: added at open, no version -----------------------------


def test_sqlite_file_of_this_version_gains_the_events_index_at_open(tmp_path: Path) -> None:
    """A file written before the index (same schema version) gets it when a store opens it;
    the version stays, so older releases still open the file."""
    path = tmp_path / "usage.db"
    first = store_from_url(f"sqlite:///{path}")
    first.customer_for_request("r")
    first.close()
    with sqlite3.connect(path) as raw:
        raw.execute("DROP INDEX events_claimed_at")
        version = raw.execute("PRAGMA user_version").fetchone()[0]
    again = store_from_url(f"sqlite:///{path}")
    again.customer_for_request("r")
    again.close()
    with sqlite3.connect(path) as raw:
        plan = raw.execute(
            "EXPLAIN QUERY PLAN SELECT event_id FROM events WHERE claimed_at < 0"
        ).fetchall()
        assert raw.execute("PRAGMA user_version").fetchone()[0] == version
    assert "events_claimed_at" in str(plan)


@pytest.mark.postgres
def test_postgres_schema_of_this_version_gains_the_events_index_at_open() -> None:
    """A schema migrated before the index (same version) gets it when a store first runs."""
    psycopg = pytest.importorskip("psycopg")
    from psycopg import sql

    from .test_redis_postgres_processes import _drop_postgres, _reachable

    _reachable(POSTGRES_URL)
    schema = f"safe_openai_idx_{uuid.uuid4().hex[:10]}"
    find = "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = 'events_claimed_at'"
    try:
        store = store_from_url(POSTGRES_URL, schema=schema)
        store.customer_for_request("r")
        store.close()
        with psycopg.connect(POSTGRES_URL) as conn:
            assert conn.execute(find, (schema,)).fetchall() == [(1,)]
            conn.execute(sql.SQL("DROP INDEX {}.events_claimed_at").format(sql.Identifier(schema)))
        store = store_from_url(POSTGRES_URL, schema=schema)
        store.customer_for_request("r")
        store.close()
        with psycopg.connect(POSTGRES_URL) as conn:
            assert conn.execute(find, (schema,)).fetchall() == [(1,)]
    finally:
        _drop_postgres(schema)
