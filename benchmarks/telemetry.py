"""What OpenTelemetry costs a cached guarded call, with and without a configured provider.

Three variants over the same offline transport (FakeOpenAI), in one process:

- ``plain``: ``openai.OpenAI`` -> chat.completions.create.
- ``safe_cached``: SafeClient, the same conversation each call; the OpenTelemetry API is
  imported (as in an application that has it installed) but no provider is configured.
- ``safe_cached_otel``: the same with the SDK's ``TracerProvider`` (a span processor that
  exports to nowhere) and ``MeterProvider`` (an in-memory reader) given to the library, so every
  call makes its span, its moderation span and its metric points.

Wall clock: interleaved rounds, fastest and median round, as ``overhead.py``. With
``--instructions``, also instructions per call counted by callgrind (as ``instructions.py``:
two runs of ``--base`` and ``--base + --calls`` calls, the difference divided by ``--calls``).
Usage: ``python benchmarks/telemetry.py [--calls 100] [--rounds 30] [--instructions]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import openai
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from safe_openai import SafeClient, telemetry
from safe_openai.testing import FakeOpenAI

HERE = Path(__file__).parent
MODEL = "gpt-4o-mini"
VARIANTS = ("plain", "safe_cached", "safe_cached_otel")


class Nowhere(SpanExporter):
    """Takes every span and keeps none (the export itself is not what is measured)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


Variant = tuple[Callable[[], None], Callable[[], None]]


def build() -> dict[str, Variant]:
    """Each variant as (set-up to run before its rounds, one call)."""
    fake = FakeOpenAI(reply="ok")
    plain = openai.OpenAI(**fake.openai_kwargs())
    safe = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret="bench-identifier-secret",
        store="memory://",
        spool=False,
    ).for_customer("acme")
    history = [{"role": "user", "content": "What is the capital of France?"}]
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(Nowhere()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])

    def plain_call() -> None:
        plain.chat.completions.create(model=MODEL, messages=history)

    def safe_call() -> None:
        safe.chat.completions.create(model=MODEL, messages=history)

    def off() -> None:
        telemetry.configure()

    def on() -> None:
        telemetry.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)

    return {
        "plain": (off, plain_call),
        "safe_cached": (off, safe_call),
        "safe_cached_otel": (on, safe_call),
    }


def measure(calls: int, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per call of each variant: (fastest round, median round)."""
    variants = build()
    for setup, fn in variants.values():
        setup()
        for _ in range(20):
            fn()
    gc.collect()
    gc.freeze()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (setup, fn) in variants.items():
            setup()
            fn()  # the instruments are made on the first call after configure()
            gc.collect()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    telemetry.configure()
    best = {name: min(values) for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    return best, median


RUNNER = """
import gc, logging, sys
logging.basicConfig(level=logging.WARNING)
sys.path.insert(0, {here!r})
from telemetry import build
setup, fn = build()[sys.argv[1]]
setup()
for i in range(3):
    fn()
gc.collect()
gc.freeze()
for i in range(int(sys.argv[2])):
    fn()
"""


def count_instructions(calls: int, base: int) -> dict[str, float]:
    """Instructions per call of each variant (callgrind; several minutes)."""
    sys.path.insert(0, str(HERE))
    from instructions import instructions

    per_call: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "runner.py"
        script.write_text(RUNNER.format(here=str(HERE.resolve())))
        for variant in VARIANTS:
            low = instructions(script, variant, base)
            high = instructions(script, variant, base + calls)
            per_call[variant] = (high - low) / calls
            print(f"{variant:<18} {per_call[variant] / 1e6:8.3f} M instructions per call")
    return per_call


def ratios_of(figures: dict[str, float]) -> dict[str, float]:
    return {
        "safe_cached_otel / safe_cached": figures["safe_cached_otel"] / figures["safe_cached"],
        "safe_cached / plain": figures["safe_cached"] / figures["plain"],
        "safe_cached_otel / plain": figures["safe_cached_otel"] / figures["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--instructions", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "telemetry.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # warnings and up, as a production app logs
    best, median = measure(args.calls, args.rounds)
    print(f"{'variant':<18} {'µs/call best':>13} {'µs/call median':>15}")
    for name in VARIANTS:
        print(f"{name:<18} {best[name] * 1e6:>13.1f} {median[name] * 1e6:>15.1f}")
    result: dict[str, object] = {
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "us_per_call_best": {k: round(v * 1e6, 2) for k, v in best.items()},
        "us_per_call_median": {k: round(v * 1e6, 2) for k, v in median.items()},
        "ratios_best": {k: round(v, 4) for k, v in ratios_of(best).items()},
        "ratios_median": {k: round(v, 4) for k, v in ratios_of(median).items()},
    }
    for name, ratio in ratios_of(best).items():
        print(f"{name:<32} {ratio:6.3f} (median {ratios_of(median)[name]:.3f})")
    if args.instructions:
        per_call = count_instructions(200, 10)
        result["instructions_per_call"] = {k: round(v) for k, v in per_call.items()}
        result["instruction_ratios"] = {k: round(v, 4) for k, v in ratios_of(per_call).items()}
        for name, ratio in ratios_of(per_call).items():
            print(f"{name:<32} {ratio:6.3f} ({(ratio - 1) * 100:+.1f}%) in instructions")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
