"""The SQLite store: the embedded default for anything kept.

One database file can be shared by several worker processes (and their threads) of one web app:

- the file runs in WAL mode, so readers never wait for the writer, with a busy timeout so a
  writer waits its turn instead of failing;
- each thread has its own connection (``sqlite:///:memory:`` has a single, lock-protected one);
- every write is one short ``BEGIN IMMEDIATE`` transaction. ``reserve`` reads the customer's
  quota buckets and writes its hold in one, ``commit`` swaps the hold for the usage record in one,
  so no reservation is double-counted and no write is lost. Threads of one process queue for
  their turn on a lock, so SQLite's sleep-and-retry busy handler only arbitrates between
  processes;
- ``reserve`` reads a few dozen bucket rows (see :mod:`safe_openai.stores._types`): its cost does
  not grow with the customer's volume; times are the host's clock (SQLite has none of its own);
- a store used before ``fork()`` (a preloading web server) leaves the parent's connections
  alone in the child and opens its own.

Durability follows ``synchronous`` (``FULL`` by default: a committed record survives power loss).
Times are stored as UTC epoch seconds (``REAL``): microsecond datetimes of this era round-trip
exactly through a double, and range queries stay plain number comparisons. The schema version is
kept in ``PRAGMA user_version``; :data:`_MIGRATIONS` lists the steps that bring an older file up
to :data:`SCHEMA_VERSION`, each run inside the same transaction that bumps the version.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from ..errors import ConfigurationError, StoreError
from ..policy import Quota
from ..usage import SENT_OUTCOMES, UsageRecord
from ._adapter import AsyncAdapter
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
    counted_days,
    day_of,
    finish_report,
    from_us,
    measure,
    record_from_row,
    to_us,
)

__all__ = ["SCHEMA_VERSION", "AsyncSQLiteStore", "SQLiteStore"]

#: How long a writer waits for the file's write lock before giving up.
DEFAULT_TIMEOUT = 30.0
_SYNCHRONOUS = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_OPTIONS = frozenset({"timeout", "synchronous"})
#: Pending rows older than this are deleted. Longer than the TTL, so a worker whose clock runs a
#: little ahead never deletes a reservation the others still count.
_PENDING_GC = RESERVATION_TTL + timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Connections inherited across fork(): never used or closed in the child (closing could
# checkpoint or unlink the WAL under the parent's feet), only kept from the garbage collector.
_ABANDONED: list[sqlite3.Connection] = []
# One write lock per database file and process, shared by every store open on it.
_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()
_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _write_lock(path: str) -> threading.Lock:
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(path)
        if lock is None:
            lock = _WRITE_LOCKS[path] = threading.Lock()
        return lock


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held any of these locks when it forked.
    global _WRITE_LOCKS_GUARD
    _WRITE_LOCKS_GUARD = threading.Lock()
    _WRITE_LOCKS.clear()
    for store in list(_STORES):
        store._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- schema -------------------------------------------------------------------------------------


def _sql_list(values: Sequence[str]) -> str:
    return ", ".join("'" + value.replace("'", "''") + "'" for value in values)


_SENT = _sql_list(sorted(SENT_OUTCOMES))
# floor(ts / 3600) in SQL without the optional math functions: CAST truncates toward zero.
_FLOOR_HOUR = "(CAST({ts} / 3600.0 AS INTEGER) - ({ts} / 3600.0 < CAST({ts} / 3600.0 AS INTEGER)))"
_FLOOR = "(CAST({ts} AS INTEGER) - ({ts} < CAST({ts} AS INTEGER)))"

_SCHEMA_V1: Final = (
    """CREATE TABLE usage_records (
        record_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT,
        outcome TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cost_usd REAL,
        latency_s REAL NOT NULL,
        created_at REAL NOT NULL,
        request_id TEXT
    )""",
    "CREATE INDEX usage_records_customer_time ON usage_records (customer_id, created_at)",
    "CREATE INDEX usage_records_time ON usage_records (created_at)",
    """CREATE TABLE pending (
        id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        at REAL NOT NULL,
        tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL
    )""",
    "CREATE INDEX pending_customer_time ON pending (customer_id, at)",
    """CREATE TABLE violations (
        id INTEGER PRIMARY KEY,
        customer_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        source TEXT NOT NULL,
        categories TEXT NOT NULL,
        top_score REAL,
        endpoint TEXT,
        detail TEXT NOT NULL
    )""",
    "CREATE INDEX violations_customer_time ON violations (customer_id, created_at)",
    "CREATE INDEX violations_time ON violations (created_at)",
    """CREATE TABLE suspensions (
        customer_id TEXT PRIMARY KEY,
        since REAL NOT NULL,
        until REAL,
        reason TEXT NOT NULL
    )""",
    "CREATE TABLE identifiers (identifier TEXT PRIMARY KEY, customer_id TEXT NOT NULL)",
    "CREATE TABLE requests (request_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL)",
    "CREATE TABLE events (event_id TEXT PRIMARY KEY, claimed_at REAL NOT NULL)",
    # Hourly sums of the records that count against quotas, kept by a trigger, so a reserve
    # reads at most ~744 rows for a month however busy the customer is.
    """CREATE TABLE usage_hourly (
        customer_id TEXT NOT NULL,
        hour INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        PRIMARY KEY (customer_id, hour)
    ) WITHOUT ROWID""",
    f"""CREATE TRIGGER usage_records_hourly AFTER INSERT ON usage_records
    WHEN NEW.outcome IN ({_SENT})
    BEGIN
        INSERT INTO usage_hourly (customer_id, hour, tokens, cost_usd)
        VALUES (
            NEW.customer_id,
            {_FLOOR_HOUR.format(ts="NEW.created_at")},
            NEW.input_tokens + NEW.output_tokens,
            COALESCE(NEW.cost_usd, 0.0)
        )
        ON CONFLICT (customer_id, hour) DO UPDATE SET
            tokens = tokens + excluded.tokens, cost_usd = cost_usd + excluded.cost_usd;
    END""",
)


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


# Version 2: each customer's quota state is a few buckets (seconds of the minute windows,
# minutes of pending holds, day totals) instead of a log scanned on every reservation.
_SCHEMA_V2: Final = (
    """CREATE TABLE quota_seconds (
        customer_id TEXT NOT NULL,
        second INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        last_us INTEGER NOT NULL,
        PRIMARY KEY (customer_id, second)
    ) WITHOUT ROWID""",
    """CREATE TABLE quota_holds (
        customer_id TEXT NOT NULL,
        minute INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        last_us INTEGER NOT NULL,
        PRIMARY KEY (customer_id, minute)
    ) WITHOUT ROWID""",
    """CREATE TABLE quota_days (
        customer_id TEXT NOT NULL,
        day INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        PRIMARY KEY (customer_id, day)
    ) WITHOUT ROWID""",
    # carry the data of version 1 forward: every day's totals, and the minute windows and
    # holds that may still count (by this host's clock, :now)
    f"""INSERT INTO quota_days (customer_id, day, tokens, cost_usd)
    SELECT customer_id, {_FLOOR.format(ts="created_at / 86400.0")},
           SUM(input_tokens + output_tokens), TOTAL(cost_usd)
    FROM usage_records WHERE outcome IN ({_SENT}) GROUP BY 1, 2""",
    f"""INSERT INTO quota_seconds (customer_id, second, requests, tokens, last_us)
    SELECT customer_id, {_FLOOR.format(ts="at")}, COUNT(*), SUM(tokens),
           MAX(CAST(ROUND(at * 1000000.0) AS INTEGER))
    FROM (
        SELECT customer_id, created_at AS at, input_tokens + output_tokens AS tokens
        FROM usage_records WHERE outcome IN ({_SENT}) AND created_at > :now - {KEEP_SECONDS}
        UNION ALL
        SELECT customer_id, at, tokens FROM pending WHERE at > :now - {KEEP_SECONDS}
    ) GROUP BY 1, 2""",
    f"""INSERT INTO quota_holds (customer_id, minute, requests, tokens, cost_usd, last_us)
    SELECT customer_id, {_FLOOR.format(ts="at / 60.0")}, COUNT(*), SUM(tokens), TOTAL(cost_usd),
           MAX(CAST(ROUND(at * 1000000.0) AS INTEGER))
    FROM pending WHERE at > :now - {int(RESERVATION_TTL.total_seconds())} GROUP BY 1, 2""",
    "DROP TRIGGER usage_records_hourly",
    "DROP TABLE usage_hourly",
)


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V2:
        conn.execute(statement, {"now": time.time()} if ":now" in statement else ())


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    # Webhook claims with a lease: a row with a token is a live or lapsed claim, a row without
    # one (every row of earlier versions) an event done. Violations get an id a replay cannot
    # repeat.
    conn.execute("ALTER TABLE events ADD COLUMN token TEXT")
    conn.execute("ALTER TABLE events ADD COLUMN lease_until REAL")
    conn.execute("ALTER TABLE violations ADD COLUMN violation_id TEXT")
    conn.execute(
        "CREATE UNIQUE INDEX violations_violation_id ON violations (violation_id) "
        "WHERE violation_id IS NOT NULL"
    )


def _migrate_to_4(conn: sqlite3.Connection) -> None:
    # Every violation is stored, with whether it is a strike; every earlier row was one.
    conn.execute("ALTER TABLE violations ADD COLUMN strike INTEGER NOT NULL DEFAULT 1")


#: ``_MIGRATIONS[n]`` brings a file from schema version ``n`` to ``n + 1``. Append, never edit.
_MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _migrate_to_1,
    _migrate_to_2,
    _migrate_to_3,
    _migrate_to_4,
)
#: The schema version this release writes.
SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the file's schema to :data:`SCHEMA_VERSION` (the caller holds a write transaction)."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        # Written by a newer release: refuse rather than write rows it does not expect.
        raise StoreError(
            f"The SQLite file has schema version {version}, newer than this release supports "
            f"({SCHEMA_VERSION}); upgrade safe-openai."
        )
    for migrate in _MIGRATIONS[version:]:
        migrate(conn)
    if version != SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    # Claims are pruned by age (claim_event). An index changes no row an older release reads
    # or writes, so it is added here, idempotently, rather than as a version an older release
    # would refuse to open.
    conn.execute("CREATE INDEX IF NOT EXISTS events_claimed_at ON events (claimed_at)")


# --- SQL shared by the sync and async stores ----------------------------------------------------

# Claims older than EVENT_KEEP, finished or lapsed (never a live lease), a bounded batch per
# claim (the index on claimed_at finds them).
_PRUNE_EVENTS = f"""
    DELETE FROM events WHERE event_id IN (
        SELECT event_id FROM events
        WHERE claimed_at < :cutoff AND (token IS NULL OR lease_until IS NULL OR lease_until <= :now)
        LIMIT {EVENT_PRUNE_BATCH:d}
    )
