"""The PostgreSQL store: usage, quotas and enforcement state shared by every replica.

Open it with ``store_from_url("postgresql://user@host/db", schema="safe_openai")``. Options:
``schema`` (every table lives in it), ``min_size`` / ``max_size`` (the connection pool),
``timeout`` (seconds to wait for a pooled connection before :class:`~safe_openai.StoreError`);
any other keyword is passed to ``psycopg.connect`` (``connect_timeout``, ``sslmode``, ...).

The schema is created and migrated by the library on first use. :data:`_MIGRATIONS` is an
ordered list of steps; ``<schema>.schema_version`` records the ones applied. Many processes
starting at once serialise on a transaction-scoped advisory lock, so each step runs once.

Quota reservations are atomic across processes and hosts: each takes
``pg_advisory_xact_lock`` on a key derived from the schema and the customer (no row has to
exist, so a customer first seen by many replicas at once still gets exactly its quota), reads
its windows in one statement and inserts its hold before the transaction ends. The decision is
:func:`~safe_openai.stores._types.evaluate_quota` itself. ``commit`` swaps the hold for the usage
record in one transaction, so a concurrent reservation sees one or the other, never both or
neither.

Times are ``timestamptz`` (microseconds, like Python). ``usage_report`` reads
``usage_records`` through indexes on ``(customer_id, created_at)`` and ``created_at``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar, cast

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from ..errors import ConfigurationError, StoreError
from ..policy import Quota
from ..usage import SENT_OUTCOMES, UsageRecord
from ._types import (
    CLOCK_SKEW,
    MINUTE,
    OUTCOME_COLUMNS,
    RESERVATION_TTL,
    CustomerReport,
    QuotaDemand,
    Reservation,
    Suspension,
    Violation,
    WindowEntry,
    day_start,
    evaluate_quota,
    finish_report,
    month_start,
    record_from_row,
)

__all__ = ["DEFAULT_SCHEMA", "SCHEMA_VERSION", "AsyncPostgresStore", "PostgresStore"]

T = TypeVar("T")

#: The schema used when none is given.
DEFAULT_SCHEMA = "safe_openai"
DEFAULT_MIN_SIZE = 1
DEFAULT_MAX_SIZE = 10
#: Seconds to wait for a pooled connection (an unreachable server fails after this long).
DEFAULT_TIMEOUT = 10.0
#: Holds older than this are deleted. Longer than the TTL, so a replica whose clock runs a
#: little ahead never deletes a hold the others still count.
_PENDING_GC = RESERVATION_TTL + timedelta(hours=1)

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
_VIOLATION_COLUMNS = "customer_id, created_at, source, categories, top_score, endpoint, detail"
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
    # One statement, so one snapshot: a concurrent commit (hold -> record) is seen entirely
    # before or entirely after, never counted twice or not at all. The minute window (with
    # entries stamped up to CLOCK_SKEW after now) comes row by row, since retry_after depends
    # on each time;
    # the rest of the month comes as sums
    # anchored where evaluate_quota counts them as it would the rows: day tokens and cost at
    # midnight, older cost at the month start, all before the minute window. Whole days
    # before the minute window's day come from quota_days; only records since then are read.
    "window": """
        WITH entries AS (
            SELECT created_at AS at, input_tokens + output_tokens AS tokens,
                   coalesce(cost_usd, 0)::float8 AS cost
            FROM {schema}.usage_records
            WHERE customer_id = %(customer)s AND outcome = ANY(%(sent)s)
                AND created_at >= %(records_from)s AND created_at <= %(horizon)s
            UNION ALL
            SELECT created_at, tokens, cost_usd FROM {schema}.reservations
            WHERE customer_id = %(customer)s AND created_at > %(stale)s
                AND created_at >= %(reservations_from)s AND created_at <= %(horizon)s
        )
        SELECT at, tokens, cost FROM entries WHERE at > %(minute_from)s
        UNION ALL
        SELECT %(today)s, sum(tokens)::bigint, sum(cost)::float8 FROM entries
        WHERE at <= %(minute_from)s AND at >= %(today)s HAVING count(*) > 0
        UNION ALL
        SELECT %(month)s, 0, sum(cost)::float8 FROM entries
        WHERE at <= %(minute_from)s AND at < %(today)s AND at >= %(month)s
        HAVING count(*) > 0
        UNION ALL
        SELECT %(month)s, 0, sum(cost_usd)::float8 FROM {schema}.quota_days
        WHERE customer_id = %(customer)s AND day >= %(month_day)s AND day < %(days_before)s
        HAVING count(*) > 0""",
    "hold": """
        WITH gc AS (
            DELETE FROM {schema}.reservations
            WHERE customer_id = %(customer)s AND created_at < %(gc)s
        )
        INSERT INTO {schema}.reservations (id, customer_id, created_at, tokens, cost_usd)
        VALUES (%(id)s, %(customer)s, %(now)s, %(tokens)s, %(cost)s)""",
    "drop_hold": "DELETE FROM {schema}.reservations WHERE id = %(id)s",
    # One statement: the record and its quota day are written together or not at all, and a
    # record_id already stored adds nothing.
    "insert_record": f"""
        WITH inserted AS (
            INSERT INTO {{schema}}.usage_records ({_RECORD_COLUMNS})
            VALUES (%(record_id)s, %(customer_id)s, %(endpoint)s, %(model)s, %(outcome)s,
                    %(input_tokens)s, %(cached_tokens)s, %(output_tokens)s,
                    %(reasoning_tokens)s, %(cost_usd)s, %(latency_s)s, %(created_at)s,
                    %(request_id)s)
            ON CONFLICT (record_id) DO NOTHING
            RETURNING customer_id, created_at, outcome, input_tokens + output_tokens AS tokens,
                      coalesce(cost_usd, 0)::float8 AS cost
        )
        INSERT INTO {{schema}}.quota_days AS days (customer_id, day, tokens, cost_usd)
        SELECT customer_id, (created_at AT TIME ZONE 'UTC')::date, tokens, cost FROM inserted
        WHERE outcome = ANY(%(sent)s)
        ON CONFLICT (customer_id, day) DO UPDATE
        SET tokens = days.tokens + EXCLUDED.tokens, cost_usd = days.cost_usd + EXCLUDED.cost_usd""",
    "records": f"""
        SELECT {_RECORD_COLUMNS} FROM {{schema}}.usage_records {{where}}
        ORDER BY created_at DESC, record_id LIMIT %(limit)s""",
    "report_sums": f"""
        SELECT customer_id, {_REPORT_SUMS} FROM {{schema}}.usage_records {{where}}
        GROUP BY customer_id""",
    "report_violations": """
        SELECT customer_id, count(*) FROM {schema}.violations {where} GROUP BY customer_id""",
    "report_suspended": """
        SELECT customer_id FROM {schema}.suspensions
        WHERE (until IS NULL OR until > %(now)s) {and_customer}""",
    "insert_violation": f"""
        INSERT INTO {{schema}}.violations ({_VIOLATION_COLUMNS})
        VALUES (%(customer_id)s, %(created_at)s, %(source)s, %(categories)s::text[],
                %(top_score)s, %(endpoint)s, %(detail)s)""",
    "count_violations": """
        SELECT count(*) FROM {schema}.violations
        WHERE customer_id = %(customer)s AND created_at >= %(since)s""",
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
    "claim_event": """
        INSERT INTO {schema}.events (event_id) VALUES (%(key)s)
        ON CONFLICT (event_id) DO NOTHING RETURNING 1""",
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


_Rows = list[tuple[Any, ...]]
_Op = Generator[_Query, _Rows, T]


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _migrate(q: _Sql) -> _Op[None]:
    if (yield _Query(q["version_table"], {"schema_name": q.schema})):
        ((version,),) = yield _Query(q["version"], {})
        if version == SCHEMA_VERSION:
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


def _reserve(
    q: _Sql, customer_id: str, quota: Quota, demand: QuotaDemand, now: datetime
) -> _Op[Reservation]:
    now = _utc(now)
    entries: list[WindowEntry] = []
    if not quota.is_unlimited:
        # Held until commit: every replica deciding for this customer waits its turn, and the
        # key needs no row, so a customer's very first calls are serialised too.
        yield _Query(q["lock"], {"key": _lock_key("safe_openai.quota", q.schema, customer_id)})
        minute_from = now - timedelta(seconds=MINUTE)
        today, this_month = day_start(now), month_start(now)
        # Records are read from the start of the minute window's day (yesterday during the
        # first minute of a day) but never from after the window's start; the whole days
        # before that come from quota_days, when the monthly limit needs them.
        records_from = min(minute_from, max(day_start(minute_from), this_month))
        if quota.usd_per_month is None and quota.tokens_per_day is None:
            records_from = minute_from
        rows = yield _Query(
            q["window"],
            {
                "customer": customer_id,
                "sent": _SENT,
                "records_from": records_from,
                "reservations_from": min(minute_from, this_month),
                "horizon": now + CLOCK_SKEW,
                "stale": now - RESERVATION_TTL,
                "minute_from": minute_from,
                "today": today,
                "month": this_month,
                "month_day": this_month.date(),
                # no day qualifies unless the monthly limit is set
                "days_before": (
                    records_from.date() if quota.usd_per_month is not None else this_month.date()
                ),
            },
        )
        entries = [WindowEntry(_utc(at), int(tokens), float(cost)) for at, tokens, cost in rows]
    limit, retry_after = evaluate_quota(quota, demand, entries, now)
    if limit is not None:
        return Reservation("", customer_id, False, limit, retry_after)
    reservation_id = uuid.uuid4().hex
    yield _Query(
        q["hold"],
        {
            "id": reservation_id,
            "customer": customer_id,
            "now": now,
            "tokens": int(demand.tokens),
            "cost": float(demand.cost_usd),
            "gc": now - _PENDING_GC,
        },
    )
    return Reservation(reservation_id, customer_id, True)


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
    )


def _suspension_from_row(row: Sequence[Any]) -> Suspension:
    return Suspension(
        customer_id=row[0],
        since=_utc(row[1]),
        until=None if row[2] is None else _utc(row[2]),
        reason=row[3],
    )


def _commit(q: _Sql, reservation: Reservation, record: UsageRecord) -> _Op[None]:
    if reservation.id:
        yield _Query(q["drop_hold"], {"id": reservation.id})
    yield _Query(q["insert_record"], _record_params(record))


def _release(q: _Sql, reservation: Reservation) -> _Op[None]:
    if reservation.id:
        yield _Query(q["drop_hold"], {"id": reservation.id})


def _record_usage(q: _Sql, record: UsageRecord) -> _Op[None]:
    yield _Query(q["insert_record"], _record_params(record))


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
    violations = {str(customer): int(count) for customer, count in rows}
    rows = yield _Query(
        q[f"report_suspended:{customer_id is not None}"],
        {"customer": customer_id, "now": datetime.now(timezone.utc)},
    )
    suspended = {str(row[0]) for row in rows}
    return finish_report(sums, violations, suspended)


def _record_violation(q: _Sql, violation: Violation) -> _Op[None]:
    yield _Query(
        q["insert_violation"],
        {
            "customer_id": violation.customer_id,
            "created_at": _utc(violation.created_at),
            "source": violation.source,
            "categories": list(violation.categories),
            "top_score": violation.top_score,
            "endpoint": violation.endpoint,
            "detail": violation.detail,
        },
    )


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


def _claim_event(q: _Sql, event_id: str) -> _Op[bool]:
    return bool((yield _Query(q["claim_event"], {"key": event_id})))


# --------------------------------------------------------------------------------------------
# The stores


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        # psycopg messages carry the server's text, never the password
        raise StoreError(f"The PostgreSQL usage store failed: {type(exc).__name__}: {exc}") from exc


def _conninfo(url: str) -> str:
    """libpq takes ``postgresql://`` and ``postgres://``, not SQLAlchemy's ``+driver`` suffix."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


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
        **connect_kwargs: Any,
    ) -> None:
        _check_sizes(min_size, max_size, timeout)
        self.schema = _check_schema(schema)
        self._sql = _Sql(schema)
        self._timeout = float(timeout)
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs=connect_kwargs or None,
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
        return cls(_conninfo(url), **options)

    def _execute(self, op: _Op[T]) -> T:
        with self._pool.connection(timeout=self._timeout) as conn, conn.cursor() as cur:
            try:
                query = next(op)
                while True:
                    cur.execute(query.statement, query.params)
                    rows = cur.fetchall() if cur.description is not None else []
                    query = op.send(rows)
            except StopIteration as done:
                # leaving the `connection()` block commits the transaction
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
        self, customer_id: str, quota: Quota, demand: QuotaDemand, *, now: datetime
    ) -> Reservation:
        return self._run(_reserve(self._sql, customer_id, quota, demand, now))

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

    def record_violation(self, violation: Violation) -> None:
        self._run(_record_violation(self._sql, violation))

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

    def claim_event(self, event_id: str) -> bool:
        return self._run(_claim_event(self._sql, event_id))

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
        **connect_kwargs: Any,
    ) -> None:
        _check_sizes(min_size, max_size, timeout)
        self.schema = _check_schema(schema)
        self._sql = _Sql(schema)
        self._timeout = float(timeout)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = (
            AsyncConnectionPool(
                conninfo,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                kwargs=connect_kwargs or None,
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
        return cls(_conninfo(url), **options)

    async def _execute(self, op: _Op[T]) -> T:
        async with (
            self._pool.connection(timeout=self._timeout) as conn,
            conn.cursor() as cur,
        ):
            try:
                query = next(op)
                while True:
                    await cur.execute(query.statement, query.params)
                    rows = await cur.fetchall() if cur.description is not None else []
                    query = op.send(rows)
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
        self, customer_id: str, quota: Quota, demand: QuotaDemand, *, now: datetime
    ) -> Reservation:
        return await self._run(_reserve(self._sql, customer_id, quota, demand, now))

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

    async def record_violation(self, violation: Violation) -> None:
        await self._run(_record_violation(self._sql, violation))

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

    async def claim_event(self, event_id: str) -> bool:
        return await self._run(_claim_event(self._sql, event_id))

    async def close(self) -> None:
        """Close the connection pool."""
        with _store_errors():
            await self._pool.close()
