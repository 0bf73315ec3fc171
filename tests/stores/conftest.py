"""Fixtures of the store contract suite: every backend URL, each driven sync and async.

``store`` is a :class:`StoreDriver`: tests call the store's methods on it as if it were a sync
store. For an async store each call runs to completion on the driver's own event loop, so every
contract case is written once and checked against both flavours.

Service-backed URLs (Redis and PostgreSQL, standalone and in each topology: a Redis Cluster,
a Sentinel-managed primary, PgBouncer in transaction pooling) skip when the server is absent,
except with ``CI=true``, where an absent server is a failure. Each of their tests gets a clean
namespace: a random key prefix on Redis, a fresh schema on PostgreSQL, dropped afterwards. The
servers are those of :mod:`tests.topologies`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import socket
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from safe_openai.errors import ConfigurationError, StoreError
from safe_openai.stores import async_store_from_url, store_from_url

from ..topologies import (
    POSTGRES_URL,
    REDIS_URL,
    TOPOLOGIES,
    drop_postgres_schema,
    drop_redis_prefix,
    first_address,
    require,
    unavailable,
)
from ..topologies import params as topology_params

STORE_URLS = [
    pytest.param("memory://", id="memory"),
    pytest.param("sqlite:///{tmp_path}/usage.db", id="sqlite"),
    pytest.param("sqlite:///:memory:", id="sqlite-memory"),
    # a service topology by name (tests/topologies.py), resolved to its URL by `store_url`
    *(
        pytest.param(f"topology:{name}", id=name, marks=p.marks)
        for name, p in zip(TOPOLOGIES, topology_params(), strict=True)
    ),
]

# Backends whose stores opened twice on one URL share their data.
__all__ = ["POSTGRES_URL", "REDIS_URL", "Backend", "Call", "StoreDriver", "call", "run_in_parallel"]

_SHARED_SCHEMES = {"sqlite", "redis", "rediss", "postgresql", "postgres"}
_SERVICE_MODULES = {
    "redis": "safe_openai.stores._redis",
    "rediss": "safe_openai.stores._redis",
    "postgresql": "safe_openai.stores._postgres",
    "postgres": "safe_openai.stores._postgres",
}


@dataclass(frozen=True)
class Call:
    """One store method call, for :meth:`StoreDriver.concurrently`."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def call(name: str, *args: Any, **kwargs: Any) -> Call:
    """A :class:`Call` of ``store.name(*args, **kwargs)``."""
    return Call(name, args, kwargs)


class StoreDriver:
    """Calls a sync or async store through one blocking interface.

    Attribute access returns the store's method; for an async store, a function that runs the
    coroutine to completion on this driver's private event loop. Use one driver from one thread
    at a time.

    Attributes:
        store: The store under test (a ``UsageStore`` or an ``AsyncUsageStore``).
        is_async: Whether ``store`` is the async flavour.
    """

    def __init__(self, store: Any, *, is_async: bool) -> None:
        self.store = store
        self.is_async = is_async
        self._loop = asyncio.new_event_loop() if is_async else None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.store, name)
        loop = self._loop
        if loop is None:
            return method  # type: ignore[no-any-return]

        def run(*args: Any, **kwargs: Any) -> Any:
            return loop.run_until_complete(method(*args, **kwargs))

        return run

    def concurrently(self, calls: Sequence[Call]) -> list[Any]:
        """Run ``calls`` at once on this store: one thread each, or ``asyncio.gather``."""
        if self._loop is not None:

            async def gather() -> list[Any]:
                return list(
                    await asyncio.gather(
                        *(getattr(self.store, c.name)(*c.args, **c.kwargs) for c in calls)
                    )
                )

            return self._loop.run_until_complete(gather())
        barrier = threading.Barrier(len(calls), timeout=60)

        def run(c: Call) -> Any:
            barrier.wait()
            return getattr(self.store, c.name)(*c.args, **c.kwargs)

        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(run, calls))

    def close(self) -> None:
        """Close the store, then the driver's event loop."""
        if self._loop is None:
            self.store.close()
            return
        try:
            self._loop.run_until_complete(self.store.close())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
        finally:
            self._loop.close()


