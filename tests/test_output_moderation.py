"""Output moderation through the real SDK over the fake API: off, record and block, for chat
completions, Responses and completions, sync and async, plain, streamed, raw and streaming
responses; usage and violations recorded either way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import httpx2
import openai
import pytest
from pydantic import BaseModel

from safe_openai import (
    ConfigurationError,
    CustomerSuspended,
    DefaultPolicy,
    GuardedRequest,
    ModerationBlocked,
    ModerationInput,
    ModerationResult,
    ModerationUnavailable,
    OutputBlocked,
    SafeClient,
    UnguardedPathError,
)
from safe_openai.testing import FakeOpenAI

from .conftest import make_async_client, make_client

MODEL = "gpt-4o-mini"
QUESTION = "Tell me a story."
#: The flagged word sits in the middle of the answer, in its third sentence.
FLAGGED = (
    "Once upon a time there was a quiet village. The people were kind and calm. "
    "One night a stranger came to kill the baker. Nobody slept that night. The end."
)
CLEAN = "Once upon a time there was a quiet village. Everyone lived happily. The end."
ENDPOINTS = ("chat", "responses", "completions")
MODES: tuple[str | None, ...] = (None, "record", "block")


def policy(mode: str | None, **settings: Any) -> DefaultPolicy:
    return DefaultPolicy(output_moderation=mode, output_window_chars=40, **settings)  # type: ignore[arg-type]


def resource(client: Any, endpoint: str) -> Any:
    return {
        "chat": lambda: client.chat.completions,
        "responses": lambda: client.responses,
        "completions": lambda: client.completions,
    }[endpoint]()


def arguments(endpoint: str) -> dict[str, Any]:
    if endpoint == "chat":
        return {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}]}
    if endpoint == "responses":
        return {"model": MODEL, "input": QUESTION}
    return {"model": MODEL, "prompt": QUESTION}


def call(client: Any, endpoint: str, **extra: Any) -> Any:
    return resource(client, endpoint).create(**arguments(endpoint), **extra)


def answer_text(endpoint: str, result: Any) -> str:
    if endpoint == "chat":
        return str(result.choices[0].message.content)
    if endpoint == "responses":
        return str(result.output_text)
    return str(result.choices[0].text)


def event_text(endpoint: str, event: Any) -> str:
    if endpoint == "chat":
        return (event.choices[0].delta.content or "") if event.choices else ""
    if endpoint == "responses":
        return str(event.delta) if event.type == "response.output_text.delta" else ""
    return event.choices[0].text if event.choices else ""


def drain(events: Any, endpoint: str, delivered: list[str]) -> None:
    """Read a stream to its end, keeping the text of each event delivered."""
    for event in events:
        delivered.append(event_text(endpoint, event))


async def adrain(events: Any, endpoint: str, delivered: list[str]) -> None:
    async for event in events:
        delivered.append(event_text(endpoint, event))


def drain_helper(manager: Any, delivered: list[str]) -> None:
    """Read a ``stream()`` helper's text deltas inside its context manager."""
    with manager as stream:
        for event in stream:
            if event.type in ("content.delta", "response.output_text.delta"):
                delivered.append(event.delta)


async def adrain_helper(manager: Any, delivered: list[str]) -> None:
    async with manager as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                delivered.append(event.delta)


def output_inputs(fake: FakeOpenAI) -> list[str]:
    """Moderation inputs other than the question itself (the input gate's)."""
    return [text for text in fake.moderation_inputs if text != QUESTION]


