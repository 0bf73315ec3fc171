"""Paths the guard cannot inspect are refused with a clear error, unless the policy allows them:
WebSockets (Responses ``connect``, Realtime) and HTTP endpoints that feed content to a model."""

from __future__ import annotations

import pytest

from safe_openai import AsyncSafeClient, DefaultPolicy, SafeClient, UnguardedPathError
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET


class AllowWebSockets(DefaultPolicy):
    def allow_unguarded(self, endpoint: str) -> bool:
        return endpoint.startswith("wss:")


def test_responses_websocket_is_refused_before_connecting(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    with (
        pytest.raises(UnguardedPathError, match="wss:/responses"),
        client.for_customer("acme").responses.connect(),
    ):
        pass
    assert fake.requests == []


def test_realtime_websocket_is_refused_before_connecting(client: SafeClient) -> None:
    with (
        pytest.raises(UnguardedPathError, match="wss:/realtime"),
        client.realtime.connect(model="gpt-realtime"),
    ):
        pass


async def test_async_websockets_are_refused(aclient: AsyncSafeClient) -> None:
    with pytest.raises(UnguardedPathError):
        async with aclient.responses.connect():
            pass
    with pytest.raises(UnguardedPathError):
        async with aclient.realtime.connect(model="gpt-realtime"):
            pass


def test_policy_may_allow_websockets_explicitly(fake: FakeOpenAI) -> None:
    """Allowed, the SDK goes on to open the socket (which fails here: nothing listens)."""
    client = SafeClient(
        **fake.openai_kwargs(), identifier_secret=SECRET, policy=AllowWebSockets(), spool=False
    )
    client = client.with_options(websocket_base_url="ws://127.0.0.1:9/v1")
    with pytest.raises(OSError, match=r"refused|connect"), client.responses.connect():
        pass


def test_http_paths_that_feed_models_unseen_are_refused(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    with pytest.raises(UnguardedPathError, match="/realtime/client_secrets"):
        client.realtime.client_secrets.create()
    assert fake.requests == []
