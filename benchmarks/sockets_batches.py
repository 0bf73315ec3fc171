"""What the guard adds to the Responses WebSocket and to Batch API uploads, against the plain
SDK in the same run.

- ``socket``: one ``response.create`` on an open ``responses.connect()`` connection, read to
  ``response.completed``, over the fake's loopback WebSocket server: the plain SDK, and a
  SafeClient whose verdict is cached (the same input each time, as a conversation's history
  is).
- ``batch``: ``files.create(purpose="batch")`` of a JSONL file of ``--lines`` chat requests
  over the fake transport: the plain SDK; a SafeClient with a warm verdict cache (the same
  file again); and a SafeClient moderating every line (new texts each time, one moderation
  call per 32 texts, answered by the fake).

The figure per variant is the fastest of interleaved rounds, median beside it, as in
``overhead.py``. Usage: ``python benchmarks/sockets_batches.py [--rounds 15] [--lines 1000]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import openai
from overhead import log_as_production

from safe_openai import SafeClient
from safe_openai.testing import FakeOpenAI

MODEL = "gpt-4o-mini"


def _read_to_end(connection: object) -> None:
    for event in connection:  # type: ignore[attr-defined]
        if event.type in ("response.completed", "error"):
            return


def socket_variants(stack: ExitStack, calls: int) -> dict[str, Callable[[], None]]:
    fake = FakeOpenAI(reply="ok")
    url = stack.enter_context(fake.serve_websocket())
    plain = openai.OpenAI(**fake.openai_kwargs(), websocket_base_url=url)
    safe = SafeClient(
        **fake.openai_kwargs(),
        websocket_base_url=url,
        identifier_secret="benchmark-secret",
        store="memory://",
        spool=False,
    ).for_customer("acme")
    plain_socket = stack.enter_context(plain.responses.connect())
    safe_socket = stack.enter_context(safe.responses.connect())

    def run(connection: object) -> Callable[[], None]:
        def calls_on_socket() -> None:
            for _ in range(calls):
                connection.response.create(model=MODEL, input="What is the capital of France?")  # type: ignore[attr-defined]
                _read_to_end(connection)

        return calls_on_socket

    return {"socket_plain": run(plain_socket), "socket_safe_cached": run(safe_socket)}


def batch_variants(lines: int) -> dict[str, Callable[[], None]]:
    fake = FakeOpenAI()
    plain = openai.OpenAI(**fake.openai_kwargs())
    safe = SafeClient(
        **fake.openai_kwargs(), identifier_secret="benchmark-secret", store="memory://", spool=False
    ).for_customer("acme")
    numbers: Iterator[int] = iter(range(10**9))

    def jsonl(prefix: str) -> bytes:
        return "".join(
            json.dumps(
                {
                    "custom_id": f"r{n}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"{prefix} question {n}?"}],
                    },
                }
            )
            + "\n"
            for n in range(lines)
        ).encode()

    same = jsonl("Same")

    def upload(client: openai.OpenAI, content: Callable[[], bytes]) -> Callable[[], None]:
        def one() -> None:
            client.files.create(file=("requests.jsonl", content()), purpose="batch")
            fake.files.clear()  # keep the fake's memory flat

        return one

    return {
        "batch_plain": upload(plain, lambda: same),
        "batch_safe_cached": upload(safe, lambda: same),
        "batch_safe_uncached": upload(safe, lambda: jsonl(f"Round {next(numbers)}")),
    }


def measure(
    variants: dict[str, Callable[[], None]], rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    for fn in variants.values():
        fn()
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return (
        {name: min(values) for name, values in samples.items()},
        {name: statistics.median(values) for name, values in samples.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50, help="socket calls per round")
    parser.add_argument("--lines", type=int, default=1000, help="requests per batch file")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "sockets_batches.json"
    )
    args = parser.parse_args()
    log_as_production()
    with ExitStack() as stack:
        socket_best, socket_median = measure(socket_variants(stack, args.calls), args.rounds)
    batch_best, batch_median = measure(batch_variants(args.lines), args.rounds)
    best, median = {**socket_best, **batch_best}, {**socket_median, **batch_median}
    per_unit = {
        **{name: args.calls for name in socket_best},
        **{name: args.lines for name in batch_best},
    }
    print(f"{'variant':<22} {'µs/unit best':>13} {'µs/unit median':>15}")
    for name, seconds in best.items():
        unit = per_unit[name]
        print(f"{name:<22} {seconds / unit * 1e6:>13.1f} {median[name] / unit * 1e6:>15.1f}")
    ratios = {
        "socket_safe_cached / socket_plain": (
            best["socket_safe_cached"] / best["socket_plain"],
            median["socket_safe_cached"] / median["socket_plain"],
        ),
        "batch_safe_cached / batch_plain": (
            best["batch_safe_cached"] / best["batch_plain"],
            median["batch_safe_cached"] / median["batch_plain"],
        ),
        "batch_safe_uncached / batch_plain": (
            best["batch_safe_uncached"] / best["batch_plain"],
            median["batch_safe_uncached"] / median["batch_plain"],
        ),
    }
    print()
    for name, (fastest, middle) in ratios.items():
        print(f"{name:<36} {fastest:6.3f}   median {middle:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "python": platform.python_version(),
                "openai": openai.__version__,
                "machine": platform.machine(),
                "rounds": args.rounds,
                "socket_calls_per_round": args.calls,
                "batch_lines": args.lines,
                "us_per_unit_best": {k: round(v / per_unit[k] * 1e6, 2) for k, v in best.items()},
                "us_per_unit_median": {
                    k: round(v / per_unit[k] * 1e6, 2) for k, v in median.items()
                },
                "ratios_best": {k: round(v[0], 4) for k, v in ratios.items()},
                "ratios_median": {k: round(v[1], 4) for k, v in ratios.items()},
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
