"""The PostgreSQL store: usage, quotas and enforcement state shared by every replica.

Open it with ``store_from_url("postgresql://user@host/db", schema="safe_openai")``. Options:
``schema`` (every table lives in it), ``min_size`` / ``max_size`` (the connection pool),
``timeout`` (seconds to wait for a pooled connection before :class:`~safe_openai.StoreError`),
also settable in the URL's query as ``?min_size=1&max_size=20&pool_timeout=5``; a call that finds
every connection busy waits for one, up to ``timeout``; ``prepare_threshold`` (see below); any
other keyword is passed to ``psycopg.connect`` (``connect_timeout``, ``sslmode``, ...). The
store's options may also be given in the URL's query string
(``postgresql://db/app?schema=billing&prepare_threshold=5``); libpq's own parameters
(``sslmode``, ``connect_timeout``, ...) stay in it for libpq.

Connection poolers: nothing the store does outlives a transaction, so it works behind
PgBouncer in transaction pooling. Every statement names its schema (no ``search_path``), no
session setting is made, advisory locks are transaction-scoped (``pg_advisory_xact_lock``),
and by default no statement is prepared: psycopg prepares a statement on the server after
``prepare_threshold`` executions on one connection (5 by default), and a pooler that hands
each transaction to any server connection then fails with ``prepared statement "_pg3_0" does
not exist`` / ``already exists``. ``prepare_threshold=None`` (the default here) sends every
statement unprepared; on a direct connection ``prepare_threshold=5`` opts back in. Statement
pooling is not supported: a reservation takes a lock, reads its windows and writes its hold in
one transaction.

The schema is created and migrated by the library on first use. :data:`_MIGRATIONS` is an
ordered list of steps; ``<schema>.schema_version`` records the ones applied. Many processes
starting at once serialise on a transaction-scoped advisory lock, so each step runs once.

Quota reservations are atomic across processes and hosts: each takes
``pg_advisory_xact_lock`` on a key derived from the schema and the customer (no row has to
exist, so a customer first seen by many replicas at once still gets exactly its quota), reads
its quota buckets and the server's clock in one statement and writes its hold in another before
the transaction ends. The decision is :func:`~safe_openai.stores._types.decide` itself, on the
server's clock (``clock_timestamp()``) unless the caller passes ``now``. ``commit`` swaps the
hold for the usage record in one statement, so a concurrent reservation sees one or the other,
never both or neither. Nothing outlives a transaction (no session state, no session locks).

Times are ``timestamptz`` (microseconds, like Python). ``usage_report`` reads
``usage_records`` through indexes on ``(customer_id, created_at)`` and ``created_at``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import uuid
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ..errors import ConfigurationError, StoreError
from ..policy import Quota
from ..usage import SENT_OUTCOMES, UsageRecord
from ._types import (
    EVENT_KEEP,
    EVENT_PRUNE_BATCH,
    KEEP_HOLD_MINUTES,
    KEEP_SECONDS,
    MINUTE_US,
    OUTCOME_COLUMNS,
    RESERVATION_TTL,
    SECOND_US,
    Bucket,
    CallStart,
    CustomerReport,
    DayTotal,
    EventClaim,
    LimitUsage,
    QuotaDemand,
    QuotaState,
    Reservation,
    Suspension,
    Violation,
    assess,
    day_of,
    finish_report,
    from_us,
    measure,
    record_from_row,
    to_us,
)

__all__ = ["DEFAULT_SCHEMA", "SCHEMA_VERSION", "AsyncPostgresStore", "PostgresStore"]

T = TypeVar("T")

#: The schema used when none is given.
DEFAULT_SCHEMA = "safe_openai"
DEFAULT_MIN_SIZE = 1
DEFAULT_MAX_SIZE = 10
#: Seconds to wait for a pooled connection (an unreachable server fails after this long).
DEFAULT_TIMEOUT = 10.0
#: psycopg's ``prepare_threshold``: ``None`` never prepares (safe behind a pooler).
DEFAULT_PREPARE_THRESHOLD: int | None = None
#: The store's options that may come in the URL's query string, with their parsers.
_URL_OPTIONS: dict[str, Any] = {
    "schema": str,
    "min_size": int,
    "max_size": int,
    "timeout": float,
    "prepare_threshold": lambda raw: None if raw.lower() in ("", "none", "null") else int(raw),
    "pool_timeout": float,
}
#: URL query names that stand for a keyword of another name.
_URL_KEYWORDS = {"pool_timeout": "timeout"}
#: Holds older than this are deleted. Longer than the TTL, so a replica whose clock runs a
#: little ahead never deletes a hold the others still count.
_PENDING_GC = RESERVATION_TTL + timedelta(hours=1)
_TTL_S = int(RESERVATION_TTL.total_seconds())

# --------------------------------------------------------------------------------------------
# Schema. ``_MIGRATIONS[n]`` brings a schema from version ``n`` to ``n + 1``: append, never edit.

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE {schema}.usage_records (
            record_id text PRIMARY KEY,
            customer_id text NOT NULL,
            endpoint text NOT NULL,
            model text,
            outcome text NOT NULL,
            input_tokens bigint NOT NULL,
            cached_tokens bigint NOT NULL,
            output_tokens bigint NOT NULL,
            reasoning_tokens bigint NOT NULL,
            cost_usd double precision,
            latency_s double precision NOT NULL,
            created_at timestamptz NOT NULL,
            request_id text
        )""",
        # covers the quota windows (index-only scans) as well as per-customer reports
        """CREATE INDEX usage_records_customer_created ON {schema}.usage_records
            (customer_id, created_at) INCLUDE (outcome, input_tokens, output_tokens, cost_usd)""",
        "CREATE INDEX usage_records_created ON {schema}.usage_records (created_at)",
        # Per customer and UTC day, what quotas count of records that reached the model, so a
        # reservation reads at most a day of records plus a month of these rows, however busy
        # the customer. Kept in step with usage_records by the statement that inserts them.
        """CREATE TABLE {schema}.quota_days (
            customer_id text NOT NULL,
            day date NOT NULL,
            tokens bigint NOT NULL,
            cost_usd double precision NOT NULL,
            PRIMARY KEY (customer_id, day)
        )""",
        """CREATE TABLE {schema}.reservations (
            id text PRIMARY KEY,
            customer_id text NOT NULL,
            created_at timestamptz NOT NULL,
            tokens bigint NOT NULL,
            cost_usd double precision NOT NULL
        )""",
        "CREATE INDEX reservations_customer_created ON {schema}.reservations "
        "(customer_id, created_at)",
        """CREATE TABLE {schema}.violations (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            customer_id text NOT NULL,
            created_at timestamptz NOT NULL,
            source text NOT NULL,
            categories text[] NOT NULL,
            top_score double precision,
            endpoint text,
            detail text NOT NULL
        )""",
        "CREATE INDEX violations_customer_created ON {schema}.violations (customer_id, created_at)",
        "CREATE INDEX violations_created ON {schema}.violations (created_at)",
        """CREATE TABLE {schema}.suspensions (
            customer_id text PRIMARY KEY,
            since timestamptz NOT NULL,
            until timestamptz,
            reason text NOT NULL
        )""",
        """CREATE TABLE {schema}.identifiers (
            identifier text PRIMARY KEY,
            customer_id text NOT NULL
        )""",
        """CREATE TABLE {schema}.requests (
            request_id text PRIMARY KEY,
            customer_id text NOT NULL
        )""",
        """CREATE TABLE {schema}.events (
            event_id text PRIMARY KEY,
            claimed_at timestamptz NOT NULL DEFAULT now()
        )""",
    ),
    # Version 2: each customer's quota state is a few buckets (seconds of the minute windows,
    # minutes of pending holds; quota_days already holds the day totals) instead of a log
    # read on every reservation. The minute windows and holds that may still count are
    # carried forward from version 1's rows.
    (
        """CREATE TABLE {schema}.quota_seconds (
            customer_id text NOT NULL,
            second bigint NOT NULL,
            requests bigint NOT NULL,
            tokens bigint NOT NULL,
            last_us bigint NOT NULL,
            PRIMARY KEY (customer_id, second)
        )""",
        """CREATE TABLE {schema}.quota_holds (
            customer_id text NOT NULL,
            minute bigint NOT NULL,
            requests bigint NOT NULL,
            tokens bigint NOT NULL,
            cost_usd double precision NOT NULL,
            last_us bigint NOT NULL,
            PRIMARY KEY (customer_id, minute)
        )""",
        f"""INSERT INTO {{schema}}.quota_seconds (customer_id, second, requests, tokens, last_us)
        SELECT customer_id, floor(extract(epoch FROM at))::bigint, count(*), sum(tokens),
               max((extract(epoch FROM at) * 1000000)::bigint)
        FROM (
            SELECT customer_id, created_at AS at, input_tokens + output_tokens AS tokens
            FROM {{schema}}.usage_records
            WHERE outcome IN ({", ".join(repr(o) for o in sorted(SENT_OUTCOMES))})
                AND created_at > clock_timestamp() - interval '{KEEP_SECONDS} seconds'
            UNION ALL
            SELECT customer_id, created_at, tokens FROM {{schema}}.reservations
            WHERE created_at > clock_timestamp() - interval '{KEEP_SECONDS} seconds'
        ) AS recent GROUP BY 1, 2""",
        f"""INSERT INTO {{schema}}.quota_holds
            (customer_id, minute, requests, tokens, cost_usd, last_us)
        SELECT customer_id, floor(extract(epoch FROM created_at) / 60)::bigint, count(*),
               sum(tokens), sum(cost_usd), max((extract(epoch FROM created_at) * 1000000)::bigint)
        FROM {{schema}}.reservations
        WHERE created_at > clock_timestamp() - interval '{_TTL_S} seconds'
        GROUP BY 1, 2""",
    ),
    # Version 3: webhook claims with a lease (a row with a token is a live or lapsed claim, a
    # row without one, as every earlier row, an event done); violations get an id a replay
    # cannot repeat.
    (
        "ALTER TABLE {schema}.events ADD COLUMN token text, ADD COLUMN lease_until timestamptz",
        "ALTER TABLE {schema}.violations ADD COLUMN violation_id text UNIQUE",
    ),
    # Version 4: every violation is stored, with whether it is a strike (every earlier row was).
    ("ALTER TABLE {schema}.violations ADD COLUMN strike boolean NOT NULL DEFAULT true",),
)
#: The schema version this release writes.
SCHEMA_VERSION = len(_MIGRATIONS)

