"""Safety webhooks on every backend: one event acts once, whatever the concurrency.

Each case runs a real handler (sync with threads, async with tasks) over the store under test,
so the claim's atomicity is the store's own, not the memory store's lock.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest

from safe_openai import AsyncSafeClient, SafeClient, StoreError, WebhookInProgress
from safe_openai.webhooks import AsyncSafetyWebhookHandler, SafetyEvent, SafetyWebhookHandler
from tests.test_webhooks import IDENTIFIER_SECRET, WEBHOOK_SECRET, Api, blocked, ident, signed

from .conftest import Backend

DELIVERIES = 8


def _kwargs(store: Any, *, is_async: bool) -> dict[str, Any]:
    http = httpx2.AsyncClient if is_async else httpx2.Client
    return {
        "api_key": "k",
        "base_url": "http://t/v1",
        "http_client": http(transport=httpx2.MockTransport(Api())),
        "identifier_secret": IDENTIFIER_SECRET,
        "store": store,
        "spool": False,
        "webhook_secret": WEBHOOK_SECRET,
        "max_retries": 0,
    }


def _outcome(result: SafetyEvent | BaseException) -> str:
    if isinstance(result, WebhookInProgress):
        return "in progress"
    if isinstance(result, BaseException):
        raise result
    return result.action


def _deliver_all(backend: Backend, body: str, count: int) -> tuple[list[str], int]:
    """``count`` deliveries of ``body`` at once (each its own webhook id), then a late one.

    Returns the outcomes of the concurrent ones plus the late one, and the violations stored.
    """
    driver = backend.open()
    store = driver.store
    deliveries = [(body, signed(body, webhook_id=f"wh_{i}")) for i in range(count + 1)]
    if backend.is_async:

        async def run() -> tuple[list[str], int]:
            client = AsyncSafeClient(**_kwargs(store, is_async=True))
            await store.remember_identifier(ident("acme"), "acme")
            handler = AsyncSafetyWebhookHandler(client)
            results = await asyncio.gather(
                *(handler.handle(b, h) for b, h in deliveries[:count]), return_exceptions=True
            )
            late = await handler.handle(*deliveries[count])
            outcomes = [_outcome(r) for r in [*results, late]]
            return outcomes, len(await store.violations(customer_id="acme"))

        return driver._loop.run_until_complete(run())  # type: ignore[union-attr]

    client = SafeClient(**_kwargs(store, is_async=False))
    store.remember_identifier(ident("acme"), "acme")
    handler = SafetyWebhookHandler(client)
    barrier = threading.Barrier(count, timeout=60)

    def one(delivery: tuple[str, dict[str, str]]) -> SafetyEvent | BaseException:
        barrier.wait()
        try:
            return handler.handle(*delivery)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(one, deliveries[:count]))
    outcomes = [_outcome(r) for r in [*results, handler.handle(*deliveries[count])]]
    return outcomes, len(store.violations(customer_id="acme"))


def test_concurrent_deliveries_of_one_event_act_once(backend: Backend) -> None:
    """N deliveries of one signed event at once: one strike, one violation; every other one
    is a duplicate or told to retry, and a redelivery afterwards is a duplicate."""
    outcomes, violations = _deliver_all(backend, blocked(event_id="evt_race"), DELIVERIES)
    assert violations == 1
    concurrent, late = outcomes[:-1], outcomes[-1]
    assert concurrent.count("strike") == 1
    assert set(concurrent) <= {"strike", "duplicate", "in progress"}
    assert late == "duplicate"


def test_a_delivery_whose_action_failed_lets_the_retry_act_at_once(backend: Backend) -> None:
    """The store fails while the first delivery acts: it raises and releases its claim, so the
    redelivery (well within the claim's lease) acts, once."""
    driver = backend.open()
    store = driver.store
    original = store.record_violation
    failures = [StoreError("down")]

    if backend.is_async:

        async def failing_once(violation: Any) -> Any:
            if failures:
                raise failures.pop()
            return await original(violation)

        store.record_violation = failing_once

        async def run() -> tuple[list[str], int]:
            client = AsyncSafeClient(**_kwargs(store, is_async=True))
            await store.remember_identifier(ident("acme"), "acme")
            handler = AsyncSafetyWebhookHandler(client)
            body = blocked(event_id="evt_retry")
            with pytest.raises(StoreError):
                await handler.handle(body, signed(body, webhook_id="wh_1"))
            outcomes = [
                (await handler.handle(body, signed(body, webhook_id=f"wh_{i}"))).action
                for i in (2, 3)
            ]
            return outcomes, len(await store.violations(customer_id="acme"))

        outcomes, violations = driver._loop.run_until_complete(run())  # type: ignore[union-attr]
    else:

        def failing_once_sync(violation: Any) -> Any:
            if failures:
                raise failures.pop()
            return original(violation)

        store.record_violation = failing_once_sync
        client = SafeClient(**_kwargs(store, is_async=False))
        store.remember_identifier(ident("acme"), "acme")
        handler = SafetyWebhookHandler(client)
        body = blocked(event_id="evt_retry")
        with pytest.raises(StoreError):
            handler.handle(body, signed(body, webhook_id="wh_1"))
        outcomes = [handler.handle(body, signed(body, webhook_id=f"wh_{i}")).action for i in (2, 3)]
        violations = len(store.violations(customer_id="acme"))

    assert outcomes == ["strike", "duplicate"]
    assert violations == 1