# -- plain calls -----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_output_moderation_is_off_by_default(endpoint: str) -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    with make_client(fake) as client:
        result = call(client.for_customer("acme"), endpoint)
        assert answer_text(endpoint, result) == FLAGGED
        assert output_inputs(fake) == []  # not one moderation request about the output
        assert client.store.violations() == []


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_record_returns_flagged_output_and_records_the_violation(endpoint: str) -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    with make_client(fake, policy=policy("record")) as client:
        result = call(client.for_customer("acme"), endpoint)
        assert answer_text(endpoint, result) == FLAGGED
        [violation] = client.store.violations()
        assert violation.source == "output"
        assert violation.categories == ("violence",)
        assert violation.endpoint == f"/{endpoint.replace('chat', 'chat/completions')}"
        [record] = client.store.usage_records()
        assert record.outcome == "ok" and record.tokens.output_tokens > 0
        [row] = client.store.usage_report()
        assert row.violations == 1 and row.requests == 1
        assert output_inputs(fake) == [FLAGGED]  # one moderation request for the answer


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_block_raises_output_blocked_and_records_usage_and_violation(endpoint: str) -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    with make_client(fake, policy=policy("block")) as client:
        with pytest.raises(OutputBlocked) as caught:
            call(client.for_customer("acme"), endpoint)
        error = caught.value
        assert isinstance(error, ModerationBlocked)
        assert error.categories == ("violence",)
        assert error.request_id == "req_0002"
        assert "kill" not in str(error) and "village" not in error.user_message
        [record] = client.store.usage_records()
        assert record.outcome == "ok" and record.tokens.output_tokens > 0  # tokens were spent
        [violation] = client.store.violations()
        assert violation.source == "output" and violation.detail == "req_0002"
        [row] = client.store.usage_report()
        assert row.violations == 1 and row.requests == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_block_returns_clean_output_untouched(endpoint: str) -> None:
    fake = FakeOpenAI(reply=CLEAN)
    with make_client(fake, policy=policy("block")) as client:
        assert answer_text(endpoint, call(client.for_customer("acme"), endpoint)) == CLEAN
        assert client.store.violations() == []


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_async_block_and_record(endpoint: str) -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    async with make_async_client(fake, policy=policy("block")) as client:
        with pytest.raises(OutputBlocked):
            await call(client.for_customer("acme"), endpoint)
        assert len(await client.store.usage_records()) == 1
        [violation] = await client.store.violations()
        assert violation.source == "output"
    async with make_async_client(fake, policy=policy("record")) as client:
        result = await call(client.for_customer("acme"), endpoint)
        assert answer_text(endpoint, result) == FLAGGED
        assert len(await client.store.violations()) == 1
    async with make_async_client(fake, policy=policy(None)) as client:
        assert answer_text(endpoint, await call(client.for_customer("acme"), endpoint)) == FLAGGED
        assert await client.store.violations() == []


def test_the_same_answer_is_not_moderated_twice() -> None:
    fake = FakeOpenAI(reply=CLEAN)
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        call(acme, "chat")
        call(acme, "chat")
        assert output_inputs(fake) == [CLEAN]  # the verdict cache answers the second time


def test_tool_call_arguments_are_moderated() -> None:
    fake = FakeOpenAI(tool_arguments={"command": "kill the server owner"})
    tools = [{"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}]
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        with pytest.raises(OutputBlocked):
            call(acme, "chat", tools=tools)
        responses_tools = [{"type": "function", "name": "run", "parameters": {"type": "object"}}]
        with pytest.raises(OutputBlocked):
            call(acme, "responses", tools=responses_tools)


def test_parse_helpers_are_moderated() -> None:
    class Story(BaseModel):
        text: str

    fake = FakeOpenAI(reply='{"text": "they kill him"}')
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        with pytest.raises(OutputBlocked):
            acme.chat.completions.parse(
                model=MODEL, messages=[{"role": "user", "content": QUESTION}], response_format=Story
            )
        with pytest.raises(OutputBlocked):
            acme.responses.parse(model=MODEL, input=QUESTION, text_format=Story)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_raw_and_streaming_responses_are_moderated(endpoint: str) -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        with pytest.raises(OutputBlocked):
            resource(acme, endpoint).with_raw_response.create(**arguments(endpoint))
        with pytest.raises(OutputBlocked):
            resource(acme, endpoint).with_streaming_response.create(
                **arguments(endpoint)
            ).__enter__()
        assert len(client.store.usage_records()) == 2
    with make_client(FakeOpenAI(reply=CLEAN), policy=policy("block")) as client:
        raw = client.for_customer("acme").chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}]
        )
        assert raw.parse().choices[0].message.content == CLEAN


async def test_async_raw_and_streaming_responses_are_moderated() -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    async with make_async_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        messages: Any = [{"role": "user", "content": QUESTION}]
        with pytest.raises(OutputBlocked):
            await acme.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
        with pytest.raises(OutputBlocked):
            async with acme.chat.completions.with_streaming_response.create(
                model=MODEL, messages=messages
            ):
                pass
        assert len(await client.store.usage_records()) == 2