"""

_RECORD_COLUMNS = (
    "record_id, customer_id, endpoint, model, outcome, input_tokens, cached_tokens, "
    "output_tokens, reasoning_tokens, cost_usd, latency_s, created_at, request_id"
)
_INSERT_RECORD = (
    f"INSERT OR IGNORE INTO usage_records ({_RECORD_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# One customer's quota state (see _types.QuotaState): a few dozen rows however busy it is.
_QUOTA_STATE = """
    SELECT 's', second, requests, tokens, 0.0, last_us FROM quota_seconds
    WHERE customer_id = :customer AND second >= :from_second
    UNION ALL
    SELECT 'h', minute, requests, tokens, cost_usd, last_us FROM quota_holds
    WHERE customer_id = :customer AND minute >= :from_minute
    UNION ALL
    SELECT 'd', day, 0, tokens, cost_usd, 0 FROM quota_days
    WHERE customer_id = :customer AND day >= :from_day AND day <= :to_day
"""
_ADD_SECOND = """
    INSERT INTO quota_seconds (customer_id, second, requests, tokens, last_us)
    VALUES (:customer, :index, 1, :tokens, :at)
    ON CONFLICT (customer_id, second) DO UPDATE SET
        requests = requests + 1, tokens = tokens + excluded.tokens,
        last_us = MAX(last_us, excluded.last_us)
