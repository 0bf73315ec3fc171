"""Import time of ``safe_openai`` against ``import openai``, in the same run.

Each round starts fresh interpreters in alternating order with ``python -X importtime -c
STATEMENT`` and adds up the self time of every module the statement imported (the modules a bare
interpreter imports at start-up left out):

- ``import openai``: the SDK with its client;
- ``from safe_openai import SafeClient``: what an application imports, the SDK included
  (``import safe_openai`` alone imports neither the SDK nor the guard: its names load on first
  use);
- ``import safe_openai._cli``: what ``safe-openai --help`` loads.

Byte code is written and a first round is not counted, as for an installed wheel (an editable
install under ``PYTHONDONTWRITEBYTECODE`` would compile the package's sources on every run, and
not the SDK's). The figure is the median over the rounds (the fastest beside it); the ratio is of
the medians. Usage: ``python benchmarks/import_time.py [--rounds 15] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

STATEMENTS = {
    "openai": "import openai",
    "safe_openai": "from safe_openai import SafeClient",
    "cli": "import safe_openai._cli",
}

_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _self_times(statement: str) -> dict[str, int]:
    """Microseconds of each module's own import work (``-X importtime``'s self column)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        check=True,
        env=_ENV,
    )
    times: dict[str, int] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = (f.strip() for f in line.removeprefix("import time:").split("|"))
        times[name] = times.get(name, 0) + int(own)
    return times


def import_us(statement: str, start_up: frozenset[str]) -> int:
    """Microseconds ``statement`` spent importing, in a fresh interpreter."""
    return sum(t for name, t in _self_times(statement).items() if name not in start_up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start_up = frozenset(_self_times("pass"))
    for statement in STATEMENTS.values():  # writes byte code; not counted
        import_us(statement, start_up)
    times: dict[str, list[int]] = {name: [] for name in STATEMENTS}
    names = list(STATEMENTS)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(import_us(STATEMENTS[name], start_up))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["safe_openai"] / median["openai"]
    for name, statement in STATEMENTS.items():
        print(
            f"{statement:<36} median {median[name] / 1000:8.1f} ms   "
            f"fastest {min(times[name]) / 1000:8.1f} ms"
        )
    print(f"ratio SafeClient / openai: {ratio:.3f} (the target is at most 1.2)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rounds": args.rounds, "statements": STATEMENTS, "us": times, "ratio": ratio}
            )
        )


if __name__ == "__main__":
    main()
