"""The safe-openai command line: report, violations, suspend, unsuspend and the demo."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import structlog

from safe_openai._cli import main, parse_since
from safe_openai.stores import Violation, store_from_url
from safe_openai.usage import TokenUsage, UsageRecord

NOW = datetime.now(timezone.utc)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures structlog for its process; undo that for the next tests."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/cli.db"
    store = store_from_url(url)
    for i, (customer, outcome, tokens, cost) in enumerate(
        [
            ("acme", "ok", TokenUsage(100, 20, 50, 10), 0.002),
            ("acme", "ok", TokenUsage(10, 0, 5, 0), 0.0001),
            ("acme", "blocked", TokenUsage(), 0.0),
            ("a-customer-with-a-very-long-name-indeed", "ok", TokenUsage(2_500_000, 0, 1, 0), 1.5),
            ("old", "ok", TokenUsage(1, 0, 1, 0), 0.1),
        ]
    ):
        created = NOW - timedelta(days=30 if customer == "old" else 0, seconds=i)
        store.record_usage(
            UsageRecord(
                customer,
                "/chat/completions",
                "gpt-4o-mini",
                outcome,
                tokens,
                cost,
                0.1,
                created,
                f"req_{i}",
                f"r{i}",
            )
        )  # type: ignore[arg-type]
    store.record_violation(
        Violation("acme", NOW, "moderation", ("violence",), 0.9, "/chat/completions")
    )
    store.record_violation(
        Violation("acme", NOW, "safety_identifier.blocked", ("cyber",), None, None, "evt_1")
    )
    store.close()
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_report_json_has_the_documented_fields(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(
        capsys, "report", "--store", store_url, "--format", "json", "--since", "7d"
    )
    assert status == 0
    rows = {row["customer"]: row for row in json.loads(out)}
    assert set(rows) == {"acme", "a-customer-with-a-very-long-name-indeed"}
    acme = rows["acme"]
    for field in (
        "customer",
        "requests",
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "reasoning_tokens",
        "cost_usd",
        "blocked",
        "violations",
        "suspended",
    ):
        assert field in acme
    assert (acme["requests"], acme["input_tokens"], acme["cached_tokens"]) == (2, 110, 20)
    assert (acme["output_tokens"], acme["reasoning_tokens"], acme["blocked"]) == (55, 10, 1)
    assert acme["violations"] == 2 and acme["suspended"] is False
    assert acme["cost_usd"] == pytest.approx(0.0021)


def test_report_csv_parses_and_table_fits_80_columns(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(capsys, "report", "--store", store_url, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["customer"] for r in rows} == {
        "acme",
        "a-customer-with-a-very-long-name-indeed",
        "old",
    }
    _, table, _ = run(capsys, "report", "--store", store_url)
    assert "acme" in table and "2.5M" in table
    assert max(len(line) for line in table.splitlines()) <= 80


def test_suspend_and_unsuspend_change_standing(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(
        capsys, "suspend", "acme", "--reason", "fraud", "--for", "24h", "--store", store_url
    )
    assert status == 0 and "suspended acme until" in out
    assert "customer_suspended" in err
    store = store_from_url(store_url)
    suspension = store.suspension("acme", now=datetime.now(timezone.utc))
    assert suspension is not None and suspension.reason == "fraud"
    _, out, _ = run(
        capsys, "report", "--store", store_url, "--format", "json", "--customer", "acme"
    )
    assert json.loads(out)[0]["suspended"] is True
    _, out, _ = run(capsys, "unsuspend", "acme", "--store", store_url)
    assert out.strip() == "unsuspended acme"
    assert store.suspension("acme", now=datetime.now(timezone.utc)) is None
    _, out, _ = run(capsys, "unsuspend", "acme", "--store", store_url)
    assert "was not suspended" in out


def test_violations_lists_sources(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, table, _ = run(capsys, "violations", "--store", store_url)
    assert "moderation" in table and "safety_identifier.blocked" in table
    assert max(len(line) for line in table.splitlines()) <= 80
    _, out, _ = run(capsys, "violations", "--store", store_url, "--format", "json")
    assert {v["source"] for v in json.loads(out)} == {"moderation", "safety_identifier.blocked"}


def test_errors_are_one_clear_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAFE_OPENAI_STORE_URL", raising=False)
    status, _, err = run(capsys, "report")
    assert status == 2 and "--store" in err
    status, _, err = run(capsys, "report", "--store", "nosuch://x")
    assert status == 2 and "Unknown store URL scheme" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7d", timedelta(days=7)), ("24h", timedelta(hours=24)), ("30m", timedelta(minutes=30))],
)
def test_since_durations(text: str, expected: timedelta) -> None:
    assert parse_since(text, now=NOW) == NOW - expected


def test_since_iso_date_is_utc() -> None:
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_demo_runs_offline_as_a_module_and_prints_the_report(tmp_path: Path) -> None:
    """``python -m safe_openai demo``: one customer blocked twice then suspended, a report."""
    result = subprocess.run(
        [sys.executable, "-m", "safe_openai", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "", "HOME": str(tmp_path), "OPENAI_API_KEY": ""},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ModerationBlocked" in out and "CustomerSuspended" in out
    assert (tmp_path / "safe_openai_demo.db").exists()
    report = out.split("Usage report")[1]
    initech = next(line for line in report.splitlines() if line.startswith("initech"))
    assert initech.split()[-1] == "yes"
    store = store_from_url(f"sqlite:///{tmp_path}/safe_openai_demo.db")
    rows = {r.customer: r for r in store.usage_report()}
    assert rows["acme"].requests == 2 and rows["initech"].blocked == 2 and rows["initech"].suspended