"""
_ADD_HOLD = """
    INSERT INTO quota_holds (customer_id, minute, requests, tokens, cost_usd, last_us)
    VALUES (:customer, :index, 1, :tokens, :cost, :at)
    ON CONFLICT (customer_id, minute) DO UPDATE SET
        requests = requests + 1, tokens = tokens + excluded.tokens,
        cost_usd = cost_usd + excluded.cost_usd, last_us = MAX(last_us, excluded.last_us)
"""
_ADD_DAY = """
    INSERT INTO quota_days (customer_id, day, tokens, cost_usd)
    VALUES (:customer, :day, :tokens, :cost)
    ON CONFLICT (customer_id, day) DO UPDATE SET
        tokens = tokens + excluded.tokens, cost_usd = cost_usd + excluded.cost_usd
"""
# A hold leaves its bucket of holds; an emptied bucket is zeroed exactly (no float residue).
_DROP_HOLD = """
    UPDATE quota_holds SET
        requests = MAX(requests - 1, 0),
        tokens = CASE WHEN requests <= 1 THEN 0 ELSE tokens - :tokens END,
        cost_usd = CASE WHEN requests <= 1 THEN 0.0 ELSE cost_usd - :cost END
    WHERE customer_id = :customer AND minute = :minute
"""
# ... and its minute bucket: replaced by the settled call's tokens, or taken out.
_SETTLE_SECOND = """
    UPDATE quota_seconds SET tokens = MAX(tokens - :tokens + :settled, 0)
    WHERE customer_id = :customer AND second = :second
"""
_UNDO_SECOND = """
    UPDATE quota_seconds SET requests = MAX(requests - 1, 0), tokens = MAX(tokens - :tokens, 0)
    WHERE customer_id = :customer AND second = :second
