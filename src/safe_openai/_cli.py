"""The ``safe-openai`` command line: usage report, violations, suspensions, and the demo."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog

from ._guard import drive, on_store, suspend, unsuspend
from .errors import ConfigurationError, SafeOpenAIError
from .stores import CustomerReport, UsageStore, Violation, default_store_url, store_from_url

__all__ = ["main"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``7d``, ``24h``, ``30m``, ``2w`` ago, or an ISO date/time (UTC when no zone is given)."""
    now = now or datetime.now(timezone.utc)
    match = _DURATION.match(text.strip())
    if match:
        amount, unit = float(match.group(1)), match.group(2)
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since takes a duration like 7d, 24h, 30m or an ISO date, not {text!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def parse_duration(text: str) -> timedelta:
    """``24h``, ``7d``... as a timedelta."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 24h or 7d, not {text!r}")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


#: Columns of ``report --format csv|json``: every field of a report row, in order.
REPORT_FIELDS = tuple(field.name for field in fields(CustomerReport))


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(value: int) -> str:
    """A token count in at most 6 characters: 999999, 1.2M, 35.0M."""
    if value < 1_000_000:
        return str(value)
    return f"{value / 1_000_000:.1f}M"


def format_report_table(rows: Sequence[CustomerReport]) -> str:
    """The report as a table that fits an 80-column terminal."""
    header = (
        f"{'customer':<16} {'reqs':>6} {'input':>7} {'cached':>7} {'output':>7} "
        f"{'reason':>7} {'cost $':>9} {'blk':>4} {'viol':>4} {'susp':>4}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{_fit(row.customer or '(anonymous)', 16):<16} {row.requests:>6} "
            f"{_count(row.input_tokens):>7} {_count(row.cached_tokens):>7} "
            f"{_count(row.output_tokens):>7} {_count(row.reasoning_tokens):>7} "
            f"{row.cost_usd:>9.6f} {row.blocked:>4} {row.violations:>4} "
            f"{'yes' if row.suspended else '':>4}"
        )
    if not rows:
        lines.append("(no usage recorded)")
    return "\n".join(lines)


def format_violations_table(rows: Sequence[Violation]) -> str:
    """Violations as a table that fits an 80-column terminal."""
    header = f"{'when (UTC)':<16} {'customer':<16} {'source':<26} {'categories':<19}"
    lines = [header, "-" * len(header)]
    for v in rows:
        when = v.created_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"{when:<16} {_fit(v.customer_id, 16):<16} {_fit(v.source, 26):<26} "
            f"{_fit(', '.join(v.categories) or '-', 19):<19}"
        )
    if not rows:
        lines.append("(no violations)")
    return "\n".join(lines)


def _violation_dict(v: Violation) -> dict[str, Any]:
    data = asdict(v)
    data["created_at"] = v.created_at.isoformat()
    data["categories"] = list(v.categories)
    return data


def _render(rows: list[dict[str, Any]], fields: Sequence[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(v) if isinstance(v, list) else v for k, v in row.items()})
    return buffer.getvalue().rstrip("\n")


def _open_store(url: str | None) -> UsageStore:
    url = url or default_store_url()
    if url.startswith("memory://"):
        raise ConfigurationError(
            "No persistent store: pass --store URL (e.g. sqlite:///usage.db) or set "
            "SAFE_OPENAI_STORE_URL."
        )
    return store_from_url(url)


def _cmd_report(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    try:
        rows = store.usage_report(since=args.since, customer_id=args.customer)
    finally:
        store.close()
    if args.format == "table":
        print(format_report_table(rows))
    else:
        print(_render([asdict(r) for r in rows], REPORT_FIELDS, args.format))
    return 0


def _cmd_violations(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    try:
        rows = store.violations(customer_id=args.customer, since=args.since, limit=args.limit)
    finally:
        store.close()
    if args.format == "table":
        print(format_violations_table(rows))
    else:
        fields = ("created_at", "customer_id", "source", "categories", "top_score", "endpoint")
        print(_render([_violation_dict(v) for v in rows], (*fields, "detail"), args.format))
    return 0


def _cmd_suspend(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    try:
        until = drive(
            suspend(args.customer, reason=args.reason, duration=args.duration, by="cli"),
            on_store(store),
        )
    finally:
        store.close()
    print(f"suspended {args.customer}" + (f" until {until.isoformat()}" if until else ""))
    return 0


def _cmd_unsuspend(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    try:
        lifted = drive(
            unsuspend(args.customer, by="cli"),
            on_store(store),
        )
    finally:
        store.close()
    print(f"unsuspended {args.customer}" if lifted else f"{args.customer} was not suspended")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(store_url=args.store)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``safe-openai``."""
    parser = argparse.ArgumentParser(
        prog="safe-openai",
        description="Per-customer usage, violations and suspensions of a safe-openai store.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_store(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store", help="store URL (default: SAFE_OPENAI_STORE_URL), e.g. sqlite:///usage.db"
        )

    report = sub.add_parser("report", help="per-customer usage")
    add_store(report)
    report.add_argument("--since", type=parse_since, help="e.g. 7d, 24h, 2026-11-01")
    report.add_argument("--customer", help="only this customer")
    report.add_argument("--format", choices=("table", "json", "csv"), default="table")
    report.set_defaults(handler=_cmd_report)

    violations = sub.add_parser("violations", help="moderation and OpenAI safety violations")
    add_store(violations)
    violations.add_argument("--since", type=parse_since)
    violations.add_argument("--customer")
    violations.add_argument("--limit", type=int, default=100)
    violations.add_argument("--format", choices=("table", "json", "csv"), default="table")
    violations.set_defaults(handler=_cmd_violations)

    suspend = sub.add_parser("suspend", help="suspend a customer")
    add_store(suspend)
    suspend.add_argument("customer")
    suspend.add_argument("--reason", default="suspended from the command line")
    suspend.add_argument("--for", dest="duration", type=parse_duration, help="e.g. 24h")
    suspend.set_defaults(handler=_cmd_suspend)

    unsuspend = sub.add_parser("unsuspend", help="lift a customer's suspension")
    add_store(unsuspend)
    unsuspend.add_argument("customer")
    unsuspend.set_defaults(handler=_cmd_unsuspend)

    demo = sub.add_parser("demo", help="an offline demo: no API key, no network")
    demo.add_argument("--store", help="default: sqlite:///safe_openai_demo.db (recreated)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    # The command line is an application, so it may choose how logs look: warnings and
    # errors only, on stderr, so tables and JSON on stdout stay clean for scripts.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except SafeOpenAIError as exc:
        print(f"safe-openai: {exc}", file=sys.stderr)
        return 2
    return status