# --------------------------------------------------------------------------------------------
# SQL shared by the sync and async stores, with ``{schema}`` filled in per store.

_SENT = sorted(SENT_OUTCOMES)
_RECORD_COLUMNS = (
    "record_id, customer_id, endpoint, model, outcome, input_tokens, cached_tokens, "
    "output_tokens, reasoning_tokens, cost_usd, latency_s, created_at, request_id"
)
_VIOLATION_COLUMNS = (
    "customer_id, created_at, source, categories, top_score, endpoint, detail, violation_id, strike"
)
_SUSPENSION_COLUMNS = "customer_id, since, until, reason"
_REPORT_KEYS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    *OUTCOME_COLUMNS.values(),
)
_REPORT_SUMS = ", ".join(
    [
        "count(*) FILTER (WHERE outcome = ANY(%(sent)s))",
        "coalesce(sum(input_tokens), 0)::bigint",
        "coalesce(sum(cached_tokens), 0)::bigint",
        "coalesce(sum(output_tokens), 0)::bigint",
        "coalesce(sum(reasoning_tokens), 0)::bigint",
        "coalesce(sum(cost_usd), 0)::float8",
        *(
            "count(*) FILTER (WHERE outcome = '" + outcome.replace("'", "''") + "')"
            for outcome in OUTCOME_COLUMNS
        ),
    ]
)

