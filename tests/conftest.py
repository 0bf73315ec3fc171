"""Shared fixtures: the offline fake API and guarded clients built on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from safe_openai import AsyncSafeClient, SafeClient
from safe_openai.testing import FakeOpenAI

SECRET = "test-identifier-secret"


@pytest.fixture
def fake() -> FakeOpenAI:
    """A fresh offline OpenAI API."""
    return FakeOpenAI()


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[SafeClient]:
    """A SafeClient on the fake API, with an in-memory store."""
    with SafeClient(
        **fake.openai_kwargs(), identifier_secret=SECRET, store="memory://", spool=False
    ) as safe:
        yield safe


@pytest.fixture
async def aclient(fake: FakeOpenAI) -> AsyncIterator[AsyncSafeClient]:
    """An AsyncSafeClient on the fake API, with an in-memory store."""
    async with AsyncSafeClient(
        **fake.async_openai_kwargs(), identifier_secret=SECRET, store="memory://", spool=False
    ) as safe:
        yield safe
