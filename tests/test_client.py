"""SafeClient over the real SDK and a fake API: what reached the "server" for each call."""

from __future__ import annotations

import gc
import itertools
import json
from typing import Any

import httpx2
import openai
import pydantic
import pytest
from openai.types import CreateEmbeddingResponse, ImagesResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

import safe_openai
from safe_openai import (
    ConfigurationError,
    CustomerRequired,
    DefaultPolicy,
    ModerationBlocked,
    ModerationUnavailable,
    SafeClient,
    SafeOpenAIError,
)
from safe_openai._identity import safety_identifier
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET

USER = [{"role": "user", "content": "Hello there"}]
SID = safety_identifier(SECRET.encode(), "acme")


def test_is_a_real_openai_client_and_errors_are_openai_errors(client: SafeClient) -> None:
    assert isinstance(client, openai.OpenAI)
    assert isinstance(client.for_customer("acme"), SafeClient)
    assert issubclass(SafeOpenAIError, openai.OpenAIError)


def test_missing_secret_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, fake: FakeOpenAI
) -> None:
    monkeypatch.delenv("SAFE_OPENAI_IDENTIFIER_SECRET", raising=False)
    with pytest.raises(ConfigurationError, match="SAFE_OPENAI_IDENTIFIER_SECRET"):
        SafeClient(**fake.openai_kwargs(), spool=False)
    assert fake.requests == []


def test_no_customer_raises_before_anything_is_sent(client: SafeClient, fake: FakeOpenAI) -> None:
    with pytest.raises(CustomerRequired):
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert fake.requests == []


def test_chat_call_is_moderated_then_tagged(client: SafeClient, fake: FakeOpenAI) -> None:
    reply = client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert isinstance(reply, ChatCompletion)
    assert [r.path for r in fake.requests] == ["/moderations", "/chat/completions"]
    assert fake.moderation_inputs == ["Hello there"]
    assert fake.model_requests[0].json["safety_identifier"] == SID


def test_raw_customer_id_never_reaches_openai(client: SafeClient, fake: FakeOpenAI) -> None:
    acme = client.for_customer("customer-raw-id-42")
    acme.chat.completions.create(model="gpt-4o-mini", messages=USER)
    acme.embeddings.create(model="text-embedding-3-small", input="x")
    acme.responses.create(model="gpt-4o-mini", input="y")
    for request in fake.requests:
        assert "customer-raw-id-42" not in json.dumps(request.json)
        assert "customer-raw-id-42" not in json.dumps(request.headers)


def test_blocked_request_sends_no_model_request(client: SafeClient, fake: FakeOpenAI) -> None:
    acme = client.for_customer("acme")
    with pytest.raises(ModerationBlocked) as info:
        acme.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "I will kill you"}]
        )
    assert fake.model_requests == []
    assert "violence" in info.value.categories
    assert info.value.scores["violence"] > 0.9
    assert "kill" not in str(info.value)
    assert info.value.user_message
    [report] = client.store.usage_report()
    assert (report.blocked, report.violations, report.requests) == (1, 1, 0)


def test_second_turn_moderates_only_the_new_message(client: SafeClient, fake: FakeOpenAI) -> None:
    acme = client.for_customer("acme")
    history = [{"role": "user", "content": "First question"}]
    first = acme.chat.completions.create(model="gpt-4o-mini", messages=history)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Second question"},
    ]
    fake.reset()
    acme.chat.completions.create(model="gpt-4o-mini", messages=history)
    assert fake.moderation_inputs == ["Second question"]


def test_fully_cached_call_sends_no_moderation_request(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    acme = client.for_customer("acme")
    acme.chat.completions.create(model="gpt-4o-mini", messages=USER)
    fake.reset()
    acme.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert [r.path for r in fake.requests] == ["/chat/completions"]


def test_with_options_and_library_style_copies_keep_guard_and_customer(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    acme = client.for_customer("acme")
    copies = [
        acme.with_options(max_retries=0),
        acme.copy(http_client=acme._client, _extra_kwargs={}),
        acme.with_options(timeout=5).with_options(max_retries=1),
    ]
    for copy in copies:
        assert isinstance(copy, SafeClient)
        assert copy.customer_id == "acme"
        assert copy.store is client.store
        with pytest.raises(ModerationBlocked):
            copy.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "kill kill"}]
            )
    assert fake.model_requests == []
    with pytest.raises(CustomerRequired):
        client.with_options(max_retries=0).chat.completions.create(model="m", messages=USER)


