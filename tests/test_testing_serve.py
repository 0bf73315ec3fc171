"""FakeOpenAI.serve(): the fake over real HTTP on loopback, for code that builds its own client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from safe_openai import ModerationBlocked, SafeClient
from safe_openai.testing import FakeOpenAI

MODEL = "gpt-4o-mini"
HELLO: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Hello there, fake!"}
]


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def url(fake: FakeOpenAI) -> Iterator[str]:
    with fake.serve() as base_url:
        yield base_url


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
        yield c


def test_the_base_url_is_loopback_with_the_api_prefix(url: str) -> None:
    assert url.startswith("http://127.0.0.1:")
    assert url.endswith("/v1")
    assert int(url.removeprefix("http://127.0.0.1:").removesuffix("/v1")) > 0


def test_chat_create_over_http_answers_and_records_like_the_transport(
    fake: FakeOpenAI, client: openai.OpenAI
) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=HELLO)

    assert completion.choices[0].message.content == "Echo: Hello there, fake!"
    assert completion._request_id == "req_0001"
    [request] = fake.requests
    assert (request.method, request.path) == ("POST", "/chat/completions")
    assert request.json is not None
    assert request.json["messages"] == HELLO
    assert "authorization" not in request.headers


def test_chat_stream_over_http_delivers_every_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: Hello there, fake!"
    assert len(chunks) > 3
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0


def test_each_sse_event_goes_out_as_its_own_http_chunk(url: str) -> None:
    """Chunked transfer, one event per chunk: a client sees events as they are written."""
    with (
        httpx2.Client() as http,
        http.stream(
            "POST",
            f"{url}/chat/completions",
            json={"model": MODEL, "messages": HELLO, "stream": True},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"
        pieces = list(response.iter_raw())

    assert len(pieces) > 3
    assert all(piece.count(b"\n\n") <= 1 for piece in pieces)
    assert pieces[0].startswith(b"data: ")
    assert b"".join(pieces).endswith(b"data: [DONE]\n\n")


def test_responses_stream_over_http_reaches_the_completed_event(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Say hi") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()

    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert final.output_text == "Echo: Say hi"
    assert final.usage is not None
    assert final.usage.output_tokens > 0


async def test_async_client_over_http_creates_and_streams(fake: FakeOpenAI, url: str) -> None:
    async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as client:
        completion = await client.chat.completions.create(model=MODEL, messages=HELLO)
        stream = await client.responses.create(model=MODEL, input="Async hi", stream=True)
        kinds = [event.type async for event in stream]

    assert completion.choices[0].message.content == "Echo: Hello there, fake!"
    assert kinds[-1] == "response.completed"
    assert [r.path for r in fake.requests] == ["/chat/completions", "/responses"]


def test_injected_status_is_answered_over_http_and_the_sdk_retries(
    fake: FakeOpenAI, url: str
) -> None:
    fake.fail("/chat/completions", 503, headers={"retry-after-ms": "1"})
    with openai.OpenAI(base_url=url, api_key="k", max_retries=1) as client:
        completion = client.chat.completions.create(model=MODEL, messages=HELLO)

    assert completion.choices[0].message.content == "Echo: Hello there, fake!"
    assert len(fake.requests) == 2


def test_injected_exception_drops_the_connection(fake: FakeOpenAI, client: openai.OpenAI) -> None:
    fake.fail("/chat/completions", exception=httpx2.ConnectError("down"))

    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=HELLO)
    # the next call gets a fresh connection and an answer
    assert client.chat.completions.create(model=MODEL, messages=HELLO).choices


def test_a_safe_client_built_from_the_environment_is_guarded_over_http(
    fake: FakeOpenAI, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("SAFE_OPENAI_IDENTIFIER_SECRET", "serve-test-secret")
    with SafeClient(spool=False, max_retries=0) as client:
        acme = client.for_customer("acme")
        acme.chat.completions.create(model=MODEL, messages=HELLO)
        with pytest.raises(ModerationBlocked):
            acme.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "I will kill you"}]
            )

    assert [r.path for r in fake.requests] == ["/moderations", "/chat/completions", "/moderations"]
    assert fake.moderation_inputs == ["Hello there, fake!", "I will kill you"]
    [model_request] = fake.model_requests
    assert model_request.json is not None
    assert len(model_request.json["safety_identifier"]) == 43


def _server_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("safe_openai-fake-server"))


def test_the_server_stops_and_closes_kept_alive_connections_on_exit(fake: FakeOpenAI) -> None:
    before = threading.active_count()
    with fake.serve() as url:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=HELLO)  # leaves a kept-alive socket
        assert _server_threads() == 1

    assert _server_threads() == 0
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=HELLO)
    client.close()


def test_two_servers_of_one_fake_share_its_records(fake: FakeOpenAI) -> None:
    with fake.serve() as first, fake.serve() as second:
        assert first != second
        for url in (first, second):
            with openai.OpenAI(base_url=url, api_key="k") as client:
                client.models.list()

    assert [r.path for r in fake.requests] == ["/models", "/models"]
