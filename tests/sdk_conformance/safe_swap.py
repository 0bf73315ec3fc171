"""A pytest plugin for the SDK's own test suite: ``openai.OpenAI`` and ``openai.AsyncOpenAI``
become :class:`~safe_openai.SafeClient` and :class:`~safe_openai.AsyncSafeClient`, as a user's
one-line import change makes them.

Loaded with ``-p safe_swap`` (``run.py`` does that) before the SDK's tests are imported, so their
``from openai import OpenAI`` gets the guarded clients. The guard is set to let the SDK's tests
mean what they test: a local moderator that never flags (no moderation requests on the wire),
the ``memory://`` store, no spool, anonymous calls allowed, and every unguarded path allowed.
What is left is what a drop-in must keep: the SDK's behaviour on every call.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import openai

from safe_openai import AsyncSafeClient, DefaultPolicy, SafeClient
from safe_openai._moderation import ModerationInput
from safe_openai.policy import MODERATION_CATEGORIES as CATEGORIES
from safe_openai.policy import ModerationResult


class NeverFlags:
    """A local moderator whose every answer is clean."""

    model = "never-flags"

    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        clean = ModerationResult(
            False, dict.fromkeys(CATEGORIES, False), dict.fromkeys(CATEGORIES, 0.0)
        )
        return [clean for _ in inputs]


class OpenPolicy(DefaultPolicy):
    """Anonymous calls and every path the guard cannot inspect are allowed."""

    def __init__(self) -> None:
        super().__init__(require_customer=False)

    def allow_unguarded(self, endpoint: str) -> bool:
        return True


GUARD: dict[str, Any] = {
    "identifier_secret": "sdk-conformance-identifier-secret",
    "store": "memory://",
    "spool": False,
}


def _with_guard(kwargs: dict[str, Any]) -> dict[str, Any]:
    for name, value in GUARD.items():
        kwargs.setdefault(name, value)
    kwargs.setdefault("policy", OpenPolicy())
    kwargs.setdefault("moderator", NeverFlags())
    return kwargs


class GuardedOpenAI(SafeClient):
    """``SafeClient`` with the conformance run's guard settings as its defaults."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_with_guard(kwargs))


class GuardedAsyncOpenAI(AsyncSafeClient):
    """``AsyncSafeClient`` with the conformance run's guard settings as its defaults."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**_with_guard(kwargs))


for _cls, _name in ((GuardedOpenAI, "OpenAI"), (GuardedAsyncOpenAI, "AsyncOpenAI")):
    _cls.__qualname__ = _cls.__name__ = _name
    _cls.__module__ = "openai"

openai.OpenAI = GuardedOpenAI  # type: ignore[misc]
openai.AsyncOpenAI = GuardedAsyncOpenAI  # type: ignore[misc]
# ``openai._client`` as an attribute of the package is the module-level client, not the module
_module: Any = importlib.import_module("openai._client")
_module.OpenAI = GuardedOpenAI
_module.AsyncOpenAI = GuardedAsyncOpenAI