_STATEMENTS: dict[str, str] = {
    "version_table": """
        SELECT 1 FROM pg_catalog.pg_tables
        WHERE schemaname = %(schema_name)s AND tablename = 'schema_version'""",
    "version": "SELECT coalesce(max(version), 0) FROM {schema}.schema_version",
    "lock": "SELECT pg_advisory_xact_lock(%(key)s)",
    "create_schema": "CREATE SCHEMA IF NOT EXISTS {schema}",
    "create_version_table": """
        CREATE TABLE IF NOT EXISTS {schema}.schema_version (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )""",
    "set_version": "INSERT INTO {schema}.schema_version (version) VALUES (%(version)s)",
    # Claims are pruned by age (claim_event). An index changes no row an older release reads or
    # writes, so it is added at open, idempotently, rather than as a version an older release
    # would refuse to open.
    "events_index": """
        SELECT 1 FROM pg_catalog.pg_indexes
        WHERE schemaname = %(schema_name)s AND indexname = 'events_claimed_at'""",
    "create_events_index": """
        CREATE INDEX IF NOT EXISTS events_claimed_at ON {schema}.events (claimed_at)""",
    # One customer's quota state (see _types.QuotaState): a few dozen rows however busy it
    # is, with the server's clock. Run after the customer's lock is taken, so its snapshot
    # includes every write of the previous holder.
    "quota_state": """
        SELECT 'n', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, 0, 0, 0.0, 0
        UNION ALL
        SELECT 's', second, requests, tokens, 0.0, last_us FROM {schema}.quota_seconds
        WHERE customer_id = %(customer)s AND second >= coalesce(
            %(from_second)s::bigint,
            floor(extract(epoch FROM clock_timestamp()))::bigint - %(keep_seconds)s::bigint)
        UNION ALL
        SELECT 'h', minute, requests, tokens, cost_usd, last_us FROM {schema}.quota_holds
        WHERE customer_id = %(customer)s
        UNION ALL
        SELECT 'd', day - DATE '1970-01-01', 0, tokens, cost_usd, 0 FROM {schema}.quota_days
        WHERE customer_id = %(customer)s AND day >= coalesce(
            DATE '1970-01-01' + %(from_day)s::int,
            (clock_timestamp() AT TIME ZONE 'UTC')::date - 40)""",
    "clock": "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
    # The customer's quota lock and its suspension in force, in one statement (the suspension
    # is read from the snapshot taken before the lock: standing needs no lock).
    "lock_and_standing": """
        SELECT pg_advisory_xact_lock(%(key)s)::text, s.since, s.until, s.reason
        FROM (SELECT 1) AS one LEFT JOIN {schema}.suspensions AS s
            ON s.customer_id = %(customer)s AND (s.until IS NULL OR s.until > clock_timestamp())""",
    "standing": """
        SELECT '', s.since, s.until, s.reason
        FROM (SELECT 1) AS one LEFT JOIN {schema}.suspensions AS s
            ON s.customer_id = %(customer)s AND (s.until IS NULL OR s.until > clock_timestamp())""",
    # The hold, its buckets, and the pruning of what can no longer count, in one statement;
    # never pruned past the server's clock (a caller's `now` far ahead would drop what still
    # counts for everyone else).
    "hold": """
        WITH gc AS (
            DELETE FROM {schema}.reservations
            WHERE customer_id = %(customer)s
                AND created_at < least(%(gc)s, clock_timestamp() - %(gc_age)s::interval)
        ), old_seconds AS (
            DELETE FROM {schema}.quota_seconds
            WHERE customer_id = %(customer)s AND second < least(
                %(old_second)s::bigint,
                floor(extract(epoch FROM clock_timestamp()))::bigint - %(keep_seconds)s::bigint)
        ), old_holds AS (
            DELETE FROM {schema}.quota_holds
            WHERE customer_id = %(customer)s AND minute < least(
                %(old_minute)s::bigint,
                floor(extract(epoch FROM clock_timestamp()) / 60)::bigint
                    - %(keep_minutes)s::bigint)
        ), second AS (
            INSERT INTO {schema}.quota_seconds AS q (customer_id, second, requests, tokens, last_us)
            VALUES (%(customer)s, %(second)s, 1, %(tokens)s, %(at_us)s)
            ON CONFLICT (customer_id, second) DO UPDATE SET
                requests = q.requests + 1, tokens = q.tokens + EXCLUDED.tokens,
                last_us = greatest(q.last_us, EXCLUDED.last_us)
        ), minute AS (
            INSERT INTO {schema}.quota_holds AS q
                (customer_id, minute, requests, tokens, cost_usd, last_us)
            VALUES (%(customer)s, %(minute)s, 1, %(tokens)s, %(cost)s, %(at_us)s)
            ON CONFLICT (customer_id, minute) DO UPDATE SET
                requests = q.requests + 1, tokens = q.tokens + EXCLUDED.tokens,
                cost_usd = q.cost_usd + EXCLUDED.cost_usd,
                last_us = greatest(q.last_us, EXCLUDED.last_us)
        )
        INSERT INTO {schema}.reservations (id, customer_id, created_at, tokens, cost_usd)
        VALUES (%(id)s, %(customer)s, %(now)s, %(tokens)s, %(cost)s)""",
    # A hold leaves its buckets (an emptied bucket of holds is zeroed exactly); its second
    # keeps the call with the settled tokens when %(settled)s is not null.
    "release": """
        WITH hold AS (
            DELETE FROM {schema}.reservations WHERE id = %(id)s
            RETURNING customer_id, (extract(epoch FROM created_at) * 1000000)::bigint AS at_us,
                      tokens, cost_usd
        ), minute AS (
            UPDATE {schema}.quota_holds AS q SET
                requests = greatest(q.requests - 1, 0),
                tokens = CASE WHEN q.requests <= 1 THEN 0 ELSE q.tokens - h.tokens END,
                cost_usd = CASE WHEN q.requests <= 1 THEN 0 ELSE q.cost_usd - h.cost_usd END
            FROM hold AS h
            WHERE q.customer_id = h.customer_id AND q.minute = div(h.at_us, 60000000)
        )
        UPDATE {schema}.quota_seconds AS q SET
            requests = greatest(q.requests - 1, 0), tokens = greatest(q.tokens - h.tokens, 0)
        FROM hold AS h
        WHERE q.customer_id = h.customer_id AND q.second = div(h.at_us, 1000000)""",
    # One statement: the hold goes, the record is stored once per record_id, and only a new
    # record that reached the model moves the counters: in its hold's second (settled
    # tokens), or in the second of %(quota_us)s when it settles no hold, and in its day.
    "settle": f"""
        WITH hold AS (
            DELETE FROM {{schema}}.reservations WHERE id = %(id)s
            RETURNING customer_id, (extract(epoch FROM created_at) * 1000000)::bigint AS at_us,
                      tokens, cost_usd
        ), inserted AS (
            INSERT INTO {{schema}}.usage_records ({_RECORD_COLUMNS})
            VALUES (%(record_id)s, %(customer_id)s, %(endpoint)s, %(model)s, %(outcome)s,
                    %(input_tokens)s, %(cached_tokens)s, %(output_tokens)s,
                    %(reasoning_tokens)s, %(cost_usd)s, %(latency_s)s, %(created_at)s,
                    %(request_id)s)
            ON CONFLICT (record_id) DO NOTHING
            RETURNING 1
        ), request AS (
            INSERT INTO {{schema}}.requests (request_id, customer_id)
            SELECT %(request_id_map)s::text, %(customer_id)s
            WHERE %(request_id_map)s::text IS NOT NULL
            ON CONFLICT (request_id) DO UPDATE SET customer_id = EXCLUDED.customer_id
        ), counts AS (
            SELECT EXISTS (SELECT 1 FROM inserted) AND %(counts)s AS yes
        ), minute AS (
            UPDATE {{schema}}.quota_holds AS q SET
                requests = greatest(q.requests - 1, 0),
                tokens = CASE WHEN q.requests <= 1 THEN 0 ELSE q.tokens - h.tokens END,
                cost_usd = CASE WHEN q.requests <= 1 THEN 0 ELSE q.cost_usd - h.cost_usd END
            FROM hold AS h
            WHERE q.customer_id = h.customer_id AND q.minute = div(h.at_us, 60000000)
        ), held_second AS (
            UPDATE {{schema}}.quota_seconds AS q SET
                requests = CASE WHEN c.yes THEN q.requests ELSE greatest(q.requests - 1, 0) END,
                tokens = greatest(
                    q.tokens - h.tokens + CASE WHEN c.yes THEN %(tokens)s ELSE 0 END, 0
                )
            FROM hold AS h, counts AS c
            WHERE q.customer_id = h.customer_id AND q.second = div(h.at_us, 1000000)
        ), own_second AS (
            INSERT INTO {{schema}}.quota_seconds AS q
                (customer_id, second, requests, tokens, last_us)
            SELECT %(customer_id)s, div(%(quota_us)s::bigint, 1000000), 1, %(tokens)s,
                   %(quota_us)s
            FROM counts WHERE counts.yes AND NOT EXISTS (SELECT 1 FROM hold)
            ON CONFLICT (customer_id, second) DO UPDATE SET
                requests = q.requests + 1, tokens = q.tokens + EXCLUDED.tokens,
                last_us = greatest(q.last_us, EXCLUDED.last_us)
        )
        INSERT INTO {{schema}}.quota_days AS days (customer_id, day, tokens, cost_usd)
        SELECT %(customer_id)s, DATE '1970-01-01' + %(quota_day)s::int, %(tokens)s, %(cost)s
        FROM counts WHERE counts.yes
        ON CONFLICT (customer_id, day) DO UPDATE
        SET tokens = days.tokens + EXCLUDED.tokens, cost_usd = days.cost_usd + EXCLUDED.cost_usd""",
    "records": f"""
        SELECT {_RECORD_COLUMNS} FROM {{schema}}.usage_records {{where}}
        ORDER BY created_at DESC, record_id LIMIT %(limit)s""",
    "report_sums": f"""
        SELECT customer_id, {_REPORT_SUMS} FROM {{schema}}.usage_records {{where}}
        GROUP BY customer_id""",
    "report_violations": """
        SELECT customer_id, count(*), count(*) FILTER (WHERE strike)
        FROM {schema}.violations {where} GROUP BY customer_id""",
    "report_suspended": """
        SELECT customer_id FROM {schema}.suspensions
        WHERE (until IS NULL OR until > %(now)s) {and_customer}""",
    "insert_violation": f"""
        INSERT INTO {{schema}}.violations ({_VIOLATION_COLUMNS})
        VALUES (%(customer_id)s, %(created_at)s, %(source)s, %(categories)s::text[],
                %(top_score)s, %(endpoint)s, %(detail)s, %(violation_id)s, %(strike)s)
        ON CONFLICT DO NOTHING RETURNING 1""",
    "count_violations": """
        SELECT count(*) FROM {schema}.violations
        WHERE customer_id = %(customer)s AND created_at >= %(since)s AND strike""",
    "violations": f"""
        SELECT {_VIOLATION_COLUMNS} FROM {{schema}}.violations {{where}}
        ORDER BY created_at DESC, id LIMIT %(limit)s""",
    "suspend": f"""
        INSERT INTO {{schema}}.suspensions ({_SUSPENSION_COLUMNS})
        VALUES (%(customer)s, %(since)s, %(until)s, %(reason)s)
        ON CONFLICT (customer_id) DO UPDATE
        SET since = EXCLUDED.since, until = EXCLUDED.until, reason = EXCLUDED.reason""",
    "unsuspend": """
        DELETE FROM {schema}.suspensions WHERE customer_id = %(customer)s RETURNING 1""",
    "suspension": f"""
        SELECT {_SUSPENSION_COLUMNS} FROM {{schema}}.suspensions
        WHERE customer_id = %(customer)s AND (until IS NULL OR until > %(now)s)""",
    "suspensions": f"""
        SELECT {_SUSPENSION_COLUMNS} FROM {{schema}}.suspensions
        WHERE until IS NULL OR until > %(now)s ORDER BY customer_id""",
    "remember_identifier": """
        INSERT INTO {schema}.identifiers (identifier, customer_id) VALUES (%(key)s, %(customer)s)
        ON CONFLICT (identifier) DO UPDATE SET customer_id = EXCLUDED.customer_id""",
    "customer_for_identifier": """
        SELECT customer_id FROM {schema}.identifiers WHERE identifier = %(key)s""",
    "remember_request": """
        INSERT INTO {schema}.requests (request_id, customer_id) VALUES (%(key)s, %(customer)s)
        ON CONFLICT (request_id) DO UPDATE SET customer_id = EXCLUDED.customer_id""",
    "customer_for_request": """
        SELECT customer_id FROM {schema}.requests WHERE request_id = %(key)s""",
    # Claims older than EVENT_KEEP, finished or lapsed (never a live lease), a bounded batch per
    # claim; never past the server's clock (a caller's `now` far ahead would forget what other
    # processes still need). Rows another transaction is pruning or claiming are skipped.
    "prune_events": f"""
        DELETE FROM {{schema}}.events WHERE event_id IN (
            SELECT event_id FROM {{schema}}.events
            WHERE claimed_at < least(%(now)s, clock_timestamp()) - %(keep)s
                AND (token IS NULL OR lease_until IS NULL OR lease_until <= %(now)s)
            LIMIT {EVENT_PRUNE_BATCH:d} FOR UPDATE SKIP LOCKED)""",
    # One statement: of concurrent claims, the row lock lets one insert (or take over a lapsed
    # lease) and the others see its row.
    "claim_event": """
        INSERT INTO {schema}.events AS events (event_id, claimed_at, token, lease_until)
        VALUES (%(key)s, %(now)s, %(token)s, %(until)s)
        ON CONFLICT (event_id) DO UPDATE
        SET claimed_at = EXCLUDED.claimed_at, token = EXCLUDED.token,
            lease_until = EXCLUDED.lease_until
        WHERE events.token IS NOT NULL AND events.lease_until <= %(now)s
        RETURNING 1""",
    "event_state": """
        SELECT token IS NULL FROM {schema}.events WHERE event_id = %(key)s""",
    "finish_event": """
        UPDATE {schema}.events SET token = NULL, lease_until = NULL
        WHERE event_id = %(key)s AND token = %(token)s RETURNING 1""",
    "release_event": """
        DELETE FROM {schema}.events WHERE event_id = %(key)s AND token = %(token)s""",
}