def run_in_parallel(
    drivers: Sequence[StoreDriver], work: Callable[[StoreDriver], Any]
) -> list[Any]:
    """Run ``work(driver)`` for every driver at once, each in its own thread."""
    barrier = threading.Barrier(len(drivers), timeout=60)

    def run(driver: StoreDriver) -> Any:
        barrier.wait()
        return work(driver)

    with ThreadPoolExecutor(max_workers=len(drivers)) as pool:
        return list(pool.map(run, drivers))


_unavailable = unavailable


@dataclass
class Backend:
    """One store URL opened in one flavour, with per-test isolation options.

    Attributes:
        url: The store URL.
        is_async: Whether stores are opened with ``async_store_from_url``.
        options: Keyword options for every store opened (the clean-state namespace).
        shared: Whether two stores opened on the URL see the same data.
    """

    url: str
    is_async: bool
    options: dict[str, Any]
    shared: bool
    drivers: list[StoreDriver] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0].split("+", 1)[0].lower()

    def open(self) -> StoreDriver:
        """Open one more store on this backend (closed after the test)."""
        opener = async_store_from_url if self.is_async else store_from_url
        try:
            store = opener(self.url, **self.options)
        except ConfigurationError as exc:
            if self.scheme in _SERVICE_MODULES:
                _unavailable(f"{self.scheme} store cannot be opened: {exc}")
            raise
        driver = StoreDriver(store, is_async=self.is_async)
        self.drivers.append(driver)
        return driver

    def close(self) -> None:
        for driver in self.drivers:
            driver.close()
        self.drivers.clear()


def _check_service(url: str, scheme: str) -> None:
    module = _SERVICE_MODULES[scheme]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    host, port = first_address(url)
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        _unavailable(f"{scheme} server not reachable at {host}:{port}: {exc}")


@pytest.fixture(params=STORE_URLS)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A store URL of each backend (SQLite files under the test's temporary directory)."""
    param = str(request.param)
    if param.startswith("topology:"):
        return require(param.removeprefix("topology:"))
    return param.format(tmp_path=tmp_path)


@pytest.fixture(params=["sync", "async"])
def flavour(request: pytest.FixtureRequest) -> str:
    """``"sync"`` (``store_from_url``) or ``"async"`` (``async_store_from_url``)."""
    return str(request.param)


@pytest.fixture
def backend(store_url: str, flavour: str) -> Iterator[Backend]:
    """The backend under test, with a clean namespace that is dropped afterwards."""
    scheme = store_url.partition("://")[0].split("+", 1)[0].lower()
    options: dict[str, Any] = {}
    cleanup: Callable[[], None] | None = None
    tag = uuid.uuid4().hex[:12]
    if scheme in _SERVICE_MODULES:
        _check_service(store_url, scheme)
    if scheme in ("redis", "rediss"):
        options["prefix"] = f"safe-openai-test-{tag}:"
        cleanup = functools.partial(drop_redis_prefix, store_url, options["prefix"])
    elif scheme in ("postgresql", "postgres"):
        options["schema"] = f"safe_openai_test_{tag}"
        cleanup = functools.partial(drop_postgres_schema, options["schema"])
    found = Backend(
        store_url,
        is_async=flavour == "async",
        options=options,
        shared=scheme in _SHARED_SCHEMES and ":memory:" not in store_url,
    )
    try:
        yield found
    finally:
        try:
            found.close()
        finally:
            if cleanup is not None:
                try:
                    cleanup()
                except Exception as exc:  # a leftover namespace must not hide the test's result
                    warnings.warn(f"could not clean up after {scheme}: {exc!r}", stacklevel=1)


@pytest.fixture
def store(backend: Backend) -> StoreDriver:
    """A fresh store of the backend under test, driven through a blocking interface."""
    driver = backend.open()
    if backend.scheme in _SERVICE_MODULES:
        try:
            driver.customer_for_identifier("connectivity-probe")
        except StoreError as exc:
            _unavailable(f"{backend.scheme} store is not usable: {exc}")
    return driver
