"""Property: whatever shape a chat or Responses request takes, no untrusted text reaches a model
without having been moderated (in this call, or earlier and served from the cache), and a
malformed request gets a clear error (ours or the SDK's), never an unmoderated send.

The oracle below is deliberately independent of safe_openai._extract: it collects every string
a model would read under an untrusted role, by walking the body that was actually sent.
"""

from __future__ import annotations

import contextlib
from typing import Any

import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safe_openai import DefaultPolicy, SafeClient, SafeOpenAIError
from safe_openai.testing import FakeOpenAI

UNTRUSTED = {"user", "tool", "function"}
NOT_CONTENT = {"type", "id", "call_id", "status", "role", "name", "tool_call_id"}


class DenyUnmoderatable(DefaultPolicy):
    """Refuse what moderation cannot read, so the property can be strict."""

    def allow_unmoderatable(self, request: Any, kinds: Any) -> bool:
        return False


FAKE = FakeOpenAI(flag_words={})
CLIENT = SafeClient(
    **FAKE.openai_kwargs(),
    identifier_secret="property-test-secret",
    store="memory://",
    spool=False,
    max_retries=0,
    policy=DenyUnmoderatable(),
).for_customer("prop")

words = st.text(alphabet="abcdefgh ", min_size=1, max_size=12).filter(str.strip)
keys = st.sampled_from(["payload", "deep", "x", "note"])
nested: st.SearchStrategy[Any] = st.recursive(
    words | st.integers() | st.none(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)

chat_part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, words),
    st.builds(
        lambda u: {"type": "image_url", "image_url": {"url": f"https://img.test/{u}"}}, words
    ),
    st.builds(lambda v: {"type": "mystery", "payload": v}, nested),
    nested,
)
chat_content = st.one_of(words, st.lists(chat_part, max_size=3), nested)
chat_message = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(
                ["user", "assistant", "system", "developer", "tool", "function"]
            ),
            "content": chat_content,
        }
    ),
    nested,
)
chat_messages = st.one_of(st.lists(chat_message, min_size=1, max_size=4), nested)

response_part = st.one_of(
    st.builds(lambda t: {"type": "input_text", "text": t}, words),
    st.builds(lambda u: {"type": "input_image", "image_url": f"https://img.test/{u}"}, words),
    st.builds(lambda v: {"type": "strange_part", "payload": v}, nested),
)
response_item = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "developer"]),
            "content": st.one_of(words, st.lists(response_part, max_size=3)),
        }
    ),
    st.builds(lambda o: {"type": "function_call_output", "call_id": "c1", "output": o}, words),
    st.builds(lambda v: {"type": "future_item", "payload": v}, nested),
    nested,
)
response_input = st.one_of(words, st.lists(response_item, max_size=4), nested)


def strings(value: Any) -> list[str]:
    """Every string in a structure, skipping keys that are not content."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, dict):
        return [s for k, v in value.items() if k not in NOT_CONTENT for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def untrusted_chat(body: dict[str, Any]) -> list[str]:
    found: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and message.get("role", "user") in UNTRUSTED:
            found += strings(message.get("content"))
    return found


def untrusted_responses(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return strings(value)
    found: list[str] = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        if item.get("type") in (None, "message"):
            if item.get("role", "user") == "user":
                found += strings(item.get("content"))
        else:
            found += strings(item)
    return found


def check_sent_requests_were_moderated() -> None:
    moderated = set(FAKE.moderation_inputs)
    for request in FAKE.model_requests:
        body = request.json or {}
        texts = (
            untrusted_chat(body)
            if request.path == "/chat/completions"
            else untrusted_responses(body)
        )
        for text in texts:
            assert text in moderated, f"unmoderated text reached {request.path}: {text!r}"


def send(call: Any) -> None:
    with contextlib.suppress(SafeOpenAIError, openai.APIStatusError, TypeError, ValueError):
        call()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=chat_messages, smuggled=st.none() | chat_messages)
def test_chat_requests_of_any_shape_never_send_unmoderated_text(
    messages: Any, smuggled: Any
) -> None:
    extra = {"messages": smuggled} if smuggled is not None else None
    send(
        lambda: CLIENT.chat.completions.create(
            model="gpt-4o-mini", messages=messages, extra_body=extra
        )
    )
    check_sent_requests_were_moderated()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=response_input, instructions=st.none() | words)
def test_responses_requests_of_any_shape_never_send_unmoderated_text(
    value: Any, instructions: Any
) -> None:
    kwargs: dict[str, Any] = {"instructions": instructions} if instructions else {}
    send(lambda: CLIENT.responses.create(model="gpt-4o-mini", input=value, **kwargs))
    check_sent_requests_were_moderated()