# -- streams ---------------------------------------------------------------------------------


def stream_fake(reply: str = FLAGGED) -> FakeOpenAI:
    return FakeOpenAI(reply=reply, delta_chars=7)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_blocked_stream_delivers_nothing_of_the_flagged_window(endpoint: str) -> None:
    fake = stream_fake()
    with make_client(fake, policy=policy("block")) as client:
        pieces: list[str] = []
        with pytest.raises(OutputBlocked):
            drain(call(client.for_customer("acme"), endpoint, stream=True), endpoint, pieces)
        delivered = "".join(pieces)
        assert "kill" not in delivered and "stranger" not in delivered
        assert delivered and FLAGGED.startswith(delivered)  # text before the window came
        # no more than one window of text beyond what was delivered was ever held back
        windows = output_inputs(fake)
        assert any("kill" in text for text in windows)
        assert all(len(text) < 40 + 7 + 120 for text in windows)
        [record] = client.store.usage_records()
        assert record.outcome == "estimated" and record.tokens.output_tokens > 0
        [violation] = client.store.violations()
        assert violation.source == "output"
        [row] = client.store.usage_report()
        assert row.violations == 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_clean_stream_under_block_delivers_every_event_in_order(endpoint: str) -> None:
    fake = stream_fake(CLEAN)
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        blocked = list(call(acme, endpoint, stream=True))
        fake.reset()
        with make_client(fake) as plain:
            unmoderated = list(call(plain.for_customer("acme"), endpoint, stream=True))
        assert [e.model_dump() for e in blocked] == [e.model_dump() for e in unmoderated]
        assert "".join(event_text(endpoint, e) for e in blocked) == CLEAN
        [record, _] = client.store.usage_records() + plain.store.usage_records()
        expected = "estimated" if endpoint == "completions" else "ok"  # see guide: legacy
        assert record.outcome == expected


def test_a_streamed_answer_is_moderated_once_per_window_and_never_again() -> None:
    fake = stream_fake(CLEAN)
    with make_client(fake, policy=policy("block")) as client:
        list(call(client.for_customer("acme"), "responses", stream=True))
        windows = output_inputs(fake)
        # the done, part, item and completed events repeat the text: nothing more is sent
        assert len(windows) >= 2 and CLEAN not in windows  # the whole text is never sent again
        assert len(fake.moderation_requests) == 1 + len(windows)  # one request per window
        assert "".join(windows).count("The end.") == 1


def test_chat_stream_usage_chunk_stays_hidden_and_usage_recorded() -> None:
    fake = stream_fake(CLEAN)
    with make_client(fake, policy=policy("block")) as client:
        chunks = list(call(client.for_customer("acme"), "chat", stream=True))
        assert all(chunk.choices for chunk in chunks)  # no usage-only chunk for this caller
        [record] = client.store.usage_records()
        assert record.outcome == "ok"


def test_usage_is_recorded_when_the_flag_is_in_the_last_window() -> None:
    fake = stream_fake("All is well. Then they kill.")
    with make_client(fake, policy=policy("block", output_window_sentences=None)) as client:
        delivered: list[str] = []
        with pytest.raises(OutputBlocked):
            drain(call(client.for_customer("acme"), "chat", stream=True), "chat", delivered)
        [record] = client.store.usage_records()
        assert record.outcome == "ok"  # the usage chunk was read, though never delivered
        assert "kill" not in "".join(delivered)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_record_streams_deliver_everything_and_record_once(endpoint: str) -> None:
    fake = stream_fake()
    with make_client(fake, policy=policy("record")) as client:
        text = "".join(
            event_text(endpoint, e)
            for e in call(client.for_customer("acme"), endpoint, stream=True)
        )
        assert text == FLAGGED
        assert output_inputs(fake) == [FLAGGED]  # the whole answer once, at the end
        [violation] = client.store.violations()
        assert violation.source == "output"
        assert len(client.store.usage_records()) == 1


