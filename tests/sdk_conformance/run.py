"""The openai SDK's own test suite as a drop-in conformance check.

Downloads the source distribution of the installed ``openai`` release from the package index,
runs a subset of its tests twice, on the plain SDK and with ``OpenAI`` / ``AsyncOpenAI``
swapped for ``SafeClient`` / ``AsyncSafeClient`` (``safe_swap.py``), and compares the tests
that fail only with the swap against ``expected.json``: every expected difference with its
reason. A new difference fails the run, and so does an expected one that no longer differs
(the list stays true). Tests that fail on the plain SDK too (a missing optional package, the
machine) are no difference and are only counted.

Usage::

    python tests/sdk_conformance/run.py [--version 3.60.0] [--work DIR] [--tests PATH ...]

The environment needs the package installed with the tooling in ``requirements.txt`` (CI makes
a venv of its own for it: see ``.ci/run``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: The SDK's tests that run here: the client (options, retries, copies, timeouts), streaming
#: (SSE, stream mode, large bodies, raw and legacy responses), the chat and Responses helpers,
#: and the WebSocket send queue (full queue, reconnect, flush). Its ``api_resources`` need a
#: mock server; the rest of ``tests/lib`` (Azure, Bedrock, Vertex, browser and agent helpers)
#: is about providers the guard does not touch and takes far longer.
SUBSET = (
    "tests/test_client.py",
    "tests/test_streaming.py",
    "tests/test_stream_mode.py",
    "tests/test_large_payload_contract.py",
    "tests/test_legacy_response.py",
    "tests/test_response.py",
    "tests/lib/chat",
    "tests/lib/test_pydantic.py",
    "tests/lib/responses/test_responses.py",
    "tests/test_send_queue.py",
    "tests/test_send_queue_reconnect.py",
    "tests/test_websocket_raw_reconnect_wire.py",
)
# Left out: tests/test_websocket_terminal_flush.py races threads against socket timeouts and
# fails on the plain SDK too on a loaded machine, so its differences would be noise.


def sdist(version: str, work: Path) -> Path:
    """The unpacked source distribution of ``openai==version`` (downloaded once into ``work``)."""
    tree = work / f"openai-{version}"
    if (tree / "tests").is_dir():
        return tree
    work.mkdir(parents=True, exist_ok=True)
    archive = work / f"openai-{version}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "--no-build-isolation",
                f"openai=={version}",
                "-d",
                str(work),
            ],
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return tree


def failures(
    tree: Path, tests: tuple[str, ...], *, swapped: bool, workers: str | None = None
) -> tuple[set[str], int]:
    """The ids of the tests that failed or errored, and how many ran."""
    present = [t for t in tests if (tree / t.split("::", 1)[0]).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            "-n",
            workers or os.environ.get("SDK_CONFORMANCE_WORKERS", "2"),
            "--timeout",
            "60",
            f"--junitxml={report}",
            *(["-p", "safe_swap"] if swapped else []),
            *present,
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(tree)])}
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if not report.exists():
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit("the SDK's tests did not run")
        return _read(report)


def _read(report: Path) -> tuple[set[str], int]:
    failed: set[str] = set()
    ran = 0
    for case in ET.parse(report).iter("testcase"):
        ran += 1
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").replace(".", "/")
            cls = ""
            parts = path.split("/")
            # junit names "tests.test_client.TestOpenAI": the class is the capitalized tail
            if parts and parts[-1][:1].isupper():
                cls = "::" + parts.pop()
            failed.add(f"{'/'.join(parts)}.py{cls}::{case.get('name')}")
    return failed, ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=importlib.metadata.version("openai"))
    parser.add_argument(
        "--work", type=Path, default=Path.home() / ".cache" / "safe-openai" / "sdk-conformance"
    )
    parser.add_argument("--tests", nargs="*", default=list(SUBSET))
    parser.add_argument("--expected", type=Path, default=HERE / "expected.json")
    args = parser.parse_args(argv)

    if args.version != importlib.metadata.version("openai"):
        print("the SDK's tests must run on the same release as installed", file=sys.stderr)
        return 2
    tree = sdist(args.version, args.work)
    tests = tuple(args.tests)
    plain, ran_plain = failures(tree, tests, swapped=False)
    guarded, ran_guarded = failures(tree, tests, swapped=True)
    expected: dict[str, str] = json.loads(args.expected.read_text())["differences"]

    differences = guarded - plain
    unexpected = sorted(differences - expected.keys())
    if unexpected:
        # A test that races threads or timers can fail once under load: run the unexpected
        # ones again, alone, on the guarded clients; only those that fail again count.
        again, _ = failures(tree, tuple(unexpected), swapped=True, workers="1")
        for test in sorted(set(unexpected) - again):
            print(f"passed when run again (flaky, not counted): {test}")
        differences -= set(unexpected) - again
    new = sorted(differences - expected.keys())
    # an expected difference whose test ran and passed (or failed on the plain SDK too) is stale
    stale = sorted(t for t in expected if t not in differences and _ran(t, tests))
    print(
        f"openai {args.version}: {ran_guarded} tests with SafeClient ({ran_plain} plain), "
        f"{len(plain)} fail on the plain SDK too, {len(differences)} differ "
        f"({len(differences & expected.keys())} expected)"
    )
    for test in new:
        print(f"NEW DIFFERENCE: {test}")
    for test in stale:
        print(f"NO LONGER DIFFERS (remove it from {args.expected.name}): {test}")
    if ran_guarded == 0 or ran_plain == 0:
        print("no test ran", file=sys.stderr)
        return 1
    return 1 if new or stale else 0


def _ran(test: str, tests: tuple[str, ...]) -> bool:
    return any(test.startswith(t.rstrip("/")) for t in tests)


if __name__ == "__main__":
    sys.exit(main())
