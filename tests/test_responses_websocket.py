"""The Responses WebSocket (``responses.connect()`` and ``beta.responses.connect()``, sync and
async) is guarded like ``POST /responses``: every ``response.create`` and ``response.steer`` is
moderated and tagged before it is sent, a blocked event raises from ``send`` with nothing on the
socket, and usage from the terminal events is recorded. Runs against the fake's loopback
WebSocket server."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from openai.resources.responses import Responses

import safe_openai
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
from safe_openai._sockets import SocketSession, incoming, outgoing, register, sent_steer
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


class Wire:
    """A guarded session driven by crafted events, without a socket: for the orders of events a
    real server produces but the fake does not."""

    def __init__(self, client: SafeClient, customer: str | None = None) -> None:
        self.client = client
        self.session = SocketSession(client._safe, customer)
        self.session.opened = True

    def send(self, event: dict[str, Any]) -> None:
        frame, call = drive(outgoing(self.session, json.dumps(event)), self.client._execute)
        register(self.session, call, frame)
        if event["type"] == "response.steer" and call is not None:
            drive(sent_steer(self.session, call), self.client._execute)

    def receive(self, kind: str, response_id: str, tokens: int = 0, **fields: Any) -> None:
        response: dict[str, Any] = {"id": response_id, **fields.pop("response", {})}
        if tokens:
            response["usage"] = {"input_tokens": tokens, "output_tokens": tokens}
        event = {"type": kind, "response": response, **fields}
        drive(incoming(self.session, json.dumps(event)), self.client._execute)

    def usage(self) -> list[tuple[str, str | None, str, int]]:
        records = self.client.store.usage_records()
        return sorted((r.customer_id, r.model, r.outcome, r.tokens.output_tokens) for r in records)


def test_lanes_keep_each_response_with_its_own_call(acme: SafeClient) -> None:
    """Lanes answer in any order: each ``response.created`` binds the oldest call of its own
    lane."""
    wire = Wire(acme, "acme")
    for lane, model in (("a", "gpt-4o"), ("b", "gpt-4o-mini")):
        wire.send({"type": "response.create", "model": model, "input": "hi", "stream_id": lane})

    wire.receive("response.created", "resp_b", stream_id="b")
    wire.receive("response.created", "resp_a", stream_id="a")
    wire.receive("response.completed", "resp_a", tokens=11, stream_id="a")
    wire.receive("response.completed", "resp_b", tokens=22, stream_id="b")

    assert wire.usage() == [("acme", "gpt-4o", "ok", 11), ("acme", "gpt-4o-mini", "ok", 22)]


def test_a_steers_successor_does_not_take_the_next_customers_call(client: SafeClient) -> None:
    wire = Wire(client)
    with safe_openai.customer("alice"):
        wire.send({"type": "response.create", "model": "gpt-4o", "input": "a poem"})
    wire.receive("response.created", "r1")
    with safe_openai.customer("alice"):
        wire.send({"type": "response.steer", "input": "shorter", "previous_response_id": "r1"})
    with safe_openai.customer("bob"):
        wire.send({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"})
    wire.receive("response.incomplete", "r1", tokens=5)
    # the server continues alice's response with the steering input, then answers bob
    wire.receive("response.created", "r2", response={"previous_response_id": "r1"})
    wire.receive("response.completed", "r2", tokens=7, response={"model": "gpt-4o"})
    wire.receive("response.created", "r3")
    wire.receive("response.completed", "r3", tokens=3)

    assert [u for u in wire.usage() if u[2] != "ok" or u[3]] == [
        ("alice", "gpt-4o", "ok", 5),
        ("alice", "gpt-4o", "ok", 7),
        ("bob", "gpt-4o-mini", "ok", 3),
    ]


def test_an_explicit_create_after_a_steer_binds_its_own_response(client: SafeClient) -> None:
    """After ``response.steer.pending`` the docs ask for one explicit create per parent with
    the same ``previous_response_id``: that response is the create's, not a successor."""
    wire = Wire(client, "alice")
    wire.send({"type": "response.create", "model": "gpt-4o", "input": "a poem"})
    wire.receive("response.created", "r1")
    wire.send({"type": "response.steer", "input": "shorter", "previous_response_id": "r1"})
    wire.receive("response.completed", "r1", tokens=5)
    wire.send(
        {"type": "response.create", "model": "gpt-4o", "previous_response_id": "r1", "input": []}
    )
    wire.receive("response.created", "r2", response={"previous_response_id": "r1"})
    wire.receive("response.completed", "r2", tokens=9)
    creates = [u for u in wire.usage() if u[3]]
    assert creates == [("alice", "gpt-4o", "ok", 5), ("alice", "gpt-4o", "ok", 9)]
    assert len(client.store.usage_records()) == 3  # the two creates and the steer


def test_an_error_inside_a_streaming_response_ends_that_response(client: SafeClient) -> None:
    wire = Wire(client)
    with safe_openai.customer("alice"):
        wire.send({"type": "response.create", "model": "gpt-4o", "input": "long"})
    wire.receive("response.created", "r1")
    with safe_openai.customer("bob"):
        wire.send({"type": "response.create", "model": "gpt-4o-mini", "input": "short"})
    drive(
        incoming(wire.session, json.dumps({"type": "error", "sequence_number": 9})),
        client._execute,
    )
    wire.receive("response.created", "r2")
    wire.receive("response.completed", "r2", tokens=4)

    assert wire.usage() == [("alice", "gpt-4o", "error", 0), ("bob", "gpt-4o-mini", "ok", 4)]


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