def test_off_streams_are_not_moderated() -> None:
    fake = stream_fake()
    with make_client(fake) as client:
        text = "".join(
            event_text("chat", e) for e in call(client.for_customer("acme"), "chat", stream=True)
        )
        assert text == FLAGGED and output_inputs(fake) == []


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_async_streams_block_and_record(endpoint: str) -> None:
    fake = stream_fake()
    async with make_async_client(fake, policy=policy("block")) as client:
        pieces: list[str] = []
        stream = await call(client.for_customer("acme"), endpoint, stream=True)
        with pytest.raises(OutputBlocked):
            await adrain(stream, endpoint, pieces)
        delivered = "".join(pieces)
        assert delivered and "kill" not in delivered and FLAGGED.startswith(delivered)
        [violation] = await client.store.violations()
        assert violation.source == "output"
        assert len(await client.store.usage_records()) == 1
    fake.reset()
    async with make_async_client(fake, policy=policy("record")) as client:
        text = ""
        async for event in await call(client.for_customer("acme"), endpoint, stream=True):
            text += event_text(endpoint, event)
        assert text == FLAGGED
        assert len(await client.store.violations()) == 1


def test_stream_helpers_are_held_in_windows() -> None:
    fake = stream_fake()
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        chat: list[str] = []
        manager = acme.chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}]
        )
        with pytest.raises(OutputBlocked):
            drain_helper(manager, chat)
        assert chat and "kill" not in "".join(chat)
        responses: list[str] = []
        with pytest.raises(OutputBlocked):
            drain_helper(acme.responses.stream(model=MODEL, input=QUESTION), responses)
        assert responses and "kill" not in "".join(responses)
        assert len(client.store.usage_records()) == 2


async def test_async_stream_helpers_are_held_in_windows() -> None:
    fake = stream_fake()
    async with make_async_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        seen: list[str] = []
        with pytest.raises(OutputBlocked):
            await adrain_helper(acme.responses.stream(model=MODEL, input=QUESTION), seen)
        assert seen and "kill" not in "".join(seen)


def test_raw_streams_parsed_are_held_in_windows() -> None:
    fake = stream_fake()
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        messages: Any = [{"role": "user", "content": QUESTION}]
        raw = acme.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=True
        )
        delivered: list[str] = []
        with pytest.raises(OutputBlocked):
            drain(raw.parse(), "chat", delivered)
        assert delivered and "kill" not in "".join(delivered)
        streamed: list[str] = []
        with acme.chat.completions.with_streaming_response.create(
            model=MODEL, messages=messages, stream=True
        ) as response:
            chunks = response.parse()
            with pytest.raises(OutputBlocked):
                drain(chunks, "chat", streamed)
        assert streamed and "kill" not in "".join(streamed)
        assert len(client.store.violations()) == 1  # the same flagged window: one strike
        assert len(client.store.usage_records()) == 2


def test_a_stream_closed_early_under_block_moderates_nothing_more() -> None:
    fake = stream_fake()
    with make_client(fake, policy=policy("block")) as client:
        stream = call(client.for_customer("acme"), "chat", stream=True)
        next(iter(stream))
        stream.close()
        before = len(fake.moderation_requests)
        assert client.store.violations() == []
        [record] = client.store.usage_records()
        assert record.outcome == "estimated"
        assert len(fake.moderation_requests) == before


def test_a_record_stream_closed_early_is_moderated_as_far_as_it_went() -> None:
    fake = stream_fake()
    with make_client(fake, policy=policy("record")) as client:
        stream = call(client.for_customer("acme"), "chat", stream=True)
        for chunk in stream:
            if "kill" in (chunk.choices[0].delta.content or ""):
                break
        stream.close()
        [violation] = client.store.violations()
        assert violation.source == "output"
        assert len(client.store.usage_records()) == 1


# -- policy --------------------------------------------------------------------------------


class FreeTierBlocks(DefaultPolicy):
    def output_moderation_for(self, request: GuardedRequest) -> Any:
        return "block" if request.customer_id == "free" else None


def test_the_policy_decides_per_customer() -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    with make_client(fake, policy=FreeTierBlocks()) as client:
        assert answer_text("chat", call(client.for_customer("paid"), "chat")) == FLAGGED
        assert output_inputs(fake) == []
        with pytest.raises(OutputBlocked):
            call(client.for_customer("free"), "chat")


