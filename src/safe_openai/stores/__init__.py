"""Usage stores: where usage, quotas, violations, suspensions and identifier maps live.

A store is any object with the methods of :class:`UsageStore` (or :class:`AsyncUsageStore` for
the async client); no base class is needed. Pick a built-in backend by URL::

    store_from_url("memory://")                      # one process, nothing kept
    store_from_url("sqlite:///usage.db")             # the embedded default for anything kept
    store_from_url("redis://127.0.0.1:6379/0")       # pip install safe-openai[redis]
    store_from_url("redis+cluster://h1:6379,h2:6379") # a Redis Cluster
    store_from_url("redis+sentinel://s1:26379/main")  # a Sentinel-managed primary
    store_from_url("postgresql://localhost/app")     # pip install safe-openai[postgres]

Every built-in store also has ``quota_usage(customer_id, quota, *, now=None)``, which reads
what a customer has used of each limit (a tuple of :class:`LimitUsage`) without holding
anything. It is optional for a store of your own: ``client.standing()`` then reports the
limits from the quota without usage (see docs/stores.md).

Backends are imported lazily: ``import safe_openai`` never imports redis or psycopg. Every
backend passes the same contract suite (``tests/stores/test_contract.py``); the quota
arithmetic they share is documented in :mod:`safe_openai.stores._types`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigurationError
from ..policy import Quota
from ..usage import UsageRecord
from ._spool import Spool
from ._types import (
    CustomerReport,
    EventClaim,
    LimitUsage,
    QuotaDemand,
    Reservation,
    Suspension,
    Violation,
)

__all__ = [
    "AsyncUsageStore",
    "CustomerReport",
    "EventClaim",
    "LimitUsage",
    "QuotaDemand",
    "Reservation",
    "Spool",
    "Suspension",
    "UsageStore",
    "Violation",
    "async_store_from_url",
    "default_store_url",
    "store_from_url",
    "store_identity",
]


@runtime_checkable
class UsageStore(Protocol):
    """The synchronous store contract. Every method may raise :class:`~safe_openai.StoreError`."""

    def reserve(
        self, customer_id: str, quota: Quota, demand: QuotaDemand, *, now: datetime
    ) -> Reservation:
        """Atomically check ``demand`` against ``quota`` and, if admitted, hold it as pending."""
        ...

    def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        """Replace a pending reservation by the call's actual usage record, atomically."""
        ...

    def release(self, reservation: Reservation) -> None:
        """Drop a pending reservation (the call was never sent)."""
        ...

    def record_usage(self, record: UsageRecord) -> None:
        """Store a usage record. Writing the same ``record_id`` twice stores it once."""
        ...

    def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        """Usage records, newest first."""
        ...

    def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        """Per-customer totals since ``since``, sorted by customer id."""
        ...

    def record_violation(self, violation: Violation) -> bool:
        """Store a violation, once per non-empty ``violation_id``.

        Returns ``False`` when a violation with the same ``violation_id`` was already stored
        (nothing was written), ``True`` otherwise.
        """
        ...

    def count_violations(self, customer_id: str, *, since: datetime) -> int:
        """How many strikes the customer has had since ``since`` (violations whose
        :attr:`~Violation.strike` is true; they drive the strike limit)."""
        ...

    def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        """Violations, newest first."""
        ...

    def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        """Suspend a customer (replacing any current suspension)."""
        ...

    def unsuspend(self, customer_id: str) -> bool:
        """Lift a suspension. Returns whether one was in place."""
        ...

    def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        """The customer's suspension in force at ``now``, if any."""
        ...

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        """Every suspension in force at ``now``, sorted by customer id."""
        ...

    def remember_identifier(self, identifier: str, customer_id: str) -> None:
        """Map a safety identifier back to its customer."""
        ...

    def customer_for_identifier(self, identifier: str) -> str | None:
        """The customer a safety identifier belongs to."""
        ...

    def remember_request(self, request_id: str, customer_id: str) -> None:
        """Map an OpenAI request id back to its customer."""
        ...

    def customer_for_request(self, request_id: str) -> str | None:
        """The customer an OpenAI request id belongs to."""
        ...

    def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        """Claim a webhook event for handling, atomically: of any number of concurrent
        claims, at most one gets ``"claimed"``.

        ``token`` holds the claim until :meth:`finish_event`, :meth:`release_event` or
        ``now + lease``, whichever comes first; a claim whose lease ran out may be claimed
        again. Returns ``"claimed"``, ``"held"`` (another token's claim is live) or ``"done"``
        (finished before).
        """
        ...

    def finish_event(self, event_id: str, *, token: str) -> bool:
        """Mark an event claimed by ``token`` as done for good. Returns whether ``token``
        still held the claim (``False``: its lease ran out and another token claimed it)."""
        ...

    def release_event(self, event_id: str, *, token: str) -> None:
        """Give up ``token``'s claim of an event that is not done, so a redelivery acts at
        once. A claim held by another token, or a finished event, is left alone."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class AsyncUsageStore(Protocol):
    """The asynchronous twin of :class:`UsageStore`: the same methods, awaited."""

    async def reserve(
        self, customer_id: str, quota: Quota, demand: QuotaDemand, *, now: datetime
    ) -> Reservation: ...
    async def commit(self, reservation: Reservation, record: UsageRecord) -> None: ...
    async def release(self, reservation: Reservation) -> None: ...
    async def record_usage(self, record: UsageRecord) -> None: ...
    async def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]: ...
    async def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]: ...
    async def record_violation(self, violation: Violation) -> bool: ...
    async def count_violations(self, customer_id: str, *, since: datetime) -> int: ...
    async def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]: ...
    async def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None: ...
    async def unsuspend(self, customer_id: str) -> bool: ...
    async def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None: ...
    async def suspensions(self, *, now: datetime) -> list[Suspension]: ...
    async def remember_identifier(self, identifier: str, customer_id: str) -> None: ...
    async def customer_for_identifier(self, identifier: str) -> str | None: ...
    async def remember_request(self, request_id: str, customer_id: str) -> None: ...
    async def customer_for_request(self, request_id: str) -> str | None: ...
    async def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim: ...
    async def finish_event(self, event_id: str, *, token: str) -> bool: ...
    async def release_event(self, event_id: str, *, token: str) -> None: ...
    async def close(self) -> None: ...


# scheme -> (module, sync class, async class, extra to install)
_BACKENDS: dict[str, tuple[str, str, str, str | None]] = {
    "memory": ("._memory", "MemoryStore", "AsyncMemoryStore", None),
    "sqlite": ("._sqlite", "SQLiteStore", "AsyncSQLiteStore", None),
    "redis": ("._redis", "RedisStore", "AsyncRedisStore", "redis"),
    "rediss": ("._redis", "RedisStore", "AsyncRedisStore", "redis"),
    "redis+cluster": ("._redis", "RedisStore", "AsyncRedisStore", "redis"),
    "rediss+cluster": ("._redis", "RedisStore", "AsyncRedisStore", "redis"),
    "redis+sentinel": ("._redis", "RedisStore", "AsyncRedisStore", "redis"),
    "rediss+sentinel": ("._redis", "RedisStore", "AsyncRedisStore", "redis"),
    "postgresql": ("._postgres", "PostgresStore", "AsyncPostgresStore", "postgres"),
    "postgres": ("._postgres", "PostgresStore", "AsyncPostgresStore", "postgres"),
}

#: The store used when none is passed and ``SAFE_OPENAI_STORE_URL`` is unset.
DEFAULT_STORE_URL = "memory://"


def default_store_url() -> str:
    """``SAFE_OPENAI_STORE_URL`` when set, else ``memory://``."""
    return os.environ.get("SAFE_OPENAI_STORE_URL") or DEFAULT_STORE_URL


