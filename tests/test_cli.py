"""The safe-openai command line: report, violations, suspend, unsuspend and the demo."""

from __future__ import annotations

import csv
import io
import json
import socket
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


def test_violations_and_report_say_which_violations_are_strikes(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The violations table, JSON and CSV carry the strike flag (CSV true/false); the report
    counts every violation and, apart, the strikes among them."""
    store = store_from_url(store_url)
    store.record_violation(
        Violation("acme", NOW, "output", ("violence",), 0.8, "/responses", strike=False)
    )
    store.close()
    _, table, _ = run(capsys, "violations", "--store", store_url, "--customer", "acme")
    assert table.splitlines()[0].endswith("strike")
    assert sorted(line.split()[-1] for line in table.splitlines()[2:]) == ["no", "yes", "yes"]
    assert max(len(line) for line in table.splitlines()) <= 80
    _, out, _ = run(capsys, "violations", "--store", store_url, "--format", "json")
    assert sorted((v["source"], v["strike"]) for v in json.loads(out)) == [
        ("moderation", True),
        ("output", False),
        ("safety_identifier.blocked", True),
    ]
    _, out, _ = run(capsys, "violations", "--store", store_url, "--format", "csv")
    assert sorted(r["strike"] for r in csv.DictReader(io.StringIO(out))) == [
        "false",
        "true",
        "true",
    ]
    _, out, _ = run(capsys, "report", "--store", store_url, "--format", "json")
    acme = next(row for row in json.loads(out) if row["customer"] == "acme")
    assert (acme["violations"], acme["strikes"]) == (3, 2)
    _, out, _ = run(capsys, "report", "--store", store_url, "--format", "csv")
    row = next(r for r in csv.DictReader(io.StringIO(out)) if r["customer"] == "acme")
    assert (row["violations"], row["strikes"]) == ("3", "2")


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


def cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m safe_openai ARGV`` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "safe_openai", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_bare_command_shows_help_and_version_is_the_package_version() -> None:
    """``safe-openai`` alone prints the commands (status 2); ``--version`` the package version."""
    from importlib.metadata import version

    bare = cli()
    assert bare.returncode == 2
    assert "report" in bare.stdout and "violations" in bare.stdout and "demo" in bare.stdout
    shown = cli("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"safe-openai {version('safe-openai')}"


@pytest.mark.parametrize("command", ["report", "violations"])
def test_read_only_commands_never_create_a_store(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped path is an error naming it, not a new empty file and an empty report."""
    missing = tmp_path / "typo.db"
    status, out, err = run(capsys, command, "--store", f"sqlite:///{missing}")
    assert status == 2 and out == ""
    assert err.strip() == f"safe-openai: No store at {missing}: check the --store path."
    assert not missing.exists()


@pytest.mark.parametrize("command", ["suspend", "unsuspend"])
@pytest.mark.parametrize("customer", ["", "   ", "x" * 257])
def test_suspend_refuses_a_customer_id_the_library_refuses(
    command: str, customer: str, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, customer, "--store", store_url])
    assert exited.value.code == 2
    assert "customer id must be" in capsys.readouterr().err
    assert store_from_url(store_url).suspensions(now=datetime.now(timezone.utc)) == []


@pytest.mark.parametrize("limit", ["0", "-3", "ten"])
def test_violations_limit_must_be_a_positive_whole_number(
    limit: str, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["violations", "--store", store_url, "--limit", limit])
    assert exited.value.code == 2
    assert "--limit" in capsys.readouterr().err


