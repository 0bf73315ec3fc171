"""The local spool: records the store could not take survive on disk and reach it exactly once."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from safe_openai.errors import StoreError
from safe_openai.policy import Quota
from safe_openai.stores import QuotaDemand, UsageStore, store_from_url
from safe_openai.stores._memory import AsyncMemoryStore, MemoryStore
from safe_openai.stores._spool import Spool, default_spool_dir
from safe_openai.usage import TokenUsage, UsageRecord

REDIS_URL = os.environ.get("SAFE_OPENAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("SAFE_OPENAI_TEST_POSTGRES_URL", "postgresql://127.0.0.1:5432/test")
NOW = datetime(2025, 3, 14, 12, 0, tzinfo=timezone.utc)


def make_record(n: int, customer: str = "acme", **changes: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "customer_id": customer,
        "endpoint": "/chat/completions",
        "model": "gpt-4o-mini",
        "outcome": "ok",
        "tokens": TokenUsage(100 + n, 0, 10),
        "cost_usd": 0.001,
        "created_at": NOW + timedelta(milliseconds=n),
        "record_id": f"rec-{n}",
    }
    fields.update(changes)
    return UsageRecord(**fields)


def record_ids(store: Any, customer: str | None = None) -> list[str]:
    return sorted(r.record_id for r in store.usage_records(customer_id=customer, limit=100_000))


class FlakyStore:
    """A memory store whose writes fail with ``error`` from the ``fail_at``-th write on."""

    def __init__(self, fail_at: int, error: BaseException | None = None) -> None:
        self.inner = MemoryStore()
        self.fail_at = fail_at
        self.error = error or StoreError("store unreachable")
        self.writes = 0

    def _write(self) -> None:
        self.writes += 1
        if self.writes >= self.fail_at:
            raise self.error

    def record_usage(self, record: UsageRecord) -> None:
        self._write()
        self.inner.record_usage(record)

    def commit(self, reservation: Any, record: UsageRecord) -> None:
        self._write()
        self.inner.commit(reservation, record)


def _require(url: str) -> None:
    """Skip (fail under CI=true) when the server behind ``url`` is not listening."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 0), timeout=2).close()
    except OSError as exc:
        message = f"{url} not reachable: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


# --- basics ------------------------------------------------------------------------------------


def test_append_is_counted_and_drain_writes_every_record(tmp_path: Path) -> None:
    """len() counts appended records; drain() writes all of them and leaves nothing behind."""
    spool = Spool(tmp_path)
    store = MemoryStore()
    for n in range(5):
        spool.append(make_record(n))
    assert len(spool) == 5

    assert spool.drain(store) == 5

    assert len(spool) == 0
    assert record_ids(store) == [f"rec-{n}" for n in range(5)]
    assert spool.drain(store) == 0


def test_spooled_record_with_reservation_commits_it(tmp_path: Path) -> None:
    """A record spooled with its reservation id is committed: the pending hold is dropped."""
    store = MemoryStore()
    quota = Quota(requests_per_minute=2)
    held = store.reserve("acme", quota, QuotaDemand(), now=NOW)
    spool = Spool(tmp_path)
    spool.append(make_record(0, created_at=NOW), held.id)

    spool.drain(store)

    # the record replaces the hold (1 used), so one more call fits and a third does not;
    # had the record been added beside the hold, the second reserve would already fail
    assert store.reserve("acme", quota, QuotaDemand(), now=NOW).admitted
    assert not store.reserve("acme", quota, QuotaDemand(), now=NOW).admitted


def test_record_without_id_gets_one_so_replays_stay_idempotent(tmp_path: Path) -> None:
    """An id-less record is given a record_id when spooled; draining twice stores it once."""
    spool = Spool(tmp_path)
    spool.append(make_record(0, record_id=""))
    claimed = next(tmp_path.glob("*.jsonl")).read_bytes()
    store = MemoryStore()

    spool.drain(store)
    # replay the same file, as after a crash between writing and deleting it
    (tmp_path / "replay.jsonl").write_bytes(claimed)
    spool.drain(store)

    records = store.usage_records()
    assert len(records) == 1
    assert records[0].record_id


