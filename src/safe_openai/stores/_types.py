"""The records a usage store holds, and the quota arithmetic every backend shares.

Quota semantics (the contract every backend implements exactly):

- Every quota entry has a time: a pending reservation the time it was made (the store's clock
  where it has one, see :func:`decide`), a usage record that reached the model
  (:attr:`UsageRecord.counts_as_request`) the time of the reservation it settles, or its
  ``created_at`` when it settles none.
- The minute windows are kept as one bucket per second (:data:`BUCKET`): requests, tokens and
  the time of the latest entry put in it. A bucket counts at ``now`` while its latest entry is
  younger than 60 s, so every entry counts at least as long as the exact sliding window would
  count it and at most one bucket (1 s) longer: the window never admits more than the exact
  sliding window, and refuses at most 1 s early. When the entries of one bucket are all the
  latest of it (one entry per second, the common case) the answer is exact. ``retry_after`` is
  when enough buckets have left the window, so waiting that long is always enough.
- The day window starts at UTC midnight and the month window at 00:00 UTC on the first; both are
  exact counters (tokens per UTC day, cost per UTC day summed over the month).
- A pending reservation counts in the minute buckets like a record, and in the day and month
  windows through one bucket per minute of holds (:data:`HOLD_BUCKET`) until it is committed,
  released or older than :data:`RESERVATION_TTL` (a crashed process's hold ages out; a bucket
  ages out with its latest hold, so a hold counts at most a minute past its TTL).
- Entries stamped up to :data:`CLOCK_SKEW` after ``now`` count (a concurrent caller read the
  clock later but reserved first); buckets starting later than that are ignored.
- Requests count 1 each, tokens ``input + output``, cost ``cost_usd`` (``None`` as 0).
- A demand is admitted when, for every limit set, ``used + demand <= limit`` (requests: demand
  1). Limits are checked in the order requests_per_minute, tokens_per_minute, tokens_per_day,
  usd_per_month; the first that fails is reported with its ``retry_after``.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, cast

from ..policy import Quota
from ..usage import Outcome, TokenUsage, UsageRecord

__all__ = [
    "BUCKET",
    "CLOCK_SKEW",
    "EVENT_KEEP",
    "EVENT_LEASE",
    "EVENT_PRUNE_BATCH",
    "HOLD_BUCKET",
    "KEEP_HOLD_MINUTES",
    "KEEP_SECONDS",
    "LIMIT_NAMES",
    "OUTCOME_COLUMNS",
    "RESERVATION_TTL",
    "Bucket",
    "CallStart",
    "CustomerReport",
    "DayTotal",
    "EventClaim",
    "LimitUsage",
    "QuotaDemand",
    "QuotaState",
    "Reservation",
    "Suspension",
    "Violation",
    "WindowSums",
    "add_to_report",
    "assess",
    "counted_days",
    "day_of",
    "day_start",
    "decide",
    "finish_report",
    "from_us",
    "measure",
    "month_of",
    "month_start",
    "next_month",
    "record_from_row",
    "to_us",
    "usage_of",
    "window_sums",
]

#: A pending reservation older than this is treated as abandoned (its process died).
RESERVATION_TTL = timedelta(minutes=10)
MINUTE = 60.0
#: How far after ``now`` an entry may be stamped and still count (clock skew between hosts).
CLOCK_SKEW = timedelta(seconds=60)
#: Width of one bucket of the minute windows.
BUCKET = timedelta(seconds=1)
#: Width of one bucket of pending holds (what the day and month windows count of them).
HOLD_BUCKET = timedelta(minutes=1)
#: Minute buckets this many seconds older than the newest ``now`` a store saw are dropped: the
#: window (60 s), the skew allowance (60 s) and a margin.
KEEP_SECONDS = 128
#: Buckets of holds this many minutes older than ``now`` are dropped (the TTL and a margin).
KEEP_HOLD_MINUTES = int(RESERVATION_TTL / HOLD_BUCKET) + 2

SECOND_US = 1_000_000
MINUTE_US = 60 * SECOND_US
DAY_US = 86_400 * SECOND_US
SKEW_US = int(CLOCK_SKEW / timedelta(microseconds=1))
TTL_US = int(RESERVATION_TTL / timedelta(microseconds=1))
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


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
        violation_id: Identifies the violation: a store keeps one violation per non-empty id,
            so a violation written again (a spool replay, a webhook redelivery) counts once.
        strike: Whether it counts against the customer: only strikes count toward the strike
            limit (:meth:`UsageStore.count_violations
            <safe_openai.stores.UsageStore.count_violations>`). A block of content the
            customer did not write (a role outside :attr:`Policy.strike_roles
            <safe_openai.Policy.strike_roles>`), or flagged output under
            ``output_strikes=False``, is kept as a violation that is not a strike.
    """

    customer_id: str
    created_at: datetime
    source: str
    categories: tuple[str, ...] = ()
    top_score: float | None = None
    endpoint: str | None = None
    detail: str = ""
    violation_id: str = ""
    strike: bool = True


