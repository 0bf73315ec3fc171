"""``with_streaming_response`` on guarded JSON endpoints streams as in the SDK: nothing is read
before the caller reads, and the usage is recorded when the read ends or the response closes.
"""

from __future__ import annotations

import gc
import gzip
from collections.abc import AsyncIterator, Iterator

import httpx2
import openai
import pytest

from safe_openai import AsyncSafeClient, SafeClient
from safe_openai._bodies import MAX_KEPT_BYTES
from safe_openai.testing import FakeOpenAI

from .conftest import DEFAULTS

USER = [{"role": "user", "content": "Hello there"}]


class _Pieces(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A body that arrives in small pieces, counting how many were pulled."""

    def __init__(self, body: bytes, size: int) -> None:
        self.pieces = [body[i : i + size] for i in range(0, len(body), size)]
        self.pulled = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.pieces:
            self.pulled += 1
            yield piece

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.pulled += 1
            yield piece

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


class Chunked(httpx2.BaseTransport, httpx2.AsyncBaseTransport):
    """The fake API, with model replies sent in pieces (optionally gzipped or corrupted)."""

    def __init__(self, fake: FakeOpenAI, *, size: int = 16, encoding: str = "") -> None:
        self.fake = fake
        self.size = size
        self.encoding = encoding
        self.bodies: list[_Pieces] = []

    def _piecewise(self, request: httpx2.Request, response: httpx2.Response) -> httpx2.Response:
        if request.url.path.endswith("/moderations"):
            return response
        body = response.content
        headers = {"content-type": response.headers["content-type"]}
        headers["x-request-id"] = response.headers.get("x-request-id", "req_1")
        if self.encoding == "gzip":
            body = gzip.compress(body)
            headers["content-encoding"] = "gzip"
        elif self.encoding == "broken-gzip":
            body = b"this is not gzip" * 4
            headers["content-encoding"] = "gzip"
        stream = _Pieces(body, self.size)
        self.bodies.append(stream)
        return httpx2.Response(response.status_code, headers=headers, stream=stream)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        return self._piecewise(request, self.fake.handle_request(request))

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return self._piecewise(request, await self.fake.handle_async_request(request))


def _client(transport: Chunked) -> SafeClient:
    return SafeClient(
        api_key="test",
        base_url="http://fake.test/v1",
        http_client=httpx2.Client(transport=transport),
        **DEFAULTS,
    )


def _async_client(transport: Chunked) -> AsyncSafeClient:
    return AsyncSafeClient(
        api_key="test",
        base_url="http://fake.test/v1",
        http_client=httpx2.AsyncClient(transport=transport),
        **DEFAULTS,
    )


def test_the_body_is_not_read_before_the_caller_reads_it() -> None:
    transport = Chunked(FakeOpenAI())
    with _client(transport) as client:
        acme = client.for_customer("acme")
        with acme.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=USER
        ) as response:
            [body] = transport.bodies
            assert body.pulled == 0
            assert client.store.usage_records() == []
            pieces = list(response.iter_bytes())
            assert len(pieces) == len(body.pieces) > 1
        [record] = client.store.usage_records()
    assert record.outcome == "ok" and record.tokens.input_tokens > 0
    assert record.request_id == response.http_response.headers["x-request-id"]


def test_a_gzipped_body_read_line_by_line_records_its_usage() -> None:
    transport = Chunked(FakeOpenAI(), encoding="gzip")
    with _client(transport) as client:
        with client.for_customer("acme").responses.with_streaming_response.create(
            model="gpt-4o-mini", input="hi"
        ) as response:
            assert "".join(response.iter_lines())
        [record] = client.store.usage_records()
    assert record.outcome == "ok" and record.tokens.output_tokens > 0


def test_a_body_closed_unread_records_an_estimate() -> None:
    transport = Chunked(FakeOpenAI())
    with _client(transport) as client:
        with client.for_customer("acme").chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=USER
        ):
            pass
        [record] = client.store.usage_records()
        assert transport.bodies[0].closed
    assert record.outcome == "estimated"


def test_a_response_dropped_unclosed_still_records_once() -> None:
    transport = Chunked(FakeOpenAI())
    with _client(transport) as client:
        manager = client.for_customer("acme").chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=USER
        )
        response = manager.__enter__()
        del response, manager
        gc.collect()
        [record] = client.store.usage_records()
    assert record.outcome == "estimated"


def test_a_body_too_large_to_keep_is_still_streamed_and_estimated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("safe_openai._bodies.MAX_KEPT_BYTES", 40)
    transport = Chunked(FakeOpenAI())
    with _client(transport) as client:
        with client.for_customer("acme").chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=USER
        ) as response:
            assert response.json()["choices"]
        [record] = client.store.usage_records()
    assert record.outcome == "estimated"
    assert MAX_KEPT_BYTES >= 1024 * 1024


def test_a_decoding_error_surfaces_while_iterating_as_in_the_sdk() -> None:
    def attempt(client: openai.OpenAI) -> tuple[str, type]:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=USER
        ) as response:
            try:
                list(response.iter_bytes())
            except Exception as exc:
                return "iterating", type(exc)
            return "read", type(None)

    transport = Chunked(FakeOpenAI(), encoding="broken-gzip")
    plain = openai.OpenAI(
        api_key="test",
        base_url="http://fake.test/v1",
        http_client=httpx2.Client(transport=transport),
    )
    with _client(transport) as client:
        assert (
            attempt(client.for_customer("acme"))
            == attempt(plain)
            == ("iterating", httpx2.DecodingError)
        )
        [record] = client.store.usage_records()
    assert record.outcome == "estimated"


async def test_async_streaming_response_streams_and_records_at_the_end() -> None:
    transport = Chunked(FakeOpenAI())
    async with _async_client(transport) as client:
        acme = client.for_customer("acme")
        async with acme.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=USER
        ) as response:
            [body] = transport.bodies
            assert body.pulled == 0
            assert await client.store.usage_records() == []
            pieces = [piece async for piece in response.iter_bytes()]
            assert len(pieces) > 1
        [record] = await client.store.usage_records()
    assert record.outcome == "ok" and record.tokens.input_tokens > 0


async def test_async_streaming_response_closed_unread_records_an_estimate() -> None:
    transport = Chunked(FakeOpenAI(), encoding="gzip")
    async with _async_client(transport) as client:
        async with client.for_customer("acme").embeddings.with_streaming_response.create(
            model="text-embedding-3-small", input="x"
        ):
            pass
        [record] = await client.store.usage_records()
    assert record.outcome == "estimated"