def test_output_strikes_false_stores_a_violation_that_is_not_a_strike() -> None:
    fake = FakeOpenAI(reply=FLAGGED)
    with make_client(fake, policy=policy("block", output_strikes=False)) as client:
        with pytest.raises(OutputBlocked):
            call(client.for_customer("acme"), "chat")
        (violation,) = client.store.violations()
        assert (violation.source, violation.strike) == ("output", False)
        assert violation.categories == ("violence",)
        assert client.store.count_violations("acme", since=violation.created_at) == 0
        (row,) = client.store.usage_report()
        assert (row.violations, row.strikes) == (1, 0)
        assert len(client.store.usage_records()) == 1


@pytest.mark.parametrize("mode", ["record", "block"])
def test_output_that_is_no_strike_never_suspends(mode: str) -> None:
    """Under output_strikes=False every flagged answer is stored, none counts toward the
    strike limit, so the customer is never suspended; a strike policy suspends the same run."""
    for strikes, suspended in ((False, False), (True, True)):
        fake = FakeOpenAI()
        settings = {"strike_limit": 2, "output_strikes": strikes}
        with make_client(fake, policy=policy(mode, **settings)) as client:
            acme = client.for_customer("acme")
            for reply in (FLAGGED, "They kill again.", "And kill once more."):
                fake.reply = reply
                try:
                    call(acme, "chat")
                except OutputBlocked:
                    pass
                except CustomerSuspended:
                    assert suspended
            stored = client.store.violations(customer_id="acme")
            assert [v.strike for v in stored] == [strikes] * (2 if suspended else 3)
            assert (client.store.suspension("acme", now=_now()) is not None) is suspended


def test_async_output_strikes_false_stores_a_violation_that_is_not_a_strike() -> None:
    async def main() -> None:
        fake = FakeOpenAI()
        policy_ = policy("record", output_strikes=False, strike_limit=1)
        async with make_async_client(fake, policy=policy_) as client:
            acme = client.for_customer("acme")
            for reply in (FLAGGED, "They kill again."):
                fake.reply = reply
                await resource(acme, "chat").create(**arguments("chat"))
            stored = await client.store.violations(customer_id="acme")
            assert [(v.source, v.strike) for v in stored] == [("output", False)] * 2
            assert await client.store.suspension("acme", now=_now()) is None

    asyncio.run(main())


def _now() -> datetime:
    return datetime.now(timezone.utc)


def test_output_strikes_suspend_at_the_strike_limit() -> None:
    fake = FakeOpenAI()
    with make_client(fake, policy=policy("block", strike_limit=2)) as client:
        acme = client.for_customer("acme")
        for reply in (FLAGGED, "They kill again."):
            fake.reply = reply
            with pytest.raises(OutputBlocked):
                call(acme, "chat")
        fake.reply = CLEAN
        with pytest.raises(openai.OpenAIError, match="suspended"):
            call(acme, "chat")


def test_a_policy_answering_nonsense_is_refused_before_anything_is_sent() -> None:
    class Bad(DefaultPolicy):
        def output_moderation_for(self, request: GuardedRequest) -> Any:
            return "yes"

    fake = FakeOpenAI(reply=CLEAN)
    with make_client(fake, policy=Bad()) as client:
        with pytest.raises(ConfigurationError, match="output_moderation_for"):
            call(client.for_customer("acme"), "chat")
        assert fake.model_requests == []


def test_other_endpoints_are_not_output_moderated() -> None:
    fake = FakeOpenAI()
    with make_client(fake, policy=policy("block")) as client:
        client.for_customer("acme").embeddings.create(model="text-embedding-3-small", input="hi")
        assert fake.moderation_inputs == ["hi"]  # the input only: embeddings say no text


@pytest.mark.parametrize("endpoint", ["chat", "responses"])
@pytest.mark.parametrize("mode", MODES)
def test_the_server_side_moderation_parameter_is_sent_as_given(
    endpoint: str, mode: str | None
) -> None:
    fake = FakeOpenAI(reply=CLEAN)
    setting = {"model": "omni-moderation-latest", "policy": {"output": {"mode": "score"}}}
    with make_client(fake, policy=policy(mode)) as client:
        acme = client.for_customer("acme")
        call(acme, endpoint, moderation=setting)
        call(acme, endpoint)
        sent, omitted = fake.model_requests
        assert sent.json is not None and sent.json["moderation"] == setting
        assert omitted.json is not None and "moderation" not in omitted.json  # never added


