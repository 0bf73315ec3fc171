"""An adversarial pass over the moderation gate and the quota reservation, after issue 10's
fixes: request shapes that carried text past moderation, reservations left behind, and the
fixes pinned (each test failed before its fix)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from safe_openai import DefaultPolicy, ModerationBlocked, Quota
from safe_openai.testing import FakeOpenAI

from .conftest import make_client

BAD = "I will kill them all"
MODEL = "gpt-4o-mini"
EVERY_ROLE = ("user", "tool", "assistant", "system", "developer")
ONE_A_MINUTE = DefaultPolicy(quota=Quota(requests_per_minute=1))


def _sent_bad(fake: FakeOpenAI) -> bool:
    return any("kill" in json.dumps(r.json or {}) for r in fake.model_requests)


def _hello(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **extra}


# --- values that look like JSON but read differently from how they are sent ----------------


class HidingDict(dict[str, Any]):
    """A dict whose ``get`` hides its content: ``json`` still sends every item."""

    def get(self, key: str, default: Any = None) -> Any:
        return default if key == "content" else super().get(key, default)


class BlankStr(str):
    """A str that claims to be blank: ``json`` still sends its characters."""

    __slots__ = ()

    def strip(self, chars: str | None = None) -> str:
        return ""


class OtherBytes(str):
    """A str whose ``encode`` (the verdict cache key) names other, clean, text."""

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"hello"


@pytest.mark.parametrize(
    "message",
    [
        HidingDict(role="user", content=BAD),
        {"role": "user", "content": BlankStr(BAD)},
        {"role": "user", "content": [{"type": "text", "text": BlankStr(BAD)}]},
        {"role": "user", "content": OtherBytes(BAD)},
    ],
    ids=["dict-subclass", "str-subclass", "str-subclass-part", "str-subclass-cache-key"],
)
def test_subclasses_of_json_types_are_moderated_as_sent(
    fake: FakeOpenAI, message: dict[str, Any]
) -> None:
    """The guard reads the body as the SDK's JSON encoding will send it: a ``dict`` or ``str``
    subclass is read through its plain value, not its overridden methods."""
    with make_client(fake) as client:
        acme = client.for_customer("acme")
        acme.chat.completions.create(**_hello())  # "hello" is in the verdict cache now
        with pytest.raises(ModerationBlocked):
            acme.post(
                "/chat/completions",
                body={"model": MODEL, "messages": [message]},
                cast_to=object,
            )
        with pytest.raises(ModerationBlocked):
            acme.chat.completions.create(model=MODEL, messages=[message])  # type: ignore[list-item]
    assert not _sent_bad(fake)


# --- quota: every exit after the reservation gives it back; no demand below zero -----------


@pytest.mark.parametrize("stream_options", [["include_usage"], "include_usage", 1])
def test_a_stream_option_that_is_no_object_holds_no_reservation(
    fake: FakeOpenAI, stream_options: object
) -> None:
    """``stream_options`` that is not an object is the API's to refuse (400): the guard neither
    crashes on it (a TypeError after the reservation) nor keeps the call's reservation."""
    policy = DefaultPolicy(quota=Quota(tokens_per_minute=5000))  # room for one 4096 worst case
    with make_client(fake, policy=policy) as client:
        acme = client.for_customer("acme")
        with pytest.raises(openai.BadRequestError):
            acme.chat.completions.create(
                **_hello(),
                stream=True,
                stream_options=stream_options,  # type: ignore[arg-type]
            )
        acme.chat.completions.create(**_hello())  # admitted: the first call holds nothing


def test_a_negative_output_cap_reserves_no_negative_tokens(fake: FakeOpenAI) -> None:
    """``max_tokens=-10**9`` must not reserve a negative amount, which would make room in the
    window for other calls while it is in flight."""
    with make_client(fake, policy=DefaultPolicy(quota=Quota(tokens_per_minute=100))) as client:
        acme = client.for_customer("acme")
        demands: list[Any] = []
        store = client._safe.store
        reserve = store.reserve

        def spy(customer_id: str, quota: Quota, demand: Any, **kwargs: Any) -> Any:
            demands.append(demand)
            return reserve(customer_id, quota, demand, **kwargs)

        store.reserve = spy
        acme.chat.completions.create(**_hello(max_tokens=-(10**9)))
    assert demands and all(d.tokens >= 0 and d.cost_usd >= 0 for d in demands)