# The WHERE clauses of the listing queries, by which filters are given.
_FILTERS: dict[tuple[bool, bool], str] = {
    (False, False): "",
    (True, False): "WHERE customer_id = %(customer)s",
    (False, True): "WHERE created_at >= %(since)s",
    (True, True): "WHERE customer_id = %(customer)s AND created_at >= %(since)s",
}


class _Sql:
    """Every statement of one store, composed once with its schema."""

    def __init__(self, schema: str) -> None:
        ident = sql.Identifier(schema)
        self.schema = schema
        self.statements: dict[str, sql.Composed] = {}
        for name, text in _STATEMENTS.items():
            if "{where}" in text:
                for filters, where in _FILTERS.items():
                    self._add(f"{name}:{filters}", text, ident, where=sql.SQL(where))
            elif "{and_customer}" in text:
                self._add(f"{name}:False", text, ident, and_customer=sql.SQL(""))
                self._add(
                    f"{name}:True",
                    text,
                    ident,
                    and_customer=sql.SQL("AND customer_id = %(customer)s"),
                )
            else:
                self._add(name, text, ident)
        self.migrations = [
            [sql.SQL(cast("Any", text)).format(schema=ident) for text in step]
            for step in _MIGRATIONS
        ]

    def _add(self, name: str, text: str, ident: sql.Identifier, **parts: sql.SQL) -> None:
        # ``text`` comes from the module constants above, never from input
        self.statements[name] = sql.SQL(cast("Any", text)).format(schema=ident, **parts)

    def __getitem__(self, name: str) -> sql.Composed:
        return self.statements[name]


def _lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key, the same in every process."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# --------------------------------------------------------------------------------------------
# Operations: generators that yield statements and receive their rows, so the sync and async
# stores share every statement and decision. Each operation runs in one transaction.


@dataclass(frozen=True)
class _Query:
    statement: sql.Composed
    params: dict[str, Any]
    #: The transaction's last statement: sent together with its COMMIT.
    last: bool = False


_Rows = list[tuple[Any, ...]]
#: An operation yields a statement (and gets its rows) or several to send at once (and gets
#: the rows of each).
_Op = Generator[_Query | tuple[_Query, ...], Any, T]


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _migrate(q: _Sql) -> _Op[None]:
    if (yield _Query(q["version_table"], {"schema_name": q.schema})):
        ((version,),) = yield _Query(q["version"], {})
        if version == SCHEMA_VERSION and (
            yield _Query(q["events_index"], {"schema_name": q.schema})
        ):
            return
    # Serialise every process migrating this schema; the lock ends with the transaction.
    yield _Query(q["lock"], {"key": _lock_key("safe_openai.migrate", q.schema)})
    yield _Query(q["create_schema"], {})
    yield _Query(q["create_version_table"], {})
    ((version,),) = yield _Query(q["version"], {})
    if version > SCHEMA_VERSION:
        # written by a newer release: refuse rather than write rows it does not expect
        raise StoreError(
            f"The PostgreSQL schema {q.schema!r} has version {version}, newer than this "
            f"release supports ({SCHEMA_VERSION}); upgrade safe-openai."
        )
    for number in range(version, SCHEMA_VERSION):
        for statement in q.migrations[number]:
            yield _Query(statement, {})
        yield _Query(q["set_version"], {"version": number + 1})
    yield _Query(q["create_events_index"], {})


