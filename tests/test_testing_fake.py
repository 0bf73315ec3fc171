"""The FakeOpenAI transport answers every endpoint in shapes the real SDK parses into its types."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import pydantic
import pytest
from openai.types import (
    Completion,
    CreateEmbeddingResponse,
    ImagesResponse,
    Model,
    ModerationCreateResponse,
    ModerationImageURLInputParam,
    ModerationMultiModalInputParam,
    ModerationTextInputParam,
)
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionContentPartParam,
    ChatCompletionMessageParam,
)
from openai.types.responses import Response, ResponseCompletedEvent

from safe_openai import testing
from safe_openai.testing import (
    MODERATION_CATEGORIES,
    PNG_BYTES,
    FakeOpenAI,
    RecordedRequest,
)

MODEL = "gpt-4o-mini"
MOD_MODEL = "omni-moderation-latest"

pytest_plugins = ["pytester"]


class Person(pydantic.BaseModel):
    name: str
    age: int
    tags: list[str]


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(**fake.openai_kwargs()) as c:
        yield c


@pytest.fixture
async def aclient(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(**fake.async_openai_kwargs()) as c:
        yield c


def text_part(text: str) -> ModerationTextInputParam:
    return {"type": "text", "text": text}


def image_part(url: str) -> ModerationImageURLInputParam:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


# -- chat completions -------------------------------------------------------------------------


def test_chat_create_parses_into_chat_completion_with_usage_details(client: openai.OpenAI) -> None:
    """A chat completion echoes the last user text and reports token details."""
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *user("hello there")],
    )
    assert isinstance(result, ChatCompletion)
    assert result.choices[0].message.content == "Echo: hello there"
    assert result.choices[0].finish_reason == "stop"
    assert result.model == MODEL
    usage = result.usage
    assert usage is not None
    assert usage.prompt_tokens == 5  # "Be brief." + "hello there" = 20 chars
    assert usage.completion_tokens == 5  # len("Echo: hello there") = 17 chars -> 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0
    assert result._request_id == "req_0001"


def test_chat_usage_reports_configured_cached_and_reasoning_tokens() -> None:
    """Cached tokens are capped at the prompt; reasoning tokens add to the output."""
    fake = FakeOpenAI(reply="Sure.", cached_tokens=1000, reasoning_tokens=7)
    client = openai.OpenAI(**fake.openai_kwargs())
    usage = client.chat.completions.create(model=MODEL, messages=user("x" * 40)).usage
    assert usage is not None
    assert usage.prompt_tokens == 10
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 10
    assert usage.completion_tokens == 2 + 7
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 7


def test_chat_reply_text_parts_and_length_limit(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """Text parts count as user text; a small max_completion_tokens cuts with 'length'."""
    parts: list[ChatCompletionContentPartParam] = [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_completion_tokens=1
    )
    assert result.choices[0].message.content == "Echo"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 1
    fake.reply = "fixed"
    again = client.chat.completions.create(model=MODEL, messages=user("hi"), n=2)
    assert [c.message.content for c in again.choices] == ["fixed", "fixed"]


async def test_chat_create_async(aclient: openai.AsyncOpenAI) -> None:
    """The async client gets the same completion."""
    result = await aclient.chat.completions.create(model=MODEL, messages=user("hi async"))
    assert isinstance(result, ChatCompletion)
    assert result.choices[0].message.content == "Echo: hi async"


def test_chat_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    """Without include_usage every chunk has a choice and no usage."""
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=user("stream me please"), stream=True)
    )
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(deltas) > 1
    assert "".join(d or "" for d in deltas) == "Echo: stream me please"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_with_include_usage_ends_with_usage_only_chunk(
    client: openai.OpenAI,
) -> None:
    """With include_usage a final chunk carries usage and no choices; earlier ones usage null."""
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=user("count me"),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4  # "Echo: count me" = 14 chars
    assert all(c.usage is None and c.choices for c in content)


def test_chat_stream_raw_sse_marks_usage_null_only_when_asked(fake: FakeOpenAI) -> None:
    """On the wire, chunks carry "usage": null only when include_usage was asked for."""
    with httpx2.Client(transport=fake, base_url="http://fake/v1") as http:
        plain = http.post(
            "/chat/completions", json={"model": MODEL, "messages": user("a"), "stream": True}
        ).text
        asked = http.post(
            "/chat/completions",
            json={
                "model": MODEL,
                "messages": user("a"),
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ).text
    assert '"usage"' not in plain
    assert plain.endswith("data: [DONE]\n\n")
    events = [line[len("data: ") :] for line in asked.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert all("usage" in b for b in bodies)
    assert [b["usage"] is None for b in bodies] == [True] * (len(bodies) - 1) + [False]


async def test_chat_stream_async_with_usage(aclient: openai.AsyncOpenAI) -> None:
    """The async stream also ends with the usage chunk."""
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=user("hey"), stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None


def test_chat_parse_builds_schema_instance_or_uses_reply(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    """parse() gets a minimal instance of the schema, or exactly the configured reply."""
    parsed = client.chat.completions.parse(
        model=MODEL, messages=user("who?"), response_format=Person
    )
    assert parsed.choices[0].message.parsed == Person(name="text", age=0, tags=[])
    sent = fake.requests[-1].json
    assert sent is not None
    assert sent["response_format"]["type"] == "json_schema"

    fake.reply = '{"name": "Ada", "age": 36, "tags": ["math"]}'
    parsed = client.chat.completions.parse(
        model=MODEL, messages=user("who?"), response_format=Person
    )
    assert parsed.choices[0].message.parsed == Person(name="Ada", age=36, tags=["math"])


def test_chat_parse_length_cut_raises_sdk_error(client: openai.OpenAI) -> None:
    """A reply cut by max_tokens makes parse() raise the SDK's LengthFinishReasonError."""
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model=MODEL, messages=user("x"), response_format=Person, max_tokens=1
        )