def read(create: Any, client: Any, stream: bool, delivered: list[str]) -> None:
    result = create(client, "chat", stream=stream)
    if stream:
        drain(result, "chat", delivered)
    else:
        delivered.append(answer_text("chat", result))


class FailingOnOutput:
    """Moderates input with the fake's rules and fails on anything else."""

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake

    def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
        if any(item.value != QUESTION for item in inputs):
            raise RuntimeError("moderation is down")
        return [ModerationResult(False, {}, {}) for _ in inputs]


@pytest.mark.parametrize("stream", [False, True])
def test_an_outage_on_output_withholds_it_when_failing_closed(stream: bool) -> None:
    fake = stream_fake(CLEAN)
    with make_client(fake, policy=policy("block"), moderator=FailingOnOutput(fake)) as client:
        delivered: list[str] = []
        with pytest.raises(ModerationUnavailable):
            read(call, client.for_customer("acme"), stream, delivered)
        assert "".join(delivered) == ""
        assert len(client.store.usage_records()) == 1
        assert client.store.violations() == []


@pytest.mark.parametrize("mode", ["record", "block"])
def test_an_outage_on_output_delivers_it_when_failing_open_or_recording(mode: str) -> None:
    fake = stream_fake(CLEAN)
    fail_open = mode == "block"
    with make_client(
        fake, policy=policy(mode, fail_open=fail_open), moderator=FailingOnOutput(fake)
    ) as client:
        acme = client.for_customer("acme")
        assert answer_text("chat", call(acme, "chat")) == CLEAN
        text = "".join(event_text("chat", e) for e in call(acme, "chat", stream=True))
        assert text == CLEAN


# -- hostile shapes --------------------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n"
        for e in events
    )


def hostile_client(body: bytes, moderated: list[str]) -> SafeClient:
    """A client whose API streams ``body`` and whose moderator flags any text with ``kill``."""

    class Keyword:
        def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
            moderated.extend(item.value for item in inputs)
            return [
                ModerationResult("kill" in i.value, {"violence": "kill" in i.value}, {})
                for i in inputs
            ]

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=body, request=request
        )

    return SafeClient(
        api_key="sk-test",
        base_url="http://hostile.test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        identifier_secret="output-test-identifier-secret",
        store="memory://",
        spool=False,
        moderator=Keyword(),
        policy=policy("block"),
    )


def test_a_final_event_whose_text_the_deltas_never_said_is_withheld() -> None:
    item = {
        "id": "m",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "we kill", "annotations": []}],
    }
    body = sse(
        {
            "type": "response.output_text.delta",
            "output_index": 0,
            "content_index": 0,
            "item_id": "m",
            "delta": "Hello.",
            "sequence_number": 0,
            "logprobs": [],
        },
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": item,
            "sequence_number": 1,
        },
    )
    moderated: list[str] = []
    with hostile_client(body, moderated) as client:
        seen: list[str] = []
        stream = client.for_customer("acme").responses.create(model=MODEL, input="hi", stream=True)
        with pytest.raises(OutputBlocked):
            drain(stream, "responses", seen)
        assert seen == []  # the delta's window and the item were judged in one request
        assert moderated[-2:] == ["Hello.", "we kill"]


# -- cancellation --------------------------------------------------------------------------


async def test_a_stream_cancelled_while_a_window_is_moderated_records_once() -> None:
    started = asyncio.Event()

    class Slow:
        async def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
            if any(item.value != QUESTION for item in inputs):
                started.set()
                await asyncio.sleep(10)
            return [ModerationResult(False, {}, {}) for _ in inputs]

    fake = stream_fake(CLEAN)
    async with make_async_client(fake, policy=policy("block"), moderator=Slow()) as client:
        delivered: list[str] = []

        async def read() -> None:
            stream = await call(client.for_customer("acme"), "chat", stream=True)
            async for chunk in stream:
                delivered.append(chunk.choices[0].delta.content or "")

        task = asyncio.create_task(read())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "".join(delivered) == ""  # the held window never came out
        [record] = await client.store.usage_records()
        assert record.outcome == "estimated"