#: What :meth:`UsageStore.claim_event <safe_openai.stores.UsageStore.claim_event>` found:
#: ``"claimed"`` (the caller holds the event now and acts on it), ``"held"`` (another
#: delivery's claim is live: it is acting right now) or ``"done"`` (an earlier delivery
#: finished it).
EventClaim = Literal["claimed", "held", "done"]

#: How long a webhook handler's claim on an event lasts if it neither finishes nor releases it
#: (its process died): after that, a redelivery may claim the event and act.
EVENT_LEASE = timedelta(minutes=5)

#: How long a claim is remembered, finished or lapsed, from when it was claimed (Redis: from
#: when its key was last written, the finish at the latest, a lease later): longer than
#: OpenAI's webhook retries (up to 3 days) and than the longest alert window (a UTC month),
#: so a redelivery or an alert id of this month finds it ``"done"``. Older claims are forgotten
#: (Redis lets their keys expire; the other stores delete them as they claim new events), and
#: an id claimed again after that is ``"claimed"`` again. A live lease is never forgotten.
EVENT_KEEP = timedelta(days=32)

#: At most this many forgotten claims are deleted per ``claim_event`` call (a bounded cost per
#: call; a backlog, such as the first claims after an upgrade, drains over the next calls).
EVENT_PRUNE_BATCH = 100


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
    ``denied`` calls refused by the policy, a quota or a suspension; ``violations`` counts
    every violation recorded, ``strikes`` those of them that count toward suspension.
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
    strikes: int = 0


@dataclass(frozen=True, slots=True)
class QuotaDemand:
    """The most a call may consume: what a reservation holds until the call ends."""

    tokens: int = 0
    cost_usd: float = 0.0


