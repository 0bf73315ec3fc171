"""Re-record the cassettes of tests/test_cassettes.py from the offline fake API.

Run ``python tests/cassettes/record.py``; the tests replay them with ``record_mode="none"``. The
scenarios live in tests/test_cassettes.py so recording and replay run the very same calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx2

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from tests.test_cassettes import SCENARIOS, make_client, vcr_for  # noqa: E402

from safe_openai.testing import FakeOpenAI  # noqa: E402


def main() -> None:
    for name, scenario in SCENARIOS.items():
        path = HERE / f"{name}.yaml"
        path.unlink(missing_ok=True)
        fake = FakeOpenAI()
        client = make_client(httpx2.MockTransport(fake.handle_request))
        with vcr_for(record_mode="all").use_cassette(str(path)):
            scenario(client)
        print(f"recorded {path.name}: {len(fake.requests)} interactions")


if __name__ == "__main__":
    main()