def _state_query(q: _Sql, customer_id: str, now: datetime | None) -> _Query:
    """The read of a customer's quota state; with ``now`` None the rows are picked on the
    server's clock, however far this host's is."""
    return _Query(
        q["quota_state"],
        {
            "customer": customer_id,
            "from_second": None if now is None else to_us(_utc(now)) // SECOND_US - KEEP_SECONDS,
            "from_day": None if now is None else day_of(to_us(_utc(now))) - 40,
            "keep_seconds": KEEP_SECONDS,
        },
    )


def _parse_state(rows: _Rows, now: datetime | None) -> tuple[QuotaState, int]:
    """The quota state in the rows of ``quota_state``, and the instant to decide at: ``now``,
    or the server's clock read with them."""
    seconds, holds, days = [], [], []
    server_us = 0
    for kind, index, requests, tokens, cost, last_us in rows:
        if kind == "n":
            server_us = int(index)
        elif kind == "s":
            seconds.append(Bucket(int(index), int(requests), int(tokens), 0.0, int(last_us)))
        elif kind == "h":
            holds.append(Bucket(int(index), int(requests), int(tokens), float(cost), int(last_us)))
        else:
            days.append(DayTotal(int(index), int(tokens), float(cost)))
    now_us = to_us(_utc(now)) if now is not None else server_us
    return QuotaState(seconds, holds, days), now_us


def _quota_usage(
    q: _Sql, customer_id: str, quota: Quota, now: datetime | None
) -> _Op[tuple[LimitUsage, ...]]:
    """A customer's usage of each limit, read in one statement without the quota lock (one
    snapshot, nothing written)."""
    if quota.is_unlimited:
        return ()
    rows = yield _state_query(q, customer_id, now)
    state, now_us = _parse_state(rows, now)
    return measure(quota, state, now_us)


def _begin_call(
    q: _Sql, customer_id: str, quota: Quota | None, demand: QuotaDemand, identifier: str | None
) -> _Op[CallStart]:
    """Standing, reservation and identifier map in one transaction, on the server's clock.
    The customer's quota lock is taken by the statement that reads its standing, sent in one
    round trip with the read of its quota state."""
    params = {"customer": customer_id}
    state_rows = None
    if quota is not None:  # a hold is written: every writer of the buckets holds the lock
        key = _lock_key("safe_openai.quota", q.schema, customer_id)
        rows, state_rows = yield (
            _Query(q["lock_and_standing"], {**params, "key": key}),
            _state_query(q, customer_id, None),
        )
    else:
        rows = yield _Query(q["standing"], params)
    if identifier is not None:
        yield from _remember(q, "remember_identifier", identifier, customer_id)
    found = [row for row in rows if row[1] is not None]
    if found:
        return CallStart(_suspension_from_row((customer_id, *found[0][1:])), None)
    if quota is None:
        return CallStart(None, None)
    return CallStart(
        None, (yield from _reserve(q, customer_id, quota, demand, None, state_rows=state_rows))
    )


def _reserve(
    q: _Sql,
    customer_id: str,
    quota: Quota,
    demand: QuotaDemand,
    now: datetime | None,
    *,
    state_rows: list[tuple[Any, ...]] | None = None,
) -> _Op[Reservation]:
    """Decide and hold a reservation: with ``now`` None on the server's clock."""
    if state_rows is not None:
        rows = state_rows  # read by the caller, under the customer's lock
    else:
        # Held until commit: every replica deciding for this customer waits its turn, and the
        # key needs no row, so a customer's very first calls are serialised too; the hold
        # writes the customer's buckets, so it is taken without limits too. The lock and the
        # read go in one round trip: the read's snapshot is taken when it starts, after the
        # lock is granted.
        key = _lock_key("safe_openai.quota", q.schema, customer_id)
        _, rows = yield (_Query(q["lock"], {"key": key}), _state_query(q, customer_id, now))
    state, now_us = _parse_state(rows, now)
    usage: tuple[LimitUsage, ...] = ()
    if not quota.is_unlimited:
        limit, retry_after, usage = assess(quota, demand, state, now_us)
        if limit is not None:
            return Reservation("", customer_id, False, limit, retry_after, usage=usage)
    reservation_id = uuid.uuid4().hex
    at = from_us(now_us)
    yield _Query(
        q["hold"],
        last=True,
        params={
            "id": reservation_id,
            "customer": customer_id,
            "now": at,
            "at_us": now_us,
            "second": now_us // SECOND_US,
            "minute": now_us // MINUTE_US,
            "tokens": int(demand.tokens),
            "cost": float(demand.cost_usd),
            "gc": at - _PENDING_GC,
            "gc_age": _PENDING_GC,
            "old_second": now_us // SECOND_US - KEEP_SECONDS,
            "old_minute": now_us // MINUTE_US - KEEP_HOLD_MINUTES,
            "keep_seconds": KEEP_SECONDS,
            "keep_minutes": KEEP_HOLD_MINUTES,
        },
    )
    return Reservation(reservation_id, customer_id, True, at=at, usage=usage)


def _record_params(record: UsageRecord) -> dict[str, Any]:
    tokens = record.tokens
    return {
        "sent": _SENT,
        "record_id": record.record_id or uuid.uuid4().hex,
        "customer_id": record.customer_id,
        "endpoint": record.endpoint,
        "model": record.model,
        "outcome": record.outcome,
        "input_tokens": tokens.input_tokens,
        "cached_tokens": tokens.cached_tokens,
        "output_tokens": tokens.output_tokens,
        "reasoning_tokens": tokens.reasoning_tokens,
        "cost_usd": record.cost_usd,
        "latency_s": record.latency_s,
        "created_at": _utc(record.created_at),
        "request_id": record.request_id,
    }


def _violation_from_row(row: Sequence[Any]) -> Violation:
    return Violation(
        customer_id=row[0],
        created_at=_utc(row[1]),
        source=row[2],
        categories=tuple(row[3]),
        top_score=row[4],
        endpoint=row[5],
        detail=row[6],
        violation_id=row[7] or "",
        strike=bool(row[8]),
    )


def _suspension_from_row(row: Sequence[Any]) -> Suspension:
    return Suspension(
        customer_id=row[0],
        since=_utc(row[1]),
        until=None if row[2] is None else _utc(row[2]),
        reason=row[3],
    )


def _settle_params(
    reservation: Reservation | None, record: UsageRecord, request_id: str | None = None
) -> dict[str, Any]:
    when = reservation.at if reservation is not None and reservation.at else record.created_at
    quota_us = to_us(_utc(when))
    return {
        **_record_params(record),
        "id": reservation.id if reservation is not None else "",
        "counts": record.counts_as_request,
        "tokens": record.tokens.total_tokens,
        "cost": float(record.cost_usd or 0.0),
        "quota_us": quota_us,
        "quota_day": day_of(quota_us),
        "request_id_map": request_id or None,
    }


