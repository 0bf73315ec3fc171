"""The scripts in examples/ run as a new user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_tiered_saas_example_runs_offline(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "tiered_saas.py"), "--store", f"sqlite:///{tmp_path}/t.db"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "globex   refused PolicyDenied" in result.stdout
    assert sum("globex   ok" in line for line in lines) == 3
    assert "globex   refused QuotaExceeded" in result.stdout
    assert "initech  refused CustomerSuspended" in result.stdout
    assert any(line.startswith("initech") and "suspended=True" in line for line in lines)
    assert "safe_openai.customer_suspended" in result.stderr
