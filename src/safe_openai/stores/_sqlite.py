"""The SQLite store: the embedded default for anything kept.

One database file can be shared by several worker processes (and their threads) of one web app:

- the file runs in WAL mode, so readers never wait for the writer, with a busy timeout so a
  writer waits its turn instead of failing;
- each thread has its own connection (``sqlite:///:memory:`` has a single, lock-protected one);
- every write is one short ``BEGIN IMMEDIATE`` transaction. ``reserve`` reads the window and
  inserts its pending row in one, ``commit`` swaps the pending row for the usage record in one,
  so no reservation is double-counted and no write is lost. Threads of one process queue for
  their turn on a lock, so SQLite's sleep-and-retry busy handler only arbitrates between
  processes;
- ``reserve`` reads the minute window row by row and the rest of the month from an hourly rollup
  kept by a trigger, so its cost does not grow with a busy customer's month of records;
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
import math
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

__all__ = ["SCHEMA_VERSION", "AsyncSQLiteStore", "SQLiteStore"]

#: How long a writer waits for the file's write lock before giving up.
DEFAULT_TIMEOUT = 30.0
_SYNCHRONOUS = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_OPTIONS = frozenset({"timeout", "synchronous"})
#: Pending rows older than this are deleted. Longer than the TTL, so a worker whose clock runs a
#: little ahead never deletes a reservation the others still count.
_PENDING_GC = RESERVATION_TTL + timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NO_HOUR_LIMIT = 2**62
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


#: ``_MIGRATIONS[n]`` brings a file from schema version ``n`` to ``n + 1``. Append, never edit.
_MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (_migrate_to_1,)
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


# --- SQL shared by the sync and async stores ----------------------------------------------------

_RECORD_COLUMNS = (
    "record_id, customer_id, endpoint, model, outcome, input_tokens, cached_tokens, "
    "output_tokens, reasoning_tokens, cost_usd, latency_s, created_at, request_id"
)
_INSERT_RECORD = (
    f"INSERT OR IGNORE INTO usage_records ({_RECORD_COLUMNS}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Window entries that a sliding minute window needs one by one: records that reached the model
# and live pending reservations after :start (later than now too: see evaluate_quota).
_MINUTE_ENTRIES = f"""
    SELECT created_at, input_tokens + output_tokens, COALESCE(cost_usd, 0.0)
    FROM usage_records
    WHERE customer_id = :customer AND created_at > :start AND outcome IN ({_SENT})
    UNION ALL
    SELECT at, tokens, cost_usd FROM pending
    WHERE customer_id = :customer AND at > :live
"""

# The month from its start up to :upper (inclusive, may be +inf), summed: (tokens since
# midnight, cost since midnight, cost before it). Hours before :upper_hour come from the rollup,
# records from :rows_from on row by row, pending reservations always row by row.
_MONTH_SUMS = f"""
    SELECT COALESCE(SUM(CASE WHEN at >= :day THEN tokens ELSE 0 END), 0),
           TOTAL(CASE WHEN at >= :day THEN cost ELSE 0.0 END),
           TOTAL(CASE WHEN at < :day THEN cost ELSE 0.0 END)
    FROM (
        SELECT hour * 3600.0 AS at, tokens, cost_usd AS cost
        FROM usage_hourly
        WHERE customer_id = :customer AND hour >= :month_hour AND hour < :upper_hour
        UNION ALL
        SELECT created_at, input_tokens + output_tokens, COALESCE(cost_usd, 0.0)
        FROM usage_records
        WHERE customer_id = :customer AND created_at >= :rows_from AND created_at <= :upper
            AND outcome IN ({_SENT})
        UNION ALL
        SELECT at, tokens, cost_usd FROM pending
        WHERE customer_id = :customer AND at > :stale AND at >= :month AND at <= :upper
    )
