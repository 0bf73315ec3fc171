"""What each in-process cache of a client costs in memory when full.

Each cache is filled to its cap with entries shaped like real ones, in a fresh subprocess, and
two figures are taken: the bytes ``tracemalloc`` sees allocated for the cache and its entries,
and the growth of the process's resident set (RSS). The moderation results are the shape the
OpenAI endpoint returns (13 categories with a flag and a score each, built the way the
moderator builds them from a response); identifiers are the 43-character HMAC the guard sends;
customer ids 24 characters.

Usage: ``python benchmarks/caches.py``. Results are printed and written to
``benchmarks/results/caches.json``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "caches.json"


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fill(name: str) -> tuple[int, Any]:
    """(entries, the cache) filled to its cap inside the measurement."""
    from safe_openai._guard import KnownIdentifiers, RecentBlocks
    from safe_openai._identity import safety_identifier
    from safe_openai._moderation import ModerationInput, VerdictCache
    from safe_openai.policy import MODERATION_CATEGORIES as CATEGORIES
    from safe_openai.policy import ModerationResult

    if name == "verdict_cache":
        cache = VerdictCache()
        for n in range(cache.maxsize):
            key = VerdictCache.key("omni-moderation-latest", ModerationInput("text", f"text {n}"))
            scores = {c: (n % 997) / 1e6 + i / 1e3 for i, c in enumerate(CATEGORIES)}
            cache.put(key, ModerationResult(False, {c: False for c in CATEGORIES}, scores))
        return cache.maxsize, cache
    if name == "known_identifiers":
        known = KnownIdentifiers()
        secret = b"s" * 32
        for n in range(50_000):
            customer = f"customer-{n:015d}"
            known.add((safety_identifier(secret, customer), customer))
        return 50_000, known
    blocks = RecentBlocks()
    now = datetime.now(timezone.utc)
    for n in range(10_000):
        blocks.struck(f"customer-{n:015d}", [os.urandom(32)], now)
    return 10_000, blocks


def _measure(name: str) -> dict[str, Any]:
    import safe_openai  # noqa: F401 (imported before the baseline)

    before = _rss()
    tracemalloc.start()
    entries, held = _fill(name)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grown = _rss() - before
    assert len(getattr(held, "_items", getattr(held, "_seen", {}))) == entries
    return {
        "cache": name,
        "cap": entries,
        "traced_bytes_per_entry": round(traced / entries),
        "rss_bytes_per_entry": round(grown / entries),
        "rss_mb_at_cap": round(grown / 2**20, 1),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(_measure(sys.argv[2])))
        return
    rows = []
    for name in ("verdict_cache", "known_identifiers", "recent_blocks"):
        out = subprocess.run(
            [sys.executable, __file__, "--one", name], check=True, capture_output=True, text=True
        )
        rows.append(json.loads(out.stdout))
    print(f"{'cache':<18} {'cap':>7} {'traced B/entry':>15} {'RSS B/entry':>12} {'RSS MB':>7}")
    for row in rows:
        print(
            f"{row['cache']:<18} {row['cap']:>7,} {row['traced_bytes_per_entry']:>15,} "
            f"{row['rss_bytes_per_entry']:>12,} {row['rss_mb_at_cap']:>7.1f}"
        )
    payload = {
        "benchmark": "caches",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "results": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
