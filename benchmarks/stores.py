"""Throughput of each usage store backend: usage writes and quota checks per second.

For every backend URL (memory, a SQLite file, Redis, PostgreSQL) this measures, on one
synchronous store in one thread:

- ``record_usage``: records written per second (each its own durable write);
- ``reserve+commit``: quota checks per second, each a reservation against a quota with every
  limit set (so every window is evaluated) followed by the commit of its usage record;
- ``report``: milliseconds for ``usage_report()`` over everything written;
- ``store ms per guarded call``: a SafeClient with a quota on every limit, calling chat
  completions over the offline FakeOpenAI transport (moderation cached), per call, minus the
  same client on ``memory://`` in the same run: the time the store adds to one guarded call
  (standing check, reservation, commit, identifier and request maps).

Ten customers share the load, so each customer's minute window holds many entries, as for a
busy tenant. A measurement stops after ``--records`` operations or ``--seconds`` seconds,
whichever comes first, and reports the rate of what it did. Servers that cannot be reached are
skipped with a note. Each run uses its own Redis key prefix / PostgreSQL schema / SQLite file
and removes it afterwards.

Usage: ``python benchmarks/stores.py [--records 2000] [--seconds 8]
[--redis-url URL] [--postgres-url URL]``. Results are printed as a table and written to
``benchmarks/results/stores.json``.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from safe_openai import DefaultPolicy, SafeClient
from safe_openai.errors import StoreError
from safe_openai.policy import Quota
from safe_openai.stores import QuotaDemand, UsageStore, store_from_url
from safe_openai.testing import FakeOpenAI
from safe_openai.usage import TokenUsage, UsageRecord

RESULTS = Path(__file__).parent / "results" / "stores.json"
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


def guarded_call_ms(store: UsageStore, calls: int) -> float:
    """Milliseconds per guarded chat call on ``store``, moderation served from the cache."""
    fake = FakeOpenAI(reply="ok")
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret="benchmark-secret",
        store=store,
        spool=False,
        policy=DefaultPolicy(quota=GUARDED_QUOTA),
    ).for_customer(f"bench-{uuid.uuid4().hex[:8]}")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for _ in range(5):
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    best = float("inf")
    for _ in range(5):  # the fastest of five rounds: the slower ones measure other processes
        started = time.perf_counter()
        for _ in range(calls):
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1000


def _reachable(url: str, default_port: int) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"not reachable at {host}:{port} ({exc.strerror or exc})"
    return None


def _drop_redis(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
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
    parser.add_argument("--calls", type=int, default=100, help="guarded calls per round")
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
    print(
        f"{'backend':<10} {'record_usage/s':>15} {'reserve+commit/s':>17} {'report ms':>10} "
        f"{'store ms/call':>14}"
    )
    for row in results:
        if "skipped" in row:
            print(f"{row['backend']:<10} skipped: {row['skipped']}")
            continue
        print(
            f"{row['backend']:<10} {row['record_usage_per_s']:>15,.0f} "
            f"{row['reserve_commit_per_s']:>17,.0f} {row['report_ms']:>10.1f} "
            f"{row['store_ms_per_guarded_call']:>14.3f}"
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
