"""Paths the guard cannot inspect are refused with a clear error, unless the policy allows them:
Realtime and Live WebSockets, and HTTP endpoints that feed content to a model. (The Responses
WebSocket is guarded: tests/test_responses_websocket.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from safe_openai import AsyncSafeClient, DefaultPolicy, SafeClient, UnguardedPathError
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET


class AllowWebSockets(DefaultPolicy):
    def allow_unguarded(self, endpoint: str) -> bool:
        return endpoint.startswith("wss:")


def test_realtime_websocket_is_refused_before_connecting(client: SafeClient) -> None:
    with (
        pytest.raises(UnguardedPathError, match="wss:/realtime"),
        client.realtime.connect(model="gpt-realtime"),
    ):
        pass


async def test_async_websockets_are_refused(aclient: AsyncSafeClient) -> None:
    with pytest.raises(UnguardedPathError):
        async with aclient.realtime.connect(model="gpt-realtime"):
            pass
    with pytest.raises(UnguardedPathError):
        async with aclient.realtime.translations.connect(model="gpt-realtime"):
            pass


def test_policy_may_allow_websockets_explicitly(fake: FakeOpenAI) -> None:
    """Allowed, the SDK goes on to open the socket (which fails here: nothing listens)."""
    client = SafeClient(
        **fake.openai_kwargs(), identifier_secret=SECRET, policy=AllowWebSockets(), spool=False
    )
    client = client.with_options(websocket_base_url="ws://127.0.0.1:9/v1")
    with pytest.raises(OSError, match=r"refused|connect"), client.realtime.connect(model="m"):
        pass


def test_http_paths_that_feed_models_unseen_are_refused(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    with pytest.raises(UnguardedPathError, match="/realtime/client_secrets"):
        client.realtime.client_secrets.create()
    assert fake.requests == []


@pytest.mark.parametrize(
    ("open_socket", "endpoint"),
    [
        (lambda c: c.realtime.connect(model="gpt-realtime"), "wss:/realtime"),
        (lambda c: c.realtime.translations.connect(model="gpt-realtime"), "wss:/realtime/"),
        (lambda c: c.beta.realtime.connect(model="gpt-realtime"), "wss:/realtime"),
        (lambda c: c.live.connect(), "wss:/live"),
        (lambda c: c.live.sideband.connect(session_id="s1"), "wss:/live"),
        (lambda c: c.live.forks.connect(session_id="s1"), "wss:/live"),
    ],
    ids=["realtime", "translations", "beta-realtime", "live", "sideband", "forks"],
)
def test_every_live_session_is_refused_before_its_socket_opens(
    client: SafeClient, fake: FakeOpenAI, open_socket: Any, endpoint: str
) -> None:
    with pytest.raises(UnguardedPathError, match=endpoint), open_socket(client):
        pass
    assert fake.requests == []