def test_a_malformed_answer_on_output_withholds_it_even_failing_open() -> None:
    class Malformed:
        def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
            if any(item.value != QUESTION for item in inputs):
                return []  # no result for the answer: not an outage, a broken moderator
            return [ModerationResult(False, {}, {}) for _ in inputs]

    fake = FakeOpenAI(reply=CLEAN)
    with make_client(fake, policy=policy("block", fail_open=True), moderator=Malformed()) as client:
        with pytest.raises(ModerationUnavailable):
            call(client.for_customer("acme"), "chat")
        assert len(client.store.usage_records()) == 1


def test_a_blocked_streams_raw_bytes_are_refused_outside_parse() -> None:
    fake = stream_fake()
    with make_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        messages: Any = [{"role": "user", "content": QUESTION}]
        raw = acme.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=True
        )
        with pytest.raises(UnguardedPathError, match="parse"):
            raw.http_response.read()
        with acme.chat.completions.with_streaming_response.create(
            model=MODEL, messages=messages, stream=True
        ) as response:
            lines = response.iter_lines()
            with pytest.raises(UnguardedPathError):
                next(lines)
        assert "kill" not in "".join(fake.moderation_inputs)  # nothing was ever read
    with make_client(stream_fake(), policy=policy("record")) as client:
        raw = client.for_customer("acme").chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=True
        )
        body = raw.http_response.read().decode()  # "record" withholds nothing
        chunks = [json.loads(line[6:]) for line in body.splitlines() if line[6:].startswith("{")]
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text == FLAGGED


async def test_a_blocked_async_streams_raw_bytes_are_refused_outside_parse() -> None:
    fake = stream_fake()
    async with make_async_client(fake, policy=policy("block")) as client:
        acme = client.for_customer("acme")
        messages: Any = [{"role": "user", "content": QUESTION}]
        raw = await acme.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=True
        )
        with pytest.raises(UnguardedPathError):
            await raw.http_response.aread()
        raw = await acme.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=True
        )
        delivered: list[str] = []
        with pytest.raises(OutputBlocked):
            await adrain(raw.parse(), "chat", delivered)
        assert delivered and "kill" not in "".join(delivered)


def test_a_store_outage_loses_neither_the_usage_nor_the_output_violation(
    tmp_path: Any,
) -> None:
    from safe_openai.stores import Spool
    from safe_openai.stores._memory import MemoryStore

    class Down(MemoryStore):
        down = False

        def record_usage(self, record: Any) -> None:
            if self.down:
                raise ConnectionError("store unreachable")
            super().record_usage(record)

        def record_violation(self, violation: Any) -> None:
            if self.down:
                raise ConnectionError("store unreachable")
            super().record_violation(violation)

    store = Down()
    fake = FakeOpenAI(reply=FLAGGED)
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret="output-moderation-test-secret",
        store=store,
        spool=Spool(tmp_path),
        policy=policy("block"),
    )
    with client:
        acme = client.for_customer("acme")
        store.down = True
        with pytest.raises(OutputBlocked):  # the block stands whatever the store does
            call(acme, "chat")
        assert store.violations() == [] and store.usage_records() == []
        store.down = False
        fake.reply = CLEAN
        call(acme, "chat")  # the next write that succeeds drains the spool
        [violation] = store.violations()
        assert violation.source == "output"
        assert len(store.usage_records()) == 2


async def test_a_call_cancelled_while_its_answer_is_moderated_has_its_usage_recorded() -> None:
    started = asyncio.Event()

    class Slow:
        async def moderate(self, inputs: Sequence[ModerationInput]) -> list[ModerationResult]:
            if any(item.value != QUESTION for item in inputs):
                started.set()
                await asyncio.sleep(10)
            return [ModerationResult(False, {}, {}) for _ in inputs]

    fake = FakeOpenAI(reply=CLEAN)
    async with make_async_client(fake, policy=policy("block"), moderator=Slow()) as client:
        task = asyncio.create_task(call(client.for_customer("acme"), "chat"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [record] = await client.store.usage_records()
        assert record.outcome == "ok"  # recorded before the answer was moderated
        assert await client.store.violations() == []