def test_chat_json_object_reply_is_json(client: openai.OpenAI) -> None:
    """response_format json_object gets a JSON object echo."""
    result = client.chat.completions.create(
        model=MODEL, messages=user("hi"), response_format={"type": "json_object"}
    )
    assert json.loads(result.choices[0].message.content or "") == {"echo": "hi"}


def test_chat_stream_helper_accumulates_and_parses(client: openai.OpenAI) -> None:
    """The chat.completions.stream helper emits content events and a parsed final completion."""
    with client.chat.completions.stream(
        model=MODEL, messages=user("hello stream"), response_format=Person
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert kinds.count("content.delta") > 1
    assert "content.done" in kinds
    assert final.choices[0].message.parsed == Person(name="text", age=0, tags=[])


# -- responses ----------------------------------------------------------------------------------


def test_responses_create_parses_into_response(client: openai.OpenAI) -> None:
    """A Response carries the echo, usage details and echoes safety_identifier."""
    result = client.responses.create(
        model=MODEL,
        instructions="Be kind.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hi there"}]}],
        safety_identifier="sid-1",
    )
    assert isinstance(result, Response)
    assert result.status == "completed"
    assert result.output_text == "Echo: hi there"
    assert result.safety_identifier == "sid-1"
    assert result.usage is not None
    assert result.usage.input_tokens == 4  # "Be kind." + "hi there" = 16 chars
    assert result.usage.input_tokens_details.cached_tokens == 0
    assert result.usage.output_tokens_details.reasoning_tokens == 0
    message = result.output[0]
    assert message.type == "message"
    assert message.content[0].type == "output_text"
    assert message.content[0].annotations == []


def test_responses_max_output_tokens_gives_incomplete(client: openai.OpenAI) -> None:
    """A reply over max_output_tokens is cut and the response is incomplete."""
    result = client.responses.create(model=MODEL, input="a long question", max_output_tokens=2)
    assert result.status == "incomplete"
    assert result.incomplete_details is not None
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.output_text == "Echo: a "  # two tokens: eight characters


