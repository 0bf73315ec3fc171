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


def test_the_fastapi_example_s_tests_run_with_the_suite() -> None:
    """examples/fastapi_app/test_app.py is collected by a plain ``pytest`` (testpaths)."""
    config = (EXAMPLES.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert 'testpaths = ["tests", "examples/fastapi_app"]' in config
    assert (EXAMPLES / "fastapi_app" / "test_app.py").is_file()
