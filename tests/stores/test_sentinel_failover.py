"""A Sentinel failover while guarded calls run: the same client follows the new primary, and
every call that reached the model is recorded exactly once.

``SENTINEL FAILOVER`` promotes the replica and demotes the primary while threads make guarded
calls (each a standing check, a quota reservation and a commit). Calls caught in the switch
fail closed (``StoreError``) or have their usage spooled; afterwards the client works
unchanged, the spool drains, and the report counts exactly the calls the model served.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safe_openai import DefaultPolicy, Quota, SafeClient
from safe_openai.errors import StoreError
from safe_openai.stores import Spool, store_from_url
from safe_openai.testing import FakeOpenAI

from ..topologies import drop_redis_prefix, first_address, require

pytestmark = pytest.mark.redis

# A failover on a machine loaded by the rest of the suite can take a while to settle.
SERVICE_TIMEOUT = 90.0


def _sentinel(url: str) -> Any:
    import redis.sentinel

    return redis.sentinel.Sentinel([first_address(url)], socket_timeout=2)


def _service(url: str) -> str:
    return url.partition("://")[2].split("/", 2)[1].split("?")[0]


def _wait_until(what: str, check: Any, timeout: float = SERVICE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # a node restarting its replication answers errors for a moment
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _replicated(sentinel: Any, service: str) -> bool:
    """The current primary has an online replica, and Sentinel sees it as healthy."""
    master = sentinel.master_for(service, socket_timeout=2)
    try:
        info = master.info("replication")
    finally:
        master.close()
    online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    replicas = sentinel.sentinels[0].sentinel_slaves(service)
    healthy = [r for r in replicas if not r["is_sdown"] and r.get("master-link-status") == "ok"]
    return (
        info["role"] == "master" and any(r["state"] == "online" for r in online) and bool(healthy)
    )


@pytest.fixture
def sentinel_setup() -> Iterator[tuple[str, str, Any]]:
    url = require("redis-sentinel")
    sentinel, service = _sentinel(url), _service(url)
    _wait_until("a replicated primary", lambda: _replicated(sentinel, service))
    prefix = f"safe-openai-failover-{uuid.uuid4().hex[:10]}"
    yield url, prefix, sentinel
    # leave the set replicated for whatever runs next
    _wait_until("a replicated primary", lambda: _replicated(sentinel, service))
    drop_redis_prefix(url, prefix)
    for node in sentinel.sentinels:
        node.close()


def test_calls_during_a_failover_fail_closed_or_spool_and_are_counted_exactly_once(
    sentinel_setup: tuple[str, str, Any], tmp_path: Path
) -> None:
    url, prefix, sentinel = sentinel_setup
    service = _service(url)
    store = store_from_url(url, prefix=prefix, socket_timeout=1, socket_connect_timeout=1)
    fake = FakeOpenAI(reply="ok")
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret="failover-test-secret-0123",
        store=store,
        spool=Spool(tmp_path / "spool"),
        policy=DefaultPolicy(quota=Quota(requests_per_minute=10**6)),
    )
    stop = threading.Event()
    refused: list[int] = []
    unexpected: list[BaseException] = []
    lock = threading.Lock()

    def caller(n: int) -> None:
        customer = client.for_customer(f"tenant-{n}")
        messages = [{"role": "user", "content": f"hello from {n}"}]
        while not stop.is_set():
            try:
                customer.chat.completions.create(model="gpt-4o-mini", messages=messages)
            except StoreError:
                with lock:
                    refused.append(n)  # failed closed: nothing was sent
            except BaseException as exc:  # anything else is a bug
                with lock:
                    unexpected.append(exc)
                return

    old = sentinel.discover_master(service)
    threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        before = len(fake.model_requests)
        assert before > 0, "calls must be running when the failover starts"
        assert sentinel.sentinels[0].sentinel_failover(service)
        _wait_until("the new primary", lambda: sentinel.discover_master(service) != old)
        _wait_until("the demoted primary to follow", lambda: _replicated(sentinel, service))
        time.sleep(1.0)  # calls keep running on the new primary
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    try:
        assert not unexpected, unexpected
        assert sentinel.discover_master(service) != old
        # the same client, no restart: calls work on the new primary
        for n in range(3):
            client.for_customer("after").chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"after {n}"}]
            )
        spool = client.spool
        assert spool is not None
        spool.drain(store)
        assert len(spool) == 0
        served = len(fake.model_requests)
        report = store.usage_report()
        assert sum(row.requests for row in report) == served
        ids = [r.record_id for r in store.usage_records(limit=100_000)]
        assert len(ids) == len(set(ids)) == served
        assert served > before
    finally:
        client.close()
        store.close()
