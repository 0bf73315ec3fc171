"""Throughput of each usage store backend: usage writes and quota checks per second.

For every backend URL (memory, a SQLite file, Redis, PostgreSQL, and the topologies: a Redis
Cluster, a Sentinel-managed primary, PostgreSQL with prepared statements and behind PgBouncer)
this measures, on one synchronous store in one thread:

- ``record_usage``: records written per second (each its own durable write);
- ``reserve+commit``: quota checks per second, each a reservation against a quota with every
  limit set (so every window is evaluated) followed by the commit of its usage record;
- ``report``: milliseconds for ``usage_report()`` over everything written;
- ``store ms per guarded call``: a SafeClient with a quota on every limit, calling chat
  completions over the offline FakeOpenAI transport (moderation cached), per call, minus the
  same client on ``memory://`` in the same run: the time the store adds to one guarded call
  (standing check, reservation, commit, identifier and request maps);
- ``vs standalone``: that store time as a ratio to the standalone server of its family in the
  same run (Redis for the Redis topologies, PostgreSQL on a direct connection without
  prepared statements for PostgreSQL's).

Ten customers share the load, so each customer's minute window holds many entries, as for a
busy tenant. A measurement stops after ``--records`` operations or ``--seconds`` seconds,
whichever comes first, and reports the rate of what it did. Servers that cannot be reached are
skipped with a note. Each run uses its own Redis key prefix / PostgreSQL schema / SQLite file
and removes it afterwards.

The growth table: for a tenant with 0, 1,000, 10,000 and 50,000 calls already in its minute
window (records stamped in the last 5 s, written just before; all tenants are filled, then
measured in interleaved rounds), the time of a store-level
``reserve`` + ``commit`` and of a whole guarded call (a ``SafeClient`` with a quota, moderation
cached), per backend, and their ratios to the 0-entry tenant in the same run. With an O(1)
quota state the ratios stay near 1.

Round trips per guarded call: the store round trips one guarded call makes, counted by a
wrapper around the store's network layer (one Redis pipeline, one SQLite transaction, one
batch of PostgreSQL statements sent together in pipeline mode; psycopg's own waits for
``BEGIN`` and at each pipeline's end are not counted), and on Redis the commands the server
counted (``INFO commandstats`` deltas; server-wide, so exact only when nothing else runs).

Usage: ``python benchmarks/stores.py [--records 2000] [--seconds 8]
[--redis-url URL] [--postgres-url URL] [--growth 0,1000,10000,50000] [--redis-cluster-url URL]
[--redis-sentinel-url URL] [--pgbouncer-url URL]``. The topology URLs default to those
``.ci/topologies.sh start`` wrote (``.topologies/env``). Results are printed as tables and
written to ``benchmarks/results/stores.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from safe_openai import DefaultPolicy, SafeClient
from safe_openai.errors import StoreError
from safe_openai.policy import Quota
from safe_openai.stores import QuotaDemand, UsageStore, store_from_url
from safe_openai.stores._memory import MemoryStore
from safe_openai.testing import FakeOpenAI
from safe_openai.usage import TokenUsage, UsageRecord

RESULTS = Path(__file__).parent / "results" / "stores.json"
TOPOLOGY_ENV = Path(__file__).resolve().parents[1] / ".topologies" / "env"
#: Each topology row's standalone server, whose store time it is compared with.
FAMILY = {
    "redis-cluster": "redis",
    "redis-sentinel": "redis",
    "postgres-prepared": "postgres",
    "pgbouncer": "postgres",
}


def _topology_url(name: str) -> str:
    """A topology's URL from the environment, else from ``.ci/topologies.sh``'s env file."""
    if os.environ.get(name):
        return os.environ[name]
    try:
        lines = TOPOLOGY_ENV.read_text().splitlines()
    except OSError:
        return ""
    return dict(line.split("=", 1) for line in lines if "=" in line).get(name, "")


# High enough never to refuse: every window is still evaluated on each call.
GUARDED_QUOTA = Quota(
    requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**12, usd_per_month=1e9
)
CUSTOMERS = [f"customer-{n}" for n in range(10)]
# every limit set and none reached: each check evaluates every window
QUOTA = Quota(
    requests_per_minute=10**9,
    tokens_per_minute=10**12,
    tokens_per_day=10**12,
    usd_per_month=10.0**9,
)


def _record(n: int) -> UsageRecord:
    return UsageRecord(
        customer_id=CUSTOMERS[n % len(CUSTOMERS)],
        endpoint="/chat/completions",
        model="gpt-4o-mini",
        outcome="ok",
        tokens=TokenUsage(1200, 200, 300, 0),
        cost_usd=0.00042,
        latency_s=0.8,
        created_at=datetime.now(timezone.utc),
        record_id=uuid.uuid4().hex,
    )


def _rate(operation: Callable[[int], None], limit: int, seconds: float) -> tuple[float, int]:
    """Run ``operation(n)`` up to ``limit`` times or ``seconds``; return (per second, count)."""
    started = time.perf_counter()
    deadline = started + seconds
    done = 0
    while done < limit:
        operation(done)
        done += 1
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - started
    return done / elapsed, done


def measure(store: UsageStore, records: int, seconds: float) -> dict[str, Any]:
    def write(n: int) -> None:
        store.record_usage(_record(n))

    def check(n: int) -> None:
        record = _record(n)
        reservation = store.reserve(
            record.customer_id,
            QUOTA,
            QuotaDemand(tokens=2000, cost_usd=0.001),
            now=record.created_at,
        )
        assert reservation.admitted
        store.commit(reservation, record)

    write(0)  # connect, create the schema, load scripts: not part of the figures
    writes, written = _rate(write, records, seconds)
    checks, checked = _rate(check, records, seconds)
    started = time.perf_counter()
    rows = store.usage_report()
    report_ms = (time.perf_counter() - started) * 1000
    assert sum(row.requests for row in rows) == written + checked + 1
    return {
        "record_usage_per_s": round(writes, 1),
        "records_written": written,
        "reserve_commit_per_s": round(checks, 1),
        "checks_done": checked,
        "report_ms": round(report_ms, 1),
    }


def guarded_call_ms(
    store: UsageStore, calls: int, *, customer: str | None = None, rounds: int = 5
) -> float:
    """Milliseconds per guarded chat call on ``store``, moderation served from the cache."""
    fake = FakeOpenAI(reply="ok")
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret="benchmark-secret",
        store=store,
        spool=False,
        policy=DefaultPolicy(quota=GUARDED_QUOTA),
    ).for_customer(customer or f"bench-{uuid.uuid4().hex[:8]}")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for _ in range(5):
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    best = float("inf")
    for _ in range(rounds):  # the fastest round: the slower ones measure other processes
        started = time.perf_counter()
        for _ in range(calls):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1000


def _fill(store: UsageStore, customer: str, entries: int) -> None:
    """Put ``entries`` calls in ``customer``'s minute window: records stamped in the last 5 s."""
    from concurrent.futures import ThreadPoolExecutor

    def write(chunk: range) -> None:
        for n in chunk:
            store.record_usage(
                UsageRecord(
                    customer_id=customer,
                    endpoint="/chat/completions",
                    model="gpt-4o-mini",
                    outcome="ok",
                    tokens=TokenUsage(10, 0, 10, 0),
                    cost_usd=0.0,
                    latency_s=0.1,
                    created_at=datetime.now(timezone.utc)
                    - timedelta(microseconds=(n * 397) % 5_000_000),
                    record_id=uuid.uuid4().hex,
                )
            )

    # SQLite and memory take one writer at a time anyway; servers are filled by 8 threads
    threads = 1 if isinstance(store, MemoryStore) else 8
    step = max(1, entries // threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, [range(i, min(i + step, entries)) for i in range(0, entries, step)]))


def growth(store: UsageStore, sizes: list[int], calls: int) -> list[dict[str, Any]]:
    """reserve+commit and a whole guarded call for tenants with ``sizes`` entries.

    Every tenant is filled first (the largest first), then all are measured in two interleaved
    rounds and each keeps its fastest, so they share the store's state and the machine's load.
    """
    tenants = {size: f"tenant-{size}-{uuid.uuid4().hex[:6]}" for size in sizes}
    for size in sorted(sizes, reverse=True):
        _fill(store, tenants[size], size)
    best: dict[int, list[float]] = {size: [float("inf"), float("inf")] for size in sizes}
    for _ in range(2):
        for size in sizes:
            tenant = tenants[size]
            started = time.perf_counter()
            done = 0
            while done < 100 and time.perf_counter() - started < 1.5:
                reservation = store.reserve(tenant, QUOTA, QuotaDemand(tokens=2000, cost_usd=0.001))
                assert reservation.admitted
                store.commit(reservation, replace(_record(done), customer_id=tenant))
                done += 1
            reserve_ms = (time.perf_counter() - started) / done * 1000
            call_ms = guarded_call_ms(store, calls, customer=tenant, rounds=1)
            best[size] = [min(best[size][0], reserve_ms), min(best[size][1], call_ms)]
    rows = [
        {
            "entries": size,
            "reserve_commit_ms": round(best[size][0], 3),
            "guarded_call_ms": round(best[size][1], 3),
        }
        for size in sizes
    ]
    base = rows[0]
    for row in rows:
        row["reserve_commit_ratio"] = round(row["reserve_commit_ms"] / base["reserve_commit_ms"], 2)
        row["guarded_call_ratio"] = round(row["guarded_call_ms"] / base["guarded_call_ms"], 2)
    return rows


class _Counted:
    """Counts the round trips of a built-in store: Redis pipelines, PostgreSQL statements and
    transactions, SQLite transactions."""

    def __init__(self, store: Any) -> None:
        self.trips = 0
        self.transactions = 0
        kind = type(store).__name__
        if kind == "RedisStore":
            send = store._send

            def counted_send(batch: Any) -> Any:
                self.trips += 1
                return send(batch)

            store._send = counted_send
        elif kind == "PostgresStore":
            execute = store._execute

            def counted_execute(op: Any) -> Any:
                # One round trip per step the operation sends (several statements of a step go
                # out together in pipeline mode); BEGIN rides with a first step of several
                # statements, COMMIT with a step marked last; otherwise each is one more.
                def counting() -> Any:
                    step = next(op)
                    first, committed = True, False
                    while True:
                        self.trips += 1
                        queries = step if isinstance(step, tuple) else (step,)
                        if first and len(queries) == 1 and not queries[0].last:
                            self.trips += 1  # BEGIN on its own
                        first = False
                        committed = committed or queries[-1].last
                        try:
                            step = op.send((yield step))
                        except StopIteration as done:
                            if not committed:
                                self.trips += 1  # COMMIT on its own
                            return done.value

                return execute(counting())

            store._execute = counted_execute
        elif kind == "SQLiteStore":
            transaction = store._transaction

            def counted_transaction(action: str, begin: str | None = None) -> Any:
                self.transactions += 1
                return transaction(action, begin)

            store._transaction = counted_transaction

    @property
    def round_trips(self) -> int:
        return self.trips or self.transactions


def round_trips(store: Any, url: str, calls: int) -> dict[str, Any]:
    """Store round trips (and Redis commands) per guarded call, after a warm-up call."""
    fake = FakeOpenAI(reply="ok")
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret="benchmark-secret",
        store=store,
        spool=False,
        policy=DefaultPolicy(quota=GUARDED_QUOTA),
    ).for_customer(f"trips-{uuid.uuid4().hex[:8]}")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    counter = _Counted(store)
    # INFO commandstats of one server: not for a cluster's or Sentinel's URL
    standalone = url.partition("://")[0] in ("redis", "rediss")
    before = _commandstats(url) if type(store).__name__ == "RedisStore" and standalone else None
    for _ in range(calls):
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    row: dict[str, Any] = {"round_trips_per_call": round(counter.round_trips / calls, 2)}
    if before is not None:
        after = _commandstats(url)
        row["redis_commands_per_call"] = {
            name: round((after.get(name, 0) - before.get(name, 0)) / calls, 2)
            for name in sorted(after)
            if after.get(name, 0) - before.get(name, 0) >= calls // 2
        }
    for name in ("_send", "_execute", "_transaction"):
        store.__dict__.pop(name, None)
    return row


