"""``safe-openai status CUSTOMER``: a customer's standing from a real SQLite file, through real
subprocesses, with the application's policy (``--policy module:attr``) or without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from safe_openai.stores import Violation, store_from_url
from safe_openai.usage import TokenUsage, UsageRecord

POLICY_MODULE = """
from datetime import timedelta

from safe_openai import DefaultPolicy, Quota

POLICY = DefaultPolicy(
    quota=Quota(requests_per_minute=100, tokens_per_day=10_000, usd_per_month=5.0),
    strike_limit=3,
    strike_window=timedelta(hours=12),
)


def make_policy():
    return POLICY


NOT_A_POLICY = 42
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A directory holding a store with acme's usage, a strike and a suspension, and the
    application's policy module."""
    now = datetime.now(timezone.utc)
    store = store_from_url(f"sqlite:///{tmp_path}/usage.db")
    for tokens, cost in ((TokenUsage(1200, 0, 300, 0), 0.5), (TokenUsage(400, 0, 100, 0), 0.25)):
        store.record_usage(
            UsageRecord(
                customer_id="acme",
                endpoint="/chat/completions",
                model="gpt-4o-mini",
                outcome="ok",
                tokens=tokens,
                cost_usd=cost,
                latency_s=0.1,
                created_at=now,
                record_id=uuid.uuid4().hex,
            )
        )
    store.record_violation(Violation("acme", now, "moderation", ("violence",), 0.9))
    store.record_violation(Violation("acme", now - timedelta(days=2), "moderation", ("hate",)))
    store.suspend("acme", reason="chargeback", until=now + timedelta(hours=2), now=now)
    store.close()
    (tmp_path / "app_policy.py").write_text(POLICY_MODULE)
    return tmp_path


def status(workdir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m safe_openai status ARGV`` in a real subprocess, in ``workdir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFE_OPENAI")}
    return subprocess.run(
        [sys.executable, "-m", "safe_openai", "status", *argv],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_status_json_with_the_policy(workdir: Path) -> None:
    """Limits from the application's policy: used, limit, remaining, resets_at per limit; the
    suspension; strikes in the policy's window counted against its limit."""
    done = status(
        workdir, "acme", "--store", "sqlite:///usage.db", "--policy", "app_policy:POLICY",
        "--format", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["customer"] == "acme"
    assert shown["suspended"] is True
    assert shown["suspension"]["reason"] == "chargeback"
    assert shown["suspension"]["until"] is not None
    assert (shown["strikes"], shown["strike_limit"]) == (1, 3)  # the 2-day-old one is out
    assert shown["strike_window_seconds"] == 12 * 3600
    assert shown["limits_known"] is True and shown["usage_known"] is True
    limits = {item["name"]: item for item in shown["limits"]}
    assert list(limits) == ["requests_per_minute", "tokens_per_day", "usd_per_month"]
    day = limits["tokens_per_day"]
    assert (day["used"], day["limit"], day["remaining"]) == (2000, 10_000, 8000)
    assert day["resets_at"].endswith("T00:00:00+00:00")
    month = limits["usd_per_month"]
    assert (month["used"], month["limit"], month["remaining"]) == (0.75, 5.0, 4.25)
    assert limits["requests_per_minute"]["limit"] == 100


def test_status_table_with_a_policy_factory(workdir: Path) -> None:
    done = status(
        workdir, "acme", "--store", "sqlite:///usage.db", "--policy", "app_policy:make_policy"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "strikes:    1 of 3 within 12h" in out
    assert "chargeback" in out
    day = next(line for line in out.splitlines() if line.startswith("tokens_per_day"))
    assert day.split()[1:4] == ["2000", "10000", "8000"]
    assert max(len(line) for line in out.splitlines()) <= 80


def test_status_without_a_policy_shows_usage_and_says_the_limits_are_unknown(
    workdir: Path,
) -> None:
    done = status(workdir, "acme", "--store", "sqlite:///usage.db", "--format", "json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["limits_known"] is False
    assert shown["strike_limit"] is None
    limits = {item["name"]: item for item in shown["limits"]}
    assert limits["tokens_per_day"]["used"] == 2000
    assert limits["tokens_per_day"]["limit"] is None
    assert limits["usd_per_month"]["remaining"] is None
    table = status(workdir, "acme", "--store", "sqlite:///usage.db")
    assert "no --policy: the limits are unknown" in table.stdout


def test_status_of_a_customer_with_nothing_recorded(workdir: Path) -> None:
    done = status(
        workdir, "nobody", "--store", "sqlite:///usage.db", "--policy", "app_policy:POLICY",
        "--format", "json",
    )  # fmt: skip
    shown = json.loads(done.stdout)
    assert shown["suspension"] is None and shown["strikes"] == 0
    assert all(item["used"] == 0 and item["resets_at"] is None for item in shown["limits"])


def test_status_never_creates_a_store_and_names_bad_policies(workdir: Path) -> None:
    missing = status(workdir, "acme", "--store", "sqlite:///typo.db")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "safe-openai: No store at typo.db: check the --store path."
    assert not (workdir / "typo.db").exists()
    for spec, says in (
        ("app_policy", "pkg.module:attr"),
        ("no_such_module:POLICY", "cannot import"),
        ("app_policy:MISSING", "has no"),
        ("app_policy:NOT_A_POLICY", "not a safe_openai.Policy"),
    ):
        done = status(workdir, "acme", "--store", "sqlite:///usage.db", "--policy", spec)
        assert done.returncode == 2, spec
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    blank = status(workdir, "", "--store", "sqlite:///usage.db")
    assert blank.returncode == 2 and "customer id must be" in blank.stderr


def test_the_strike_window_reads_as_the_suspension_reason_writes_it() -> None:
    """A 24 h window is "1d" in `status` as in the reason of the suspension it leads to
    ("2 violations within 1d"); the CLI had a copy of the rule that wrote "24h"."""
    from datetime import datetime, timedelta, timezone

    from safe_openai._cli import format_standing
    from safe_openai.standing import Standing

    standing = Standing(
        customer_id="acme",
        at=datetime.now(timezone.utc),
        limits=(),
        suspension=None,
        strikes=1,
        strike_limit=3,
        strike_window=timedelta(hours=24),
        usage_known=True,
    )
    assert "1 of 3 within 1d" in format_standing(standing)
