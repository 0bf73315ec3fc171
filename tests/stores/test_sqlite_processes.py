"""The SQLite store across processes and at the file level.

Several worker processes of one web app share one SQLite file: their writes must all land and
a quota budget must hold across them. The rest pins what only the SQLite backend has: WAL
mode, the schema version and its migrations, reopening a file, URL forms, fork safety, and
sqlite3 errors surfacing as StoreError.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from safe_openai.errors import ConfigurationError, StoreError
from safe_openai.policy import Quota
from safe_openai.stores import _sqlite as sqlite_backend
from safe_openai.stores import store_from_url
from safe_openai.stores._sqlite import SCHEMA_VERSION, SQLiteStore
from safe_openai.stores._types import CustomerReport, QuotaDemand
from safe_openai.usage import TokenUsage, UsageRecord

UTC = timezone.utc
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
SPAWN = multiprocessing.get_context("spawn")
WORKERS = 4
RECORDS_PER_WORKER = 200
PAIRS_PER_WORKER = 20
RACE_ATTEMPTS = 8
RACE_BUDGET = 10


def _record(customer: str, index: int, *, when: datetime = T0, record_id: str = "") -> UsageRecord:
    return UsageRecord(
        customer_id=customer,
        endpoint="/chat/completions",
        model="gpt-4o-mini",
        outcome="ok",
        tokens=TokenUsage(input_tokens=index + 1, output_tokens=2),
        cost_usd=(index % 8) / 1024,  # binary fractions: sums are exact in any order
        created_at=when + timedelta(milliseconds=index),
        record_id=record_id or uuid.uuid4().hex,
    )


# --- several processes on one file ---------------------------------------------------------------


def _worker(write_path: str, race_path: str, worker: int, barrier: Any, done: Any) -> None:
    """One web-app worker: writes its share on one file, then races for a budget on another.

    Module level, so spawned processes can import it. Puts ``(worker, admitted)`` on ``done``.
    """
    writer = store_from_url(f"sqlite:///{write_path}")
    barrier.wait()  # every process opens the fresh file at once
    for index in range(RECORDS_PER_WORKER):
        customer = f"w{worker}" if index % 2 == 0 else "shared"
        writer.record_usage(_record(customer, index))
    for index in range(PAIRS_PER_WORKER):
        reservation = writer.reserve("shared", Quota(), QuotaDemand(500), now=T0)
        writer.commit(reservation, _record("shared", index))
    writer.record_usage(_record("shared", 0, record_id="written-by-every-worker"))
    writer.close()

    racer = store_from_url(f"sqlite:///{race_path}")
    quota = Quota(requests_per_minute=50, tokens_per_day=RACE_BUDGET * 100)
    racer.usage_records(limit=1)  # connect before the race starts
    barrier.wait()
    admitted = 0
    for _ in range(RACE_ATTEMPTS):
        reservation = racer.reserve("acme", quota, QuotaDemand(100), now=T0)
        if reservation.admitted:
            admitted += 1
            # 98 input + 2 output: the 100 tokens reserved
            racer.commit(reservation, _record("acme", 97, when=T0 - timedelta(seconds=1)))
    racer.close()
    done.put((worker, admitted))


@dataclass(frozen=True)
class _Run:
    write_path: Path
    race_path: Path
    admitted: dict[int, int]


@pytest.fixture(scope="module")
def processes_run(tmp_path_factory: pytest.TempPathFactory) -> _Run:
    """Run WORKERS spawned processes of :func:`_worker` once for the tests of this section."""
    folder = tmp_path_factory.mktemp("processes")
    write_path, race_path = folder / "writes.db", folder / "race.db"
    barrier = SPAWN.Barrier(WORKERS, timeout=60)
    done = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_worker, args=(str(write_path), str(race_path), i, barrier, done))
        for i in range(WORKERS)
    ]
    for process in processes:
        process.start()
    admitted: dict[int, int] = {}
    deadline = time.monotonic() + 60
    try:
        while len(admitted) < WORKERS and time.monotonic() < deadline:
            try:
                worker, count = done.get(timeout=0.2)
                admitted[worker] = count
            except queue.Empty:
                if all(p.exitcode is not None for p in processes):
                    break  # all ended: a missing result means a worker failed
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0] * WORKERS
    assert sorted(admitted) == list(range(WORKERS))
    return _Run(write_path, race_path, admitted)


def _pending_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0])


def test_processes_writing_one_file_lose_no_record(processes_run: _Run) -> None:
    """4 processes x (200 records + 20 reserve/commit pairs) on a fresh file: the report is
    exactly the sum of what each wrote, and a record_id all of them wrote is stored once."""

    def row(customer: str, indexes: list[int], extra: int = 0) -> CustomerReport:
        return CustomerReport(
            customer=customer,
            requests=len(indexes) + extra,
            input_tokens=sum(i + 1 for i in indexes) + extra,
            output_tokens=2 * (len(indexes) + extra),
            cost_usd=sum((i % 8) / 1024 for i in indexes),
        )

    own = [i for i in range(RECORDS_PER_WORKER) if i % 2 == 0]
    shared = [i for i in range(RECORDS_PER_WORKER) if i % 2 == 1] + list(range(PAIRS_PER_WORKER))
    store = SQLiteStore(processes_run.write_path)
    try:
        assert store.usage_report() == [
            row("shared", shared * WORKERS, extra=1),
            *(row(f"w{worker}", own) for worker in range(WORKERS)),
        ]
    finally:
        store.close()
    assert _pending_rows(processes_run.write_path) == 0


def test_processes_racing_for_a_budget_admit_exactly_it(processes_run: _Run) -> None:
    """4 processes x 8 reserve+commit at one instant for 10 x 100 tokens a day: 10 pass."""
    assert sum(processes_run.admitted.values()) == RACE_BUDGET
    store = SQLiteStore(processes_run.race_path)
    try:
        [report] = store.usage_report()
        assert (report.requests, report.input_tokens + report.output_tokens) == (
            RACE_BUDGET,
            RACE_BUDGET * 100,
        )
        refused = store.reserve("acme", Quota(tokens_per_day=1000), QuotaDemand(1), now=T0)
        assert refused.limit == "tokens_per_day"
    finally:
        store.close()
    assert _pending_rows(processes_run.race_path) == 0


# --- the file -----------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "usage.db"


def test_file_runs_in_wal_mode_at_the_current_schema_version(db: Path) -> None:
    """The store switches the file to WAL and stamps PRAGMA user_version."""
    store = SQLiteStore(db)
    store.record_usage(_record("acme", 0))
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    store.close()


def test_data_survives_closing_and_reopening_the_file(db: Path) -> None:
    """Everything written is there for the next store opened on the file."""
    first = SQLiteStore(db)
    written = _record("acme", 3, record_id="kept")
    first.record_usage(written)
    first.suspend("acme", reason="strikes", until=None, now=T0)
    first.remember_identifier("sid", "acme")
    lease = timedelta(minutes=5)
    assert first.claim_event("evt", token="a", now=T0, lease=lease) == "claimed"
    assert first.finish_event("evt", token="a")
    first.close()
    second = store_from_url(f"sqlite:///{db}")
    try:
        assert second.usage_records() == [written]
        assert second.suspension("acme", now=T0) is not None
        assert second.customer_for_identifier("sid") == "acme"
        assert second.claim_event("evt", token="b", now=T0, lease=lease) == "done"
    finally:
        second.close()


def test_close_closes_the_connection_of_every_thread(db: Path) -> None:
    """After close() no connection is left: SQLite checkpoints and removes the -wal file."""
    store = SQLiteStore(db)
    store.record_usage(_record("acme", 0))
    threads = [
        threading.Thread(target=store.record_usage, args=(_record("acme", i),)) for i in range(1, 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Path(f"{db}-wal").exists()
    store.close()
    assert not Path(f"{db}-wal").exists()
    with pytest.raises(StoreError, match="closed"):
        store.usage_records()


def test_later_release_migrates_an_older_file_in_place(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of schema version N is brought to N+1 by the next migration step, data kept."""
    old = SQLiteStore(db)
    old.record_usage(_record("acme", 0, record_id="before"))
    old.close()

    def add_notes(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE notes (text TEXT)")

    monkeypatch.setattr(sqlite_backend, "_MIGRATIONS", (*sqlite_backend._MIGRATIONS, add_notes))
    monkeypatch.setattr(sqlite_backend, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    new = SQLiteStore(db)
    try:
        assert [r.record_id for r in new.usage_records()] == ["before"]
    finally:
        new.close()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert raw.execute("SELECT COUNT(*) FROM notes").fetchone()[0] == 0


def test_a_version_1_file_keeps_its_handled_events_and_violations(db: Path) -> None:
    """Migrating to the current version: events handled before stay done, old violations stay
    counted."""
    with sqlite3.connect(db) as raw:
        sqlite_backend._migrate_to_1(raw)
        raw.execute("PRAGMA user_version = 1")
        # handled a day before (a claim older than EVENT_KEEP would be forgotten)
        raw.execute(
            "INSERT INTO events (event_id, claimed_at) VALUES ('evt_old', ?)",
            (T0.timestamp() - 86400,),
        )
        raw.execute(
            "INSERT INTO violations (customer_id, created_at, source, categories, detail) "
            "VALUES ('acme', ?, 'moderation', '[]', '')",
            (T0.timestamp(),),
        )
    store = SQLiteStore(db)
    try:
        lease = timedelta(minutes=5)
        assert store.claim_event("evt_old", token="t", now=T0, lease=lease) == "done"
        assert store.claim_event("evt_new", token="t", now=T0, lease=lease) == "claimed"
        assert store.count_violations("acme", since=T0) == 1
    finally:
        store.close()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_file_from_a_newer_release_is_refused(db: Path) -> None:
    """A schema version above this release's raises StoreError rather than touching the file."""
    with sqlite3.connect(db) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store = SQLiteStore(db)
    with pytest.raises(StoreError, match="newer"):
        store.usage_records()
    store.close()


def test_sqlite_errors_become_store_error_without_record_content(db: Path) -> None:
    """A failing statement raises StoreError, the sqlite3 error chained, no record text in it."""
    store = SQLiteStore(db)
    store.record_usage(_record("acme", 0))
    with sqlite3.connect(db) as raw:
        raw.execute("DROP TABLE usage_records")
    secret = _record("secret-customer-name", 0, record_id="secret-record-id")
    with pytest.raises(StoreError) as caught:
        store.record_usage(secret)
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    assert "secret" not in str(caught.value)
    store.close()


def test_a_file_that_is_not_a_database_raises_store_error(db: Path) -> None:
    """Opening garbage fails with StoreError, chained to sqlite3.DatabaseError."""
    db.write_bytes(b"definitely not sqlite " * 200)
    store = SQLiteStore(db)
    with pytest.raises(StoreError) as caught:
        store.usage_report()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    store.close()


def test_abandoned_reservations_do_not_pile_up(db: Path) -> None:
    """Pending rows long past the TTL are deleted by later reservations of the customer."""
    store = SQLiteStore(db)
    for minute in range(5):
        store.reserve("acme", Quota(), QuotaDemand(1), now=T0 + timedelta(minutes=minute))
    store.reserve("acme", Quota(), QuotaDemand(1), now=T0 + timedelta(hours=3))
    store.close()
    assert _pending_rows(db) == 1


def test_window_boundaries_hold_to_the_microsecond(db: Path) -> None:
    """One microsecond before midnight or the 1st is yesterday / last month, also when summed
    from the hourly rollup (reserves two hours later) and with a minute limit set."""
    store = SQLiteStore(db)
    midnight, month = datetime(2025, 3, 15, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)
    tiny = timedelta(microseconds=1)
    for customer, when in [
        ("before-day", midnight - tiny),
        ("at-day", midnight),
        ("before-month", month - tiny),
        ("at-month", month),
    ]:
        usage = TokenUsage(input_tokens=1000)
        store.record_usage(
            replace(_record(customer, 0), created_at=when, tokens=usage, cost_usd=7 / 1024)
        )
    day_quota = Quota(requests_per_minute=100, tokens_per_day=1000)
    usd_quota = Quota(requests_per_minute=100, usd_per_month=7 / 1024)
    later = timedelta(hours=2)
    try:
        for customer, quota, now, admitted in [
            ("before-day", day_quota, midnight + later, True),
            ("at-day", day_quota, midnight + later, False),
            ("before-month", usd_quota, month + later, True),
            ("at-month", usd_quota, month + later, False),
        ]:
            demand = QuotaDemand(tokens=1000, cost_usd=7 / 1024)
            got = store.reserve(customer, quota, demand, now=now)
            assert got.admitted is admitted, customer
    finally:
        store.close()


# --- URLs and options ---------------------------------------------------------------------------


def test_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///data/usage.db is data/usage.db under the cwd at opening time."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    store = store_from_url("sqlite:///data/usage.db")
    monkeypatch.chdir("/")  # a later chdir does not move the store
    store.record_usage(_record("acme", 0))
    store.close()
    assert (tmp_path / "data" / "usage.db").exists()


def test_memory_url_is_private_to_its_store_and_shared_by_its_threads() -> None:
    """Each sqlite:///:memory: store has its own database, which all its threads see."""
    first, second = store_from_url("sqlite:///:memory:"), store_from_url("sqlite:///:memory:")
    worker = threading.Thread(target=first.record_usage, args=(_record("acme", 0),))
    worker.start()
    worker.join()
    assert len(first.usage_records()) == 1
    assert second.usage_records() == []
    first.close()
    second.close()


@pytest.mark.parametrize(
    "url",
    ["sqlite://usage.db", "sqlite:///", "sqlite:///usage.db?timeout=5", "sqlite:/usage.db"],
)
def test_malformed_url_is_a_configuration_error(url: str) -> None:
    """A URL without the three slashes, without a path, or with a query is refused."""
    with pytest.raises(ConfigurationError):
        store_from_url(url)


@pytest.mark.parametrize(
    "options", [{"prefix": "x"}, {"synchronous": "SOMETIMES"}, {"timeout": -1}]
)
def test_bad_option_is_a_configuration_error(tmp_path: Path, options: dict[str, Any]) -> None:
    """Unknown or invalid keyword options are refused before any file is touched."""
    with pytest.raises(ConfigurationError):
        store_from_url(f"sqlite:///{tmp_path}/usage.db", **options)
    assert not (tmp_path / "usage.db").exists()


def test_datetimes_come_back_utc_and_naive_ones_are_taken_as_utc(db: Path) -> None:
    """Stored times return as aware UTC datetimes of the same instant; naive input means UTC."""
    store = SQLiteStore(db)
    plus_five = timezone(timedelta(hours=5))
    store.record_usage(_record("aware", 0, when=datetime(2025, 3, 14, 17, 0, tzinfo=plus_five)))
    store.record_usage(_record("naive", 0, when=datetime(2025, 3, 14, 12, 0)))
    times = {r.customer_id: r.created_at for r in store.usage_records()}
    store.close()
    assert times == {"aware": T0, "naive": T0}
    assert {t.utcoffset() for t in times.values()} == {timedelta(0)}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_connection(db: Path) -> None:
    """A store used before fork (a preloading web server) works in the child and the parent."""
    store = SQLiteStore(db)
    store.record_usage(_record("parent", 0))
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            store.record_usage(_record("child", 0))
            code = 0 if len(store.usage_records()) == 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.record_usage(_record("parent", 1))
    assert sorted(r.customer_id for r in store.usage_records()) == ["child", "parent", "parent"]
    store.close()


def test_a_write_waits_for_another_process_holding_the_lock(db: Path) -> None:
    """A writer blocked by another connection's write waits (busy timeout) instead of failing."""
    store = SQLiteStore(db, timeout=10)
    store.record_usage(_record("acme", 0))
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    # Timed from before the timer starts: a loaded machine that runs the commit late only
    # lengthens the wait, and cannot make it look shorter than the timer's 0.3 s.
    started = time.monotonic()
    threading.Timer(0.3, blocker.execute, args=("COMMIT",)).start()  # the other "process"
    store.record_usage(_record("acme", 1))
    assert time.monotonic() - started >= 0.25
    assert len(store.usage_records()) == 2
    blocker.close()
    store.close()


def test_a_write_gives_up_after_the_timeout_with_store_error(db: Path) -> None:
    """When the lock is held past the timeout, the write fails with StoreError."""
    store = SQLiteStore(db, timeout=0.2)
    store.record_usage(_record("acme", 0))
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError) as caught:
            store.record_usage(_record("acme", 1))
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store.close()