def _locks(q: _Sql, *customers: str) -> tuple[_Query, ...]:
    """The customers' quota locks (in one order, so two writers never wait on each other
    crosswise). Every writer of a customer's buckets takes its lock first: a reservation locks
    its second's bucket and then its minute's, a settle the minute's and then the second's, so
    without it the two deadlock."""
    keys = sorted({_lock_key("safe_openai.quota", q.schema, c) for c in customers})
    return tuple(_Query(q["lock"], {"key": key}) for key in keys)


def _commit(
    q: _Sql, reservation: Reservation | None, record: UsageRecord, request_id: str | None = None
) -> _Op[None]:
    """The locks, the statement and COMMIT go in one round trip (pipeline mode)."""
    if reservation is not None and reservation.id and reservation.customer_id != record.customer_id:
        # a hold of another customer is released, not settled by this record
        yield (
            *_locks(q, reservation.customer_id, record.customer_id),
            _Query(q["release"], {"id": reservation.id}),
            _Query(q["settle"], _settle_params(None, record, request_id), last=True),
        )
        return
    yield (
        *_locks(q, record.customer_id),
        _Query(q["settle"], _settle_params(reservation, record, request_id), last=True),
    )


def _release(q: _Sql, reservation: Reservation) -> _Op[None]:
    if reservation.id:
        yield (
            *_locks(q, reservation.customer_id),
            _Query(q["release"], {"id": reservation.id}, last=True),
        )


def _record_usage(q: _Sql, record: UsageRecord) -> _Op[None]:
    yield (
        *_locks(q, record.customer_id),
        _Query(q["settle"], _settle_params(None, record), last=True),
    )


def _filters(customer_id: str | None, since: datetime | None) -> tuple[str, dict[str, Any]]:
    key = str((customer_id is not None, since is not None))
    params: dict[str, Any] = {"customer": customer_id, "since": None if since is None else since}
    return key, params


def _usage_records(
    q: _Sql, customer_id: str | None, since: datetime | None, limit: int
) -> _Op[list[UsageRecord]]:
    key, params = _filters(customer_id, since)
    rows = yield _Query(q[f"records:{key}"], {**params, "limit": max(limit, 0)})
    return [record_from_row(row, _utc) for row in rows]


def _usage_report(
    q: _Sql, since: datetime | None, customer_id: str | None
) -> _Op[list[CustomerReport]]:
    key, params = _filters(customer_id, since)
    rows = yield _Query(q[f"report_sums:{key}"], {**params, "sent": _SENT})
    sums: dict[str, dict[str, float | int]] = {
        row[0]: dict(zip(_REPORT_KEYS, row[1:], strict=True)) for row in rows
    }
    rows = yield _Query(q[f"report_violations:{key}"], params)
    violations = {str(customer): int(count) for customer, count, _ in rows}
    strikes = {str(customer): int(struck) for customer, _, struck in rows}
    rows = yield _Query(
        q[f"report_suspended:{customer_id is not None}"],
        {"customer": customer_id, "now": datetime.now(timezone.utc)},
    )
    suspended = {str(row[0]) for row in rows}
    return finish_report(sums, violations, suspended, strikes)


def _record_violation(q: _Sql, violation: Violation) -> _Op[bool]:
    rows = yield _Query(
        q["insert_violation"],
        {
            "customer_id": violation.customer_id,
            "created_at": _utc(violation.created_at),
            "source": violation.source,
            "categories": list(violation.categories),
            "top_score": violation.top_score,
            "endpoint": violation.endpoint,
            "detail": violation.detail,
            "violation_id": violation.violation_id or None,
            "strike": bool(violation.strike),
        },
    )
    return bool(rows)


def _count_violations(q: _Sql, customer_id: str, since: datetime) -> _Op[int]:
    ((count,),) = yield _Query(q["count_violations"], {"customer": customer_id, "since": since})
    return int(count)


def _violations(
    q: _Sql, customer_id: str | None, since: datetime | None, limit: int
) -> _Op[list[Violation]]:
    key, params = _filters(customer_id, since)
    rows = yield _Query(q[f"violations:{key}"], {**params, "limit": max(limit, 0)})
    return [_violation_from_row(row) for row in rows]


def _suspend(
    q: _Sql, customer_id: str, reason: str, until: datetime | None, now: datetime
) -> _Op[None]:
    yield _Query(
        q["suspend"],
        {"customer": customer_id, "since": now, "until": until, "reason": reason},
    )


def _unsuspend(q: _Sql, customer_id: str) -> _Op[bool]:
    return bool((yield _Query(q["unsuspend"], {"customer": customer_id})))


def _suspension(q: _Sql, customer_id: str, now: datetime) -> _Op[Suspension | None]:
    rows = yield _Query(q["suspension"], {"customer": customer_id, "now": now})
    return _suspension_from_row(rows[0]) if rows else None


def _suspensions(q: _Sql, now: datetime) -> _Op[list[Suspension]]:
    rows = yield _Query(q["suspensions"], {"now": now})
    return [_suspension_from_row(row) for row in rows]


def _remember(q: _Sql, statement: str, key: str, customer_id: str) -> _Op[None]:
    yield _Query(q[statement], {"key": key, "customer": customer_id})


def _lookup(q: _Sql, statement: str, key: str) -> _Op[str | None]:
    rows = yield _Query(q[statement], {"key": key})
    return str(rows[0][0]) if rows else None


def _claim_event(
    q: _Sql, event_id: str, token: str, now: datetime, lease: timedelta
) -> _Op[EventClaim]:
    now = _utc(now)
    params = {"key": event_id, "token": token, "now": now, "until": now + lease}
    _, claimed = yield (
        _Query(q["prune_events"], {"now": now, "keep": EVENT_KEEP}),
        _Query(q["claim_event"], params),
    )
    if claimed:
        return "claimed"
    rows = yield _Query(q["event_state"], {"key": event_id})
    # no row: released between the two statements; whoever released it wants a retry to act
    return "done" if rows and rows[0][0] else "held"


def _finish_event(q: _Sql, event_id: str, token: str) -> _Op[bool]:
    return bool((yield _Query(q["finish_event"], {"key": event_id, "token": token})))


def _release_event(q: _Sql, event_id: str, token: str) -> _Op[None]:
    yield _Query(q["release_event"], {"key": event_id, "token": token})


# --------------------------------------------------------------------------------------------
# The stores


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        # psycopg messages carry the server's text, never the password
        hint = ""
        if "statement pooling mode" in str(exc):
            hint = " (PgBouncer's statement pooling is not supported: use transaction pooling)"
        raise StoreError(
            f"The PostgreSQL usage store failed: {type(exc).__name__}: {exc}{hint}"
        ) from exc