def _commandstats(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def _reachable(url: str, default_port: int) -> str | None:
    if not url:
        return "no URL (start the topologies: .ci/topologies.sh start)"
    # the first node of a multi-host URL
    netloc = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    parts = urlsplit("//" + netloc.split(",")[0])
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"not reachable at {host}:{port} ({exc.strerror or exc})"
    return None


def _drop_redis(url: str, prefix: str) -> None:
    from safe_openai.stores._redis import RedisStore

    client = RedisStore.from_url(url, wait_replicas=0).client  # any topology
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for key in keys:  # one by one: on a cluster they live in many slots
            client.delete(key)
    finally:
        client.close()


def _drop_postgres(url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def backends(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Each backend: name, URL, store options, a reachability note and a cleanup."""
    tag = uuid.uuid4().hex[:10]
    prefix, schema = f"safe-openai-bench-{tag}", f"safe_openai_bench_{tag}"
    return [
        {"name": "memory", "url": "memory://", "options": {}, "skip": None, "cleanup": None},
        {
            "name": "sqlite",
            "url": f"sqlite:///{workdir / 'bench.db'}",
            "options": {},
            "skip": None,
            "cleanup": None,
        },
        {
            "name": "redis",
            "url": args.redis_url,
            "options": {"prefix": prefix},
            "skip": _reachable(args.redis_url, 6379),
            "cleanup": lambda: _drop_redis(args.redis_url, prefix),
        },
        {
            "name": "postgres",
            "url": args.postgres_url,
            "options": {"schema": schema},
            "skip": _reachable(args.postgres_url, 5432),
            "cleanup": lambda: _drop_postgres(args.postgres_url, schema),
        },
        {
            "name": "redis-cluster",
            "url": args.redis_cluster_url,
            "options": {"prefix": prefix + "-cluster"},
            "skip": _reachable(args.redis_cluster_url, 6379),
            "cleanup": lambda: _drop_redis(args.redis_cluster_url, prefix + "-cluster"),
        },
        {
            "name": "redis-sentinel",
            "url": args.redis_sentinel_url,
            "options": {"prefix": prefix + "-sentinel"},
            "skip": _reachable(args.redis_sentinel_url, 26379),
            "cleanup": lambda: _drop_redis(args.redis_sentinel_url, prefix + "-sentinel"),
        },
        {
            # psycopg's own default: prepare a statement after 5 executions (direct only)
            "name": "postgres-prepared",
            "url": args.postgres_url,
            "options": {"schema": schema + "_prepared", "prepare_threshold": 5},
            "skip": _reachable(args.postgres_url, 5432),
            "cleanup": lambda: _drop_postgres(args.postgres_url, schema + "_prepared"),
        },
        {
            "name": "pgbouncer",
            "url": args.pgbouncer_url,
            "options": {"schema": schema + "_bouncer"},
            "skip": _reachable(args.pgbouncer_url, 6432),
            "cleanup": lambda: _drop_postgres(args.postgres_url, schema + "_bouncer"),
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="operations per measurement")
    parser.add_argument("--seconds", type=float, default=8.0, help="time cap per measurement")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SAFE_OPENAI_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15"),
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("SAFE_OPENAI_BENCH_POSTGRES_URL", "postgresql://127.0.0.1/test"),
    )
    parser.add_argument(
        "--redis-cluster-url", default=_topology_url("SAFE_OPENAI_TEST_REDIS_CLUSTER_URL")
    )
    parser.add_argument(
        "--redis-sentinel-url", default=_topology_url("SAFE_OPENAI_TEST_REDIS_SENTINEL_URL")
    )
    parser.add_argument("--pgbouncer-url", default=_topology_url("SAFE_OPENAI_TEST_PGBOUNCER_URL"))
    parser.add_argument("--calls", type=int, default=100, help="guarded calls per round")
    parser.add_argument(
        "--growth",
        default="0,1000,10000,50000",
        help="entries in the tenant's minute window for the growth table (comma-separated)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    # Logging as a production app would set it: warnings and up (the library never configures it).
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="safe-openai-bench-") as workdir:
        for backend in backends(args, Path(workdir)):
            row: dict[str, Any] = {"backend": backend["name"]}
            if backend["skip"]:
                row["skipped"] = backend["skip"]
                results.append(row)
                continue
            try:
                store = store_from_url(backend["url"], **backend["options"])
                try:
                    row.update(measure(store, args.records, args.seconds))
                    row["guarded_call_ms"] = round(guarded_call_ms(store, args.calls), 3)
                    row.update(round_trips(store, backend["url"], 50))
                    sizes = [int(n) for n in args.growth.split(",") if n]
                    row["growth"] = growth(store, sizes, max(10, args.calls // 4))
                finally:
                    store.close()
            except StoreError as exc:
                row["skipped"] = f"store failed: {exc}"
            finally:
                if backend["cleanup"] is not None:
                    backend["cleanup"]()
            results.append(row)

    memory_ms = next((r["guarded_call_ms"] for r in results if r["backend"] == "memory"), 0.0)
    for row in results:
        if "guarded_call_ms" in row:
            row["store_ms_per_guarded_call"] = round(row["guarded_call_ms"] - memory_ms, 3)
    by_name = {row["backend"]: row for row in results}
    for row in results:
        base = by_name.get(FAMILY.get(row["backend"], ""), {})
        if "store_ms_per_guarded_call" in row and base.get("store_ms_per_guarded_call"):
            ratio = row["store_ms_per_guarded_call"] / base["store_ms_per_guarded_call"]
            row["store_ms_vs_standalone"] = round(ratio, 2)
    print(
        f"{'backend':<18} {'record_usage/s':>15} {'reserve+commit/s':>17} {'report ms':>10} "
        f"{'store ms/call':>14} {'vs standalone':>14}"
    )
    for row in results:
        if "skipped" in row:
            print(f"{row['backend']:<18} skipped: {row['skipped']}")
            continue
        ratio = row.get("store_ms_vs_standalone")
        print(
            f"{row['backend']:<18} {row['record_usage_per_s']:>15,.0f} "
            f"{row['reserve_commit_per_s']:>17,.0f} {row['report_ms']:>10.1f} "
            f"{row['store_ms_per_guarded_call']:>14.3f} "
            f"{'' if ratio is None else f'{ratio:.2f}x':>14}"
        )
    print(
        f"\n{'backend':<10} {'entries':>8} {'reserve+commit ms':>18} {'ratio':>6} "
        f"{'guarded call ms':>16} {'ratio':>6}"
    )
    for row in results:
        for step in row.get("growth", []):
            print(
                f"{row['backend']:<10} {step['entries']:>8,} {step['reserve_commit_ms']:>18.3f} "
                f"{step['reserve_commit_ratio']:>6.2f} {step['guarded_call_ms']:>16.3f} "
                f"{step['guarded_call_ratio']:>6.2f}"
            )
    print(f"\n{'backend':<10} {'round trips/call':>17}  redis commands/call")
    for row in results:
        if "round_trips_per_call" in row:
            print(
                f"{row['backend']:<10} {row['round_trips_per_call']:>17}  "
                f"{row.get('redis_commands_per_call', '')}"
            )
    payload = {
        "benchmark": "stores",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "records": args.records,
        "seconds_cap": args.seconds,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
