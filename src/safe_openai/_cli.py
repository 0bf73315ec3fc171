"""The ``safe-openai`` command line: usage report, violations, suspensions, and the demo."""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import logging
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, fields
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .policy import Policy, Quota
    from .standing import Standing
    from .stores import CustomerReport, UsageStore, Violation

# The guard, the stores and the SDK are imported by the commands that use them, not here:
# ``safe-openai --help`` (and a mistyped command) answers without loading them.

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


def report_fields() -> tuple[str, ...]:
    """Columns of ``report --format csv|json``: every field of a report row, in order."""
    from .stores import CustomerReport

    return tuple(field.name for field in fields(CustomerReport))


def _printable(text: str) -> str:
    """``text`` with every character a terminal would act on (a newline, an ESC starting a
    control sequence, ...) written as its escape: customer ids and reasons come from end
    customers, and a table must not let them move the cursor or retitle the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fit(text: str, width: int) -> str:
    text = _printable(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _count(value: int) -> str:
    """A count in at most 6 characters: 999999, 1.2M, 35.0M, 1.2G."""
    if value < 1_000_000:
        return str(value)
    if value < 1_000_000_000:
        return f"{value / 1_000_000:.1f}M"
    return f"{value / 1_000_000_000:.1f}G"


def _cost(value: float) -> str:
    """A cost in USD in at most 8 characters: 0.002100, 12.5000, 123456.7."""
    for places in (6, 4, 2, 1, 0):
        text = f"{value:.{places}f}"
        if len(text) <= 8:
            return text
    return f"{value:.2g}"


#: What the report table's short column names stand for, printed under the table.
REPORT_LEGEND = (
    "reqs: calls that reached the model; input/cached/output/reasoning: tokens; "
    "blk: blocked by moderation; den: denied (policy, quota, suspension); err: errors; "
    "viol: violations; susp: suspended"
)


def format_report_table(rows: Sequence[CustomerReport]) -> str:
    """The report as a table that fits an 80-column terminal, with a legend of its columns."""
    header = (
        f"{'customer':<12} {'reqs':>5} {'input':>6} {'cached':>6} {'output':>6} "
        f"{'reasoning':>9} {'cost $':>8} {'blk':>3} {'den':>3} {'err':>3} {'viol':>4} "
        f"{'susp':>4}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{_fit(row.customer or '(anonymous)', 12):<12} {row.requests:>5} "
            f"{_count(row.input_tokens):>6} {_count(row.cached_tokens):>6} "
            f"{_count(row.output_tokens):>6} {_count(row.reasoning_tokens):>9} "
            f"{_cost(row.cost_usd):>8} {row.blocked:>3} {row.denied:>3} {row.errors:>3} "
            f"{row.violations:>4} {'yes' if row.suspended else '':>4}"
        )
    if not rows:
        lines.append("(no usage recorded)")
    lines += ["", *textwrap.wrap(REPORT_LEGEND, width=len(header))]
    return "\n".join(lines)


def format_violations_table(rows: Sequence[Violation]) -> str:
    """Violations as a table that fits an 80-column terminal."""
    header = f"{'when (UTC)':<16} {'customer':<16} {'source':<26} {'categories':<12} strike"
    lines = [header, "-" * len(header)]
    for v in rows:
        when = v.created_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"{when:<16} {_fit(v.customer_id, 16):<16} {_fit(v.source, 26):<26} "
            f"{_fit(', '.join(v.categories) or '-', 12):<12} {'yes' if v.strike else 'no':<6}"
        )
    if not rows:
        lines.append("(no violations)")
    return "\n".join(lines)


#: Columns of ``violations --format csv|json``; the customer is ``customer`` as in ``report``.
VIOLATION_FIELDS = (
    "created_at",
    "customer",
    "source",
    "categories",
    "top_score",
    "endpoint",
    "detail",
    "strike",
)


def _violation_dict(v: Violation) -> dict[str, Any]:
    data = asdict(v)
    data["customer"] = data.pop("customer_id")
    data["created_at"] = v.created_at.isoformat()
    data["categories"] = list(v.categories)
    return {name: data[name] for name in VIOLATION_FIELDS}


def _csv_cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(value)
    return value


def _render(rows: list[dict[str, Any]], fields: Sequence[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return buffer.getvalue().rstrip("\n")


#: Connection limits for the command line, by scheme: a server that does not answer is an
#: error within seconds, not a hang.
_CLI_TIMEOUTS: dict[str, dict[str, Any]] = {
    "redis": {"socket_connect_timeout": 3.0, "socket_timeout": 5.0},
    "rediss": {"socket_connect_timeout": 3.0, "socket_timeout": 5.0},
    "postgresql": {"timeout": 3.0, "connect_timeout": 3},
    "postgres": {"timeout": 3.0, "connect_timeout": 3},
}


def _open_store(url: str | None, *, read_only: bool = False) -> UsageStore:
    """Open the store the command works on.

    Read-only commands never create a store: a SQLite file that does not exist is an error.
    """
    from .errors import ConfigurationError
    from .stores import default_store_url, store_from_url

    url = url or default_store_url()
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        raise ConfigurationError(
            "No persistent store: pass --store URL (e.g. sqlite:///usage.db) or set "
            "SAFE_OPENAI_STORE_URL."
        )
    if read_only and scheme == "sqlite":
        path = url.partition("://")[2][1:]
        if path and path != ":memory:" and not os.path.exists(path):
            raise ConfigurationError(f"No store at {path}: check the --store path.")
    return store_from_url(url, **_CLI_TIMEOUTS.get(scheme, {}))


def _cmd_report(args: argparse.Namespace) -> int:
    store = _open_store(args.store, read_only=True)
    try:
        rows = store.usage_report(since=args.since, customer_id=args.customer)
    finally:
        store.close()
    if args.format == "table":
        print(format_report_table(rows))
    else:
        print(_render([asdict(r) for r in rows], report_fields(), args.format))
    return 0


def _cmd_violations(args: argparse.Namespace) -> int:
    store = _open_store(args.store, read_only=True)
    try:
        rows = store.violations(customer_id=args.customer, since=args.since, limit=args.limit)
    finally:
        store.close()
    if args.format == "table":
        print(format_violations_table(rows))
    else:
        print(_render([_violation_dict(v) for v in rows], VIOLATION_FIELDS, args.format))
    return 0


def _cmd_suspend(args: argparse.Namespace) -> int:
    from ._guard import drive, on_store, suspend

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
    from ._guard import drive, on_store, unsuspend

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


def _cmd_identify(args: argparse.Namespace) -> int:
    from ._identity import identifier_for

    print(identifier_for(args.customer))
    return 0


def _cmd_whois(args: argparse.Namespace) -> int:
    store = _open_store(args.store, read_only=True)
    try:
        found = store.customer_for_identifier(args.identifier)
        if found is None:
            found = store.customer_for_request(args.identifier)
    finally:
        store.close()
    if found is None:
        print(f"safe-openai: no customer is known for {args.identifier!r}", file=sys.stderr)
        return 1
    print(found)
    return 0


def load_policy(spec: str) -> Policy:
    """The policy named by ``pkg.module:attr``: a :class:`Policy` instance, or a zero-argument
    factory (a class or function) returning one. The current directory is importable, as it
    is for ``python -m``."""
    from .errors import ConfigurationError
    from .policy import Policy

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"--policy takes pkg.module:attr, not {spec!r}.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--policy: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the application's module failed to load: name it, no traceback
        raise ConfigurationError(
            f"--policy: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ConfigurationError(f"--policy: {module_name!r} has no {attr!r}.")
        found = getattr(found, part)
    if not isinstance(found, Policy) and callable(found):
        try:
            found = found()
        except Exception as exc:  # the application's factory: name it, not a traceback
            raise ConfigurationError(
                f"--policy: {spec} raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(found, Policy):
        raise ConfigurationError(
            f"--policy: {spec} is a {type(found).__name__}, not a safe_openai.Policy "
            "(or a factory of one)."
        )
    return found


def _every_limit() -> Quota:
    """Without ``--policy`` the limits are unknown: usage is read against every limit,
    unbounded."""
    from .policy import Quota

    return Quota(
        requests_per_minute=sys.maxsize,
        tokens_per_minute=sys.maxsize,
        tokens_per_day=sys.maxsize,
        usd_per_month=1e300,
    )


def _read_standing(store: UsageStore, customer_id: str, policy: Policy | None) -> Standing:
    from ._guard import drive, on_store
    from .errors import ConfigurationError
    from .policy import DefaultPolicy
    from .standing import read_standing, reports_usage, standing_of

    now = None  # the present: the usage on the store's clock, the one it decides on
    if policy is not None:
        try:
            flow = standing_of(policy, store, customer_id, now)  # asks the policy its rules
        except Exception as exc:  # the application's code: name it, not a traceback
            raise ConfigurationError(
                f"--policy: the policy raised {type(exc).__name__} for this customer: {exc}"
            ) from exc
        return drive(flow, on_store(store))
    flow = read_standing(
        customer_id,
        quota=_every_limit(),
        strike_limit=None,
        strike_window=DefaultPolicy().strike_window,
        now=now,
        store_reports_usage=reports_usage(store),
    )
    return drive(flow, on_store(store))


def standing_dict(standing: Standing, *, limits_known: bool = True) -> dict[str, Any]:
    """``status --format json``: the standing, ``customer`` keyed as in the other commands;
    ``limit`` and ``remaining`` are ``null`` when the limits are unknown (no ``--policy``)."""
    suspension = standing.suspension
    return {
        "customer": standing.customer_id,
        "at": standing.at.isoformat(),
        "suspended": suspension is not None,
        "suspension": None
        if suspension is None
        else {
            "since": suspension.since.isoformat(),
            "until": suspension.until.isoformat() if suspension.until else None,
            "reason": suspension.reason,
        },
        "strikes": standing.strikes,
        "strike_limit": standing.strike_limit,
        "strike_window_seconds": standing.strike_window.total_seconds(),
        "limits_known": limits_known,
        "usage_known": standing.usage_known,
        "limits": [
            {
                "name": usage.name,
                "used": usage.used,
                "limit": usage.limit if limits_known else None,
                "remaining": usage.remaining if limits_known else None,
                "resets_at": usage.resets_at.isoformat() if usage.resets_at else None,
            }
            for usage in standing.limits
        ],
    }


def _amount(name: str, value: float) -> str:
    return _cost(value) if name == "usd_per_month" else _count(int(value))


def _when(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def format_standing(standing: Standing, *, limits_known: bool = True) -> str:
    """The standing as a few lines and a table of limits, within 80 columns."""
    suspension = standing.suspension
    if suspension is None:
        suspended = ["no"]
    else:
        until = _when(suspension.until) if suspension.until else "lifted"
        suspended = [
            f"yes, until {until} (since {_when(suspension.since)})",
            f"reason:     {_fit(suspension.reason, 68)}",
        ]
    from ._guard import human_span

    window = human_span(standing.strike_window)
    if standing.strike_limit is not None:
        strikes = f"{standing.strikes} of {standing.strike_limit} within {window}"
    elif limits_known:
        strikes = f"{standing.strikes} within {window} (strikes never suspend)"
    else:
        strikes = f"{standing.strikes} within {window} (the default window; no --policy)"
    lines = [
        f"customer:   {_printable(standing.customer_id)}",
        f"at (UTC):   {_when(standing.at)}",
        f"suspended:  {suspended[0]}",
        *suspended[1:],
        f"strikes:    {strikes}",
        "",
    ]
    header = f"{'limit':<20} {'used':>9} {'limit':>9} {'remaining':>9}  resets at (UTC)"
    lines += [header, "-" * len(header)]
    for usage in standing.limits:
        limit = _amount(usage.name, usage.limit) if limits_known else "-"
        left = _amount(usage.name, usage.remaining) if limits_known else "-"
        lines.append(
            f"{usage.name:<20} {_amount(usage.name, usage.used):>9} {limit:>9} {left:>9}  "
            f"{_when(usage.resets_at)}"
        )
    if not standing.limits:
        lines.append("(no quota applies to this customer)")
    if not limits_known:
        lines.append("(no --policy: the limits are unknown; showing what is used)")
    if not standing.usage_known:
        lines.append("(this store cannot report usage: quota_usage is missing)")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy) if args.policy else None
    store = _open_store(args.store, read_only=True)
    try:
        standing = _read_standing(store, args.customer, policy)
    finally:
        store.close()
    known = policy is not None
    if args.format == "json":
        print(json.dumps(standing_dict(standing, limits_known=known), indent=2))
    else:
        print(format_standing(standing, limits_known=known))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(store_url=args.store, force=args.force)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _customer_id(text: str) -> str:
    """A customer id the library accepts (the same check as ``for_customer``)."""
    from ._identity import validate_customer_id

    try:
        return validate_customer_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("safe-openai")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, read from the package metadata only when asked (importing it costs more
    than the rest of ``--help``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show program's version number and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``safe-openai``."""
    parser = argparse.ArgumentParser(
        prog="safe-openai",
        description="Per-customer usage, violations and suspensions of a safe-openai store.",
    )
    parser.add_argument("--version", action=_VersionAction, dest=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    violations.add_argument("--limit", type=_positive_int, default=100, help="at most N rows")
    violations.add_argument("--format", choices=("table", "json", "csv"), default="table")
    violations.set_defaults(handler=_cmd_violations)

    suspend = sub.add_parser("suspend", help="suspend a customer")
    add_store(suspend)
    suspend.add_argument("customer", type=_customer_id)
    suspend.add_argument("--reason", default="suspended from the command line")
    suspend.add_argument("--for", dest="duration", type=parse_duration, help="e.g. 24h")
    suspend.set_defaults(handler=_cmd_suspend)

    unsuspend = sub.add_parser("unsuspend", help="lift a customer's suspension")
    add_store(unsuspend)
    unsuspend.add_argument("customer", type=_customer_id)
    unsuspend.set_defaults(handler=_cmd_unsuspend)

    status = sub.add_parser(
        "status", help="a customer's standing: quota usage, suspension, strikes (reads only)"
    )
    add_store(status)
    status.add_argument("customer", type=_customer_id)
    status.add_argument(
        "--policy",
        metavar="MODULE:ATTR",
        help="the application's Policy (or a factory of one), e.g. myapp.policy:POLICY; "
        "without it the limits are unknown and only usage is shown",
    )
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.set_defaults(handler=_cmd_status)

    identify = sub.add_parser(
        "identify",
        help="the safety_identifier sent for a customer (secret: SAFE_OPENAI_IDENTIFIER_SECRET)",
    )
    identify.add_argument("customer", type=_customer_id)
    identify.set_defaults(handler=_cmd_identify)

    whois = sub.add_parser(
        "whois", help="the customer a safety_identifier (or an OpenAI request id) belongs to"
    )
    add_store(whois)
    whois.add_argument("identifier")
    whois.set_defaults(handler=_cmd_whois)

    demo = sub.add_parser("demo", help="an offline demo: no API key, no network")
    demo.add_argument("--store", help="default: sqlite:///safe_openai_demo.db (recreated)")
    demo.add_argument(
        "--force",
        action="store_true",
        help="run even when --store holds customers other than the demo's",
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):
        # a customer id the terminal's encoding cannot show (a Windows console or pipe in
        # cp1252, PYTHONIOENCODING=ascii) is written escaped instead of a UnicodeEncodeError
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # The command line is an application, so it may choose how logs look: warnings and
    # errors only, on stderr, so tables and JSON on stdout stay clean for scripts.
    import structlog

    from .errors import SafeOpenAIError

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    # Drivers log their own connection retries (psycopg's pool, with tracebacks); the one-line
    # error below says the same.
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)
    try:
        status: int = args.handler(args)
        sys.stdout.flush()
    except SafeOpenAIError as exc:
        print(f"safe-openai: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing, and let no flush at exit complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status