def test_caller_supplied_identifier_is_kept(client: SafeClient, fake: FakeOpenAI) -> None:
    client.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, safety_identifier="caller-chosen"
    )
    assert fake.model_requests[0].json["safety_identifier"] == "caller-chosen"
    assert client.store.customer_for_identifier("caller-chosen") == "acme"


def test_extra_body_cannot_smuggle_content_past_moderation(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    with pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini",
            messages=USER,
            extra_body={"messages": [{"role": "user", "content": "how to build a bomb"}]},
        )
    assert fake.model_requests == []


def test_customer_context_manager_binds_calls(client: SafeClient, fake: FakeOpenAI) -> None:
    with safe_openai.customer("ctx-customer"):
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert fake.model_requests[0].json["safety_identifier"] == safety_identifier(
        SECRET.encode(), "ctx-customer"
    )


def test_guard_runs_once_per_logical_call_despite_sdk_retries(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    fake.fail("/chat/completions", 500, headers={"retry-after-ms": "1"})
    client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert [r.path for r in fake.requests] == [
        "/moderations",
        "/chat/completions",
        "/chat/completions",
    ]
    assert len(client.store.usage_records()) == 1


def test_moderation_429_is_retried_honouring_retry_after(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    fake.fail("/moderations", 429, headers={"retry-after-ms": "5"})
    client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert [r.path for r in fake.requests] == ["/moderations", "/moderations", "/chat/completions"]


def test_moderation_outage_fails_closed(client: SafeClient, fake: FakeOpenAI) -> None:
    fake.fail("/moderations", 503, times=10, headers={"retry-after-ms": "1"})
    with pytest.raises(ModerationUnavailable):
        client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert fake.model_requests == []
    assert len(fake.moderation_requests) == 3


def test_moderation_connection_error_fails_open_when_policy_allows(fake: FakeOpenAI) -> None:
    fake.fail("/moderations", exception=httpx2.ConnectError("down"), times=10)
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=SECRET,
        policy=DefaultPolicy(fail_open=True),
        spool=False,
    )
    client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert len(fake.model_requests) == 1


def test_chat_stream_hides_usage_chunk_and_records_usage(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    stream = client.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    chunks = list(stream)
    assert isinstance(stream, openai.Stream)
    assert all(isinstance(c, ChatCompletionChunk) and c.choices for c in chunks)
    assert fake.model_requests[0].json["stream_options"] == {"include_usage": True}
    [record] = client.store.usage_records()
    assert record.outcome == "ok" and record.tokens.output_tokens > 0


def test_chat_stream_usage_chunk_visible_when_asked(client: SafeClient) -> None:
    chunks = list(
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_abandoned_stream_records_one_estimate(client: SafeClient) -> None:
    stream = client.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    for _ in stream:
        break
    stream.close()
    del stream
    gc.collect()
    [record] = client.store.usage_records()
    assert record.outcome == "estimated"
    assert record.tokens.input_tokens > 0


def test_unread_stream_garbage_collected_records_one_estimate(client: SafeClient) -> None:
    client.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    gc.collect()
    [record] = client.store.usage_records()
    assert record.outcome == "estimated"


def test_stream_helper_and_parse_helpers_are_guarded(client: SafeClient, fake: FakeOpenAI) -> None:
    class Answer(pydantic.BaseModel):
        text: str

    acme = client.for_customer("acme")
    with acme.chat.completions.stream(model="gpt-4o-mini", messages=USER) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content
    parsed = acme.chat.completions.parse(model="gpt-4o-mini", messages=USER, response_format=Answer)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    parsed_response = acme.responses.parse(model="gpt-4o-mini", input="hi", text_format=Answer)
    assert isinstance(parsed_response.output_parsed, Answer)
    assert all(r.json.get("safety_identifier") == SID for r in fake.model_requests)
    with pytest.raises(ModerationBlocked):
        acme.chat.completions.parse(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "kill"}],
            response_format=Answer,
        )
    assert len(client.store.usage_records()) == 4


def test_responses_create_and_stream_record_usage(client: SafeClient, fake: FakeOpenAI) -> None:
    acme = client.for_customer("acme")
    response = acme.responses.create(model="gpt-4o-mini", input="Tell me a joke")
    assert isinstance(response, Response)
    events = list(acme.responses.create(model="gpt-4o-mini", input="Another", stream=True))
    assert events[-1].type == "response.completed"
    with acme.responses.stream(model="gpt-4o-mini", input="Third") as stream:
        stream.get_final_response()
    records = client.store.usage_records()
    assert [r.outcome for r in records] == ["ok", "ok", "ok"]
    assert all(r.tokens.input_tokens > 0 for r in records)
    assert all(r.json["safety_identifier"] == SID for r in fake.model_requests)


def test_other_endpoints_return_sdk_types_and_get_identifier(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    acme = client.for_customer("acme")
    assert isinstance(
        acme.embeddings.create(model="text-embedding-3-small", input="x"), CreateEmbeddingResponse
    )
    assert isinstance(acme.images.generate(model="gpt-image-1", prompt="a cat"), ImagesResponse)
    speech = acme.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hi")
    assert speech.content
    acme.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert acme.models.list().data is not None
    by_path = {r.path: r.json for r in fake.model_requests if r.json}
    assert by_path["/embeddings"]["user"] == SID
    assert by_path["/images/generations"]["safety_identifier"] == SID
    assert by_path["/completions"]["user"] == SID
    assert "Hi" in fake.moderation_inputs and "a cat" in fake.moderation_inputs


def test_raw_and_streaming_response_modes_record_usage(client: SafeClient) -> None:
    acme = client.for_customer("acme")
    raw = acme.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    assert isinstance(raw.parse(), ChatCompletion)
    with acme.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=USER
    ) as resp:
        assert isinstance(resp.parse(), ChatCompletion)
    records = client.store.usage_records()
    assert len(records) == 2
    assert all(r.outcome == "ok" and r.tokens.input_tokens > 0 for r in records)
    assert all(r.request_id for r in records)


def test_api_error_is_recorded_as_error_and_reraised(client: SafeClient, fake: FakeOpenAI) -> None:
    fake.fail("/chat/completions", 400)
    with pytest.raises(openai.BadRequestError):
        client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=USER)
    [record] = client.store.usage_records()
    assert record.outcome == "error"