"""

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


def _hour(moment: datetime) -> int:
    """Whole hours since the epoch at ``moment`` (exact integer arithmetic)."""
    return (_utc(moment) - _EPOCH) // timedelta(hours=1)


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


def _window_entries(
    conn: sqlite3.Connection, customer_id: str, quota: Quota, now: datetime
) -> list[WindowEntry]:
    """What :func:`evaluate_quota` needs to decide ``quota`` at ``now``, read in two queries.

    The minute window comes row by row (its ``retry_after`` depends on each entry's time). The
    rest of the month comes as two sums placed where :func:`evaluate_quota` counts them exactly
    as it would the rows: day tokens and cost at midnight, older cost at the month's start, both
    outside the minute window. Records are summed from the ``usage_hourly`` rollup by whole
    hours: every hour from the month's start on when no minute limit is set, else the hours
    before the one the minute window starts in, the rest of that hour row by row.
    """
    minute_from = now - timedelta(seconds=MINUTE)
    stale = now - RESERVATION_TTL
    entries: list[WindowEntry] = []
    by_minute = quota.requests_per_minute is not None or quota.tokens_per_minute is not None
    if by_minute:
        rows = conn.execute(
            _MINUTE_ENTRIES,
            {
                "customer": customer_id,
                "start": _ts(minute_from),
                "live": _ts(max(minute_from, stale)),
            },
        ).fetchall()
        entries = [WindowEntry(_dt(at), tokens, cost) for at, tokens, cost in rows]
    if quota.tokens_per_day is not None or quota.usd_per_month is not None:
        today, this_month = day_start(now), month_start(now)
        if by_minute:
            # The minute rows were read one by one: sum only what comes before them.
            upper_hour = _hour(minute_from)
            upper = _ts(minute_from)
            rows_from = _ts(max(this_month, _EPOCH + timedelta(hours=upper_hour)))
        else:
            # No row is needed one by one: the rollup has every hour, however late.
            upper_hour, upper, rows_from = _NO_HOUR_LIMIT, math.inf, math.inf
        day_tokens, day_cost, older_cost = conn.execute(
            _MONTH_SUMS,
            {
                "customer": customer_id,
                "day": _ts(today),
                "month": _ts(this_month),
                "month_hour": _hour(this_month),
                "upper_hour": upper_hour,
                "rows_from": rows_from,
                "stale": _ts(stale),
                "upper": upper,
            },
        ).fetchone()
        # A non-zero sum implies rows at or after its anchor and at or before ``upper``, so
        # the anchor never falls inside a minute window that was read row by row (and when
        # none was read, no minute limit is set and the window does not matter).
        if day_tokens or day_cost:
            entries.append(WindowEntry(today, int(day_tokens), float(day_cost)))
        if older_cost:
            entries.append(WindowEntry(this_month, 0, float(older_cost)))
    return entries


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
        self, customer_id: str, quota: Quota, demand: QuotaDemand, *, now: datetime
    ) -> Reservation:
        """Atomically check ``demand`` against ``quota`` and, if admitted, hold it as pending."""
        now = _utc(now)
        with self._transaction("reserve quota", "IMMEDIATE") as conn:
            entries = [] if quota.is_unlimited else _window_entries(conn, customer_id, quota, now)
            limit, retry_after = evaluate_quota(quota, demand, entries, now)
            if limit is not None:
                return Reservation("", customer_id, False, limit, retry_after)
            reservation_id = uuid.uuid4().hex
            conn.execute(
                "DELETE FROM pending WHERE customer_id = ? AND at < ?",
                (customer_id, _ts(now - _PENDING_GC)),
            )
            conn.execute(
                "INSERT INTO pending (id, customer_id, at, tokens, cost_usd) "
                "VALUES (?, ?, ?, ?, ?)",
                (reservation_id, customer_id, _ts(now), demand.tokens, demand.cost_usd),
            )
        return Reservation(reservation_id, customer_id, True)

    def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        """Replace a pending reservation by the call's actual usage record, atomically."""
        with self._transaction("commit usage", "IMMEDIATE") as conn:
            conn.execute("DELETE FROM pending WHERE id = ?", (reservation.id,))
            conn.execute(_INSERT_RECORD, _record_row(record))

    def release(self, reservation: Reservation) -> None:
        """Drop a pending reservation (the call was never sent)."""
        with self._transaction("release a reservation", "IMMEDIATE") as conn:
            conn.execute("DELETE FROM pending WHERE id = ?", (reservation.id,))

    # --- usage ------------------------------------------------------------------------------

    def record_usage(self, record: UsageRecord) -> None:
        """Store a usage record. Writing the same ``record_id`` twice stores it once."""
        with self._transaction("record usage", "IMMEDIATE") as conn:
            conn.execute(_INSERT_RECORD, _record_row(record))

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
            violations = dict(
                conn.execute(
                    f"SELECT customer_id, COUNT(*) FROM violations{records_where} "
                    "GROUP BY customer_id",
                    records_params,
                ).fetchall()
            )
            suspended = {
                row[0]
                for row in conn.execute(
                    f"SELECT customer_id FROM suspensions{suspended_where}"
                    f"{' AND' if suspended_where else ' WHERE'} (until IS NULL OR until > ?)",
                    [*suspended_params, _ts(now)],
                )
            }
        return finish_report(sums, violations, suspended)

    # --- violations and suspensions ---------------------------------------------------------

    def record_violation(self, violation: Violation) -> None:
        """Store a violation."""
        with self._transaction("record a violation", "IMMEDIATE") as conn:
            conn.execute(
                "INSERT INTO violations (customer_id, created_at, source, categories, top_score, "
                "endpoint, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    violation.customer_id,
                    _ts(violation.created_at),
                    violation.source,
                    json.dumps(list(violation.categories)),
                    violation.top_score,
                    violation.endpoint,
                    violation.detail,
                ),
            )

    def count_violations(self, customer_id: str, *, since: datetime) -> int:
        """How many violations the customer has had since ``since``."""
        with self._transaction("count violations") as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM violations WHERE customer_id = ? AND created_at >= ?",
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
                "SELECT customer_id, created_at, source, categories, top_score, endpoint, detail "
                f"FROM violations{where} ORDER BY created_at DESC, id LIMIT ?",
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
            row = conn.execute(
                "SELECT customer_id, since, until, reason FROM suspensions "
                "WHERE customer_id = ? AND (until IS NULL OR until > ?)",
                (customer_id, _ts(now)),
            ).fetchone()
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
            conn.execute(
                "INSERT OR REPLACE INTO identifiers (identifier, customer_id) VALUES (?, ?)",
                (identifier, customer_id),
            )

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
            conn.execute(
                "INSERT OR REPLACE INTO requests (request_id, customer_id) VALUES (?, ?)",
                (request_id, customer_id),
            )

    def customer_for_request(self, request_id: str) -> str | None:
        """The customer an OpenAI request id belongs to."""
        with self._transaction("look up a request") as conn:
            row = conn.execute(
                "SELECT customer_id FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def claim_event(self, event_id: str) -> bool:
        """Mark a webhook event as handled. Returns ``True`` only the first time."""
        with self._transaction("claim an event", "IMMEDIATE") as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO events (event_id, claimed_at) VALUES (?, ?)",
                (event_id, time.time()),
            )
            return cursor.rowcount == 1

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