#: Schemes that take a SQLAlchemy-style ``+driver`` suffix, which is ignored.
_DRIVER_SUFFIXED = ("sqlite", "postgresql", "postgres")


def _backend_class(url: str, *, want_async: bool) -> Any:
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if scheme not in _BACKENDS and scheme.split("+", 1)[0] in _DRIVER_SUFFIXED:
        scheme = scheme.split("+", 1)[0]
    if not sep or scheme not in _BACKENDS:
        known = ", ".join(f"{s}://" for s in _BACKENDS)
        raise ConfigurationError(
            f"Unknown store URL scheme in {_redact(url)!r}; use one of {known}"
        )
    module_name, sync_name, async_name, extra = _BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name, __name__)
    except ImportError as exc:
        hint = f"pip install 'safe-openai[{extra}]'" if extra else "reinstall safe-openai"
        raise ConfigurationError(
            f"The {scheme}:// store needs a driver that is not installed: {hint}"
        ) from exc
    return getattr(module, async_name if want_async else sync_name)


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def store_identity(store: Any) -> str:
    """What names the data ``store`` holds, so that two stores on the same data agree and two
    on different data differ: the built-in stores' ``identity`` (their file, or server,
    database and schema or key prefix, never a password). A store of your own may have an
    ``identity`` string too; without one, its class names it.
    """
    identity = getattr(store, "identity", None)
    if isinstance(identity, str) and identity:
        return identity
    return f"{type(store).__module__}.{type(store).__qualname__}:{getattr(store, 'url', '')}"


def store_from_url(url: str | None = None, **options: Any) -> UsageStore:
    """Open the synchronous store named by ``url`` (default: :func:`default_store_url`).

    Raises:
        ConfigurationError: The scheme is unknown or its driver is not installed.
    """
    url = url or default_store_url()
    with _malformed_url(url):
        store: UsageStore = _backend_class(url, want_async=False).from_url(url, **options)
    return store


def async_store_from_url(url: str | None = None, **options: Any) -> AsyncUsageStore:
    """Open the asynchronous store named by ``url`` (default: :func:`default_store_url`).

    Raises:
        ConfigurationError: The scheme is unknown or its driver is not installed.
    """
    url = url or default_store_url()
    with _malformed_url(url):
        store: AsyncUsageStore = _backend_class(url, want_async=True).from_url(url, **options)
    return store


@contextmanager
def _malformed_url(url: str) -> Iterator[None]:
    """A URL the backend cannot parse (``redis://[::1``, a port that is not a number) is a
    :class:`ConfigurationError` naming it, password redacted, not a bare ``ValueError``."""
    try:
        yield
    except ConfigurationError:
        raise
    except ValueError as exc:
        # The driver's message may quote the URL, password included: it stays in the cause.
        raise ConfigurationError(f"The store URL {_redact(url)!r} cannot be parsed.") from exc
