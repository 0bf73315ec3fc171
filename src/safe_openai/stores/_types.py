"""The records a usage store holds, and the quota arithmetic every backend shares.

Quota semantics (the contract every backend implements exactly):

- Everything is timestamped at the *start* of a call: pending reservations at reservation time,
  usage records at their ``created_at``.
- Windows at ``now``: the minute window is every entry after ``now - 60 s`` (it slides across
  day and month boundaries); the day window starts at UTC midnight; the month window at 00:00
  UTC on the first of the month. Entries stamped up to :data:`CLOCK_SKEW` after ``now`` count
  (a concurrent caller read the clock later but reserved first).
- Usage in a window is the sum over usage records that reached the model
  (:attr:`UsageRecord.counts_as_request`) plus every live pending reservation (younger than
  :data:`RESERVATION_TTL`) in that window: requests count 1 each, tokens count
  ``input + output``, cost counts ``cost_usd`` (``None`` as 0).
- A demand is admitted when, for every limit set, ``used + demand <= limit`` (requests: demand
  1). Limits are checked in the order requests_per_minute, tokens_per_minute, tokens_per_day,
  usd_per_month; the first that fails is reported with its ``retry_after``.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from ..policy import Quota
from ..usage import Outcome, TokenUsage, UsageRecord

__all__ = [
    "OUTCOME_COLUMNS",
    "RESERVATION_TTL",
    "CustomerReport",
    "QuotaDemand",
    "Reservation",
    "Suspension",
    "Violation",
    "WindowEntry",
    "add_to_report",
    "day_start",
    "earliest_entry",
    "evaluate_quota",
    "finish_report",
    "month_start",
    "record_from_row",
]

#: A pending reservation older than this is treated as abandoned (its process died).
RESERVATION_TTL = timedelta(minutes=10)
MINUTE = 60.0
#: How far after ``now`` an entry may be stamped and still count (clock skew between hosts).
CLOCK_SKEW = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Violation:
    """One policy violation of a customer.

    Attributes:
        customer_id: The customer.
        created_at: When it happened (UTC).
        source: ``"moderation"`` for the library's own gate, or the OpenAI event type
            (``"safety_identifier.blocked"``, ``"safety.warning_issued"``, ...).
        categories: The categories involved.
        top_score: The highest score among them, when known.
        endpoint: The API path of the blocked call, when known.
        detail: A reference such as the webhook event id or safety case id.
    """

    customer_id: str
    created_at: datetime
    source: str
    categories: tuple[str, ...] = ()
    top_score: float | None = None
    endpoint: str | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Suspension:
    """A customer's suspension. ``until`` is ``None`` when it lasts until lifted."""

    customer_id: str
    since: datetime
    until: datetime | None
    reason: str

    def active_at(self, now: datetime) -> bool:
        """Whether the suspension is in force at ``now``."""
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True)
class CustomerReport:
    """One customer's row in the usage report.

    ``requests`` counts calls that reached the model; ``blocked`` calls moderation stopped;
    ``denied`` calls refused by the policy, a quota or a suspension.
    """

    customer: str
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    blocked: int = 0
    denied: int = 0
    errors: int = 0
    estimated: int = 0
    violations: int = 0
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class QuotaDemand:
    """The most a call may consume: what a reservation holds until the call ends."""

    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to a quota reservation.

    Attributes:
        id: Identifies the pending reservation to commit or release (empty when refused).
        customer_id: The customer.
        admitted: Whether the demand fits every limit.
        limit: The name of the limit that refused it.
        retry_after: Seconds until enough capacity frees, or ``None`` when waiting cannot help.
    """

    id: str
    customer_id: str
    admitted: bool
    limit: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class WindowEntry:
    """One counted item in a quota window: a usage record or a pending reservation."""

    at: datetime
    tokens: int
    cost_usd: float


def day_start(now: datetime) -> datetime:
    """00:00 UTC of ``now``'s day."""
    now = now.astimezone(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    """00:00 UTC on the first of ``now``'s month."""
    return day_start(now).replace(day=1)


def _next_month(now: datetime) -> datetime:
    start = month_start(now)
    days = calendar.monthrange(start.year, start.month)[1]
    return start + timedelta(days=days)


def window_starts(now: datetime) -> tuple[datetime, datetime]:
    """Where the windows at ``now`` start: (minute window, month)."""
    return now - timedelta(seconds=MINUTE), month_start(now)


def earliest_entry(now: datetime) -> datetime:
    """The oldest instant an entry can matter to :func:`evaluate_quota` at ``now``."""
    return min(window_starts(now))


def evaluate_quota(
    quota: Quota, demand: QuotaDemand, entries: Iterable[WindowEntry], now: datetime
) -> tuple[str | None, float | None]:
    """Decide a demand against the entries counted so far.

    Args:
        quota: The customer's limits.
        demand: What the new call may consume.
        entries: Usage records that reached the model and live pending reservations, at least
            those since :func:`window_starts` (older ones are ignored).
        now: The current time (UTC).

    Returns:
        ``(None, None)`` when admitted, else the refusing limit's name and its ``retry_after``.
    """
    minute_from = now - timedelta(seconds=MINUTE)
    today = day_start(now)
    this_month = month_start(now)
    horizon = now + CLOCK_SKEW
    minute: list[WindowEntry] = []
    day_tokens = 0
    month_cost = 0.0
    for entry in entries:
        # Entries stamped a little after ``now`` (a concurrent caller read the clock later but
        # reserved first, or another host's clock runs ahead) count: skipping them would let
        # concurrent callers overshoot. Entries beyond the skew allowance are clock errors.
        if entry.at > horizon:
            continue
        if entry.at >= this_month:
            month_cost += entry.cost_usd
        if entry.at >= today:
            day_tokens += entry.tokens
        if entry.at > minute_from:
            # The minute window slides across day and month boundaries.
            minute.append(entry)
    minute.sort(key=lambda e: e.at)

    if quota.requests_per_minute is not None:
        limit = quota.requests_per_minute
        if len(minute) + 1 > limit:
            if limit < 1:
                return "requests_per_minute", None
            must_expire = len(minute) + 1 - limit
            frees_at = minute[must_expire - 1].at + timedelta(seconds=MINUTE)
            return "requests_per_minute", max(0.0, (frees_at - now).total_seconds())
    if quota.tokens_per_minute is not None:
        limit = quota.tokens_per_minute
        used = sum(e.tokens for e in minute)
        if used + demand.tokens > limit:
            if demand.tokens > limit:
                return "tokens_per_minute", None
            excess = used + demand.tokens - limit
            freed = 0
            frees_at = now
            for entry in minute:
                freed += entry.tokens
                frees_at = entry.at + timedelta(seconds=MINUTE)
                if freed >= excess:
                    break
            return "tokens_per_minute", max(0.0, (frees_at - now).total_seconds())
    if quota.tokens_per_day is not None and day_tokens + demand.tokens > quota.tokens_per_day:
        if demand.tokens > quota.tokens_per_day:
            return "tokens_per_day", None
        return "tokens_per_day", (today + timedelta(days=1) - now).total_seconds()
    # Costs are summed floats: compare at the report's precision so 0.1 + 0.2 fits in 0.3.
    if (
        quota.usd_per_month is not None
        and round(month_cost + demand.cost_usd - quota.usd_per_month, 9) > 0
    ):
        if demand.cost_usd > quota.usd_per_month:
            return "usd_per_month", None
        return "usd_per_month", (_next_month(now) - now).total_seconds()
    return None, None


def add_to_report(report: dict[str, dict[str, float | int]], record: UsageRecord) -> None:
    """Add one usage record to a report being summed (``customer -> field -> total``)."""
    row = report.setdefault(record.customer_id, dict.fromkeys(_REPORT_SUMS, 0))
    if record.counts_as_request:
        row["requests"] += 1
    if record.outcome in OUTCOME_COLUMNS:
        row[OUTCOME_COLUMNS[record.outcome]] += 1
    row["input_tokens"] += record.tokens.input_tokens
    row["cached_tokens"] += record.tokens.cached_tokens
    row["output_tokens"] += record.tokens.output_tokens
    row["reasoning_tokens"] += record.tokens.reasoning_tokens
    row["cost_usd"] += record.cost_usd or 0.0


def finish_report(
    sums: dict[str, dict[str, float | int]],
    violations: dict[str, int],
    suspended: set[str],
) -> list[CustomerReport]:
    """Turn summed rows, violation counts and suspended ids into sorted report rows."""
    customers = sorted(set(sums) | set(violations) | suspended)
    rows = []
    for customer in customers:
        row = sums.get(customer, {})
        rows.append(
            CustomerReport(
                customer=customer,
                requests=int(row.get("requests", 0)),
                input_tokens=int(row.get("input_tokens", 0)),
                cached_tokens=int(row.get("cached_tokens", 0)),
                output_tokens=int(row.get("output_tokens", 0)),
                reasoning_tokens=int(row.get("reasoning_tokens", 0)),
                cost_usd=round(float(row.get("cost_usd", 0.0)), 9),
                blocked=int(row.get("blocked", 0)),
                denied=int(row.get("denied", 0)),
                errors=int(row.get("errors", 0)),
                estimated=int(row.get("estimated", 0)),
                violations=violations.get(customer, 0),
                suspended=customer in suspended,
            )
        )
    return rows


_REPORT_SUMS = (
    "requests",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "blocked",
    "denied",
    "errors",
    "estimated",
)
#: Report column counting each outcome that is not a plain ``ok``.
OUTCOME_COLUMNS = {
    "blocked": "blocked",
    "denied": "denied",
    "error": "errors",
    "estimated": "estimated",
}


def record_from_row(row: Sequence[Any], to_datetime: Callable[[Any], datetime]) -> UsageRecord:
    """A usage record from an SQL row in the column order both SQL backends select:
    record_id, customer_id, endpoint, model, outcome, input, cached, output and reasoning
    tokens, cost_usd, latency_s, created_at, request_id.
    """
    return UsageRecord(
        record_id=row[0],
        customer_id=row[1],
        endpoint=row[2],
        model=row[3],
        outcome=cast("Outcome", row[4]),
        tokens=TokenUsage(row[5], row[6], row[7], row[8]),
        cost_usd=row[9],
        latency_s=row[10],
        created_at=to_datetime(row[11]),
        request_id=row[12],
    )
