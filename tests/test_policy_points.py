"""What the policy is asked about paths the guard cannot inspect, and that its answer holds:
the plain-SDP Realtime call, a raw non-JSON frame on the Responses WebSocket, the
``TranslationSession`` socket (named as a rule can name it)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest

from safe_openai import AsyncSafeClient, DefaultPolicy, SafeClient, UnguardedPathError
from safe_openai._sockets import RAW_FRAME
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET, make_client

SDP = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\n"


class Allow(DefaultPolicy):
    """Allows exactly the endpoints it is given, and remembers what it was asked."""

    def __init__(self, *allowed: str) -> None:
        super().__init__()
        self.allowed = set(allowed)
        self.asked: list[str] = []

    def allow_unguarded(self, endpoint: str) -> bool:
        self.asked.append(endpoint)
        return endpoint in self.allowed


def _sdp_server(seen: list[httpx2.Request]) -> httpx2.MockTransport:
    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(
            201, text="v=0\r\nanswer\r\n", headers={"content-type": "application/sdp"}
        )

    return httpx2.MockTransport(answer)


def test_a_policy_that_allows_realtime_calls_can_send_plain_sdp() -> None:
    seen: list[httpx2.Request] = []
    policy = Allow("/realtime/calls")
    client = SafeClient(
        api_key="test",
        base_url="http://fake.test/v1",
        http_client=httpx2.Client(transport=_sdp_server(seen)),
        identifier_secret=SECRET,
        policy=policy,
        spool=False,
    )
    answer = client.realtime.calls.create(sdp=SDP)
    assert "answer" in answer.text
    [request] = seen
    assert request.content == SDP.encode()
    assert policy.asked == ["/realtime/calls"]


def test_plain_sdp_is_still_refused_by_default() -> None:
    seen: list[httpx2.Request] = []
    client = SafeClient(
        api_key="test",
        base_url="http://fake.test/v1",
        http_client=httpx2.Client(transport=_sdp_server(seen)),
        identifier_secret=SECRET,
        spool=False,
    )
    with pytest.raises(UnguardedPathError, match="/realtime/calls"):
        client.realtime.calls.create(sdp=SDP)
    assert seen == []


async def test_async_plain_sdp_with_a_session_is_the_policys_to_allow() -> None:
    seen: list[httpx2.Request] = []

    async def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(201, text="v=0", headers={"content-type": "application/sdp"})

    client = AsyncSafeClient(
        api_key="test",
        base_url="http://fake.test/v1",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
        identifier_secret=SECRET,
        policy=Allow("/realtime/calls"),
        spool=False,
    )
    await client.realtime.calls.create(sdp=SDP, session={"type": "realtime", "model": "m"})
    [request] = seen
    assert b"multipart" in request.headers["content-type"].encode()


@pytest.fixture
def ws_url(fake: FakeOpenAI) -> Any:
    pytest.importorskip("websockets")
    with fake.serve_websocket() as url:
        yield url


def test_a_raw_frame_on_the_responses_socket_is_the_policys_to_allow(
    fake: FakeOpenAI, ws_url: str
) -> None:
    policy = Allow(RAW_FRAME)
    with make_client(fake, websocket_base_url=ws_url, policy=policy) as client:
        acme = client.for_customer("acme")
        with acme.responses.connect() as connection:
            connection.send_raw(b"\x00 not json")
            # the server's answer to the frame is the server's: here, an error event
            assert next(iter(connection)).type == "error"
            # a JSON event still goes through the guard on the same socket
            connection.response.create(model="gpt-4o-mini", input="hello")
            for event in connection:
                if event.type == "response.completed":
                    break
    assert RAW_FRAME == "wss:/responses#raw"
    assert policy.asked == [RAW_FRAME]
    assert [r.path for r in fake.requests if r.method == "POST"] == ["/moderations"]
    [record] = client.store.usage_records()
    assert record.outcome == "ok"


def test_a_raw_frame_is_refused_by_default_and_names_the_rule(
    fake: FakeOpenAI, ws_url: str
) -> None:
    with (
        make_client(fake, websocket_base_url=ws_url) as client,
        client.for_customer("acme").responses.connect() as connection,
    ):
        with pytest.raises(UnguardedPathError, match=r"wss:/responses#raw"):
            connection.send_raw("plain text")
        with pytest.raises(UnguardedPathError):
            connection.send_raw(json.dumps(["not", "an", "event"]))
    assert [r for r in fake.requests if r.method == "WEBSOCKET"] == []


@pytest.mark.parametrize("allowed", [True, False])
def test_the_translation_session_socket_is_named_for_the_policy(
    fake: FakeOpenAI, allowed: bool
) -> None:
    pytest.importorskip("websockets")
    from openai.lib.realtime_translation import TranslationSession

    policy = Allow("wss:/realtime/translations") if allowed else Allow()
    client = make_client(fake, policy=policy).with_options(websocket_base_url="ws://127.0.0.1:9/v1")
    session = TranslationSession(client.realtime.translations, model="gpt-realtime-translate")
    if allowed:
        # allowed, the SDK goes on to open the socket (which fails here: nothing listens)
        with pytest.raises(OSError, match=r"refused|connect"), session:
            pass
    else:
        with pytest.raises(UnguardedPathError, match="wss:/realtime/translations"), session:
            pass
    assert policy.asked[0] == "wss:/realtime/translations"
    assert fake.requests == []