def _conninfo(url: str) -> str:
    """libpq takes ``postgresql://`` and ``postgres://``, not SQLAlchemy's ``+driver`` suffix."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def _identity(conninfo: str, connect_kwargs: dict[str, Any], schema: str) -> str:
    """Where the data lives: server, port, database and schema, never the user or password."""
    try:
        params = conninfo_to_dict(conninfo, **connect_kwargs)
    except (psycopg.Error, TypeError, ValueError):
        params = {}
    host = params.get("host") or params.get("hostaddr") or ""
    database = params.get("dbname") or params.get("user") or ""
    return f"postgresql://{host}:{params.get('port') or 5432}/{database}#schema={schema}"


def _split_url(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The libpq URL without the store's own query options, and the options merged.

    Raises:
        ConfigurationError: An option is malformed, or given in the URL and as a keyword
            with different values.
    """
    parts = urlsplit(_conninfo(url))
    kept: list[tuple[str, str]] = []
    merged = dict(options)
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _URL_OPTIONS:
            kept.append((name, raw))
            continue
        try:
            value = _URL_OPTIONS[name](raw)
        except ValueError:
            raise ConfigurationError(
                f"{name}={raw!r} in the PostgreSQL URL is not valid."
            ) from None
        keyword = _URL_KEYWORDS.get(name, name)
        if keyword in options and options[keyword] != value:
            raise ConfigurationError(
                f"{name} is given both in the PostgreSQL URL and as a keyword, differently."
            )
        merged[keyword] = value
    if len(kept) == len(parse_qsl(parts.query, keep_blank_values=True)):
        return _conninfo(url), merged  # nothing of ours in the query: the URL as it was
    # libpq decodes %XX but not '+', so spaces must be written %20
    return urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote))), merged


def _check_schema(schema: str) -> str:
    if not schema or len(schema.encode()) > 63:
        raise ConfigurationError("The PostgreSQL schema name must have 1 to 63 bytes.")
    return schema


def _check_sizes(min_size: int, max_size: int, timeout: float) -> None:
    if min_size < 0 or max_size < max(min_size, 1):
        raise ConfigurationError("Pool sizes need 0 <= min_size <= max_size and max_size >= 1.")
    if timeout <= 0:
        raise ConfigurationError("timeout must be > 0 seconds.")


