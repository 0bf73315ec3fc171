"""Ways around the guard found in review, each pinned: odd containers, odd path spellings,
uncovered content routes, predicted output, model-less requests, raw streams, bad settings."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pydantic
import pytest
from openai.types.chat import ChatCompletionChunk

from safe_openai import (
    AsyncSafeClient,
    ConfigurationError,
    DefaultPolicy,
    ModerationBlocked,
    PolicyDenied,
    Quota,
    SafeClient,
    UnguardedPathError,
)
from safe_openai._identity import safety_identifier
from safe_openai.stores._memory import MemoryStore
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET

BAD = "I will kill them all"
SID = safety_identifier(SECRET.encode(), "acme")


class Message(pydantic.BaseModel):
    role: str
    content: str


def test_tuple_input_to_responses_is_moderated(client: SafeClient, fake: FakeOpenAI) -> None:
    with pytest.raises(ModerationBlocked):
        client.for_customer("acme").responses.create(
            model="gpt-4o-mini",
            input=({"role": "user", "content": BAD},),  # type: ignore[arg-type]
        )
    assert fake.model_requests == []


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": ({"role": "user", "content": BAD},)},
        {"messages": [Message(role="user", content=BAD)]},
    ],
    ids=["tuple", "pydantic"],
)
def test_extra_body_containers_are_seen_as_sent(
    client: SafeClient, fake: FakeOpenAI, extra: dict[str, Any]
) -> None:
    with pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_body=extra
        )
    assert fake.model_requests == []


@pytest.mark.parametrize("path", ["chat/completions", "/./chat/completions", "/chat//completions"])
def test_every_spelling_of_a_model_path_is_guarded(
    client: SafeClient, fake: FakeOpenAI, path: str
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": BAD}]}
    with pytest.raises(ModerationBlocked):
        client.for_customer("acme").post(path, body=body, cast_to=object)
    assert fake.model_requests == []


async def test_async_client_resolves_path_spellings_too(
    aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    await aclient.for_customer("acme").post("chat/completions", body=body, cast_to=object)
    assert fake.model_requests[0].json["safety_identifier"] == SID


def test_agent_automations_carrying_user_messages_are_refused(
    client: SafeClient, fake: FakeOpenAI
) -> None:
    with pytest.raises(UnguardedPathError):
        client.post("/agents/automations", body={"target": {"input": BAD}}, cast_to=object)
    assert fake.requests == []


def test_predicted_output_is_moderated(client: SafeClient, fake: FakeOpenAI) -> None:
    with pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "fix typos"}],
            prediction={"type": "content", "content": BAD},
        )
    assert fake.model_requests == []


def test_allow_list_denies_requests_naming_no_model(fake: FakeOpenAI) -> None:
    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=SECRET,
        spool=False,
        policy=DefaultPolicy(allowed_models=["gpt-4o-mini"]),
    )
    with pytest.raises(PolicyDenied):
        client.for_customer("acme").responses.create(prompt={"id": "pmpt_1"})
    assert fake.model_requests == []


def test_raw_stream_parsed_at_once_records_real_usage(client: SafeClient) -> None:
    acme = client.for_customer("acme")
    stream = acme.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], stream=True
    ).parse()
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) and c.choices for c in chunks)
    [record] = client.store.usage_records()
    assert record.outcome == "ok"
    assert record.tokens.output_tokens > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"moderate_roles": "user"},
        {"moderate_roles": ("user", "customer")},
        {"strike_window": 3600},
        {"suspension": 3600},
        {"thresholds": {"violence": "0.5"}},
        {"quota": "10 per minute"},
    ],
)
def test_bad_policy_settings_are_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        DefaultPolicy(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"requests_per_minute": "5"}, {"tokens_per_day": True}, {"usd_per_month": -1}],
)
def test_bad_quotas_are_configuration_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Quota(**kwargs)


def test_an_object_that_is_not_a_store_is_refused(fake: FakeOpenAI) -> None:
    with pytest.raises(ConfigurationError, match="UsageStore"):
        SafeClient(**fake.openai_kwargs(), identifier_secret=SECRET, store=object(), spool=False)


def test_block_stands_when_the_violation_cannot_be_stored(fake: FakeOpenAI) -> None:
    class NoViolations(MemoryStore):
        def record_violation(self, violation: Any) -> None:
            raise ConnectionError("down")

    client = SafeClient(
        **fake.openai_kwargs(),
        identifier_secret=SECRET,
        store=NoViolations(),
        spool=False,
        policy=DefaultPolicy(strike_window=timedelta(hours=1)),
    )
    with pytest.raises(ModerationBlocked):
        client.for_customer("acme").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": BAD}]
        )
    assert fake.model_requests == []
