"""Instructions per call of each variant of ``overhead.py``, counted by valgrind's callgrind.

Wall-clock figures on a shared 2-core machine swing by 20% or more between rounds; instruction
counts do not (the same binary and inputs give the same count). Each variant runs twice under
callgrind, with ``--base`` and ``--base + --calls`` calls after the same set-up; the difference
divided by ``--calls`` is its cost per call, imports and set-up cancelled out.

Usage: ``python benchmarks/instructions.py [--calls 200] [--base 10]`` (several minutes: Python
under callgrind runs about 50 times slower). Needs ``valgrind`` on the PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
VARIANTS = ("plain", "manual", "safe_cached", "safe_uncached")

RUNNER = """
import gc, logging, sys
import structlog
structlog.configure(
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    cache_logger_on_first_use=True,
)
sys.path.insert(0, {here!r})
from overhead import build
variants = build(0)
for name in {variants!r}:  # the same warm-up for every run: pools, caches, lazy imports
    for i in range(3):
        variants[name](i)
# Start every run from the same collector state: otherwise when the cyclic GC runs depends on
# what the set-up allocated, and that moves the counts by several percent between runs.
gc.collect()
gc.freeze()
fn = variants[sys.argv[1]]
for i in range(int(sys.argv[2])):
    fn(i)
"""


def instructions(script: Path, variant: str, calls: int) -> int:
    # A fixed hash seed: dict layouts (and so instruction counts) differ between processes
    # otherwise, by more than the per-call differences being measured.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        result = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(script),
                variant,
                str(calls),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    match = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--base", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "instructions.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "runner.py"
        script.write_text(RUNNER.format(here=str(HERE.resolve()), variants=VARIANTS))
        per_call = {}
        for variant in args.variants:
            low = instructions(script, variant, args.base)
            high = instructions(script, variant, args.base + args.calls)
            per_call[variant] = (high - low) / args.calls
            print(
                f"{variant:<14} {per_call[variant] / 1e6:8.3f} M instructions per call", flush=True
            )
    pairs = {
        "safe_cached / plain": ("safe_cached", "plain"),
        "safe_uncached / manual": ("safe_uncached", "manual"),
        "manual / plain": ("manual", "plain"),
    }
    ratios = {
        name: per_call[a] / per_call[b]
        for name, (a, b) in pairs.items()
        if a in per_call and b in per_call
    }
    for name, ratio in ratios.items():
        print(f"{name:<24} {ratio:6.3f} ({(ratio - 1) * 100:+.1f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "calls": args.calls,
                "instructions_per_call": {k: round(v) for k, v in per_call.items()},
                "ratios": {k: round(v, 4) for k, v in ratios.items()},
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
