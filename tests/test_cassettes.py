"""SafeClient replayed from vcrpy cassettes: the moderation call and the injected fields are in
the recorded interactions, every interaction must be played, and nothing else may be sent.

Re-record with ``python tests/cassettes/record.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import vcr

from safe_openai import ModerationBlocked, SafeClient

CASSETTES = Path(__file__).parent / "cassettes"
USER = [{"role": "user", "content": "Plan a picnic for four."}]


def vcr_for(record_mode: str) -> vcr.VCR:
    """Cassettes matched on method, path and body: an injected field that changed fails."""
    return vcr.VCR(
        record_mode=record_mode,
        match_on=["method", "path", "body"],
        filter_headers=["authorization", "openai-organization", "openai-project"],
        decode_compressed_response=True,
    )


def make_client(transport: httpx2.BaseTransport) -> SafeClient:
    return SafeClient(
        api_key="sk-cassette",
        base_url="http://cassette.openai.test/v1",
        http_client=httpx2.Client(transport=transport),
        identifier_secret="cassette-secret!",
        store="memory://",
        spool=False,
        max_retries=0,
    )


def chat(client: SafeClient) -> None:
    reply = client.for_customer("acme").chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert reply.choices[0].message.content


def chat_stream(client: SafeClient) -> None:
    stream = client.for_customer("acme").chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    assert all(chunk.choices for chunk in stream)


def responses(client: SafeClient) -> None:
    acme = client.for_customer("acme")
    assert acme.responses.create(model="gpt-4o-mini", input="Name three rivers.").output_text
    events = list(acme.responses.create(model="gpt-4o-mini", input="Name a lake.", stream=True))
    assert events[-1].type == "response.completed"


def moderation_blocked(client: SafeClient) -> None:
    with pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "I will kill him"}]
        )


SCENARIOS: dict[str, Callable[[SafeClient], None]] = {
    "chat": chat,
    "chat_stream": chat_stream,
    "responses": responses,
    "moderation_blocked": moderation_blocked,
}


def _refuse(request: httpx2.Request) -> httpx2.Response:
    raise AssertionError(f"a request not in the cassette reached the network: {request.url}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_replays_from_cassette(name: str) -> None:
    client = make_client(httpx2.MockTransport(_refuse))
    with vcr_for(record_mode="none").use_cassette(str(CASSETTES / f"{name}.yaml")) as cassette:
        SCENARIOS[name](client)
    assert cassette.all_played
    assert all("authorization" not in {k.lower() for k in r.headers} for r in cassette.requests)
    records = client.store.usage_records()
    assert records and all(r.customer_id == "acme" for r in records)


def test_cassettes_hold_the_moderation_call_and_injected_fields() -> None:
    cassette: Any = vcr_for(record_mode="none").use_cassette(str(CASSETTES / "chat_stream.yaml"))
    with cassette as played:
        paths = [r.path for r in played.requests]
        bodies = [r.body or b"" for r in played.requests]
    assert paths == ["/v1/moderations", "/v1/chat/completions"]
    assert b'"safety_identifier"' in bodies[1]
    assert b'"include_usage":true' in bodies[1].replace(b" ", b"")


def test_blocked_cassette_has_no_model_request() -> None:
    with vcr_for(record_mode="none").use_cassette(str(CASSETTES / "moderation_blocked.yaml")) as c:
        paths = [r.path for r in c.requests]
    assert paths == ["/v1/moderations"]