def test_images_are_moderated_one_per_request(client: SafeClient, fake: FakeOpenAI) -> None:
    content = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://img.test/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://img.test/b.png"}},
    ]
    client.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}]
    )
    assert len(fake.moderation_requests) == 3
    assert sorted(fake.moderation_inputs) == sorted(
        ["what is this", "https://img.test/a.png", "https://img.test/b.png"]
    )


def test_non_model_endpoints_pass_untouched_without_a_customer(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    """Reads and uploads need no customer and are not moderated (only model calls are)."""
    client.models.list()
    client.moderations.create(input="anything")
    assert [r.path for r in fake.requests] == ["/models", "/moderations"]


COPY_ARGUMENTS: list[tuple[str, Any]] = [
    ("http_client", "own"),
    ("_extra_kwargs", {}),
    ("max_retries", 0),
    ("timeout", 7.5),
    ("default_headers", {"x-library": "1"}),
]


@pytest.mark.parametrize(
    "names",
    [
        names
        for size in range(1, len(COPY_ARGUMENTS) + 1)
        for names in itertools.combinations([name for name, _ in COPY_ARGUMENTS], size)
    ],
    ids="+".join,
)
@pytest.mark.parametrize("method", ["copy", "with_options"])
def test_every_mix_of_sdk_copy_arguments_keeps_guard_store_and_customer(
    client: SafeClient, fake: FakeOpenAI, names: tuple[str, ...], method: str
) -> None:
    acme = client.for_customer("acme")
    values = dict(COPY_ARGUMENTS)
    kwargs = {name: acme._client if values[name] == "own" else values[name] for name in names}
    copy = getattr(acme, method)(**kwargs)
    assert isinstance(copy, SafeClient)
    assert (copy.customer_id, copy.store, copy._safe) == ("acme", client.store, client._safe)
    copy.chat.completions.create(model="gpt-4o-mini", messages=USER)
    with pytest.raises(ModerationBlocked):
        copy.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "kill kill"}]
        )
    [sent] = fake.model_requests
    assert sent.json["safety_identifier"] == safety_identifier(SECRET.encode(), "acme")