"""
_PRUNE = (
    "DELETE FROM quota_seconds WHERE customer_id = :customer AND second < :old_second",
    "DELETE FROM quota_holds WHERE customer_id = :customer AND minute < :old_minute",
    "DELETE FROM pending WHERE customer_id = :customer AND at < :old_pending",
)

_REPORT_SUMS = ", ".join(
    [
        f"SUM(outcome IN ({_SENT}))",
        "SUM(input_tokens)",
        "SUM(cached_tokens)",
        "SUM(output_tokens)",
        "SUM(reasoning_tokens)",
        "TOTAL(cost_usd)",
        *(f"SUM(outcome = {_sql_list([outcome])})" for outcome in OUTCOME_COLUMNS),
    ]
)
_REPORT_KEYS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    *OUTCOME_COLUMNS.values(),
)


def _ts(moment: datetime) -> float:
    """UTC epoch seconds; a naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _dt(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _record_row(record: UsageRecord) -> tuple[Any, ...]:
    tokens = record.tokens
    return (
        record.record_id or uuid.uuid4().hex,
        record.customer_id,
        record.endpoint,
        record.model,
        record.outcome,
        tokens.input_tokens,
        tokens.cached_tokens,
        tokens.output_tokens,
        tokens.reasoning_tokens,
        record.cost_usd,
        record.latency_s,
        _ts(record.created_at),
        record.request_id,
    )


def _violation_from_row(row: Sequence[Any]) -> Violation:
    return Violation(
        customer_id=row[0],
        created_at=_dt(row[1]),
        source=row[2],
        categories=tuple(json.loads(row[3])),
        top_score=row[4],
        endpoint=row[5],
        detail=row[6],
        violation_id=row[7] or "",
        strike=bool(row[8]),
    )


def _suspension_from_row(row: Sequence[Any]) -> Suspension:
    return Suspension(
        customer_id=row[0],
        since=_dt(row[1]),
        until=None if row[2] is None else _dt(row[2]),
        reason=row[3],
    )


def _where(conditions: Sequence[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """A ``WHERE`` clause of the conditions whose value is not ``None``."""
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in used), [value for _, value in used]


def _quota_state(conn: sqlite3.Connection, customer_id: str, now_us: int) -> QuotaState:
    """The customer's buckets and day totals that can count at ``now_us``."""
    token_days, cost_days = counted_days(now_us)
    rows = conn.execute(
        _QUOTA_STATE,
        {
            "customer": customer_id,
            "from_second": now_us // SECOND_US - 61,
            "from_minute": now_us // MINUTE_US - KEEP_HOLD_MINUTES,
            "from_day": min(token_days.start, cost_days.start),
            "to_day": max(token_days.stop, cost_days.stop) - 1,
        },
    ).fetchall()
    seconds, holds, days = [], [], []
    for kind, index, requests, tokens, cost, last_us in rows:
        if kind == "s":
            seconds.append(Bucket(index, requests, tokens, 0.0, last_us))
        elif kind == "h":
            holds.append(Bucket(index, requests, tokens, cost, last_us))
        else:
            days.append(DayTotal(index, tokens, cost))
    return QuotaState(seconds, holds, days)


def _count(
    conn: sqlite3.Connection,
    customer_id: str,
    at_us: int,
    tokens: int,
    cost: float,
    *,
    minute: bool,
) -> None:
    """Count a usage record that reached the model at ``at_us`` (see _memory._Ledger.count)."""
    if minute:
        conn.execute(
            _ADD_SECOND,
            {"customer": customer_id, "index": at_us // SECOND_US, "tokens": tokens, "at": at_us},
        )
    conn.execute(
        _ADD_DAY, {"customer": customer_id, "day": day_of(at_us), "tokens": tokens, "cost": cost}
    )


def _settle(conn: sqlite3.Connection, reservation: Reservation | None, record: UsageRecord) -> None:
    """Drop the reservation's hold and store the record once per ``record_id``; a new record
    that reached the model counts where its hold did (or at its own time)."""
    hold = None
    if reservation is not None and reservation.id:
        hold = conn.execute(
            "SELECT customer_id, at, tokens, cost_usd FROM pending WHERE id = ?",
            (reservation.id,),
        ).fetchone()
        if hold is not None:
            conn.execute("DELETE FROM pending WHERE id = ?", (reservation.id,))
    new = conn.execute(_INSERT_RECORD, _record_row(record)).rowcount == 1
    counts = new and record.counts_as_request
    tokens, cost = record.tokens.total_tokens, record.cost_usd or 0.0
    if hold is not None:
        owner, at, held_tokens, held_cost = hold
        at_us = to_us(_dt(at))
        settles = counts and owner == record.customer_id
        conn.execute(
            _DROP_HOLD,
            {
                "customer": owner,
                "minute": at_us // MINUTE_US,
                "tokens": held_tokens,
                "cost": held_cost,
            },
        )
        second = {"customer": owner, "second": at_us // SECOND_US, "tokens": held_tokens}
        if settles:
            conn.execute(_SETTLE_SECOND, {**second, "settled": tokens})
            _count(conn, owner, at_us, tokens, cost, minute=False)
            return
        conn.execute(_UNDO_SECOND, second)
    if counts:
        when = reservation.at if reservation is not None and reservation.at else None
        at_us = to_us(when if when is not None else record.created_at)
        _count(conn, record.customer_id, at_us, tokens, cost, minute=True)


def _reserve_in(
    conn: sqlite3.Connection, customer_id: str, quota: Quota, demand: QuotaDemand, now_us: int
) -> Reservation:
    """Decide and hold a reservation inside the caller's write transaction."""
    usage: tuple[LimitUsage, ...] = ()
    if not quota.is_unlimited:
        limit, retry_after, usage = assess(
            quota, demand, _quota_state(conn, customer_id, now_us), now_us
        )
        if limit is not None:
            return Reservation("", customer_id, False, limit, retry_after, usage=usage)
    reservation_id = uuid.uuid4().hex
    at = from_us(now_us)
    # never prune past this host's clock: a caller's `now` far ahead would drop what still
    # counts for everyone else
    prune_us = min(now_us, to_us(datetime.now(timezone.utc)))
    for statement in _PRUNE:
        conn.execute(
            statement,
            {
                "customer": customer_id,
                "old_second": prune_us // SECOND_US - KEEP_SECONDS,
                "old_minute": prune_us // MINUTE_US - KEEP_HOLD_MINUTES,
                "old_pending": _ts(from_us(prune_us) - _PENDING_GC),
            },
        )
    tokens, cost = int(demand.tokens), float(demand.cost_usd)
    held = {"customer": customer_id, "tokens": tokens, "cost": cost, "at": now_us}
    conn.execute(_ADD_SECOND, {**held, "index": now_us // SECOND_US})
    conn.execute(_ADD_HOLD, {**held, "index": now_us // MINUTE_US})
    conn.execute(
        "INSERT INTO pending (id, customer_id, at, tokens, cost_usd) VALUES (?, ?, ?, ?, ?)",
        (reservation_id, customer_id, _ts(at), tokens, cost),
    )
    return Reservation(reservation_id, customer_id, True, at=at, usage=usage)


_REMEMBER_IDENTIFIER = "INSERT OR REPLACE INTO identifiers (identifier, customer_id) VALUES (?, ?)"
_REMEMBER_REQUEST = "INSERT OR REPLACE INTO requests (request_id, customer_id) VALUES (?, ?)"
_SUSPENSION = (
    "SELECT customer_id, since, until, reason FROM suspensions "
    "WHERE customer_id = ? AND (until IS NULL OR until > ?)"
)


# --- the stores -----------------------------------------------------------------------------


def _path_from_url(url: str, options: dict[str, Any]) -> str:
    """The database path in a ``sqlite://`` URL, after checking the options that go with it."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigurationError(f"Unknown SQLite store options: {', '.join(unknown)}.")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0].lower() != "sqlite":
        raise ConfigurationError("A SQLite store URL starts with sqlite://.")
    if "?" in rest or not rest.startswith("/") or len(rest) < 2:
        raise ConfigurationError(
            "Use sqlite:///relative/path.db, sqlite:////absolute/path.db or sqlite:///:memory: "
            "(options are passed as keyword arguments, not in the URL)."
        )
    return rest[1:]


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the original error is the one to raise
            conn.execute("ROLLBACK")


class SQLiteStore:
    """A usage store in one SQLite file, safe to share between processes and threads.

    Open it by URL (``store_from_url("sqlite:///usage.db")``) or directly. The file and its
    schema are created on first use.

    Args:
        path: The database file, or ``":memory:"`` for a private in-memory database (one
            connection shared by every thread, nothing kept).
        timeout: Seconds a write waits for another process's write to finish before failing
            with :class:`~safe_openai.StoreError`.
        synchronous: SQLite's ``synchronous`` setting. ``"FULL"`` (the default) makes every
            committed record survive power loss; ``"NORMAL"`` is faster and still survives a
            crash of the process.

    Raises:
        ConfigurationError: An option is invalid.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        synchronous: str = "FULL",
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            choices = ", ".join(sorted(_SYNCHRONOUS))
            raise ConfigurationError(f"synchronous must be one of {choices}.")
        if timeout < 0:
            raise ConfigurationError("timeout must be >= 0 seconds.")
        path = os.fspath(path)
        # Absolute, so threads opening their connection later agree even if the cwd changes.
        self.path = path if path == ":memory:" else os.path.abspath(path)
        #: Names this store's data (the spool is kept per identity): the file, or a private
        #: in-memory database of its own.
        self.identity = (
            f"sqlite:///:memory:#{uuid.uuid4().hex}"
            if self.path == ":memory:"
            else f"sqlite:///{os.path.realpath(self.path)}"
        )
        self._timeout = float(timeout)
        self._synchronous = synchronous.upper()
        self._lock = threading.Lock()
        self._closed = False
        self._ready = False
        self._pid = os.getpid()
        self._local = threading.local()
        self._connections: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._shared: sqlite3.Connection | None = None
        self._shared_lock = threading.Lock()
        _STORES.add(self)
        if self.path == ":memory:":
            try:
                self._shared = self._open()
                self._prepare(self._shared)
            except sqlite3.Error as exc:
                raise StoreError("The SQLite store could not open its database.") from exc
            self._ready = True

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """Open a store from a ``sqlite:///relative.db``, ``sqlite:////abs.db`` or
        ``sqlite:///:memory:`` URL; ``options`` are the keyword arguments of the class.

        Raises:
            ConfigurationError: The URL or an option is invalid.
        """
        return cls(_path_from_url(url, options), **options)

    # --- connections ------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # Transactions are explicit (BEGIN IMMEDIATE), so the module's implicit ones are off.
        # check_same_thread is off only so close() can close every thread's connection.
        conn = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL and migrate its schema, waiting out other processes doing it."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                if self.path != ":memory:":
                    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                    if str(mode).lower() != "wal":
                        conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    _migrate(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
                return
            except sqlite3.OperationalError as exc:
                # Switching the journal mode needs the file to itself and may fail fast with
                # "locked" rather than wait while another process opens it.
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _thread_connection(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            self._forget_parent()  # forked without os.register_at_fork running (rare)
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = self._open()
        try:
            if not self._ready:
                with self._lock:
                    if not self._ready:
                        self._prepare(conn)
                        self._ready = True
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._closed:
                conn.close()
                raise StoreError("The SQLite store is closed.")
            self._close_orphans()
            self._connections.append((weakref.ref(threading.current_thread()), conn))
        self._local.conn = conn
        return conn

    def _close_orphans(self) -> None:
        """Close the connections of threads that have ended (the caller holds the lock)."""
        alive = []
        for ref, conn in self._connections:
            thread = ref()
            if thread is not None and thread.is_alive():
                alive.append((ref, conn))
            else:
                conn.close()
        self._connections = alive

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's locks and connections, open afresh on demand."""
        self._lock = threading.Lock()
        self._shared_lock = threading.Lock()
        _ABANDONED.extend(conn for _, conn in self._connections)
        self._connections = []
        self._local = threading.local()
        self._pid = os.getpid()

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise StoreError("The SQLite store is closed.")
        if self._shared is not None:
            with self._shared_lock:
                yield self._shared
        else:
            yield self._thread_connection()

    @contextmanager
    def _write_turn(self) -> Iterator[None]:
        """Queue this process's writers on a lock, so only one at a time polls SQLite's.

        SQLite's busy handler sleeps and retries; threads of one process waiting on it would
        wake late and out of turn. A lock hands the turn over at once.
        """
        if self._shared is not None:
            yield  # the shared connection's lock already serializes everything
            return
        lock = _write_lock(self.path)
        if not lock.acquire(timeout=self._timeout):
            raise StoreError("The SQLite store timed out waiting for another write to finish.")
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def _transaction(self, action: str, begin: str | None = None) -> Iterator[sqlite3.Connection]:
        """A connection for one unit of work, with sqlite3 errors turned into StoreError.

        Args:
            action: What is being done, for the error message (never any record content).
            begin: ``"IMMEDIATE"`` for writes (takes the write lock up front, so the busy timeout
                applies and a read-then-write never deadlocks), ``"DEFERRED"`` for reads that
                need one consistent snapshot, ``None`` for a single statement.
        """
        try:
            with self._connection() as conn:
                if begin is None:
                    yield conn
                    return
                with self._write_turn() if begin == "IMMEDIATE" else contextlib.nullcontext():
                    conn.execute(f"BEGIN {begin}")
                    try:
                        yield conn
                        conn.execute("COMMIT")
                    except BaseException:
                        _rollback(conn)
                        raise
        except sqlite3.Error as exc:
            raise StoreError(f"The SQLite store could not {action}.") from exc

    # --- quotas -----------------------------------------------------------------------------

    def reserve(
        self,
        customer_id: str,
        quota: Quota,
        demand: QuotaDemand,
        *,
        now: datetime | None = None,
    ) -> Reservation:
        """Atomically check ``demand`` against ``quota`` and, if admitted, hold it as pending.

        ``now`` defaults to this host's clock (SQLite has none of its own).
        """
        now_us = to_us(now if now is not None else datetime.now(timezone.utc))
        with self._transaction("reserve quota", "IMMEDIATE") as conn:
            return _reserve_in(conn, customer_id, quota, demand, now_us)

    def quota_usage(
        self, customer_id: str, quota: Quota, *, now: datetime | None = None
    ) -> tuple[LimitUsage, ...]:
        """What the customer has used of each limit ``quota`` sets at ``now`` (default: this
        host's clock), pending holds included. One read (no write lock, nothing held)."""
        now_us = to_us(now if now is not None else datetime.now(timezone.utc))
        if quota.is_unlimited:
            return ()
        with self._transaction("read quota usage") as conn:
            state = _quota_state(conn, customer_id, now_us)
        return measure(quota, state, now_us)

    def begin_call(
        self,
        customer_id: str,
        quota: Quota | None,
        demand: QuotaDemand,
        *,
        identifier: str | None = None,
    ) -> CallStart:
        """Standing, reservation and identifier map of a call about to be sent, in one
        transaction. A suspended customer gets no reservation. With ``quota`` ``None`` only
        the standing is read (no write lock), and the identifier is left to the caller."""
        now_us = to_us(datetime.now(timezone.utc))
        if quota is None:
            # Standing alone is a read, which WAL serves while another process writes; the
            # identifier is then the caller's to map (best effort, as it always was).
            with self._transaction("check standing") as conn:
                row = conn.execute(_SUSPENSION, (customer_id, now_us / SECOND_US)).fetchone()
            found = None if row is None else _suspension_from_row(row)
            return CallStart(found, None, identifier_saved=identifier is None)
        with self._transaction("check standing and quota", "IMMEDIATE") as conn:
            if identifier is not None:
                conn.execute(_REMEMBER_IDENTIFIER, (identifier, customer_id))
            row = conn.execute(_SUSPENSION, (customer_id, now_us / SECOND_US)).fetchone()
            if row is not None:
                return CallStart(_suspension_from_row(row), None)
            if quota is None:
                return CallStart(None, None)
            return CallStart(None, _reserve_in(conn, customer_id, quota, demand, now_us))

    def finish_call(
        self, reservation: Reservation | None, record: UsageRecord, *, request_id: str | None = None
    ) -> None:
        """Settle a call in one transaction: commit (or record) its usage, map its request id."""
        with self._transaction("commit usage", "IMMEDIATE") as conn:
            _settle(conn, reservation, record)
            if request_id:
                conn.execute(_REMEMBER_REQUEST, (request_id, record.customer_id))

    def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        """Replace a pending reservation by the call's actual usage record, atomically."""
        with self._transaction("commit usage", "IMMEDIATE") as conn:
            _settle(conn, reservation, record)

    def release(self, reservation: Reservation) -> None:
        """Drop a pending reservation (the call was never sent)."""
        if not reservation.id:
            return
        with self._transaction("release a reservation", "IMMEDIATE") as conn:
            hold = conn.execute(
                "SELECT customer_id, at, tokens, cost_usd FROM pending WHERE id = ?",
                (reservation.id,),
            ).fetchone()
            if hold is None:
                return
            conn.execute("DELETE FROM pending WHERE id = ?", (reservation.id,))
            owner, at, tokens, cost = hold
            at_us = to_us(_dt(at))
            conn.execute(
                _DROP_HOLD,
                {"customer": owner, "minute": at_us // MINUTE_US, "tokens": tokens, "cost": cost},
            )
            conn.execute(
                _UNDO_SECOND, {"customer": owner, "second": at_us // SECOND_US, "tokens": tokens}
            )

    # --- usage ------------------------------------------------------------------------------

    def record_usage(self, record: UsageRecord) -> None:
        """Store a usage record. Writing the same ``record_id`` twice stores it once."""
        with self._transaction("record usage", "IMMEDIATE") as conn:
            _settle(conn, None, record)

    def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        """Usage records, newest first."""
        where, params = _where(
            [
                ("customer_id = ?", customer_id),
                ("created_at >= ?", None if since is None else _ts(since)),
            ]
        )
        with self._transaction("read usage records") as conn:
            rows = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM usage_records{where} "
                "ORDER BY created_at DESC, rowid LIMIT ?",
                [*params, max(limit, 0)],
            ).fetchall()
        return [record_from_row(row, _dt) for row in rows]

    def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        """Per-customer totals since ``since``, sorted by customer id."""
        now = datetime.now(timezone.utc)
        since_ts = None if since is None else _ts(since)
        records_where, records_params = _where(
            [("customer_id = ?", customer_id), ("created_at >= ?", since_ts)]
        )
        suspended_where, suspended_params = _where([("customer_id = ?", customer_id)])
        with self._transaction("build the usage report", "DEFERRED") as conn:
            sums = {
                row[0]: dict(zip(_REPORT_KEYS, row[1:], strict=True))
                for row in conn.execute(
                    f"SELECT customer_id, {_REPORT_SUMS} FROM usage_records{records_where} "
                    "GROUP BY customer_id",
                    records_params,
                )
            }
            violations: dict[str, int] = {}
            strikes: dict[str, int] = {}
            for customer, count, struck in conn.execute(
                f"SELECT customer_id, COUNT(*), TOTAL(strike) FROM violations{records_where} "
                "GROUP BY customer_id",
                records_params,
            ):
                violations[customer], strikes[customer] = int(count), int(struck)
            suspended = {
                row[0]
                for row in conn.execute(
                    f"SELECT customer_id FROM suspensions{suspended_where}"
                    f"{' AND' if suspended_where else ' WHERE'} (until IS NULL OR until > ?)",
                    [*suspended_params, _ts(now)],
                )
            }
        return finish_report(sums, violations, suspended, strikes)

    # --- violations and suspensions ---------------------------------------------------------

    def record_violation(self, violation: Violation) -> bool:
        """Store a violation, once per non-empty ``violation_id``; whether it was new."""
        with self._transaction("record a violation", "IMMEDIATE") as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO violations (customer_id, created_at, source, categories, "
                "top_score, endpoint, detail, violation_id, strike) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    violation.customer_id,
                    _ts(violation.created_at),
                    violation.source,
                    json.dumps(list(violation.categories)),
                    violation.top_score,
                    violation.endpoint,
                    violation.detail,
                    violation.violation_id or None,
                    int(violation.strike),
                ),
            )
            return cursor.rowcount == 1

    def count_violations(self, customer_id: str, *, since: datetime) -> int:
        """How many strikes the customer has had since ``since``."""
        with self._transaction("count violations") as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM violations "
                "WHERE customer_id = ? AND created_at >= ? AND strike",
                (customer_id, _ts(since)),
            ).fetchone()
        return int(row[0])

    def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        """Violations, newest first."""
        where, params = _where(
            [
                ("customer_id = ?", customer_id),
                ("created_at >= ?", None if since is None else _ts(since)),
            ]
        )
        with self._transaction("read violations") as conn:
            rows = conn.execute(
                "SELECT customer_id, created_at, source, categories, top_score, endpoint, detail, "
                f"violation_id, strike FROM violations{where} "
                "ORDER BY created_at DESC, id LIMIT ?",
                [*params, max(limit, 0)],
            ).fetchall()
        return [_violation_from_row(row) for row in rows]

    def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        """Suspend a customer (replacing any current suspension)."""
        with self._transaction("suspend a customer", "IMMEDIATE") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO suspensions (customer_id, since, until, reason) "
                "VALUES (?, ?, ?, ?)",
                (customer_id, _ts(now), None if until is None else _ts(until), reason),
            )

    def unsuspend(self, customer_id: str) -> bool:
        """Lift a suspension. Returns whether one was in place."""
        with self._transaction("lift a suspension", "IMMEDIATE") as conn:
            cursor = conn.execute("DELETE FROM suspensions WHERE customer_id = ?", (customer_id,))
            return cursor.rowcount > 0

    def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        """The customer's suspension in force at ``now``, if any."""
        with self._transaction("read a suspension") as conn:
            row = conn.execute(_SUSPENSION, (customer_id, _ts(now))).fetchone()
        return None if row is None else _suspension_from_row(row)

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """Every suspension in force at ``now``, sorted by customer id."""
        with self._transaction("read suspensions") as conn:
            rows = conn.execute(
                "SELECT customer_id, since, until, reason FROM suspensions "
                "WHERE until IS NULL OR until > ? ORDER BY customer_id",
                (_ts(now),),
            ).fetchall()
        return [_suspension_from_row(row) for row in rows]

    # --- identifier maps and webhook events -------------------------------------------------

    def remember_identifier(self, identifier: str, customer_id: str) -> None:
        """Map a safety identifier back to its customer."""
        with self._transaction("remember an identifier", "IMMEDIATE") as conn:
            conn.execute(_REMEMBER_IDENTIFIER, (identifier, customer_id))

    def customer_for_identifier(self, identifier: str) -> str | None:
        """The customer a safety identifier belongs to."""
        with self._transaction("look up an identifier") as conn:
            row = conn.execute(
                "SELECT customer_id FROM identifiers WHERE identifier = ?", (identifier,)
            ).fetchone()
        return None if row is None else str(row[0])

    def remember_request(self, request_id: str, customer_id: str) -> None:
        """Map an OpenAI request id back to its customer."""
        with self._transaction("remember a request", "IMMEDIATE") as conn:
            conn.execute(_REMEMBER_REQUEST, (request_id, customer_id))

    def customer_for_request(self, request_id: str) -> str | None:
        """The customer an OpenAI request id belongs to."""
        with self._transaction("look up a request") as conn:
            row = conn.execute(
                "SELECT customer_id FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        """Claim a webhook event for handling (see the protocol); one transaction."""
        with self._transaction("claim an event", "IMMEDIATE") as conn:
            # never past this host's clock: a `now` far ahead must not forget live claims
            cutoff = min(now, datetime.now(timezone.utc)) - EVENT_KEEP
            conn.execute(_PRUNE_EVENTS, {"cutoff": _ts(cutoff), "now": _ts(now)})
            row = conn.execute(
                "SELECT token, lease_until FROM events WHERE event_id = ?", (event_id,)
            ).fetchone()
            if row is not None and row[0] is None:
                return "done"
            if row is not None and row[1] is not None and row[1] > _ts(now):
                return "held"
            conn.execute(
                "INSERT OR REPLACE INTO events (event_id, claimed_at, token, lease_until) "
                "VALUES (?, ?, ?, ?)",
                (event_id, _ts(now), token, _ts(now + lease)),
            )
            return "claimed"

    def finish_event(self, event_id: str, *, token: str) -> bool:
        """Mark an event claimed by ``token`` done; whether ``token`` still held it."""
        with self._transaction("finish an event", "IMMEDIATE") as conn:
            cursor = conn.execute(
                "UPDATE events SET token = NULL, lease_until = NULL "
                "WHERE event_id = ? AND token = ?",
                (event_id, token),
            )
            return cursor.rowcount == 1

    def release_event(self, event_id: str, *, token: str) -> None:
        """Drop ``token``'s claim of an event that is not done."""
        with self._transaction("release an event", "IMMEDIATE") as conn:
            conn.execute("DELETE FROM events WHERE event_id = ? AND token = ?", (event_id, token))

    def close(self) -> None:
        """Close every connection this store opened (in this process). Later calls fail."""
        with self._lock:
            self._closed = True
            connections = [conn for _, conn in self._connections]
            self._connections = []
            if os.getpid() != self._pid:
                _ABANDONED.extend(connections)
                connections = []
            if self._shared is not None:
                connections.append(self._shared)
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):  # best effort: the store is done either way
                conn.close()


class AsyncSQLiteStore(AsyncAdapter):
    """The async twin of :class:`SQLiteStore`: each call runs the sync store in a worker thread.

    Args:
        path: The database file, or ``":memory:"``.
        **options: The keyword arguments of :class:`SQLiteStore`.
    """

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(SQLiteStore(path, **options))

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncSQLiteStore:
        """Open a store from a ``sqlite://`` URL (see :meth:`SQLiteStore.from_url`).

        Raises:
            ConfigurationError: The URL or an option is invalid.
        """
        return cls(_path_from_url(url, options), **options)
