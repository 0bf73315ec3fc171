"""AsyncSafeClient: the same guarantees as SafeClient, on the async SDK."""

from __future__ import annotations

import asyncio
import gc

import openai
import pytest
from openai.types.chat import ChatCompletion

import safe_openai
from safe_openai import (
    AsyncSafeClient,
    ConfigurationError,
    CustomerRequired,
    ModerationBlocked,
    ModerationInput,
    ModerationResult,
    ModerationUnavailable,
)
from safe_openai._identity import safety_identifier
from safe_openai.stores import store_from_url
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET

USER = [{"role": "user", "content": "Hello there"}]


async def test_async_client_guards_and_tags(aclient: AsyncSafeClient, fake: FakeOpenAI) -> None:
    assert isinstance(aclient, openai.AsyncOpenAI)
    reply = await aclient.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER
    )
    assert isinstance(reply, ChatCompletion)
    assert [r.path for r in fake.requests] == ["/moderations", "/chat/completions"]
    assert fake.model_requests[0].json["safety_identifier"] == safety_identifier(
        SECRET.encode(), "acme"
    )
    [record] = await aclient.store.usage_records()
    assert record.outcome == "ok" and record.request_id


async def test_async_blocked_and_copies(aclient: AsyncSafeClient, fake: FakeOpenAI) -> None:
    copy = aclient.for_customer("acme").with_options(max_retries=0)
    with pytest.raises(ModerationBlocked):
        await copy.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "kill"}]
        )
    assert fake.model_requests == []
    with pytest.raises(CustomerRequired):
        await aclient.chat.completions.create(model="gpt-4o-mini", messages=USER)


async def test_the_copy_pydantic_ai_makes_keeps_guard_store_and_customer(
    aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    acme = aclient.for_customer("acme")
    copy = acme.with_options(http_client=acme._client, max_retries=3, _extra_kwargs={})
    assert isinstance(copy, AsyncSafeClient)
    assert (copy.customer_id, copy.store, copy._safe) == ("acme", aclient.store, aclient._safe)
    await copy.chat.completions.create(model="gpt-4o-mini", messages=USER)
    [sent] = fake.model_requests
    assert sent.json["safety_identifier"] == safety_identifier(SECRET.encode(), "acme")


async def test_context_customer_is_per_task(aclient: AsyncSafeClient, fake: FakeOpenAI) -> None:
    async def call(customer: str) -> None:
        with safe_openai.customer(customer):
            await asyncio.sleep(0)
            await aclient.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": customer}]
            )

    await asyncio.gather(*(call(f"c{i}") for i in range(10)))
    sent = {
        r.json["messages"][0]["content"]: r.json["safety_identifier"] for r in fake.model_requests
    }
    assert sent == {f"c{i}": safety_identifier(SECRET.encode(), f"c{i}") for i in range(10)}


async def test_async_stream_hides_usage_and_records(aclient: AsyncSafeClient) -> None:
    stream = await aclient.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    [record] = await aclient.store.usage_records()
    assert record.outcome == "ok"


async def test_async_stream_closed_early_records_one_estimate(aclient: AsyncSafeClient) -> None:
    stream = await aclient.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    async for _ in stream:
        break
    await stream.close()
    del stream
    gc.collect()
    await asyncio.sleep(0.01)
    [record] = await aclient.store.usage_records()
    assert record.outcome == "estimated"


async def test_async_unread_stream_collected_records_one_estimate(aclient: AsyncSafeClient) -> None:
    await aclient.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    gc.collect()
    await asyncio.sleep(0.01)
    [record] = await aclient.store.usage_records()
    assert record.outcome == "estimated"


async def test_async_responses_stream_helper(aclient: AsyncSafeClient) -> None:
    async with aclient.for_customer("acme").responses.stream(
        model="gpt-4o-mini", input="hi"
    ) as stream:
        final = await stream.get_final_response()
    assert final.usage is not None
    [record] = await aclient.store.usage_records()
    assert record.tokens.input_tokens == final.usage.input_tokens


async def test_async_client_accepts_sync_and_async_moderators(fake: FakeOpenAI) -> None:
    class Keyword:
        def moderate(self, inputs: list[ModerationInput]) -> list[ModerationResult]:
            return [
                ModerationResult(
                    "zap" in i.value, {"violence": "zap" in i.value}, {"violence": 0.0}
                )
                for i in inputs
            ]

    class AsyncKeyword(Keyword):
        async def moderate(self, inputs: list[ModerationInput]) -> list[ModerationResult]:  # type: ignore[override]
            return Keyword.moderate(self, inputs)

    for moderator in (Keyword(), AsyncKeyword()):
        client = AsyncSafeClient(
            **fake.async_openai_kwargs(), identifier_secret=SECRET, moderator=moderator, spool=False
        )
        with pytest.raises(ModerationBlocked):
            await client.for_customer("a").chat.completions.create(
                model="m", messages=[{"role": "user", "content": "zap"}]
            )
    assert fake.moderation_requests == []


async def test_async_moderation_outage_fails_closed(
    aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    fake.fail("/moderations", 500, times=10, headers={"retry-after-ms": "1"})
    with pytest.raises(ModerationUnavailable):
        await aclient.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=USER
        )
    assert fake.model_requests == []


def test_async_client_refuses_a_sync_store(fake: FakeOpenAI) -> None:
    with pytest.raises(ConfigurationError, match="async usage store"):
        AsyncSafeClient(
            **fake.async_openai_kwargs(),
            identifier_secret=SECRET,
            store=store_from_url("memory://"),
            spool=False,
        )
