"""What output moderation costs a caller: time to first token and total time, against the plain SDK.

Every variant runs in the same process over the same offline transport (FakeOpenAI), in
interleaved rounds. The fake waits ``--latency`` seconds before every response, model and
moderation alike (the network round trip and the moderation endpoint's own time), and a
stream sends its answer in deltas of ``--delta`` characters ``--gap`` seconds apart (the
model's generation speed). Each call gets a new answer, so no output verdict comes from the
cache; the question is the same every time, so input moderation is cached and the figures show
output moderation alone. The figure per variant is the median of its rounds. Usage:
``python benchmarks/output.py [--rounds 3] [--calls 4]``.

Variants, each as a plain call (``chat.completions.create``) and a stream (``stream=True``):
- ``plain``: ``openai.OpenAI``.
- ``off``: SafeClient, output moderation off (the default).
- ``record``: SafeClient, ``output_moderation="record"``.
- ``block``: SafeClient, ``output_moderation="block"`` (default windows: 200 characters or two
  sentence ends).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path

import openai
from overhead import log_as_production

from safe_openai import DefaultPolicy, SafeClient
from safe_openai.testing import FakeOpenAI

MODEL = "gpt-4o-mini"
QUESTION = [{"role": "user", "content": "Tell me about Paris."}]
SENTENCE = "Paris is the capital of France and sits on the Seine river. "


def answer(number: int, chars: int) -> str:
    """A new answer of about ``chars`` characters (so its verdict is never cached)."""
    text = f"Answer {number}. "
    while len(text) < chars:
        text += SENTENCE
    return text[:chars]


Timing = tuple[float, float]  # (time to first text, total)


def build(fake: FakeOpenAI, chars: int) -> dict[str, Callable[[bool], Timing]]:
    numbers = count()
    clients: dict[str, openai.OpenAI] = {"plain": openai.OpenAI(**fake.openai_kwargs())}
    for mode in ("off", "record", "block"):
        policy = DefaultPolicy(output_moderation=None if mode == "off" else mode)  # type: ignore[arg-type]
        clients[mode] = SafeClient(
            **fake.openai_kwargs(),
            identifier_secret="benchmark-secret",
            store="memory://",
            spool=False,
            policy=policy,
        ).for_customer("acme")

    def variant(client: openai.OpenAI) -> Callable[[bool], Timing]:
        def run(stream: bool) -> Timing:
            fake.reply = answer(next(numbers), chars)
            start = time.perf_counter()
            if not stream:
                client.chat.completions.create(model=MODEL, messages=QUESTION)  # type: ignore[arg-type]
                total = time.perf_counter() - start
                return total, total
            first = None
            for chunk in client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,  # type: ignore[arg-type]
                stream=True,
            ):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
            total = time.perf_counter() - start
            return (first if first is not None else total), total

        return run

    return {name: variant(client) for name, client in clients.items()}


def measure(
    variants: dict[str, Callable[[bool], Timing]], rounds: int, calls: int
) -> dict[str, dict[str, float]]:
    """Median seconds per variant and shape: ``{"plain call": {"ttft": ..., "total": ...}}``."""
    for run in variants.values():  # warm up: imports, pools, the input verdict
        run(False)
        run(True)
    samples: dict[str, list[Timing]] = {}
    for _ in range(rounds):
        for stream in (False, True):
            for name, run in variants.items():
                key = f"{name} {'stream' if stream else 'call'}"
                samples.setdefault(key, []).extend(run(stream) for _ in range(calls))
    return {
        key: {
            "ttft": statistics.median(t[0] for t in values),
            "total": statistics.median(t[1] for t in values),
        }
        for key, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4, help="calls per variant and round")
    parser.add_argument("--latency", type=float, default=0.03, help="seconds per response")
    parser.add_argument("--gap", type=float, default=0.01, help="seconds between stream deltas")
    parser.add_argument("--delta", type=int, default=4, help="characters per stream delta")
    parser.add_argument("--chars", type=int, default=400, help="characters per answer")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "output.json"
    )
    args = parser.parse_args()
    log_as_production()
    fake = FakeOpenAI(delay=args.latency, event_delay=args.gap, delta_chars=args.delta)
    figures = measure(build(fake, args.chars), args.rounds, args.calls)
    ratios: dict[str, float] = {}
    for key, value in figures.items():
        name, shape = key.split(" ")
        if name == "plain":
            continue
        plain = figures[f"plain {shape}"]
        if shape == "stream":
            ratios[f"{name} stream ttft / plain"] = value["ttft"] / plain["ttft"]
        ratios[f"{name} {shape} total / plain"] = value["total"] / plain["total"]
    print(f"{'variant':<14} {'ttft ms':>9} {'total ms':>9}")
    for key, value in figures.items():
        print(f"{key:<14} {value['ttft'] * 1e3:>9.1f} {value['total'] * 1e3:>9.1f}")
    print()
    for name, ratio in ratios.items():
        print(f"{name:<30} {ratio:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "openai": openai.__version__,
                "machine": platform.machine(),
                "settings": {
                    "rounds": args.rounds,
                    "calls": args.calls,
                    "latency_s": args.latency,
                    "gap_s": args.gap,
                    "delta_chars": args.delta,
                    "answer_chars": args.chars,
                },
                "median_ms": {
                    key: {k: round(v * 1e3, 2) for k, v in value.items()}
                    for key, value in figures.items()
                },
                "ratios": {k: round(v, 4) for k, v in ratios.items()},
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
