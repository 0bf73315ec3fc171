"""``copy()`` / ``with_options()`` keep the SDK's signature and take the guard's settings."""

from __future__ import annotations

import inspect
import typing

import openai
import pytest

from safe_openai import (
    AsyncSafeClient,
    ConfigurationError,
    CustomerRequired,
    DefaultPolicy,
    ModerationBlocked,
    SafeClient,
)
from safe_openai._moderation import ModerationInput
from safe_openai.policy import ModerationResult
from safe_openai.stores import UsageStore
from safe_openai.testing import FakeOpenAI

from .conftest import make_async_client

USER = [{"role": "user", "content": "Hello there"}]
GUARD = ("policy", "store", "identifier_secret", "moderator", "prices", "spool")


class Keyword:
    """Flags one word, counting its calls."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.calls = 0

    def moderate(self, inputs: list[ModerationInput]) -> list[ModerationResult]:
        self.calls += 1
        hit = [self.word in str(i.value) for i in inputs]
        return [ModerationResult(h, {"violence": h}, {"violence": float(h)}) for h in hit]


@pytest.mark.parametrize(
    ("ours", "sdk"), [(SafeClient, openai.OpenAI), (AsyncSafeClient, openai.AsyncOpenAI)]
)
@pytest.mark.parametrize("method", ["copy", "with_options"])
def test_copy_has_every_sdk_parameter_with_its_type_and_the_guards(
    ours: type, sdk: type, method: str
) -> None:
    signature = inspect.signature(getattr(ours, method))
    theirs = inspect.signature(getattr(sdk, method))
    hints = typing.get_type_hints(getattr(ours, method))
    sdk_hints = typing.get_type_hints(getattr(sdk, method))
    for name, param in theirs.parameters.items():
        assert signature.parameters[name].kind == param.kind
        assert signature.parameters[name].default == param.default
        if name != "self":
            assert hints[name] == sdk_hints[name], name
    for name in GUARD:
        assert signature.parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert name in hints
    assert hints["store"] == (typing.get_type_hints(ours.__init__)["store"])


def test_a_copy_can_have_its_own_policy(client: SafeClient, fake: FakeOpenAI) -> None:
    open_copy = client.with_options(policy=DefaultPolicy(require_customer=False))
    open_copy.chat.completions.create(model="gpt-4o-mini", messages=USER)
    with pytest.raises(CustomerRequired):
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert open_copy.store is client.store  # the store and its records are shared
    assert len(client.store.usage_records()) == 1
    assert isinstance(client.policy, DefaultPolicy) and client.policy is not open_copy.policy


def test_none_keeps_the_clients_settings(client: SafeClient) -> None:
    copy = client.copy(policy=None, store=None, moderator=None)
    assert copy._safe is client._safe


def test_a_copy_with_its_own_store_records_there_and_closes_it(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    acme = client.for_customer("acme")
    copy = acme.with_options(store="memory://")
    assert isinstance(copy.store, UsageStore) and copy.store is not client.store
    copy.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert copy.customer_id == "acme"
    assert len(copy.store.usage_records()) == 1
    assert client.store.usage_records() == []
    # a copy sharing the root's store never closes it; one that opened its own does
    assert (copy._safe_root, copy._safe.owns_store) == (True, True)
    assert acme.with_options(max_retries=1)._safe_root is False


def test_a_copy_with_its_own_moderator_uses_it_and_not_the_cache(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    acme = client.for_customer("acme")
    acme.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "zap"}])
    strict = Keyword("zap")
    copy = acme.with_options(moderator=strict)
    with pytest.raises(ModerationBlocked):
        copy.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "zap"}]
        )
    assert strict.calls == 1
    # the original keeps its own moderator and verdicts
    acme.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "zap"}])


def test_a_sync_copy_refuses_an_async_moderator(client: SafeClient) -> None:
    class AsyncKeyword(Keyword):
        async def moderate(self, inputs: list[ModerationInput]) -> list[ModerationResult]:  # type: ignore[override]
            return Keyword.moderate(self, inputs)

    with pytest.raises(ConfigurationError):
        client.with_options(moderator=AsyncKeyword("x"))


def test_an_sdk_option_the_sdk_does_not_know_is_its_usual_type_error(client: SafeClient) -> None:
    with pytest.raises(TypeError):
        client.with_options(no_such_option=1)


async def test_async_copy_takes_guard_settings(fake: FakeOpenAI) -> None:
    async with make_async_client(fake) as aclient:
        copy = aclient.for_customer("acme").with_options(
            policy=DefaultPolicy(thresholds={"violence": 0.99}), max_retries=0
        )
        assert isinstance(copy, AsyncSafeClient) and copy.max_retries == 0
        await copy.chat.completions.create(model="gpt-4o-mini", messages=USER)
        assert len(await aclient.store.usage_records()) == 1
        assert copy.customer_id == "acme"