#: The limits of a :class:`~safe_openai.Quota`, in the order they are checked and reported.
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "usd_per_month")


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """How much of one quota limit a customer has used.

    Attributes:
        name: The limit: ``"requests_per_minute"``, ``"tokens_per_minute"``,
            ``"tokens_per_day"`` or ``"usd_per_month"``.
        used: What counts in the limit's window now, pending holds included (before any new
            demand): whole requests or tokens (ints), or US dollars.
        limit: The limit's value.
        resets_at: When ``used`` next drops: for the minute windows when the oldest entry
            counting leaves the window, for the day the next 00:00 UTC, for the month 00:00
            UTC on the first of the next month; ``None`` when nothing is used.
    """

    name: str
    used: float
    limit: float
    resets_at: datetime | None

    @property
    def remaining(self) -> float:
        """What is left of the limit (never below 0)."""
        left = self.limit - self.used
        if isinstance(left, float):
            left = round(left, 9)  # summed costs: 0.3 - 0.1 - 0.2 is 0, not -5.5e-17
        return max(left, 0)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer to a quota reservation.

    Attributes:
        id: Identifies the pending reservation to commit or release (empty when refused).
        customer_id: The customer.
        admitted: Whether the demand fits every limit.
        limit: The name of the limit that refused it.
        retry_after: Seconds until enough capacity frees, or ``None`` when waiting cannot help.
        at: When the store placed the hold (its own clock where it has one); the usage record
            that settles it counts at this time. ``None`` when unknown.
        usage: What the store found used of each limit the quota sets when it decided, before
            this demand (admitted or refused); empty when the store does not report it.
    """

    id: str
    customer_id: str
    admitted: bool
    limit: str | None = None
    retry_after: float | None = None
    at: datetime | None = None
    usage: tuple[LimitUsage, ...] = ()


@dataclass(frozen=True, slots=True)
class CallStart:
    """The answer to ``begin_call``: the customer's standing and, when a quota applies and the
    customer is not suspended, its reservation.

    Attributes:
        suspension: The suspension in force, if any (then nothing was reserved).
        reservation: The reservation, admitted or refused; ``None`` when no quota applies.
        identifier_saved: Whether the identifier given was mapped (``False``: the caller maps
            it with ``remember_identifier`` itself).
    """

    suspension: Suspension | None
    reservation: Reservation | None
    identifier_saved: bool = True

    @property
    def admitted(self) -> bool:
        """Whether a hold was placed that must be settled or released."""
        return self.reservation is not None and self.reservation.admitted


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket of a customer's quota state.

    Attributes:
        index: Seconds since the epoch (a minute bucket) or minutes since the epoch (a bucket
            of holds).
        requests: Entries in it (minute buckets), or live holds in it (buckets of holds).
        tokens: Their tokens.
        cost_usd: Their cost (buckets of holds only; 0 in minute buckets).
        last_us: Microseconds since the epoch of the latest entry ever put in it.
    """

    index: int
    requests: int
    tokens: int
    cost_usd: float
    last_us: int


@dataclass(frozen=True, slots=True)
class DayTotal:
    """Committed usage of one customer on one UTC day (``day``: days since the epoch)."""

    day: int
    tokens: int
    cost_usd: float