class PostgresStore:
    """A usage store in PostgreSQL, shared by every process and host that uses the database.

    Nothing connects until the first call, which opens the pool and creates or migrates the
    schema. See the module documentation for the locking that keeps quotas exact.

    Args:
        conninfo: A libpq connection string or ``postgresql://`` URL.
        schema: The schema holding every table (created when missing).
        min_size: Connections the pool keeps open.
        max_size: Connections the pool may open.
        timeout: Seconds a call waits for a connection before :class:`~safe_openai.StoreError`.
        prepare_threshold: psycopg's: prepare a statement on the server after this many
            executions on one connection; ``None`` (the default) never does, which a pooler
            in transaction mode needs. See the module documentation.
        **connect_kwargs: Passed to ``psycopg.connect`` for each pooled connection.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
        **connect_kwargs: Any,
    ) -> None:
        _check_sizes(min_size, max_size, timeout)
        self.schema = _check_schema(schema)
        #: Names this store's data (the spool is kept per identity).
        self.identity = _identity(conninfo, connect_kwargs, schema)
        self._sql = _Sql(schema)
        self._timeout = float(timeout)
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs={**connect_kwargs, "prepare_threshold": prepare_threshold},
            open=False,
            name=f"safe_openai:{schema}",
        )
        self._lock = threading.Lock()
        self._ready = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        """Open a store from a ``postgresql://`` or ``postgres://`` URL (connects on first use).

        Args:
            url: The database URL, e.g. ``postgresql://app@db.internal:5432/app``.
            **options: The keyword arguments of :class:`PostgresStore`.
        """
        conninfo, merged = _split_url(url, options)
        return cls(conninfo, **merged)

    def _execute(self, op: _Op[T]) -> T:
        with self._pool.connection(timeout=self._timeout) as conn:
            try:
                step: Any = next(op)
                while True:
                    queries = step if isinstance(step, tuple) else (step,)
                    # several statements at once, or a last one with its COMMIT, go out in one
                    # round trip (pipeline mode)
                    piped = len(queries) > 1 or queries[-1].last
                    with conn.pipeline() if piped else contextlib.nullcontext():
                        cursors = [conn.execute(q.statement, q.params) for q in queries]
                        if queries[-1].last:
                            conn.commit()
                    rows = [c.fetchall() if c.description is not None else [] for c in cursors]
                    step = op.send(rows if isinstance(step, tuple) else rows[0])
            except StopIteration as done:
                # leaving the `connection()` block commits the transaction (if still open)
                result: T = done.value
                return result

    def _run(self, op: _Op[T]) -> T:
        with _store_errors():
            if not self._ready:
                with self._lock:
                    if not self._ready:
                        self._pool.open(wait=False)
                        self._execute(_migrate(self._sql))
                        self._ready = True
            return self._execute(op)

    def reserve(
        self,
        customer_id: str,
        quota: Quota,
        demand: QuotaDemand,
        *,
        now: datetime | None = None,
    ) -> Reservation:
        """Atomically check ``demand`` against ``quota`` and, if admitted, hold it as pending.

        ``now`` defaults to the server's clock (``clock_timestamp()``), shared by every replica.
        """
        return self._run(_reserve(self._sql, customer_id, quota, demand, now))

    def quota_usage(
        self, customer_id: str, quota: Quota, *, now: datetime | None = None
    ) -> tuple[LimitUsage, ...]:
        """What the customer has used of each limit ``quota`` sets at ``now`` (default: the
        server's clock), pending holds included. One read: no lock, nothing held."""
        return self._run(_quota_usage(self._sql, customer_id, quota, now))

    def begin_call(
        self,
        customer_id: str,
        quota: Quota | None,
        demand: QuotaDemand,
        *,
        identifier: str | None = None,
    ) -> CallStart:
        """Standing, reservation (on the server's clock) and identifier map of a call about to
        be sent, in one transaction. A suspended customer gets no reservation."""
        return self._run(_begin_call(self._sql, customer_id, quota, demand, identifier))

    def finish_call(
        self, reservation: Reservation | None, record: UsageRecord, *, request_id: str | None = None
    ) -> None:
        """Settle a call in one statement: commit (or record) its usage, map its request id."""
        self._run(_commit(self._sql, reservation, record, request_id))

    def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        self._run(_commit(self._sql, reservation, record))

    def release(self, reservation: Reservation) -> None:
        self._run(_release(self._sql, reservation))

    def record_usage(self, record: UsageRecord) -> None:
        self._run(_record_usage(self._sql, record))

    def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        return self._run(_usage_records(self._sql, customer_id, since, limit))

    def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        return self._run(_usage_report(self._sql, since, customer_id))

    def record_violation(self, violation: Violation) -> bool:
        return self._run(_record_violation(self._sql, violation))

    def count_violations(self, customer_id: str, *, since: datetime) -> int:
        return self._run(_count_violations(self._sql, customer_id, since))

    def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        return self._run(_violations(self._sql, customer_id, since, limit))

    def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        self._run(_suspend(self._sql, customer_id, reason, until, now))

    def unsuspend(self, customer_id: str) -> bool:
        return self._run(_unsuspend(self._sql, customer_id))

    def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        return self._run(_suspension(self._sql, customer_id, now))

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        return self._run(_suspensions(self._sql, now))

    def remember_identifier(self, identifier: str, customer_id: str) -> None:
        self._run(_remember(self._sql, "remember_identifier", identifier, customer_id))

    def customer_for_identifier(self, identifier: str) -> str | None:
        return self._run(_lookup(self._sql, "customer_for_identifier", identifier))

    def remember_request(self, request_id: str, customer_id: str) -> None:
        self._run(_remember(self._sql, "remember_request", request_id, customer_id))

    def customer_for_request(self, request_id: str) -> str | None:
        return self._run(_lookup(self._sql, "customer_for_request", request_id))

    def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        return self._run(_claim_event(self._sql, event_id, token, now, lease))

    def finish_event(self, event_id: str, *, token: str) -> bool:
        return self._run(_finish_event(self._sql, event_id, token))

    def release_event(self, event_id: str, *, token: str) -> None:
        self._run(_release_event(self._sql, event_id, token))

    def close(self) -> None:
        """Close the connection pool."""
        with _store_errors():
            self._pool.close()


class AsyncPostgresStore:
    """The asyncio twin of :class:`PostgresStore` (``AsyncConnectionPool``), same SQL.

    Args:
        conninfo: A libpq connection string or ``postgresql://`` URL.
        schema: The schema holding every table.
        min_size: Connections the pool keeps open.
        max_size: Connections the pool may open.
        timeout: Seconds a call waits for a connection before :class:`~safe_openai.StoreError`.
        prepare_threshold: As for :class:`PostgresStore`.
        **connect_kwargs: Passed to ``psycopg.AsyncConnection.connect``.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        prepare_threshold: int | None = DEFAULT_PREPARE_THRESHOLD,
        **connect_kwargs: Any,
    ) -> None:
        _check_sizes(min_size, max_size, timeout)
        self.schema = _check_schema(schema)
        #: Names this store's data (the spool is kept per identity).
        self.identity = _identity(conninfo, connect_kwargs, schema)
        self._sql = _Sql(schema)
        self._timeout = float(timeout)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = (
            AsyncConnectionPool(
                conninfo,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                kwargs={**connect_kwargs, "prepare_threshold": prepare_threshold},
                open=False,
                name=f"safe_openai:{schema}",
            )
        )
        # created on first use, inside the event loop that uses the store
        self._lock: asyncio.Lock | None = None
        self._ready = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncPostgresStore:
        """Open a store from a ``postgresql://`` or ``postgres://`` URL (connects on first use).

        Args:
            url: The database URL.
            **options: The keyword arguments of :class:`AsyncPostgresStore`.
        """
        conninfo, merged = _split_url(url, options)
        return cls(conninfo, **merged)

    async def _execute(self, op: _Op[T]) -> T:
        async with self._pool.connection(timeout=self._timeout) as conn:
            try:
                step: Any = next(op)
                while True:
                    queries = step if isinstance(step, tuple) else (step,)
                    piped = len(queries) > 1 or queries[-1].last
                    cursors = []
                    if piped:
                        async with conn.pipeline():
                            for q in queries:
                                cursors.append(await conn.execute(q.statement, q.params))
                            if queries[-1].last:
                                await conn.commit()
                    else:
                        for q in queries:
                            cursors.append(await conn.execute(q.statement, q.params))
                    rows = [
                        await c.fetchall() if c.description is not None else [] for c in cursors
                    ]
                    step = op.send(rows if isinstance(step, tuple) else rows[0])
            except StopIteration as done:
                result: T = done.value
                return result

    async def _run(self, op: _Op[T]) -> T:
        with _store_errors():
            if not self._ready:
                if self._lock is None:
                    self._lock = asyncio.Lock()
                async with self._lock:
                    if not self._ready:
                        await self._pool.open(wait=False)
                        await self._execute(_migrate(self._sql))
                        self._ready = True
            return await self._execute(op)

    async def reserve(
        self,
        customer_id: str,
        quota: Quota,
        demand: QuotaDemand,
        *,
        now: datetime | None = None,
    ) -> Reservation:
        """Atomically check ``demand`` against ``quota`` and, if admitted, hold it as pending.

        ``now`` defaults to the server's clock (``clock_timestamp()``), shared by every replica.
        """
        return await self._run(_reserve(self._sql, customer_id, quota, demand, now))

    async def quota_usage(
        self, customer_id: str, quota: Quota, *, now: datetime | None = None
    ) -> tuple[LimitUsage, ...]:
        """What the customer has used of each limit ``quota`` sets at ``now`` (default: the
        server's clock), pending holds included. One read: no lock, nothing held."""
        return await self._run(_quota_usage(self._sql, customer_id, quota, now))

    async def begin_call(
        self,
        customer_id: str,
        quota: Quota | None,
        demand: QuotaDemand,
        *,
        identifier: str | None = None,
    ) -> CallStart:
        """Standing, reservation (on the server's clock) and identifier map of a call about to
        be sent, in one transaction. A suspended customer gets no reservation."""
        return await self._run(_begin_call(self._sql, customer_id, quota, demand, identifier))

    async def finish_call(
        self, reservation: Reservation | None, record: UsageRecord, *, request_id: str | None = None
    ) -> None:
        """Settle a call in one statement: commit (or record) its usage, map its request id."""
        await self._run(_commit(self._sql, reservation, record, request_id))

    async def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        await self._run(_commit(self._sql, reservation, record))

    async def release(self, reservation: Reservation) -> None:
        await self._run(_release(self._sql, reservation))

    async def record_usage(self, record: UsageRecord) -> None:
        await self._run(_record_usage(self._sql, record))

    async def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        return await self._run(_usage_records(self._sql, customer_id, since, limit))

    async def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        return await self._run(_usage_report(self._sql, since, customer_id))

    async def record_violation(self, violation: Violation) -> bool:
        return await self._run(_record_violation(self._sql, violation))

    async def count_violations(self, customer_id: str, *, since: datetime) -> int:
        return await self._run(_count_violations(self._sql, customer_id, since))

    async def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        return await self._run(_violations(self._sql, customer_id, since, limit))

    async def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        await self._run(_suspend(self._sql, customer_id, reason, until, now))

    async def unsuspend(self, customer_id: str) -> bool:
        return await self._run(_unsuspend(self._sql, customer_id))

    async def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        return await self._run(_suspension(self._sql, customer_id, now))

    async def suspensions(self, *, now: datetime) -> list[Suspension]:
        return await self._run(_suspensions(self._sql, now))

    async def remember_identifier(self, identifier: str, customer_id: str) -> None:
        await self._run(_remember(self._sql, "remember_identifier", identifier, customer_id))

    async def customer_for_identifier(self, identifier: str) -> str | None:
        return await self._run(_lookup(self._sql, "customer_for_identifier", identifier))

    async def remember_request(self, request_id: str, customer_id: str) -> None:
        await self._run(_remember(self._sql, "remember_request", request_id, customer_id))

    async def customer_for_request(self, request_id: str) -> str | None:
        return await self._run(_lookup(self._sql, "customer_for_request", request_id))

    async def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        return await self._run(_claim_event(self._sql, event_id, token, now, lease))

    async def finish_event(self, event_id: str, *, token: str) -> bool:
        return await self._run(_finish_event(self._sql, event_id, token))

    async def release_event(self, event_id: str, *, token: str) -> None:
        await self._run(_release_event(self._sql, event_id, token))

    async def close(self) -> None:
        """Close the connection pool."""
        with _store_errors():
            await self._pool.close()