def test_json_names_the_customer_alike_and_csv_booleans_are_lowercase(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``customer`` in report and violations alike; CSV says true/false, not True/False."""
    _, out, _ = run(capsys, "violations", "--store", store_url, "--format", "json")
    violations = json.loads(out)
    assert violations and all(
        v["customer"] == "acme" and "customer_id" not in v for v in violations
    )
    _, out, _ = run(capsys, "violations", "--store", store_url, "--format", "csv")
    assert next(csv.DictReader(io.StringIO(out)))["customer"] == "acme"
    run(capsys, "suspend", "acme", "--store", store_url)
    _, out, _ = run(capsys, "report", "--store", store_url, "--format", "csv")
    suspended = {r["customer"]: r["suspended"] for r in csv.DictReader(io.StringIO(out))}
    assert suspended == {
        "acme": "true",
        "a-customer-with-a-very-long-name-indeed": "false",
        "old": "false",
    }


def test_the_table_names_its_columns_and_counts_denied_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    store = store_from_url(url)
    for i, outcome in enumerate(["ok", "denied", "denied", "error"]):
        store.record_usage(
            UsageRecord(
                "acme",
                "/chat/completions",
                "gpt-4o-mini",
                outcome,
                TokenUsage(1, 0, 1, 7),  # type: ignore[arg-type]
                None,
                0.1,
                NOW,
                None,
                f"t{i}",
            )
        )
    store.close()
    _, table, _ = run(capsys, "report", "--store", url)
    header, _, row = table.splitlines()[:3]
    assert header.split() == [
        "customer",
        "reqs",
        "input",
        "cached",
        "output",
        "reasoning",
        "cost",
        "$",
        "blk",
        "den",
        "err",
        "viol",
        "susp",
    ]
    cells = dict(
        zip(
            [
                "customer",
                "reqs",
                "input",
                "cached",
                "output",
                "reasoning",
                "cost",
                "blk",
                "den",
                "err",
                "viol",
            ],
            row.split(),
            strict=True,
        )
    )
    assert (cells["reqs"], cells["den"], cells["err"], cells["reasoning"]) == ("2", "2", "1", "28")
    assert "den: denied" in table and "reasoning: tokens" in table.replace("\n", " ")
    assert max(len(line) for line in table.splitlines()) <= 80


def test_demo_refuses_a_store_with_other_customers_unless_forced(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "demo", "--store", store_url)
    assert status == 2 and "besides the demo's" in err and "--force" in err
    assert {r.customer for r in store_from_url(store_url).usage_report()} == {
        "acme",
        "a-customer-with-a-very-long-name-indeed",
        "old",
    }
    status, out, _ = run(capsys, "demo", "--store", store_url, "--force")
    assert status == 0 and "Usage report" in out


def test_a_closed_pipe_exits_quietly(store_url: str, tmp_path: Path) -> None:
    """``safe-openai violations ... | head -1``: no BrokenPipeError traceback on stderr."""
    store = store_from_url(store_url)
    for i in range(3000):
        store.record_violation(Violation(f"c{i}", NOW, "moderation", ("violence",), 0.9))
    store.close()
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE
    )
    assert reader.stdin is not None
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "safe_openai",
            "violations",
            "--store",
            store_url,
            "--limit",
            "3000",
            "--format",
            "json",
        ],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    reader.stdin.close()
    reader.wait(timeout=30)
    assert result.returncode == 1
    assert result.stderr == ""


def test_an_unreachable_server_is_one_line_within_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command line opens servers with short timeouts and says why in one line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    pytest.importorskip("redis")
    status, _, err = run(capsys, "report", "--store", f"redis://127.0.0.1:{port}/0")
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("safe-openai: The Redis usage store failed")


def test_identify_and_whois_go_both_ways(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``identify`` prints what guarded calls send; ``whois`` maps it (or a request id) back."""
    from safe_openai import SafeClient, identifier_for
    from safe_openai.testing import FakeOpenAI

    secret = "a-long-random-secret-for-the-identify-test"
    monkeypatch.setenv("SAFE_OPENAI_IDENTIFIER_SECRET", secret)
    url = f"sqlite:///{tmp_path}/ids.db"
    fake = FakeOpenAI(reply="hi")
    client = SafeClient(**fake.openai_kwargs(), store=url, identifier_secret=secret)
    acme = client.for_customer("acme")
    acme.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    client.close()
    sent = fake.requests[-1].json["safety_identifier"]
    capsys.readouterr()

    status, out, _ = run(capsys, "identify", "acme")
    assert status == 0 and out.strip() == sent == identifier_for("acme") == acme.identifier_for()
    assert client.identifier_for("globex") == identifier_for("globex", secret=secret)
    status, out, _ = run(capsys, "whois", sent, "--store", url)
    assert status == 0 and out.strip() == "acme"
    status, out, err = run(capsys, "whois", "no-such-identifier", "--store", url)
    assert status == 1 and out == "" and "no customer is known" in err


def test_identify_without_a_secret_says_how_to_set_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAFE_OPENAI_IDENTIFIER_SECRET", raising=False)
    status, out, err = run(capsys, "identify", "acme")
    assert status == 2 and out == ""
    assert "SAFE_OPENAI_IDENTIFIER_SECRET" in err


def test_identifier_for_needs_a_customer_on_an_unbound_client() -> None:
    from safe_openai import CustomerRequired, SafeClient
    from safe_openai.testing import FakeOpenAI

    client = SafeClient(**FakeOpenAI().openai_kwargs(), identifier_secret="s" * 32)
    with pytest.raises(CustomerRequired):
        client.identifier_for()
    with pytest.raises(ValueError, match="customer id"):
        client.identifier_for("")
