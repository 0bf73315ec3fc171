"""Shared fixtures: the offline fake API and guarded clients built on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

# hypothesis's pytest plugin imports this lazily at the end of the session, through pytest's
# assertion rewriter (ast.parse). After the agent-framework tests, that parse has failed on
# CPython 3.11.7 with "SystemError: AST constructor recursion depth mismatch"; imported here,
# up front, nothing is parsed late.
import hypothesis.internal.observability  # noqa: F401
import pytest
import structlog

from safe_openai import AsyncSafeClient, SafeClient
from safe_openai.testing import FakeOpenAI

SECRET = "test-identifier-secret"


DEFAULTS: dict[str, Any] = {"identifier_secret": SECRET, "store": "memory://", "spool": False}


def make_client(fake: FakeOpenAI, **options: Any) -> SafeClient:
    """A SafeClient on ``fake``: a fresh in-memory store and no spool unless ``options`` say."""
    return SafeClient(**{**fake.openai_kwargs(), **DEFAULTS, **options})


def make_async_client(fake: FakeOpenAI, **options: Any) -> AsyncSafeClient:
    """An AsyncSafeClient on ``fake``: the same defaults as :func:`make_client`."""
    return AsyncSafeClient(**{**fake.async_openai_kwargs(), **DEFAULTS, **options})


@pytest.fixture(autouse=True)
def _unconfigured_structlog() -> Iterator[None]:
    """Each test starts as an application that has not configured structlog: a test that did
    (``capture_logs`` leaves structlog configured) must not route the next test's events."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def fake() -> FakeOpenAI:
    """A fresh offline OpenAI API."""
    return FakeOpenAI()


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[SafeClient]:
    """A SafeClient on the fake API, with an in-memory store."""
    with make_client(fake) as safe:
        yield safe


@pytest.fixture
async def aclient(fake: FakeOpenAI) -> AsyncIterator[AsyncSafeClient]:
    """An AsyncSafeClient on the fake API, with an in-memory store."""
    async with make_async_client(fake) as safe:
        yield safe