def test_records_survive_a_restart(tmp_path: Path) -> None:
    """A new Spool on the same directory (a restarted process) sees and drains old records."""
    first = Spool(tmp_path)
    for n in range(3):
        first.append(make_record(n))
    del first

    restarted = Spool(tmp_path)
    store = MemoryStore()
    assert len(restarted) == 3
    assert restarted.drain(store) == 3
    assert record_ids(store) == ["rec-0", "rec-1", "rec-2"]


def test_default_directory_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAFE_OPENAI_SPOOL_DIR wins; otherwise the spool lives under the user cache directory."""
    monkeypatch.setenv("SAFE_OPENAI_SPOOL_DIR", str(tmp_path / "configured"))
    spool = Spool()
    assert spool.directory == tmp_path / "configured"
    spool.append(make_record(0))
    assert len(Spool(tmp_path / "configured")) == 1

    monkeypatch.delenv("SAFE_OPENAI_SPOOL_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if sys.platform not in ("darwin", "win32"):
        assert default_spool_dir() == tmp_path / "cache" / "safe-openai" / "spool"


def test_opening_a_spool_touches_no_disk_and_it_is_truthy_when_empty(tmp_path: Path) -> None:
    """Spool() creates nothing until the first append, and an empty spool is still truthy.

    Clients hold a spool as an optional service (``spool or None``); an empty one must not be
    mistaken for "no spool".
    """
    spool = Spool(tmp_path / "not-yet")
    assert not (tmp_path / "not-yet").exists()
    assert len(spool) == 0
    assert spool.drain(MemoryStore()) == 0
    assert bool(spool) is True
    spool.append(make_record(0))
    assert len(spool) == 1


# --- failures --------------------------------------------------------------------------------


def test_store_failing_mid_drain_keeps_the_rest(tmp_path: Path) -> None:
    """drain() stops at the first StoreError; the failed record and those after it stay."""
    spool = Spool(tmp_path)
    for n in range(5):
        spool.append(make_record(n))
    flaky = FlakyStore(fail_at=3)

    assert spool.drain(flaky) == 2  # type: ignore[arg-type]

    assert record_ids(flaky.inner) == ["rec-0", "rec-1"]
    assert len(spool) == 3
    healthy = MemoryStore()
    assert spool.drain(healthy) == 3
    assert record_ids(healthy) == ["rec-2", "rec-3", "rec-4"]
    assert len(spool) == 0


def test_crash_mid_drain_replays_harmlessly(tmp_path: Path) -> None:
    """A drain killed mid-way leaves its claimed file; the next drain rewrites it, once each."""
    spool = Spool(tmp_path)
    for n in range(4):
        spool.append(make_record(n))
    crashing = FlakyStore(fail_at=3, error=KeyboardInterrupt())

    with pytest.raises(KeyboardInterrupt):
        spool.drain(crashing)  # type: ignore[arg-type]

    assert len(spool) == 4  # nothing dropped: the file was not finished
    store = crashing.inner  # the same store, which already holds rec-0 and rec-1
    assert Spool(tmp_path).drain(store) == 4
    assert record_ids(store) == ["rec-0", "rec-1", "rec-2", "rec-3"]
    assert len(spool) == 0


def test_torn_line_from_a_crashed_append_is_skipped(tmp_path: Path) -> None:
    """A half-written line (the append never returned) does not swallow later records."""
    spool = Spool(tmp_path)
    spool.append(make_record(0))
    path = next(tmp_path.glob("*.jsonl"))
    with open(path, "ab") as handle:
        handle.write(b'{"v":1,"record":{"customer_id":"ac')  # torn: no end, no newline
    spool.append(make_record(1))

    assert len(spool) == 2
    store = MemoryStore()
    assert spool.drain(store) == 2
    assert record_ids(store) == ["rec-0", "rec-1"]


def test_records_appended_during_a_failed_drain_are_kept(tmp_path: Path) -> None:
    """Appends after a partial drain land beside its leftovers; nothing overwrites anything."""
    spool = Spool(tmp_path)
    spool.append(make_record(0))
    spool.append(make_record(1))
    assert spool.drain(FlakyStore(fail_at=2)) == 1  # type: ignore[arg-type]
    spool.append(make_record(2))  # same process, same file name as the half-drained one
    assert spool.drain(FlakyStore(fail_at=99)) == 2  # type: ignore[arg-type]
    assert len(spool) == 0


async def test_adrain_writes_every_record_and_stops_at_a_store_error(tmp_path: Path) -> None:
    """adrain() is drain() for async stores: all written, or stopped at the first StoreError."""
    spool = Spool(tmp_path)
    for n in range(4):
        spool.append(make_record(n))

    class FlakyAsync:
        def __init__(self) -> None:
            self.inner = AsyncMemoryStore()
            self.calls = 0

        async def record_usage(self, record: UsageRecord) -> None:
            self.calls += 1
            if self.calls == 3:
                raise StoreError("down")
            await self.inner.record_usage(record)

    flaky = FlakyAsync()
    assert await spool.adrain(flaky) == 2  # type: ignore[arg-type]
    assert len(spool) == 2
    store = AsyncMemoryStore()
    assert await spool.adrain(store) == 2
    assert sorted(r.record_id for r in await store.usage_records()) == ["rec-2", "rec-3"]


# --- several processes -----------------------------------------------------------------------


def _append_then_drain(directory: str, url: str, worker: int, count: int, barrier: Any) -> None:
    spool = Spool(directory)
    for n in range(count):
        spool.append(make_record(worker * 1000 + n, record_id=f"w{worker}-{n}"))
    barrier.wait()
    store = store_from_url(url)
    try:
        # drain repeatedly while the other process drains too
        for _ in range(3):
            spool.drain(store)
    finally:
        store.close()


def test_concurrent_appends_and_drains_by_processes_lose_nothing(tmp_path: Path) -> None:
    """Two processes append and drain one directory at once: every record lands exactly once."""
    directory = tmp_path / "spool"
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2, timeout=60)
    workers = [
        context.Process(target=_append_then_drain, args=(str(directory), url, w, 60, barrier))
        for w in range(2)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(90)
        assert process.exitcode == 0

    spool = Spool(directory)
    store = store_from_url(url)
    try:
        spool.drain(store)  # whatever a drain that lost the race left behind
        assert len(spool) == 0
        ids = [r.record_id for r in store.usage_records(limit=10_000)]
    finally:
        store.close()
    assert sorted(ids) == sorted(f"w{w}-{n}" for w in range(2) for n in range(60))


# --- outages of real servers -------------------------------------------------------------------


@pytest.fixture
def redis_store() -> Iterator[UsageStore]:
    _require(REDIS_URL)
    prefix = f"safe-openai-spool-test-{uuid.uuid4().hex[:10]}"
    store = store_from_url(REDIS_URL, prefix=prefix)
    yield store
    store.close()
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def postgres_store() -> Iterator[UsageStore]:
    _require(POSTGRES_URL)
    schema = f"safe_openai_spool_{uuid.uuid4().hex[:10]}"
    store = store_from_url(POSTGRES_URL, schema=schema, timeout=5)
    yield store
    store.close()
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _spool_through_outage(down: UsageStore, up: UsageStore, directory: Path) -> None:
    spool = Spool(directory)
    records = [make_record(n) for n in range(10)]
    started = time.monotonic()
    for record in records:
        with pytest.raises(StoreError) as caught:
            down.record_usage(record)
        assert caught.value.__cause__ is not None  # the driver's error is chained
        spool.append(record)
    assert time.monotonic() - started < 10, "an unreachable store must fail fast"
    assert len(spool) == len(records)

    assert spool.drain(down) == 0  # still down: everything stays
    assert len(spool) == len(records)
    assert spool.drain(up) == len(records)
    assert spool.drain(up) == 0
    assert record_ids(up) == sorted(r.record_id for r in records)


@pytest.mark.redis
def test_redis_outage_spools_records_then_drains_them_once(
    tmp_path: Path, redis_store: UsageStore
) -> None:
    """A Redis on a dead port raises StoreError fast; spooled records later land exactly once."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    down = store_from_url(
        "redis://127.0.0.1:1/0",
        socket_connect_timeout=0.2,
        socket_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        _spool_through_outage(down, redis_store, tmp_path)
    finally:
        down.close()


@pytest.mark.postgres
def test_postgres_outage_spools_records_then_drains_them_once(
    tmp_path: Path, postgres_store: UsageStore
) -> None:
    """A PostgreSQL on a dead port raises StoreError; spooled records later land exactly once."""
    down = store_from_url("postgresql://127.0.0.1:1/test", timeout=0.3, connect_timeout=1)
    try:
        _spool_through_outage(down, postgres_store, tmp_path)
    finally:
        down.close()