def test_responses_stream_sends_the_real_event_sequence(client: openai.OpenAI) -> None:
    """stream=True yields the lifecycle events in order, numbered, ending with usage."""
    events = list(client.responses.create(model=MODEL, input="tell me more", stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.usage is not None
    assert completed.response.output_text == "Echo: tell me more"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Echo: tell me more"


async def test_responses_stream_async(aclient: openai.AsyncOpenAI) -> None:
    """The async Responses stream ends with response.completed carrying usage."""
    stream = await aclient.responses.create(model=MODEL, input="hi", stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"


def test_responses_stream_helper_and_parse(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """responses.stream and responses.parse both produce parsed output."""
    fake.reply = '{"name": "Bo", "age": 3, "tags": []}'
    with client.responses.stream(model=MODEL, input="who?", text_format=Person) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed"
    assert final.output_parsed == Person(name="Bo", age=3, tags=[])
    parsed = client.responses.parse(model=MODEL, input="who?", text_format=Person)
    assert parsed.output_parsed == Person(name="Bo", age=3, tags=[])
    assert parsed.usage is not None


# -- other endpoints ----------------------------------------------------------------------------


def test_embeddings_default_base64_and_float_agree(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """The SDK asks for base64 by default; decoded vectors equal the float format."""
    default = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert fake.requests[-1].json is not None
    assert fake.requests[-1].json["encoding_format"] == "base64"
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
    )
    assert isinstance(default, CreateEmbeddingResponse)
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert len(default.data[0].embedding) == 8
    assert default.data[0].embedding != default.data[1].embedding
    assert default.usage.prompt_tokens == 2
    sized = client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=3)
    assert len(sized.data[0].embedding) == 3


def test_images_generate_returns_png_and_usage(client: openai.OpenAI) -> None:
    """Image generation returns b64 PNG bytes with usage."""
    result = client.images.generate(model="gpt-image-1", prompt="a cat", n=2)
    assert isinstance(result, ImagesResponse)
    assert result.data is not None
    assert len(result.data) == 2
    assert base64.b64decode(result.data[0].b64_json or "") == PNG_BYTES
    assert PNG_BYTES.startswith(b"\x89PNG")
    assert result.usage is not None
    assert result.usage.input_tokens == 2


def test_audio_speech_returns_bytes(client: openai.OpenAI) -> None:
    """Speech returns audio bytes; wav is a real RIFF file."""
    mp3 = client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
    assert mp3.response.headers["content-type"] == "audio/mpeg"
    assert mp3.content.startswith(b"ID3")
    wav = client.audio.speech.create(
        model="tts-1", voice="alloy", input="hello", response_format="wav"
    )
    assert wav.content.startswith(b"RIFF")


def test_legacy_completions(client: openai.OpenAI) -> None:
    """Legacy completions return one choice per prompt, and stream with usage when asked."""
    result = client.completions.create(model="gpt-3.5-turbo-instruct", prompt=["one", "two"])
    assert isinstance(result, Completion)
    assert [c.text for c in result.choices] == ["Echo: one", "Echo: two"]
    assert result.usage is not None
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="three",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: three"
    assert chunks[-1].usage is not None


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    """The model list parses into Model objects; an unknown model is a 404."""
    models = list(client.models.list())
    assert all(isinstance(m, Model) for m in models)
    assert MODEL in {m.id for m in models}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.code == "model_not_found"


def test_unknown_path_is_a_404_json_error(fake: FakeOpenAI) -> None:
    """An unknown path answers like the API: 404 with an invalid_request_error body."""
    with httpx2.Client(transport=fake) as http:
        response = http.post("http://fake/v1/nope", json={})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "req_0001"
    error = response.json()["error"]
    assert error["message"] == "Invalid URL (POST /v1/nope)"
    assert error["type"] == "invalid_request_error"


def test_bad_requests_are_400(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    """A body that is not JSON, or lacks a required field, is a 400."""
    with httpx2.Client(transport=fake) as http:
        response = http.post(
            "http://fake/v1/chat/completions",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.param == "messages"


# -- moderations -------------------------------------------------------------------------------


def test_moderation_string_clean_result_has_all_categories(client: openai.OpenAI) -> None:
    """A clean string gets one unflagged result with all 13 categories, applied to text."""
    result = client.moderations.create(model=MOD_MODEL, input="hello")
    assert isinstance(result, ModerationCreateResponse)
    assert result.model == MOD_MODEL
    (moderation,) = result.results
    assert moderation.flagged is False
    scores = moderation.category_scores.to_dict()
    assert set(scores) == set(MODERATION_CATEGORIES)
    assert len(MODERATION_CATEGORIES) == 13
    assert set(scores.values()) == {0.001}
    applied = moderation.category_applied_input_types.to_dict()
    assert all(v == ["text"] for v in applied.values())
    assert moderation.categories.harassment_threatening is False


def test_moderation_list_of_strings_one_result_each(client: openai.OpenAI) -> None:
    """A list of strings gets one result per string; flag words match case-insensitively."""
    result = client.moderations.create(
        model=MOD_MODEL, input=["fine", "I will KILL", "a BOMB", "I hate you"]
    )
    flagged = [r.flagged for r in result.results]
    assert flagged == [False, True, True, True]
    assert result.results[1].categories.violence is True
    assert result.results[1].category_scores.violence == 0.97
    assert result.results[2].categories.illicit_violent is True
    assert result.results[2].category_scores.to_dict()["illicit/violent"] == 0.97
    assert result.results[3].categories.harassment is True


def test_moderation_text_objects_are_one_combined_input(client: openai.OpenAI) -> None:
    """Typed text objects form one multi-modal input: one result, the max over parts."""
    result = client.moderations.create(
        model=MOD_MODEL,
        input=[text_part("fine"), text_part("kill")],
    )
    (moderation,) = result.results
    assert moderation.flagged is True
    assert moderation.categories.violence is True


def test_moderation_one_image_and_mixed(client: openai.OpenAI) -> None:
    """An image alone applies image categories; with text both input types are listed."""
    image = image_part("https://example.com/a.png")
    alone = client.moderations.create(model=MOD_MODEL, input=[image]).results[0]
    applied = alone.category_applied_input_types.to_dict()
    assert applied["violence"] == ["image"]
    assert applied["harassment"] == []
    both: list[ModerationMultiModalInputParam] = [text_part("hi"), image]
    mixed = client.moderations.create(model=MOD_MODEL, input=both).results[0]
    applied = mixed.category_applied_input_types.to_dict()
    assert applied["violence"] == ["text", "image"]
    assert applied["hate"] == ["text"]


def test_moderation_two_images_is_a_400(client: openai.OpenAI) -> None:
    """More than one image per request is rejected as the real endpoint does."""
    images = [image_part(f"https://example.com/{n}.png") for n in (1, 2)]
    with pytest.raises(openai.BadRequestError) as info:
        client.moderations.create(model=MOD_MODEL, input=images)
    assert info.value.code == "too_many_images"
    assert info.value.param == "input"
    assert "Number of images (2) exceeds maximum of 1" in info.value.message


def test_moderation_pinned_scores_and_custom_flag_words() -> None:
    """Exact texts and image URLs can pin scores; flag_words replace the defaults."""
    url = "data:image/png;base64,AAAA"
    fake = FakeOpenAI(
        flag_words={"spam": "harassment"},
        scores={"borderline": {"violence": 0.4}, url: {"sexual": 0.8}},
    )
    client = openai.OpenAI(**fake.openai_kwargs())
    results = client.moderations.create(
        model=MOD_MODEL, input=["borderline", "kill", "SPAM!"]
    ).results
    assert results[0].flagged is False
    assert results[0].category_scores.violence == 0.4
    assert results[1].flagged is False
    assert results[2].categories.harassment is True
    image = client.moderations.create(model=MOD_MODEL, input=[image_part(url)]).results[0]
    assert image.categories.sexual is True


def test_unknown_category_is_rejected() -> None:
    """A flag word or pinned score for a category the endpoint lacks is a ValueError."""
    with pytest.raises(ValueError, match="violent"):
        FakeOpenAI(flag_words={"x": "violent"})
    with pytest.raises(ValueError, match="gore"):
        FakeOpenAI(scores={"x": {"gore": 1.0}})


async def test_moderation_async(aclient: openai.AsyncOpenAI) -> None:
    """The async client parses moderation results too."""
    result = await aclient.moderations.create(model=MOD_MODEL, input=["kill", "ok"])
    assert [r.flagged for r in result.results] == [True, False]


# -- failure injection ----------------------------------------------------------------------------


def test_429_with_retry_after_then_success(
    client: openai.OpenAI, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK honours retry-after and retries past an injected 429: it waits the 0.01 s asked
    (its own backoff would be at least 0.375 s). The wait is read, not timed, so a loaded
    machine cannot fail it."""
    fake.fail("/moderations", 429, headers={"retry-after": "0.01"})
    waits: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)  # the module the SDK's retry loop sleeps with
    result = client.moderations.create(model=MOD_MODEL, input="hi")
    assert waits == [pytest.approx(0.01)]
    assert result.results[0].flagged is False
    assert len(fake.moderation_requests) == 2
    assert fake.requests[0].headers["x-stainless-retry-count"] == "0"
    assert fake.requests[1].headers["x-stainless-retry-count"] == "1"


def test_429_surfaces_as_rate_limit_error_without_retries(fake: FakeOpenAI) -> None:
    """With retries off, an injected 429 is the SDK's RateLimitError with its headers."""
    client = openai.OpenAI(**fake.openai_kwargs(), max_retries=0)
    fake.fail("moderations", 429, headers={"retry-after": "7"})
    with pytest.raises(openai.RateLimitError) as info:
        client.moderations.create(model=MOD_MODEL, input="hi")
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.request_id == "req_0001"


def test_503_exhausts_sdk_retries(fake: FakeOpenAI) -> None:
    """Failures count per request: three 503s beat two SDK retries, the fourth call works."""
    client = openai.OpenAI(**fake.openai_kwargs(), max_retries=2)
    fake.fail("/v1/chat/completions", 503, times=3, headers={"retry-after-ms": "1"})
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert info.value.status_code == 503
    assert len(fake.requests) == 3
    assert client.chat.completions.create(model=MODEL, messages=user("hi")).choices


def test_failure_custom_body_and_other_paths_unaffected(fake: FakeOpenAI) -> None:
    """A custom body is served as given, and only the named path fails."""
    client = openai.OpenAI(**fake.openai_kwargs(), max_retries=0)
    fake.fail("/chat/completions", 400, body={"error": {"message": "nope", "code": "custom"}})
    assert client.moderations.create(model=MOD_MODEL, input="x").results
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert info.value.code == "custom"
    assert client.chat.completions.create(model=MODEL, messages=user("hi")).choices


def test_connect_error_injection(fake: FakeOpenAI) -> None:
    """An injected exception surfaces as the SDK's APIConnectionError; the request is recorded."""
    client = openai.OpenAI(**fake.openai_kwargs(), max_retries=0)
    fake.fail("/moderations", exception=httpx2.ConnectError("down"))
    with pytest.raises(openai.APIConnectionError):
        client.moderations.create(model=MOD_MODEL, input="x")
    assert len(fake.moderation_requests) == 1


async def test_async_connect_error_then_success(fake: FakeOpenAI) -> None:
    """The async path raises injected exceptions too, and only for the next request."""
    fake.fail("/responses", exception=httpx2.ConnectError("down"))
    async with openai.AsyncOpenAI(**fake.async_openai_kwargs(), max_retries=0) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.responses.create(model=MODEL, input="hi")
        result = await client.responses.create(model=MODEL, input="hi")
    assert result.output_text == "Echo: hi"
    assert len(fake.requests) == 2


# -- recording ---------------------------------------------------------------------------------


def test_requests_are_recorded_without_authorization(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    """Requests record method, relative path, JSON body and headers minus authorization."""
    client.moderations.create(model=MOD_MODEL, input=["a", "b"])
    parts: list[ModerationMultiModalInputParam] = [
        text_part("c"),
        image_part("https://example.com/i.png"),
    ]
    client.moderations.create(model=MOD_MODEL, input=parts)
    client.chat.completions.create(model=MODEL, messages=user("hi"), safety_identifier="sid")
    list(client.models.list())

    first = fake.requests[0]
    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path) == ("POST", "/moderations")
    assert first.json == {"model": MOD_MODEL, "input": ["a", "b"]}
    assert "authorization" not in first.headers
    assert "sk-test" not in repr(fake.requests)
    assert first.headers["content-type"] == "application/json"
    assert [r.path for r in fake.model_requests] == ["/chat/completions", "/models"]
    assert fake.model_requests[0].json is not None
    assert fake.model_requests[0].json["safety_identifier"] == "sid"
    assert fake.model_requests[1].json is None
    assert len(fake.moderation_requests) == 2
    assert fake.moderation_inputs == ["a", "b", "c", "https://example.com/i.png"]
    with pytest.raises(AttributeError):
        first.path = "/x"  # type: ignore[misc]

    fake.reset()
    assert fake.requests == []
    result = client.with_raw_response.moderations.create(model=MOD_MODEL, input="x")
    assert result.headers["x-request-id"] == "req_0001"


def test_recording_is_thread_safe(fake: FakeOpenAI) -> None:
    """Concurrent requests from threads get distinct ids and all are recorded."""
    client = openai.OpenAI(**fake.openai_kwargs())
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            raw = client.moderations.with_raw_response.create(model=MOD_MODEL, input="x")
            with lock:
                ids.append(raw.headers["x-request-id"])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake.requests) == 80
    assert sorted(ids) == [f"req_{n:04d}" for n in range(1, 81)]


async def test_delay_applies_per_response(fake: FakeOpenAI) -> None:
    """delay holds each response back, sync and async."""
    fake.delay = 0.05
    client = openai.OpenAI(**fake.openai_kwargs())
    start = time.perf_counter()
    client.moderations.create(model=MOD_MODEL, input="x")
    assert time.perf_counter() - start >= 0.05
    async with openai.AsyncOpenAI(**fake.async_openai_kwargs()) as aclient:
        start = time.perf_counter()
        await aclient.moderations.create(model=MOD_MODEL, input="x")
    assert time.perf_counter() - start >= 0.05


def test_kwargs_helpers_point_at_the_fake(fake: FakeOpenAI) -> None:
    """openai_kwargs / async_openai_kwargs build clients on this transport."""
    sync = fake.openai_kwargs()
    assert sync["base_url"] == "http://fake.openai.test/v1"
    assert isinstance(sync["http_client"], httpx2.Client)
    assert isinstance(fake.async_openai_kwargs()["http_client"], httpx2.AsyncClient)
    assert isinstance(fake, httpx2.BaseTransport)
    assert isinstance(fake, httpx2.AsyncBaseTransport)


def test_pytest_plugin_provides_fake_openai_fixture(pytester: pytest.Pytester) -> None:
    """An application registering the plugin gets a fresh fake_openai per test."""
    pytester.makeconftest('pytest_plugins = ["safe_openai.testing"]')
    pytester.makepyfile(
        """
        import openai
        from safe_openai.testing import FakeOpenAI

        def test_one(fake_openai):
            assert isinstance(fake_openai, FakeOpenAI)
            client = openai.OpenAI(**fake_openai.openai_kwargs())
            assert client.moderations.create(input="kill").results[0].flagged

        def test_two(fake_openai):
            assert fake_openai.requests == []
        """
    )
    pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:hypothesispytest"
    ).assert_outcomes(passed=2)


def test_import_without_pytest() -> None:
    """The package imports, and its fake works, where pytest cannot be imported; only the
    fixture is missing. A fresh interpreter, so no module already imported here hides it."""
    script = (
        "import sys\n"
        "sys.modules['pytest'] = None\n"
        "import safe_openai.testing as t\n"
        "assert t.FakeOpenAI().requests == []\n"
        "assert not hasattr(t, 'fake_openai')\n"
        "assert 'safe_openai.testing._plugin' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_the_testing_package_has_one_module_per_api_family() -> None:
    """safe_openai.testing is a package: the fake's API families, the loopback server and the
    pytest plugin each have their own module, and the public names come from the package."""
    import safe_openai.testing._plugin as plugin

    modules = {
        name.rsplit(".", 1)[-1] for name in sys.modules if name.startswith("safe_openai.testing.")
    }
    assert {
        "_moderation",
        "_chat",
        "_responses",
        "_files",
        "_websocket",
        "_server",
        "_plugin",
    } <= modules
    assert testing.fake_openai is plugin.fake_openai  # type: ignore[attr-defined]
    for name in testing.__all__:
        assert getattr(testing, name) is not None


# -- tool calls --------------------------------------------------------------------------------

WEATHER_TOOL_CHAT: Any = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
}
WEATHER_TOOL_RESPONSES: Any = {
    "type": "function",
    "name": "weather",
    "parameters": {"type": "object", "properties": {}},
}


def test_chat_answers_with_a_tool_call_until_the_tool_output_comes_back() -> None:
    fake = FakeOpenAI(tool_arguments={"city": "Paris"})
    client = openai.OpenAI(**fake.openai_kwargs())
    asked: list[Any] = [{"role": "user", "content": "Weather?"}]
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=asked, tools=[WEATHER_TOOL_CHAT]
    )
    [call] = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "weather",
        {"city": "Paris"},
    )  # type: ignore[union-attr]

    answered = [
        *asked,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
    ]
    second = client.chat.completions.create(
        model="gpt-4o-mini", messages=answered, tools=[WEATHER_TOOL_CHAT]
    )
    assert second.choices[0].message.content == "Echo: Weather?"
    none = client.chat.completions.create(
        model="gpt-4o-mini", messages=asked, tools=[WEATHER_TOOL_CHAT], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None


def test_a_streamed_chat_tool_call_accumulates_like_the_real_one() -> None:
    fake = FakeOpenAI(tool_arguments={"city": "Paris"})
    client = openai.OpenAI(**fake.openai_kwargs())
    with client.chat.completions.stream(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER_TOOL_CHAT],
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_responses_answer_with_a_function_call_until_its_output_comes_back(stream: bool) -> None:
    fake = FakeOpenAI(tool_arguments={"city": "Paris"})
    client = openai.OpenAI(**fake.openai_kwargs())
    if stream:
        with client.responses.stream(
            model="gpt-4o-mini", input="Weather?", tools=[WEATHER_TOOL_RESPONSES]
        ) as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(
            model="gpt-4o-mini", input="Weather?", tools=[WEATHER_TOOL_RESPONSES]
        )
    [call] = first.output
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("weather", {"city": "Paris"})
    assert first.usage is not None and first.usage.output_tokens > 0

    second = client.responses.create(
        model="gpt-4o-mini",
        input=[
            {"role": "user", "content": "Weather?"},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"},
        ],
        tools=[WEATHER_TOOL_RESPONSES],
    )
    assert second.output_text == "Echo: Weather?"


def test_without_tools_the_fake_answers_text_even_with_tool_arguments() -> None:
    fake = FakeOpenAI(tool_arguments={"city": "Paris"})
    client = openai.OpenAI(**fake.openai_kwargs())
    reply = client.responses.create(model="gpt-4o-mini", input="Hi")
    assert reply.output_text == "Echo: Hi"
