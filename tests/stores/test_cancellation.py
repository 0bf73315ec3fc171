"""Calls interrupted at random points leave no quota reservation behind, on every backend: an
asyncio task cancelled anywhere (a client disconnect, a ``wait_for`` timeout), or a
``BaseException`` in the sync client (a gevent timeout, ``KeyboardInterrupt``). After the storm,
with ``requests_per_minute`` set to what really reached the model plus one, the next call is
admitted and the one after it refused: exactly the sent calls count, nothing else is held."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any

import pytest

from safe_openai import AsyncSafeClient, DefaultPolicy, Quota, QuotaExceeded, SafeClient
from safe_openai._moderation import ModerationInput
from safe_openai.policy import ModerationResult
from safe_openai.stores import async_store_from_url, store_from_url
from safe_openai.testing import FakeOpenAI

from ..conftest import SECRET
from .conftest import Backend

CALLS = 40
CLEAN = ModerationResult(flagged=False, categories={}, scores={})


class Interrupt(BaseException):
    """Stands for a gevent timeout or a KeyboardInterrupt: not an ``Exception``."""


class MovingQuota(DefaultPolicy):
    """A request quota the test sets after the storm (the policy is asked on every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = 1_000

    def quota_for(self, customer_id: str) -> Quota | None:
        return Quota(requests_per_minute=self.limit)


class SlowModerator:
    """Clean verdicts after a random pause: a task may be cancelled while it waits."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    async def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        await asyncio.sleep(self.rng.uniform(0, 0.004))
        return [CLEAN for _ in inputs]


class SlowStore:
    """The backend's async store, with a pause before and after each call."""

    def __init__(self, store: Any, rng: random.Random) -> None:
        self._store = store
        self._rng = rng

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(self._rng.uniform(0, 0.002))
            result = await method(*args, **kwargs)
            await asyncio.sleep(self._rng.uniform(0, 0.002))
            return result

        return call


class InterruptingModerator:
    """Clean verdicts, or (while ``active``) sometimes an :class:`Interrupt` instead."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.active = True

    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        if self.active and self.rng.random() < 0.3:
            raise Interrupt
        return [CLEAN for _ in inputs]


class InterruptingStore:
    """The backend's sync store; some calls are interrupted before they start, and calls
    that make nothing also after they returned (an interrupt inside the reserve round trip
    itself cannot be undone in sync code: docs/threat-model.md)."""

    def __init__(self, store: Any, rng: random.Random) -> None:
        self._store = store
        self._rng = rng
        self.active = True

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)
        if not callable(method) or name.startswith("_") or name == "close":
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.active and self._rng.random() < 0.15:
                raise Interrupt
            result = method(*args, **kwargs)
            if self.active and name != "reserve" and self._rng.random() < 0.15:
                raise Interrupt
            return result

        return call


def _chat(i: int) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}


def _settle_quota(policy: MovingQuota, fake: FakeOpenAI) -> int:
    sent = len(fake.model_requests)
    policy.limit = sent + 1
    return sent


def test_interrupted_calls_leave_no_reservation(backend: Backend) -> None:
    if backend.is_async:
        asyncio.run(_cancel_async_calls(backend))
    else:
        _interrupt_sync_calls(backend)


async def _cancel_async_calls(backend: Backend) -> None:
    rng = random.Random(20261203)
    fake = FakeOpenAI()
    policy = MovingQuota()
    store = async_store_from_url(backend.url, **backend.options)
    client = AsyncSafeClient(
        **fake.async_openai_kwargs(),
        identifier_secret=SECRET,
        store=SlowStore(store, rng),
        moderator=SlowModerator(rng),
        policy=policy,
        spool=False,
    ).for_customer("acme")
    try:
        cancelled = 0
        for i in range(CALLS):
            task = asyncio.ensure_future(client.chat.completions.create(**_chat(i)))
            await asyncio.sleep(rng.uniform(0, 0.012))
            cancelled += task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert cancelled > CALLS // 4  # the storm did cancel calls at many points
        _settle_quota(policy, fake)
        await client.chat.completions.create(**_chat(-1))
        with pytest.raises(QuotaExceeded):
            await client.chat.completions.create(**_chat(-2))
    finally:
        await store.close()


def _interrupt_sync_calls(backend: Backend) -> None:
    rng = random.Random(20261203)
    fake = FakeOpenAI()
    policy = MovingQuota()
    store = InterruptingStore(store_from_url(backend.url, **backend.options), rng)
    moderator = InterruptingModerator(rng)
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=SECRET,
        store=store,
        moderator=moderator,
        policy=policy,
        spool=False,
    ).for_customer("acme")
    try:
        interrupted = 0
        for i in range(CALLS):
            try:
                client.chat.completions.create(**_chat(i))
            except Interrupt:
                interrupted += 1
        assert interrupted > CALLS // 4
        store.active = moderator.active = False
        _settle_quota(policy, fake)
        client.chat.completions.create(**_chat(-1))
        with pytest.raises(QuotaExceeded):
            client.chat.completions.create(**_chat(-2))
    finally:
        store.close()
