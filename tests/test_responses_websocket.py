"""The Responses WebSocket (``responses.connect()`` and ``beta.responses.connect()``, sync and
async) is guarded like ``POST /responses``: every ``response.create`` and ``response.steer`` is
moderated and tagged before it is sent, a blocked event raises from ``send`` with nothing on the
socket, and usage from the terminal events is recorded. Runs against the fake's loopback
WebSocket server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from openai.resources.responses import Responses

from safe_openai import (
    AsyncSafeClient,
    CustomerSuspended,
    DefaultPolicy,
    ModerationBlocked,
    PolicyDenied,
    Quota,
    QuotaExceeded,
    SafeClient,
    UnguardedPathError,
)
from safe_openai._guard import drive
from safe_openai._identity import safety_identifier
from safe_openai._sockets import SocketSession, incoming, outgoing
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET, make_async_client, make_client

pytest.importorskip("websockets")

ACME_ID = safety_identifier(SECRET.encode(), "acme")
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}


@pytest.fixture
def ws_url(fake: FakeOpenAI) -> Iterator[str]:
    with fake.serve_websocket() as url:
        yield url


@pytest.fixture
def acme(fake: FakeOpenAI, ws_url: str) -> Iterator[SafeClient]:
    with make_client(fake, websocket_base_url=ws_url) as client:
        yield client.for_customer("acme")


@pytest.fixture
async def async_acme(fake: FakeOpenAI, ws_url: str) -> AsyncIterator[AsyncSafeClient]:
    async with make_async_client(fake, websocket_base_url=ws_url) as client:
        yield client.for_customer("acme")


def until_done(connection: Any) -> list[Any]:
    """Events read up to and including the next terminal event."""
    events = []
    for event in connection:
        events.append(event)
        if event.type in TERMINAL:
            return events
    raise AssertionError("the connection closed before the response ended")


def socket_events(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [r.json or {} for r in fake.requests if r.method == "WEBSOCKET"]


def test_create_is_moderated_then_tagged_then_sent_and_its_usage_recorded(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    with acme.responses.connect() as connection:
        connection.response.create(model="gpt-4o-mini", input="hello over the socket")
        events = until_done(connection)

    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/moderations"),
        ("WEBSOCKET", "/responses"),
    ]
    assert fake.moderation_inputs == ["hello over the socket"]
    sent = socket_events(fake)[0]
    assert sent["type"] == "response.create"
    assert sent["safety_identifier"] == ACME_ID
    completed = events[-1].response
    [record] = acme.store.usage_records(customer_id="acme")
    assert (record.endpoint, record.outcome, record.model) == ("/responses", "ok", "gpt-4o-mini")
    assert record.tokens.input_tokens == completed.usage.input_tokens
    assert record.tokens.output_tokens == completed.usage.output_tokens


def test_a_blocked_event_raises_from_send_and_never_reaches_the_socket(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    with acme.responses.connect() as connection:
        with pytest.raises(ModerationBlocked) as blocked:
            connection.send(
                {"type": "response.create", "model": "gpt-4o-mini", "input": "I will kill you"}
            )
        # the connection stays usable for the next, clean event
        connection.response.create(model="gpt-4o-mini", input="sorry, hello")
        until_done(connection)

    assert blocked.value.categories == ("violence",)
    assert [e.get("input") for e in socket_events(fake)] == ["sorry, hello"]
    outcomes = sorted(r.outcome for r in acme.store.usage_records(customer_id="acme"))
    assert outcomes == ["blocked", "ok"]
    assert len(acme.store.violations(customer_id="acme")) == 1


def test_send_raw_is_guarded_too(acme: SafeClient, fake: FakeOpenAI) -> None:
    with acme.responses.connect() as connection:
        with pytest.raises(ModerationBlocked):
            connection.send_raw(
                '{"type": "response.create", "model": "gpt-4o-mini", "input": "kill them all"}'
            )
        with pytest.raises(UnguardedPathError, match="not a JSON event"):
            connection.send_raw(b"\x00 not json")
        with pytest.raises(UnguardedPathError, match=r"response\.unknown"):
            connection.send_raw('{"type": "response.unknown", "input": "x"}')
    assert socket_events(fake) == []


def test_events_queued_before_connecting_are_guarded_when_queued(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    manager = acme.responses.connect()
    with pytest.raises(ModerationBlocked):
        manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "kill"})
    manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "queued hello"})
    assert fake.requests[-1].path == "/moderations"  # moderated before the socket exists
    with manager as connection:
        until_done(connection)

    [sent] = socket_events(fake)
    assert (sent["input"], sent["safety_identifier"]) == ("queued hello", ACME_ID)
    assert {r.outcome for r in acme.store.usage_records(customer_id="acme")} == {"blocked", "ok"}


def test_a_steer_is_moderated_and_its_successor_recorded_for_the_same_customer(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    with acme.responses.connect() as connection:
        connection.response.create(model="gpt-4o-mini", input="write a poem")
        first = until_done(connection)[-1].response
        with pytest.raises(ModerationBlocked):
            connection.response.steer(input="now kill the poet", previous_response_id=first.id)
        connection.response.steer(input="make it shorter", previous_response_id=first.id)
        events = until_done(connection)

    steer = socket_events(fake)[-1]
    assert steer == {
        "type": "response.steer",
        "input": "make it shorter",
        "previous_response_id": first.id,
    }
    assert "make it shorter" in fake.moderation_inputs
    successor = events[-1].response
    assert successor.previous_response_id == first.id
    records = acme.store.usage_records(customer_id="acme")
    by_endpoint = sorted((r.endpoint, r.outcome) for r in records)
    assert by_endpoint == [
        ("/responses", "ok"),
        ("/responses", "ok"),
        ("/responses/steer", "blocked"),
        ("/responses/steer", "ok"),
    ]
    newest = records[0]  # records come newest first: the successor ended last
    assert (newest.endpoint, newest.customer_id) == ("/responses", "acme")
    assert newest.tokens.output_tokens == successor.usage.output_tokens


def test_lanes_keep_each_response_with_its_own_call(acme: SafeClient) -> None:
    """Lanes answer in any order: each ``response.created`` binds the oldest call of its own
    lane (events crafted here, as the fake answers in sending order)."""
    session = SocketSession(acme._safe, "acme")
    execute = acme._execute
    for lane, model in (("a", "gpt-4o"), ("b", "gpt-4o-mini")):
        event = {"type": "response.create", "model": model, "input": "hi", "stream_id": lane}
        drive(outgoing(session, json.dumps(event)), execute)

    def answer(kind: str, lane: str, response_id: str, tokens: int = 0) -> None:
        response: dict[str, Any] = {"id": response_id}
        if tokens:
            response["usage"] = {"input_tokens": tokens, "output_tokens": tokens}
        event = {"type": kind, "stream_id": lane, "response": response}
        drive(incoming(session, json.dumps(event)), execute)

    answer("response.created", "b", "resp_b")
    answer("response.created", "a", "resp_a")
    answer("response.completed", "a", "resp_a", tokens=11)
    answer("response.completed", "b", "resp_b", tokens=22)

    records = {r.model: r.tokens.output_tokens for r in acme.store.usage_records()}
    assert records == {"gpt-4o": 11, "gpt-4o-mini": 22}


def test_closing_with_a_response_in_flight_records_an_estimate(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    with acme.responses.connect() as connection:
        connection.response.create(model="gpt-4o-mini", input="a long answer, please")
    [record] = acme.store.usage_records(customer_id="acme")
    assert record.outcome == "estimated"
    assert record.tokens.input_tokens > 0


def test_an_error_event_ends_the_call_as_an_error_and_frees_its_quota(
    fake: FakeOpenAI, ws_url: str
) -> None:
    policy = DefaultPolicy(quota=Quota(tokens_per_minute=5000))
    with make_client(fake, websocket_base_url=ws_url, policy=policy) as client:
        acme = client.for_customer("acme")
        fake.fail("/responses", 500)
        with acme.responses.connect() as connection:
            connection.response.create(model="gpt-4o-mini", input="hello", max_output_tokens=4000)
            assert until_done(connection)[-1].type == "error"
            # the failed call's reservation is gone: a second big call fits the quota
            connection.response.create(model="gpt-4o-mini", input="again", max_output_tokens=4000)
            assert until_done(connection)[-1].type == "response.completed"
        outcomes = sorted(r.outcome for r in acme.store.usage_records(customer_id="acme"))
    assert outcomes == ["error", "ok"]


def test_standing_quota_and_policy_apply_as_for_http(fake: FakeOpenAI, ws_url: str) -> None:
    policy = DefaultPolicy(
        quota=Quota(requests_per_minute=1),
        allowed_models=["gpt-4o-mini"],
        system_instruction="Be kind.",
    )
    with make_client(fake, websocket_base_url=ws_url, policy=policy) as client:
        acme = client.for_customer("acme")
        with acme.responses.connect() as connection:
            with pytest.raises(PolicyDenied):
                connection.response.create(model="gpt-4o", input="hi")
            connection.response.create(model="gpt-4o-mini", input="hi")
            until_done(connection)
            with pytest.raises(QuotaExceeded):
                connection.response.create(model="gpt-4o-mini", input="hi again")
        client.suspend("acme", reason="test")
        with acme.responses.connect() as connection, pytest.raises(CustomerSuspended):
            connection.response.create(model="gpt-4o-mini", input="hello")
    [sent] = socket_events(fake)
    assert sent["instructions"] == "Be kind."


def test_the_beta_twin_is_guarded(acme: SafeClient, fake: FakeOpenAI) -> None:
    with acme.beta.responses.connect() as connection:
        with pytest.raises(ModerationBlocked):
            connection.send({"type": "response.create", "model": "gpt-4o-mini", "input": "kill"})
        connection.send({"type": "response.create", "model": "gpt-4o-mini", "input": "beta hi"})
        until_done(connection)
    [sent] = socket_events(fake)
    assert sent["safety_identifier"] == ACME_ID
    assert len(acme.store.usage_records(customer_id="acme")) == 2


def test_a_connection_built_around_the_sdk_resource_is_refused(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    """The SDK's own ``Responses`` class bypasses the guarded one: its socket never opens."""
    with pytest.raises(UnguardedPathError, match="wss:/responses"), Responses(acme).connect():
        pass
    assert fake.requests == []