@dataclass(frozen=True, slots=True)
class QuotaState:
    """What :func:`decide` needs of one customer: O(1) in the customer's volume.

    Any superset of the buckets and days that matter at ``now`` may be given; the rest are
    ignored.
    """

    seconds: Sequence[Bucket] = ()
    holds: Sequence[Bucket] = ()
    days: Sequence[DayTotal] = ()


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch (a naive datetime is UTC): exact as integers and doubles."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    """The UTC datetime ``us`` microseconds after the epoch."""
    return _EPOCH + timedelta(microseconds=us)


def day_of(us: int) -> int:
    """The UTC day (days since the epoch) of an instant."""
    return us // DAY_US


def month_of(us: int) -> tuple[int, int]:
    """The UTC (year, month) of an instant."""
    moment = from_us(us)
    return moment.year, moment.month


def day_start(now: datetime) -> datetime:
    """00:00 UTC of ``now``'s day."""
    now = now.astimezone(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    """00:00 UTC on the first of ``now``'s month."""
    return day_start(now).replace(day=1)


def next_month(now: datetime) -> datetime:
    """00:00 UTC on the first of the month after ``now``'s."""
    start = month_start(now)
    days = calendar.monthrange(start.year, start.month)[1]
    return start + timedelta(days=days)


def counted_days(now_us: int) -> tuple[range, range]:
    """The UTC days whose committed totals count at ``now``: (for tokens, for cost).

    Tokens count from today, cost from the first of the month, both up to the day that
    ``now + CLOCK_SKEW`` falls in (tomorrow, in the last minute of a day).
    """
    last = day_of(now_us + SKEW_US)
    first_of_month = day_of(to_us(month_start(from_us(now_us))))
    return range(day_of(now_us), last + 1), range(first_of_month, last + 1)


@dataclass(frozen=True, slots=True)
class WindowSums:
    """What counts in each window of a customer's quota at one instant (before new demand).

    Attributes:
        requests: Requests in the minute window.
        tokens: Tokens in the minute window.
        requests_since_us: ``last_us`` of the oldest minute bucket holding requests (``None``:
            none does); it leaves the window a minute later.
        tokens_since_us: The same for the oldest bucket holding tokens.
        day_tokens: Tokens of the UTC day.
        month_cost: Cost of the UTC month.
    """

    requests: int = 0
    tokens: int = 0
    requests_since_us: int | None = None
    tokens_since_us: int | None = None
    day_tokens: int = 0
    month_cost: float = 0.0


def _counted(state: QuotaState, now_us: int) -> tuple[list[Bucket], WindowSums]:
    """The minute buckets that count at ``now_us`` (oldest first) and every window's sums:
    the one computation :func:`decide` and :func:`measure` share."""
    minute_from = now_us - MINUTE_US
    horizon = now_us + SKEW_US
    minute = sorted(
        (
            b
            for b in state.seconds
            if b.last_us > minute_from
            and b.index * SECOND_US <= horizon
            and (b.requests > 0 or b.tokens > 0)
        ),
        key=lambda b: (b.last_us, b.index),
    )
    token_days, cost_days = counted_days(now_us)
    today_us = token_days.start * DAY_US
    month_us = cost_days.start * DAY_US
    day_tokens = 0
    month_cost = 0.0
    for total in sorted(state.days, key=lambda d: d.day):
        if total.day in token_days:
            day_tokens += total.tokens
        if total.day in cost_days:
            month_cost += total.cost_usd
    stale = now_us - TTL_US
    for hold in sorted(state.holds, key=lambda b: b.index):
        start = hold.index * MINUTE_US
        if hold.requests <= 0 or hold.last_us <= stale or start > horizon:
            continue
        if start >= today_us:
            day_tokens += hold.tokens
        if start >= month_us:
            month_cost += hold.cost_usd
    sums = WindowSums(
        requests=sum(b.requests for b in minute),
        tokens=sum(b.tokens for b in minute),
        requests_since_us=next((b.last_us for b in minute if b.requests > 0), None),
        tokens_since_us=next((b.last_us for b in minute if b.tokens > 0), None),
        day_tokens=day_tokens,
        month_cost=month_cost,
    )
    return minute, sums


def window_sums(state: QuotaState, now_us: int) -> WindowSums:
    """What counts in each window of ``state`` at ``now_us`` (see the module docstring)."""
    return _counted(state, now_us)[1]


def decide(
    quota: Quota, demand: QuotaDemand, state: QuotaState, now_us: int
) -> tuple[str | None, float | None]:
    """Decide a demand against a customer's quota state (see the module docstring).

    Args:
        quota: The customer's limits.
        demand: What the new call may consume.
        state: The customer's buckets and day totals.
        now_us: The current time, microseconds since the epoch.

    Returns:
        ``(None, None)`` when admitted, else the refusing limit's name and its ``retry_after``.
    """
    minute, sums = _counted(state, now_us)
    return _decide(quota, demand, minute, sums, now_us)


def assess(
    quota: Quota, demand: QuotaDemand, state: QuotaState, now_us: int
) -> tuple[str | None, float | None, tuple[LimitUsage, ...]]:
    """:func:`decide` and :func:`measure` in one pass over ``state``: the refusing limit (or
    ``None``), its ``retry_after``, and the usage found before this demand."""
    minute, sums = _counted(state, now_us)
    limit, retry_after = _decide(quota, demand, minute, sums, now_us)
    return limit, retry_after, usage_of(quota, sums, now_us)


def _decide(
    quota: Quota, demand: QuotaDemand, minute: Sequence[Bucket], sums: WindowSums, now_us: int
) -> tuple[str | None, float | None]:
    if quota.requests_per_minute is not None:
        limit = quota.requests_per_minute
        used = sums.requests
        if used + 1 > limit:
            if limit < 1:
                return "requests_per_minute", None
            return "requests_per_minute", _frees(minute, used + 1 - limit, now_us, "requests")
    if quota.tokens_per_minute is not None:
        limit = quota.tokens_per_minute
        used = sums.tokens
        if used + demand.tokens > limit:
            if demand.tokens > limit:
                return "tokens_per_minute", None
            excess = used + demand.tokens - limit
            return "tokens_per_minute", _frees(minute, excess, now_us, "tokens")
    day_tokens, month_cost = sums.day_tokens, sums.month_cost
    if quota.tokens_per_day is not None and day_tokens + demand.tokens > quota.tokens_per_day:
        if demand.tokens > quota.tokens_per_day:
            return "tokens_per_day", None
        return "tokens_per_day", (day_of(now_us) * DAY_US + DAY_US - now_us) / SECOND_US
    # Costs are summed floats: compare at the report's precision so 0.1 + 0.2 fits in 0.3.
    if (
        quota.usd_per_month is not None
        and round(month_cost + demand.cost_usd - quota.usd_per_month, 9) > 0
    ):
        if demand.cost_usd > quota.usd_per_month:
            return "usd_per_month", None
        return "usd_per_month", (to_us(next_month(from_us(now_us))) - now_us) / SECOND_US
    return None, None


def usage_of(quota: Quota, sums: WindowSums, now_us: int) -> tuple[LimitUsage, ...]:
    """One :class:`LimitUsage` per limit ``quota`` sets (in :data:`LIMIT_NAMES` order), from
    the window sums at ``now_us``."""
    found: list[LimitUsage] = []
    if quota.requests_per_minute is not None:
        since = sums.requests_since_us if sums.requests > 0 else None
        found.append(
            LimitUsage(
                "requests_per_minute",
                sums.requests,
                quota.requests_per_minute,
                None if since is None else from_us(since + MINUTE_US),
            )
        )
    if quota.tokens_per_minute is not None:
        since = sums.tokens_since_us if sums.tokens > 0 else None
        found.append(
            LimitUsage(
                "tokens_per_minute",
                sums.tokens,
                quota.tokens_per_minute,
                None if since is None else from_us(since + MINUTE_US),
            )
        )
    if quota.tokens_per_day is not None:
        found.append(
            LimitUsage(
                "tokens_per_day",
                sums.day_tokens,
                quota.tokens_per_day,
                from_us((day_of(now_us) + 1) * DAY_US) if sums.day_tokens > 0 else None,
            )
        )
    if quota.usd_per_month is not None:
        cost = round(sums.month_cost, 9)
        found.append(
            LimitUsage(
                "usd_per_month",
                cost,
                quota.usd_per_month,
                next_month(from_us(now_us)) if cost > 0 else None,
            )
        )
    return tuple(found)


def measure(quota: Quota, state: QuotaState, now_us: int) -> tuple[LimitUsage, ...]:
    """What a customer has used of each limit ``quota`` sets at ``now_us``, before any new
    demand: the sums :func:`decide` compares, with when each next drops."""
    return usage_of(quota, window_sums(state, now_us), now_us)


def _frees(minute: Sequence[Bucket], excess: int, now_us: int, field_name: str) -> float:
    """Seconds until the oldest buckets holding ``excess`` requests or tokens have all left."""
    freed = 0
    frees_at = now_us
    for bucket in minute:
        freed += bucket.requests if field_name == "requests" else bucket.tokens
        frees_at = bucket.last_us + MINUTE_US
        if freed >= excess:
            break
    return max(0, frees_at - now_us) / SECOND_US


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
    strikes: dict[str, int],
) -> list[CustomerReport]:
    """Turn summed rows, violation and strike counts and suspended ids into sorted report
    rows."""
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
                strikes=strikes.get(customer, 0),
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