def test_threads_sharing_a_connection_keep_their_own_usage(fake: FakeOpenAI, ws_url: str) -> None:
    """A frame is registered and written under one lock, so a thread slowed between the two
    cannot have its response bound to another thread's call."""
    client = make_client(fake, websocket_base_url=ws_url)
    with client, client.responses.connect() as connection:
        raw = connection._connection
        real_send = raw.send
        first = threading.Event()

        def slow_first_send(data: Any) -> None:
            if not first.is_set():
                first.set()
                time.sleep(0.3)  # alice's frame is slow to leave
            real_send(data)

        raw.send = slow_first_send

        def ask(customer: str, text: str) -> None:
            with safe_openai.customer(customer):
                connection.response.create(model="gpt-4o-mini", input=text)

        alice = threading.Thread(target=ask, args=("alice", "a long question " * 40))
        alice.start()
        assert first.wait(5)
        ask("bob", "hi")  # while alice's frame is still on its way
        alice.join()
        until_done(connection)
        until_done(connection)

    tokens = {r.customer_id: r.tokens.input_tokens for r in client.store.usage_records()}
    assert tokens["alice"] > 100 > tokens["bob"]  # each bills their own response


def test_a_connection_dropped_unclosed_records_and_frees_its_quota(
    fake: FakeOpenAI, ws_url: str
) -> None:
    policy = DefaultPolicy(quota=Quota(tokens_per_minute=5000))
    with make_client(fake, websocket_base_url=ws_url, policy=policy) as client:
        acme = client.for_customer("acme")
        connection = acme.responses.connect().enter()
        connection.response.create(model="gpt-4o-mini", input="hi", max_output_tokens=4000)
        raw = connection._connection
        del connection
        gc.collect()
        raw.close()
        [record] = client.store.usage_records(customer_id="acme")
        assert record.outcome == "estimated"
        # its reservation is gone: a second big call fits the quota
        with acme.responses.connect() as again:
            again.response.create(model="gpt-4o-mini", input="hi", max_output_tokens=4000)


def test_an_event_the_full_queue_refuses_is_an_error_not_usage(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    manager = acme.responses.connect(max_queue_size=200)
    manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "short"})
    with pytest.raises(openai.OpenAIError, match=r"(?i)queue"):
        manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "x" * 500})
    with manager as connection:
        until_done(connection)
    outcomes = sorted(r.outcome for r in acme.store.usage_records(customer_id="acme"))
    assert outcomes == ["error", "ok"]


async def test_the_async_managers_send_is_refused_once_the_connection_is_open(
    async_acme: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    manager = async_acme.responses.connect()
    async with manager as connection:
        with pytest.raises(UnguardedPathError, match=r"await connection\.send"):
            manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"})
        await connection.response.create(model="gpt-4o-mini", input="hi")
        async for event in connection:
            if event.type == "response.completed":
                break
    assert [e["input"] for e in socket_events(fake)] == ["hi"]


def test_frames_the_sdk_gives_up_on_after_a_failed_reconnect_are_errors(fake: FakeOpenAI) -> None:
    """An event queued while the SDK reconnects, then reported unsent when the reconnect
    fails, was never sent: an error with its reservation released, not an estimate."""
    from openai import WebSocketConnectionClosedError
    from websockets.sync.server import serve

    server = serve(lambda socket: socket.close(code=1001), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}/v1"
    opened: dict[str, Any] = {}

    def on_reconnecting(event: Any) -> Any:
        if event.attempt == 1:
            server.shutdown()  # the reconnect fails
            opened["connection"].response.create(model="gpt-4o-mini", input="queued meanwhile")
            return None
        return {"abort": True}

    with make_client(fake, websocket_base_url=url) as client:
        acme = client.for_customer("acme")
        manager = acme.responses.connect(
            on_reconnecting=on_reconnecting, max_retries=1, initial_delay=0.01
        )
        opened["connection"] = connection = manager.enter()
        with pytest.raises(WebSocketConnectionClosedError) as closed:
            for _ in connection:
                pass
        connection.close()
        assert len(closed.value.unsent_messages) == 1
        [record] = client.store.usage_records(customer_id="acme")
    assert (record.outcome, record.tokens.total_tokens) == ("error", 0)


def test_events_of_a_failed_entry_are_not_sent_by_a_retry(
    acme: SafeClient, fake: FakeOpenAI
) -> None:
    """Queued events are recorded as never sent when the connection fails to open, so a
    retried ``enter()`` must not send them unmetered."""
    manager = acme.responses.connect()
    manager.send({"type": "response.create", "model": "gpt-4o-mini", "input": "queued"})

    def refused(*_: Any) -> Any:
        raise OSError("connection refused")

    manager._connect_ws = refused  # type: ignore[method-assign]
    with pytest.raises(OSError, match="refused"), manager:
        pass
    del manager._connect_ws
    with manager as connection:
        connection.response.create(model="gpt-4o-mini", input="after the retry")
        until_done(connection)

    assert [e["input"] for e in socket_events(fake)] == ["after the retry"]
    outcomes = sorted(r.outcome for r in acme.store.usage_records(customer_id="acme"))
    assert outcomes == ["error", "ok"]