def test_copies_made_by_libraries_keep_the_guarded_socket(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    copy = acme.with_options(max_retries=0).copy(http_client=acme._client, _extra_kwargs={})
    with copy.responses.connect() as connection:
        with pytest.raises(ModerationBlocked):
            connection.response.create(model="gpt-4o-mini", input="kill")
        connection.response.create(model="gpt-4o-mini", input="hello")
        until_done(connection)
    assert socket_events(fake)[0]["safety_identifier"] == ACME_ID


async def test_async_connection_is_guarded(async_acme: AsyncSafeClient, fake: FakeOpenAI) -> None:
    async with async_acme.responses.connect() as connection:
        with pytest.raises(ModerationBlocked):
            await connection.response.create(model="gpt-4o-mini", input="kill them")
        await connection.response.create(model="gpt-4o-mini", input="async hello")
        async for event in connection:
            if event.type == "response.completed":
                completed = event.response
                break
    [sent] = socket_events(fake)
    assert sent["safety_identifier"] == ACME_ID
    records = await async_acme.store.usage_records(customer_id="acme")
    ok = next(r for r in records if r.outcome == "ok")
    assert ok.tokens.output_tokens == completed.usage.output_tokens


async def test_async_events_queued_before_connecting_are_guarded_on_entry(
    async_acme: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    manager = async_acme.responses.connect()
    manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "fine"})
    manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "kill"})
    with pytest.raises(ModerationBlocked):
        async with manager:
            pass
    assert socket_events(fake) == []  # the socket never opened
    outcomes = sorted(r.outcome for r in await async_acme.store.usage_records(customer_id="acme"))
    assert outcomes == ["blocked", "error"]  # the clean one was never sent


async def test_async_beta_twin_and_raw_send_are_guarded(
    async_acme: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    async with async_acme.beta.responses.connect() as connection:
        with pytest.raises(ModerationBlocked):
            await connection.send_raw(
                '{"type": "response.create", "model": "gpt-4o-mini", "input": "kill"}'
            )
    assert socket_events(fake) == []


def test_realtime_stays_refused(acme: SafeClient) -> None:
    with (
        pytest.raises(UnguardedPathError, match="wss:/realtime"),
        acme.realtime.connect(model="gpt-realtime"),
    ):
        pass


def test_plain_sdk_client_is_unaffected(fake: FakeOpenAI, ws_url: str) -> None:
    """The guarded classes are subclasses made per SafeClient; the SDK's own stay as they are."""
    plain = openai.OpenAI(**fake.openai_kwargs(), websocket_base_url=ws_url)
    with plain.responses.connect() as connection:
        connection.response.create(model="gpt-4o-mini", input="kill")  # not moderated
        until_done(connection)
    assert type(connection).__name__ == "ResponsesConnection"
    assert fake.moderation_requests == []
