"""Redis and PostgreSQL stores under real concurrency: threads, processes, first-seen customers.

Each test runs on every topology of :mod:`tests.topologies`: standalone Redis, a Redis
Cluster, a Sentinel-managed primary, PostgreSQL directly and behind PgBouncer in transaction
pooling.

Workers are spawned processes (``multiprocessing`` spawn context), each with its own store on
the same server, like replicas of a web app. They start together at a wall-clock instant handed
out by the test, so their calls overlap. Every test gets a clean namespace (a random Redis key
prefix, a fresh PostgreSQL schema) and skips when its server is absent, except under CI=true.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import pytest

from safe_openai.policy import Quota
from safe_openai.stores import (
    QuotaDemand,
    Reservation,
    Violation,
    async_store_from_url,
    store_from_url,
)
from safe_openai.stores._memory import MemoryStore
from safe_openai.usage import Outcome, TokenUsage, UsageRecord

from ..topologies import (
    POSTGRES_URL,
    REDIS_URL,
    drop_postgres_schema,
    drop_redis_prefix,
    require,
)
from ..topologies import params as topology_params

WORKERS = 3
THREADS = 8
K = 5


@dataclass(frozen=True)
class Target:
    """A server and the options that give one test its own namespace."""

    url: str
    options: dict[str, Any]

    def open(self) -> Any:
        return store_from_url(self.url, **self.options)


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true)", pytrace=False)
    pytest.skip(message)


def _reachable(url: str) -> None:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 0), timeout=2).close()
    except OSError as exc:
        _unavailable(f"{url} not reachable: {exc}")


def _drop_redis(prefix: str, url: str = REDIS_URL) -> None:
    drop_redis_prefix(url, prefix)


def _drop_postgres(schema: str) -> None:
    drop_postgres_schema(schema)


@pytest.fixture(params=topology_params())
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    tag = uuid.uuid4().hex[:10]
    url = require(request.param)
    if url.startswith("redis"):
        prefix = f"safe-openai-proc-{tag}"
        yield Target(url, {"prefix": prefix})
        _drop_redis(prefix, url)
    else:
        schema = f"safe_openai_proc_{tag}"
        yield Target(url, {"schema": schema})
        _drop_postgres(schema)


@pytest.fixture(scope="module")
def pool() -> Iterator[Any]:
    """Worker processes, spawned once for the module (spawning is the slow part)."""
    with multiprocessing.get_context("spawn").Pool(WORKERS) as workers:
        workers.map(_warm_up, range(WORKERS), chunksize=1)
        yield workers


def _warm_up(_: int) -> None:
    import safe_openai.stores._postgres
    import safe_openai.stores._redis  # noqa: F401


def _start_in(seconds: float = 0.7) -> float:
    """A wall-clock instant far enough ahead for every worker to be waiting for it."""
    return time.time() + seconds


def _wait_until(instant: float) -> None:
    time.sleep(max(0.0, instant - time.time()))


# --- workers (top level, so spawned processes can import them) ------------------------------

CUSTOMERS = ("acme", "globex", "")  # "" is the anonymous customer
OUTCOMES: tuple[Outcome, ...] = ("ok", "ok", "ok", "error", "blocked", "denied", "estimated")
BASE = datetime(2025, 6, 10, 8, 0, tzinfo=timezone.utc)


def _worker_records(worker: int, count: int) -> list[UsageRecord]:
    """The records one worker writes: deterministic, so the test can rebuild them."""
    rng = random.Random(worker)
    return [
        UsageRecord(
            customer_id=CUSTOMERS[n % len(CUSTOMERS)],
            endpoint="/chat/completions",
            model="gpt-4o-mini",
            outcome=rng.choice(OUTCOMES),
            tokens=TokenUsage(rng.randint(0, 900), rng.randint(0, 50), rng.randint(0, 300), 7),
            # multiples of 1/1024 add up exactly in any order
            cost_usd=rng.randint(0, 64) / 1024,
            created_at=BASE + timedelta(seconds=worker * 1000 + n),
            record_id=f"w{worker}-r{n}",
        )
        for n in range(count)
    ]


def _record_many(target: Target, worker: int, count: int, start_at: float) -> int:
    store = target.open()
    try:
        records = _worker_records(worker, count)
        _wait_until(start_at)
        for record in records:
            store.record_usage(record)
        # a replayed write (as from the spool) must not count twice
        store.record_usage(records[0])
        return len(records)
    finally:
        store.close()


def _reserve_in_threads(
    target: Target,
    customer: str,
    quota: Quota,
    demand: QuotaDemand,
    now: datetime,
    threads: int,
    start_at: float,
) -> int:
    store = target.open()
    admitted: list[Reservation] = []
    lock = threading.Lock()

    def attempt() -> None:
        _wait_until(start_at)
        reservation = store.reserve(customer, quota, demand, now=now)
        if reservation.admitted:
            with lock:
                admitted.append(reservation)

    try:
        pool = [threading.Thread(target=attempt) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return len(admitted)
    finally:
        store.close()


def _open_and_write(target: Target, worker: int, start_at: float) -> str | None:
    store = target.open()
    try:
        _wait_until(start_at)
        store.record_usage(_worker_records(worker, 1)[0])
        return store.customer_for_identifier("nobody")  # type: ignore[no-any-return]
    finally:
        store.close()


# --- tests -----------------------------------------------------------------------------------


def test_records_from_many_processes_add_up_exactly(target: Target, pool: Any) -> None:
    """Processes writing at once (with one replayed write each) give the reference totals."""
    count = 150
    start_at = _start_in()
    written = pool.starmap(
        _record_many, [(target, w, count, start_at) for w in range(WORKERS)], chunksize=1
    )
    assert written == [count] * WORKERS

    reference = MemoryStore()
    for worker in range(WORKERS):
        for record in _worker_records(worker, count):
            reference.record_usage(record)
    store = target.open()
    try:
        assert store.usage_report() == reference.usage_report()
        since = BASE + timedelta(seconds=1075)  # mid-way through the second worker's records
        assert store.usage_report(since=since) == reference.usage_report(since=since)
        assert store.usage_report(customer_id="acme") == reference.usage_report(customer_id="acme")
        assert len(store.usage_records(limit=10_000)) == WORKERS * count
    finally:
        store.close()


@pytest.mark.parametrize(
    ("quota", "demand"),
    [
        pytest.param(Quota(requests_per_minute=K), QuotaDemand(), id="requests_per_minute"),
        pytest.param(Quota(tokens_per_day=K * 100), QuotaDemand(tokens=100), id="tokens_per_day"),
    ],
)
def test_concurrent_reservations_in_threads_admit_exactly_k(
    target: Target, quota: Quota, demand: QuotaDemand
) -> None:
    """Many threads of one process racing for a limit of K: exactly K are admitted."""
    now = datetime.now(timezone.utc)
    admitted = _reserve_in_threads(
        target, "threads-co", quota, demand, now, threads=4 * THREADS, start_at=_start_in(0.3)
    )
    assert admitted == K


def test_concurrent_reservations_in_processes_admit_exactly_what_is_left(
    target: Target, pool: Any
) -> None:
    """Processes x threads racing on a customer with usage: exactly the remaining room fits."""
    now = datetime.now(timezone.utc)
    store = target.open()
    try:
        for n in range(2):  # 2 of the K requests already used in this minute
            store.record_usage(
                UsageRecord(
                    "busy-co", "/chat/completions", "m", "ok", created_at=now - timedelta(seconds=n)
                )
            )
    finally:
        store.close()
    start_at = _start_in()
    quota = Quota(requests_per_minute=K)
    admitted = pool.starmap(
        _reserve_in_threads,
        [(target, "busy-co", quota, QuotaDemand(), now, THREADS, start_at)] * WORKERS,
        chunksize=1,
    )
    assert sum(admitted) == K - 2


def test_first_seen_customer_raced_by_processes_gets_exactly_k(target: Target, pool: Any) -> None:
    """A customer nobody has seen, hit by every replica at once, still gets exactly K."""
    now = datetime.now(timezone.utc)
    customer = f"new-{uuid.uuid4().hex[:8]}"
    quota = Quota(requests_per_minute=K, tokens_per_minute=K * 50)
    start_at = _start_in()
    admitted = pool.starmap(
        _reserve_in_threads,
        [(target, customer, quota, QuotaDemand(tokens=50), now, THREADS, start_at)] * WORKERS,
        chunksize=1,
    )
    assert sum(admitted) == K


def test_async_store_admits_exactly_k_under_gather(target: Target) -> None:
    """The async twin, with many reservations awaited at once, admits exactly K."""

    async def race() -> int:
        store = async_store_from_url(target.url, **target.options)
        try:
            now = datetime.now(timezone.utc)
            results = await asyncio.gather(
                *(
                    store.reserve("async-co", Quota(requests_per_minute=K), QuotaDemand(), now=now)
                    for _ in range(4 * THREADS)
                )
            )
            return sum(r.admitted for r in results)
        finally:
            await store.close()

    assert asyncio.run(race()) == K


def test_reservations_match_the_reference_decisions(target: Target) -> None:
    """Random reserve/commit/release/record sequences decide exactly as MemoryStore does.

    The clock crosses midnight at the end of a month, so the minute, day and month windows all
    roll over, and replicas' clocks disagree by up to 90 s, so some entries are stamped after
    the deciding call's ``now``. retry_after must be the same float, not just close.
    """
    rng = random.Random(20250131)
    reference, store = MemoryStore(), target.open()
    now = datetime(2025, 1, 31, 23, 58, 30, tzinfo=timezone.utc)
    held: list[tuple[Reservation, Reservation, datetime]] = []
    decisions = set()
    try:
        for step in range(400):
            now += timedelta(microseconds=rng.randint(0, 8_000_000))
            customer = rng.choice(["a", "b"])
            action = rng.random()
            if action < 0.5:
                quota = Quota(
                    requests_per_minute=rng.choice([None, 0, 3, 5]),
                    tokens_per_minute=rng.choice([None, 500, 1000]),
                    tokens_per_day=rng.choice([None, 5000, 20000]),
                    usd_per_month=rng.choice([None, 0.5, 2.0]),
                )
                demand = QuotaDemand(rng.choice([0, 100, 300, 2000]), rng.choice([0.0, 0.05]))
                # a caller whose clock reads a little behind the others'
                skewed = now - timedelta(microseconds=rng.choice([0, 0, 1_500_000]))
                expected = reference.reserve(customer, quota, demand, now=skewed)
                got = store.reserve(customer, quota, demand, now=skewed)
                assert (got.admitted, got.limit, got.retry_after) == (
                    expected.admitted,
                    expected.limit,
                    expected.retry_after,
                ), f"step {step}"
                decisions.add(expected.limit)
                if got.admitted:
                    held.append((expected, got, skewed))
            elif action < 0.8 and held:
                expected, got, at = held.pop(rng.randrange(len(held)))
                if rng.random() < 0.8:
                    record = UsageRecord(
                        expected.customer_id,
                        "/responses",
                        "m",
                        rng.choice(["ok", "error", "blocked"]),
                        TokenUsage(rng.randint(0, 400), 0, rng.randint(0, 400)),
                        cost_usd=rng.choice([None, 0.0625, 0.125]),
                        created_at=at,
                        record_id=uuid.uuid4().hex,
                    )
                    reference.commit(expected, record)
                    store.commit(got, record)
                else:
                    reference.release(expected)
                    store.release(got)
            else:
                record = UsageRecord(
                    customer,
                    "/chat/completions",
                    "m",
                    "ok",
                    TokenUsage(rng.randint(0, 300), 0, 5),
                    cost_usd=0.0625,
                    # replicas' clocks disagree: some records are stamped after `now`,
                    # across the midnight and month boundaries too
                    created_at=now + timedelta(seconds=rng.randint(-90, 90)),
                    record_id=uuid.uuid4().hex,
                )
                reference.record_usage(record)
                store.record_usage(record)
        # every limit refused at least once, and some admitted: the sequence tested something
        assert decisions >= {
            None,
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
            "usd_per_month",
        }
        assert store.usage_report() == reference.usage_report()
    finally:
        store.close()


@pytest.mark.parametrize(
    "quota",
    [
        pytest.param(Quota(tokens_per_day=1000), id="tokens_per_day"),
        pytest.param(Quota(usd_per_month=5.0), id="usd_per_month"),
        pytest.param(Quota(requests_per_minute=1), id="requests_per_minute"),
    ],
)
@pytest.mark.parametrize(
    ("now", "ahead"),
    [
        # counts: within the skew allowance, though in the next day and month
        pytest.param(datetime(2025, 1, 31, 23, 59, 30, tzinfo=timezone.utc), 40, id="next-month"),
        # ignored: beyond the allowance, in the same day and month as now
        pytest.param(datetime(2025, 1, 15, 12, 0, tzinfo=timezone.utc), 90, id="beyond-skew"),
    ],
)
def test_records_stamped_after_now_count_as_the_reference_says(
    target: Target, quota: Quota, now: datetime, ahead: int
) -> None:
    """Records stamped after now (fast clocks) count within CLOCK_SKEW, as the reference says."""
    record = UsageRecord(
        "skewed-co",
        "/responses",
        "m",
        "ok",
        TokenUsage(1000, 0, 0),
        cost_usd=5.0,
        created_at=now + timedelta(seconds=ahead),
        record_id="from-the-future",
    )
    reference, store = MemoryStore(), target.open()
    try:
        reference.record_usage(record)
        store.record_usage(record)
        demand = QuotaDemand(tokens=1, cost_usd=0.5)
        expected = reference.reserve("skewed-co", quota, demand, now=now)
        got = store.reserve("skewed-co", quota, demand, now=now)
        assert (got.admitted, got.limit, got.retry_after) == (
            expected.admitted,
            expected.limit,
            expected.retry_after,
        )
    finally:
        store.close()


# --- backend specifics -----------------------------------------------------------------------


@pytest.mark.redis
def test_redis_keys_share_a_slot_per_customer_and_only_windows_expire() -> None:
    """Every key of a customer carries one hash tag; windows have TTLs, history does not."""
    import redis

    _reachable(REDIS_URL)
    prefix = f"safe-openai-keys-{uuid.uuid4().hex[:10]}"
    store = store_from_url(REDIS_URL, prefix=prefix)
    now = datetime.now(timezone.utc)
    customers = ["plain", "with{braces}", ""]
    try:
        for customer in customers:
            held = store.reserve(customer, Quota(tokens_per_day=10**6), QuotaDemand(5), now=now)
            store.commit(held, UsageRecord(customer, "/x", "m", "ok", created_at=now))
            store.reserve(customer, Quota(requests_per_minute=100), QuotaDemand(), now=now)
            store.record_violation(Violation(customer, now, "moderation"))
            store.suspend(customer, reason="test", until=None, now=now)
        store.remember_identifier("sid", "plain")
        lease = timedelta(minutes=5)
        assert store.claim_event("evt_1", token="t", now=now, lease=lease) == "claimed"

        client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        tags: dict[str, set[str]] = {}
        for key in keys:
            rest = key[len(prefix) :]
            if "{" in rest:
                # Redis hashes the text between the first "{" and the next "}"
                tag = rest[rest.index("{") + 1 : rest.index("}", rest.index("{"))]
                assert tag, f"empty hash tag in {key!r} would not pin a slot"
                tags.setdefault(tag, set()).add(rest[rest.index("}") + 1 :])
        assert len(tags) == len(customers)
        for names in tags.values():
            assert {":rec", ":recs", ":sums", ":viol", ":susp", ":q:seconds", ":q:holds"} <= names
            assert any(name.startswith(":hold:") for name in names)
        assert f"{prefix}:event:evt_1" in keys  # one key per event, no hash tag needed

        ttls = {key[len(prefix) :]: client.ttl(key) for key in keys}
        client.close()
        for name, ttl in ttls.items():
            windowed = any(part in name for part in (":q:", ":hold:", ":day:", ":month:"))
            if windowed:
                assert 0 < ttl <= 40 * 86400, name
            elif name.startswith(":event:"):
                # a claim lives EVENT_KEEP (32 days): a month window's alert id stays done
                assert 31 * 86400 < ttl <= 32 * 86400, name
            else:
                assert ttl == -1, f"{name} is durable and must not expire"
    finally:
        store.close()
        _drop_redis(prefix)


@pytest.mark.postgres
def test_postgres_schema_created_once_by_processes_starting_together(pool: Any) -> None:
    """Replicas opening a fresh schema at the same instant migrate it once, without errors."""
    import psycopg

    _reachable(POSTGRES_URL)
    schema = f"safe_openai_migrate_{uuid.uuid4().hex[:10]}"
    target = Target(POSTGRES_URL, {"schema": schema})
    start_at = _start_in()
    try:
        results = pool.starmap(
            _open_and_write, [(target, w, start_at) for w in range(WORKERS)], chunksize=1
        )
        assert results == [None] * WORKERS
        with psycopg.connect(POSTGRES_URL) as conn:
            versions = conn.execute(
                f'SELECT version FROM "{schema}".schema_version ORDER BY version'
            ).fetchall()
            indexes = {
                row[0]
                for row in conn.execute(
                    "SELECT indexdef FROM pg_indexes WHERE schemaname = %s "
                    "AND tablename = 'usage_records'",
                    (schema,),
                )
            }
            count = conn.execute(f'SELECT count(*) FROM "{schema}".usage_records').fetchone()
        from safe_openai.stores._postgres import SCHEMA_VERSION

        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        assert count == (WORKERS,)
        assert any("(customer_id, created_at)" in index for index in indexes)
        assert any(index.endswith("(created_at)") for index in indexes)
    finally:
        _drop_postgres(schema)
