"""A customer's standing: how much of each quota limit is used, suspension and strikes; and the
``X-RateLimit-*`` response headers an application's own API can send from it.

:func:`read_standing` is a flow (see :mod:`safe_openai._guard`): it yields the store reads it
needs, so ``SafeClient.standing``, ``AsyncSafeClient.standing`` and ``safe-openai status`` run
the same code. Everything it reads is a read: no hold is placed, nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ._guard import Flow, StoreCall
from .errors import _header_number, wait_seconds
from .policy import Policy, Quota
from .stores._types import LIMIT_NAMES, LimitUsage, Suspension

__all__ = ["LimitUsage", "Standing", "rate_limit_headers", "read_standing"]


@dataclass(frozen=True, slots=True)
class Standing:
    """One customer's standing at one instant.

    Attributes:
        customer_id: The customer.
        at: When it was read (UTC).
        limits: One :class:`~safe_openai.stores.LimitUsage` per limit the customer's quota
            sets (``name``, ``used``, ``limit``, ``remaining``, ``resets_at``), in the order
            requests_per_minute, tokens_per_minute, tokens_per_day, usd_per_month; empty when
            no quota applies.
        suspension: The suspension in force (``since``, ``until``, ``reason``), or ``None``.
        strikes: Violations within the last :attr:`strike_window`, counted as the guard counts
            them towards a suspension.
        strike_limit: The violations within one window that suspend the customer (``None``:
            strikes never suspend), so ``strikes`` reads as "2 of 3".
        strike_window: The window strikes are counted over.
        usage_known: ``False`` when the store cannot report usage (a store of your own without
            ``quota_usage``): each limit is then listed with ``used`` 0 and ``resets_at``
            ``None``.
    """

    customer_id: str
    at: datetime
    limits: tuple[LimitUsage, ...]
    suspension: Suspension | None
    strikes: int
    strike_limit: int | None
    strike_window: timedelta
    usage_known: bool = True

    @property
    def suspended(self) -> bool:
        """Whether a suspension is in force."""
        return self.suspension is not None

    def limit(self, name: str) -> LimitUsage | None:
        """The usage of the limit called ``name``, or ``None`` when the quota does not set it."""
        return next((u for u in self.limits if u.name == name), None)

    @property
    def most_constrained(self) -> LimitUsage | None:
        """The limit with the smallest share left (the first of them on a tie), or ``None``
        when no limit is set."""
        if not self.limits:
            return None
        return min(self.limits, key=lambda u: u.remaining / u.limit if u.limit > 0 else 0.0)


def read_standing(
    customer_id: str,
    *,
    quota: Quota | None,
    strike_limit: int | None,
    strike_window: timedelta,
    now: datetime | None,
    store_reports_usage: bool,
) -> Flow[Standing]:
    """Read a customer's standing at ``now``: its suspension, its strikes in the window ending
    at ``now`` and, for each limit ``quota`` sets, its usage (``quota_usage``, when the store
    has it). Yields store reads only.

    ``now`` ``None`` is the present: the usage is then read on the store's own clock where it
    has one (Redis, PostgreSQL), the clock its reservations decide on, so a host whose clock is
    off by more than a minute does not see the minute windows empty; the rest on this host's.
    """
    usage_now = {} if now is None else {"now": now}
    if now is None:
        now = datetime.now(timezone.utc)
    suspension: Suspension | None = yield StoreCall("suspension", (customer_id,), {"now": now})
    strikes: int = yield StoreCall(
        "count_violations", (customer_id,), {"since": now - strike_window}
    )
    limits: tuple[LimitUsage, ...] = ()
    known = True
    if quota is not None and not quota.is_unlimited:
        if store_reports_usage:
            limits = tuple((yield StoreCall("quota_usage", (customer_id, quota), usage_now)))
        else:
            known = False
            limits = tuple(
                LimitUsage(name, 0, getattr(quota, name), None)
                for name in LIMIT_NAMES
                if getattr(quota, name) is not None
            )
    return Standing(
        customer_id=customer_id,
        at=now,
        limits=limits,
        suspension=suspension,
        strikes=int(strikes),
        strike_limit=strike_limit,
        strike_window=strike_window,
        usage_known=known,
    )


def reports_usage(store: Any) -> bool:
    """Whether ``store`` can report per-limit usage (the optional ``quota_usage``)."""
    return callable(getattr(store, "quota_usage", None))


def standing_of(
    policy: Policy, store: Any, customer_id: str, now: datetime | None
) -> Flow[Standing]:
    """:func:`read_standing` with the quota and strike rule ``policy`` gives the customer."""
    return read_standing(
        customer_id,
        quota=policy.quota_for(customer_id),
        strike_limit=policy.strike_limit,
        strike_window=policy.strike_window,
        now=now,
        store_reports_usage=reports_usage(store),
    )


def rate_limit_headers(standing: Standing, *, per_limit: bool = False) -> dict[str, str]:
    """The de-facto rate limit response headers for a customer's standing.

    ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` describe the
    most constrained limit (the smallest share left, see :attr:`Standing.most_constrained`);
    ``X-RateLimit-Reset`` is the number of seconds until its usage next drops, a whole number
    rounded up and at least 1 (0 when nothing is used), as GitHub and most APIs send it, not an
    epoch time.
    With ``per_limit``, each limit also gets ``X-RateLimit-Limit-<Name>``,
    ``X-RateLimit-Remaining-<Name>`` and ``X-RateLimit-Reset-<Name>`` (``<Name>`` as in
    ``Requests-Per-Minute``). A standing without limits gives no headers; one whose store
    reports no usage (``usage_known`` false) gives only the ``Limit`` headers.

    For a refusal, :meth:`QuotaExceeded.headers() <safe_openai.QuotaExceeded.headers>` gives
    ``Retry-After`` as well.
    """
    tightest = standing.most_constrained
    if tightest is None:
        return {}
    headers = _headers(standing, tightest, "")
    if per_limit:
        for usage in standing.limits:
            suffix = "-" + "-".join(part.capitalize() for part in usage.name.split("_"))
            headers.update(_headers(standing, usage, suffix))
    return headers


def _headers(standing: Standing, usage: LimitUsage, suffix: str) -> dict[str, str]:
    found = {f"X-RateLimit-Limit{suffix}": _header_number(usage.limit)}
    if standing.usage_known:
        found[f"X-RateLimit-Remaining{suffix}"] = _header_number(usage.remaining)
        found[f"X-RateLimit-Reset{suffix}"] = _seconds_until(usage.resets_at, standing.at)
    return found


def _seconds_until(moment: datetime | None, now: datetime) -> str:
    """Seconds until ``moment``; "0" only when nothing is used (``moment`` None). Usage that
    counts always drops later: see :func:`~safe_openai.errors.wait_seconds`."""
    if moment is None:
        return "0"
    return wait_seconds((moment - now).total_seconds())
