"""Property: whatever the body and whatever spelling of the raw path, no request reaches a model
endpoint (as observed at the mock transport) carrying a text or an image URL that was not
moderated for that very request, or judged earlier by a verdict the docs say may be reused
(texts and ``data:`` URLs, by content; never a remote image URL). Chat, Responses, embeddings,
completions and images; the sync and the async client.

Every piece of content the strategies generate carries a marker (``txt-``, ``img.example``,
``data:image``), so the oracle finds it in the body that was sent by walking every string,
without asking safe_openai where content lives.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable
from typing import Any

import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safe_openai import AsyncSafeClient, DefaultPolicy, SafeClient, SafeOpenAIError
from safe_openai.testing import PNG_BYTES, FakeOpenAI

from .conftest import SECRET

#: Every role moderated, so every marked piece must be moderated wherever it sits.
POLICY = DefaultPolicy(moderate_roles=("user", "tool", "assistant", "system", "developer"))
MARKERS = ("txt-", "img.example", "data:image")

texts = st.builds(
    lambda n, word: f"txt-{n} {word}",
    st.integers(0, 50),  # small, so the cache is hit across examples
    st.sampled_from(["hello", "the weather", "I will kill them", "résumé ✓", "a\nb"]),
)
remote_images = st.builds(lambda n: f"https://img.example/{n}.png", st.integers(0, 5))
data_images = st.builds(
    lambda n: "data:image/png;base64," + base64.b64encode(PNG_BYTES + bytes([n])).decode(),
    st.integers(0, 5),
)
images = st.one_of(remote_images, data_images)


def _chat_part() -> st.SearchStrategy[Any]:
    return st.one_of(
        texts,
        st.builds(lambda t: {"type": "text", "text": t}, texts),
        st.builds(lambda t: {"type": "input_text", "text": t}, texts),
        st.builds(lambda t: {"type": "refusal", "refusal": t}, texts),
        st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, images),
        st.builds(lambda u: {"type": "image_url", "image_url": u}, images),
        st.builds(lambda t: {"type": "brand_new_part", "payload": {"deep": [t]}}, texts),
    )


contents = st.one_of(texts, st.lists(_chat_part(), min_size=1, max_size=3), _chat_part())
roles = st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", None])


@st.composite
def chat_messages(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"content": draw(contents)}
    role = draw(roles)
    if role is not None:
        message["role"] = role
    if draw(st.booleans()):
        message["refusal"] = draw(texts)
    if draw(st.booleans()):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": draw(texts)}}
        message["tool_calls"] = [call]
    return message


def _responses_item() -> st.SearchStrategy[Any]:
    parts = st.one_of(
        st.builds(lambda t: {"type": "input_text", "text": t}, texts),
        st.builds(lambda u: {"type": "input_image", "image_url": u}, images),
        st.builds(lambda t: {"type": "output_text", "text": t}, texts),
    )
    return st.one_of(
        texts,
        st.builds(
            lambda r, c: {"role": r, "content": c},
            st.sampled_from(["user", "assistant", "system", "developer"]),
            st.one_of(texts, st.lists(parts, min_size=1, max_size=3)),
        ),
        st.builds(
            lambda o: {"type": "function_call_output", "call_id": "c1", "output": o},
            st.one_of(texts, st.lists(parts, min_size=1, max_size=2)),
        ),
        st.builds(
            lambda t: {"type": "function_call", "call_id": "c1", "name": "f", "arguments": t},
            texts,
        ),
        st.builds(
            lambda t, u: {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [{"type": "summary_text", "text": t}],
                "content": [{"type": "reasoning_text", "text": u}],
            },
            texts,
            texts,
        ),
        st.builds(lambda t: {"type": "brand_new_item", "data": {"x": t}}, texts),
    )


strings_or_lists = st.one_of(texts, st.lists(texts, min_size=1, max_size=3))

BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/chat/completions": st.builds(
        lambda m: {"model": "gpt-4o-mini", "messages": m},
        st.lists(chat_messages(), min_size=1, max_size=3),
    ),
    "/responses": st.fixed_dictionaries(
        {
            "model": st.just("gpt-4o-mini"),
            "input": st.one_of(texts, st.lists(_responses_item(), min_size=1, max_size=3)),
        },
        optional={
            "instructions": texts,
            "prompt": st.builds(lambda t: {"id": "p1", "variables": {"v": t}}, texts),
        },
    ),
    "/embeddings": st.builds(
        lambda i: {"model": "text-embedding-3-small", "input": i}, strings_or_lists
    ),
    "/completions": st.fixed_dictionaries(
        {"model": st.just("gpt-3.5-turbo-instruct"), "prompt": strings_or_lists},
        optional={"suffix": texts},
    ),
    "/images/generations": st.builds(lambda p: {"model": "gpt-image-1", "prompt": p}, texts),
}

SPELLINGS: list[Callable[[str], str]] = [
    lambda path: path,
    lambda path: path.lstrip("/"),
    lambda path: path + "#",
    lambda path: path + "#x?y",
    lambda path: path + "/",
    lambda path: path + "?stream=false#",
    lambda path: "/v1" + path,
    lambda path: "/./" + path + "/.",
    lambda path: "/v1/" + path,
    lambda path: "/chat/.." + path,
    lambda path: path[:1] + path[1:].replace("/", "%2F"),
    lambda path: path.upper(),
    lambda path: path.replace("/", "\\"),
    lambda path: "http://elsewhere/v1" + path + "#frag",
]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    path = draw(st.sampled_from(sorted(BODIES)))
    spell = draw(st.sampled_from(SPELLINGS))
    return spell(path), draw(BODIES[path])


def _marked(value: object) -> list[str]:
    """Every marked string in a JSON value, wherever it sits."""
    if isinstance(value, str):
        return [value] if any(marker in value for marker in MARKERS) else []
    if isinstance(value, dict):
        return [found for item in value.values() for found in _marked(item)]
    if isinstance(value, list):
        return [found for item in value for found in _marked(item)]
    return []


def _reusable(piece: str) -> bool:
    return not piece.startswith("https://")


def check(fake: FakeOpenAI, before: tuple[int, int], seen_earlier: set[str]) -> None:
    """The oracle: what reached a model in this request was moderated for it (or reusably)."""
    moderated_now = set(fake.moderation_inputs[before[0] :])
    sent = [r for r in fake.requests[before[1] :] if r.path != "/moderations"]
    for request in sent:
        for piece in _marked(request.json):
            assert piece in moderated_now or (_reusable(piece) and piece in seen_earlier), (
                f"{piece!r} reached {request.path} unmoderated"
            )
    seen_earlier.update(moderated_now)


def _marks(fake: FakeOpenAI) -> tuple[int, int]:
    return len(fake.moderation_inputs), len(fake.requests)


SYNC_FAKE = FakeOpenAI()
SYNC_CLIENT = SafeClient(
    **SYNC_FAKE.openai_kwargs(),
    identifier_secret=SECRET,
    store="memory://",
    spool=False,
    max_retries=0,
    policy=POLICY,
).for_customer("acme")
SYNC_SEEN: set[str] = set()

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(requests())
def test_no_unmoderated_content_reaches_a_model_sync(request: tuple[str, dict[str, Any]]) -> None:
    path, body = request
    before = _marks(SYNC_FAKE)
    # blocked, refused or rejected by the fake: what was sent is checked all the same
    with contextlib.suppress(SafeOpenAIError, openai.APIStatusError):
        SYNC_CLIENT.post(path, body=body, cast_to=object)
    check(SYNC_FAKE, before, SYNC_SEEN)


ASYNC_FAKE = FakeOpenAI()
ASYNC_SEEN: set[str] = set()


@PROPERTY
@given(requests())
def test_no_unmoderated_content_reaches_a_model_async(
    request: tuple[str, dict[str, Any]],
) -> None:
    path, body = request

    async def send() -> None:
        async with AsyncSafeClient(
            **ASYNC_FAKE.async_openai_kwargs(),
            identifier_secret=SECRET,
            store="memory://",
            spool=False,
            max_retries=0,
            policy=POLICY,
        ) as client:
            with contextlib.suppress(SafeOpenAIError, openai.APIStatusError):
                await client.for_customer("acme").post(path, body=body, cast_to=object)

    before = _marks(ASYNC_FAKE)
    asyncio.run(send())
    check(ASYNC_FAKE, before, set())  # a fresh client each time: nothing may be reused


def test_the_oracle_catches_an_unmoderated_send() -> None:
    """The property can fail: a plain SDK client's send is caught."""
    fake = FakeOpenAI()
    plain = openai.OpenAI(**fake.openai_kwargs())
    plain.post("/embeddings", body={"model": "m", "input": "txt-1 hello"}, cast_to=object)
    try:
        check(fake, (0, 0), set())
    except AssertionError:
        return
    raise AssertionError("the oracle let an unmoderated send through")
