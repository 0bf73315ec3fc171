"""Import time of ``safe_openai`` against ``import openai``, in the same run.

Each round starts two fresh interpreters, one per module, in alternating order, with
``python -X importtime -c "import MODULE"``, and reads the module's cumulative import time
from the last line of the report. The figure is the median over the rounds (the fastest is
reported beside it); the ratio is of the medians. Usage:
``python benchmarks/import_time.py [--rounds 15] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODULES = ("openai", "safe_openai")


def import_us(module: str) -> int:
    """Microseconds ``import module`` took in a fresh interpreter (its cumulative time)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in reversed(done.stderr.splitlines()):
        fields = [f.strip() for f in line.removeprefix("import time:").split("|")]
        if len(fields) == 3 and fields[2] == module:
            return int(fields[1])
    raise RuntimeError(f"no import time for {module}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    times: dict[str, list[int]] = {m: [] for m in MODULES}
    for round_ in range(args.rounds):
        order = MODULES if round_ % 2 == 0 else MODULES[::-1]
        for module in order:
            times[module].append(import_us(module))
    median = {m: statistics.median(t) for m, t in times.items()}
    ratio = median["safe_openai"] / median["openai"]
    for module in MODULES:
        print(
            f"import {module:<12} median {median[module] / 1000:8.1f} ms   "
            f"fastest {min(times[module]) / 1000:8.1f} ms"
        )
    print(f"ratio safe_openai / openai: {ratio:.3f} (the target is at most 1.2)")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "us": times, "ratio": ratio}))


if __name__ == "__main__":
    main()
