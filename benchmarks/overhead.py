"""Per-call overhead of SafeClient against the plain SDK and the manual moderation pattern.

All variants run in the same process over the same offline transport (FakeOpenAI), in
interleaved rounds so drift in machine load affects them alike. The figure per variant is the
fastest of its rounds (as ``timeit`` reports): on a shared 2-core machine the slower rounds
measure other processes, not this code; the median is reported beside it. Usage:
``python benchmarks/overhead.py [--calls 100] [--rounds 30]``.

Variants:
- ``plain``: ``openai.OpenAI`` -> chat.completions.create.
- ``manual``: ``openai.OpenAI`` -> moderations.create(input=text), then chat.completions.create
  (what a careful team writes by hand without this library).
- ``safe_cached``: SafeClient, the same conversation each call (moderation served by the cache).
- ``safe_uncached``: SafeClient, a new user message each call (one moderation call each).

Logging is configured as a production app would (warnings and up), the same for every variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import openai
import structlog

from safe_openai import SafeClient
from safe_openai.testing import FakeOpenAI

MODEL = "gpt-4o-mini"


def build(calls: int) -> dict[str, Callable[[int], None]]:
    fake = FakeOpenAI(reply="ok")
    plain = openai.OpenAI(**fake.openai_kwargs())
    safe = SafeClient(
        **fake.openai_kwargs(), identifier_secret="benchmark-secret", store="memory://", spool=False
    ).for_customer("acme")
    history = [{"role": "user", "content": "What is the capital of France?"}]
    counter = iter(range(10**9))

    def plain_call(i: int) -> None:
        plain.chat.completions.create(model=MODEL, messages=history)

    def manual_call(i: int) -> None:
        text = f"Question number {next(counter)}: what is the capital of France?"
        verdict = plain.moderations.create(model="omni-moderation-latest", input=[text])
        if verdict.results[0].flagged:
            raise RuntimeError("flagged")
        plain.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], safety_identifier="x" * 43
        )

    def safe_cached(i: int) -> None:
        safe.chat.completions.create(model=MODEL, messages=history)

    def safe_uncached(i: int) -> None:
        text = f"Question number {next(counter)}: what is the capital of France?"
        safe.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])

    return {
        "plain": plain_call,
        "manual": manual_call,
        "safe_cached": safe_cached,
        "safe_uncached": safe_uncached,
    }


def measure(calls: int, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per call of each variant: (fastest round, median round)."""
    variants = build(calls)
    for fn in variants.values():  # warm up: imports, pools, caches
        for i in range(20):
            fn(i)
    gc.collect()
    gc.freeze()  # the set-up's objects are not rescanned by every collection that follows
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            gc.collect()
            start = time.perf_counter()
            for i in range(calls):
                fn(i)
            samples[name].append((time.perf_counter() - start) / calls)
    best = {name: min(values) for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    return best, median


def log_as_production() -> None:
    """Warnings and up, as a production app logs; the same for every variant."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        cache_logger_on_first_use=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json"
    )
    args = parser.parse_args()
    log_as_production()
    per_call, median = measure(args.calls, args.rounds)

    def ratios_of(figures: dict[str, float]) -> dict[str, float]:
        return {
            "safe_cached / plain": figures["safe_cached"] / figures["plain"],
            "safe_uncached / manual": figures["safe_uncached"] / figures["manual"],
            "manual / plain": figures["manual"] / figures["plain"],
        }

    ratios, median_ratios = ratios_of(per_call), ratios_of(median)
    print(f"{'variant':<16} {'µs/call best':>13} {'µs/call median':>15}")
    for name, seconds in per_call.items():
        print(f"{name:<16} {seconds * 1e6:>13.1f} {median[name] * 1e6:>15.1f}")
    print()
    for name, ratio in ratios.items():
        change = f"({(ratio - 1) * 100:+.1f}%)"
        print(f"{name:<24} {ratio:6.3f} {change}   median {median_ratios[name]:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "openai": openai.__version__,
                "machine": platform.machine(),
                "calls_per_round": args.calls,
                "rounds": args.rounds,
                "us_per_call_best": {k: round(v * 1e6, 2) for k, v in per_call.items()},
                "us_per_call_median": {k: round(v * 1e6, 2) for k, v in median.items()},
                "ratios_best": {k: round(v, 4) for k, v in ratios.items()},
                "ratios_median": {k: round(v, 4) for k, v in median_ratios.items()},
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
