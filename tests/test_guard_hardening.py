"""Issue 10's guard-side defects, each pinned: path spellings, remote image verdicts, cancelled
calls, incomplete moderation answers, unpriced models under a cost quota, reasoning items, and
the smaller ones (secrets, quotas, ids, URLs, thresholds, local refusals, fail-open, spool)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from safe_openai import (
    AsyncSafeClient,
    DefaultPolicy,
    ModerationBlocked,
    SafeClient,
    UnguardedPathError,
)
from safe_openai._identity import safety_identifier
from safe_openai.testing import FakeOpenAI

from .conftest import SECRET, make_async_client, make_client

BAD = "I will kill them all"
SID = safety_identifier(SECRET.encode(), "acme")

BODIES: dict[str, dict[str, Any]] = {
    "/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": BAD}]},
    "/responses": {"model": "gpt-4o-mini", "input": BAD},
    "/embeddings": {"model": "text-embedding-3-small", "input": BAD},
    "/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": BAD},
    "/images/generations": {"model": "gpt-image-1", "prompt": BAD},
}

SPELLINGS: dict[str, Callable[[str], str]] = {
    "plain": lambda path: path,
    "fragment": lambda path: path + "#",
    "named-fragment": lambda path: path + "#part",
    "slash-fragment": lambda path: path + "/#",
    "query-fragment": lambda path: path + "?x=1#",
    "base-fragment": lambda path: "/v1" + path + "#",
    "dot": lambda path: "/." + path,
    "double-slash": lambda path: "/v1/" + path,
    "other-host": lambda path: "//elsewhere" + path,
    "absolute": lambda path: "http://elsewhere/v1" + path + "#",
    "trailing-dot": lambda path: path + "/.",
    "dot-dot": lambda path: "/chat/.." + path,
    "trailing-slash": lambda path: path + "/",
    "escaped-slash": lambda path: path[:1] + path[1:].replace("/", "%2F"),
    "upper-case": lambda path: path.upper(),
    "backslash": lambda path: path.replace("/", "\\"),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("path", list(BODIES))
def test_every_spelling_of_a_model_path_is_guarded(
    fake: FakeOpenAI, path: str, spelling: str
) -> None:
    """Defect 1: the guard classifies the URL the SDK will send (the fragment dropped, dot
    segments, slashes, escapes and case folded), so no spelling reaches a model unmoderated."""
    with make_client(fake) as client, pytest.raises(ModerationBlocked):
        client.for_customer("acme").post(
            SPELLINGS[spelling](path), body=BODIES[path], cast_to=object
        )
    assert fake.model_requests == []


@pytest.mark.parametrize("path", list(BODIES))
async def test_async_fragment_paths_are_guarded(fake: FakeOpenAI, path: str) -> None:
    async with make_async_client(fake) as client:
        with pytest.raises(ModerationBlocked):
            await client.for_customer("acme").post(path + "#", body=BODIES[path], cast_to=object)
        clean = {**BODIES[path]}
        for key in ("input", "prompt"):
            if key in clean:
                clean[key] = "hello"
        if "messages" in clean:
            clean["messages"] = [{"role": "user", "content": "hello"}]
        await client.for_customer("acme").post(path + "#", body=clean, cast_to=object)
    sent = fake.model_requests
    assert len(sent) == 1
    assert SID in (sent[0].json or {}).values()


def test_unknown_post_path_is_refused_unless_the_policy_allows_it(fake: FakeOpenAI) -> None:
    """Defect 1: a POST to a path the guard does not know follows the unguarded-path rule."""
    with make_client(fake) as client, pytest.raises(UnguardedPathError, match="/brand_new"):
        client.post("/brand_new/thing", body={"input": BAD}, cast_to=object)
    assert fake.requests == []

    class AllowNew(DefaultPolicy):
        def allow_unguarded(self, endpoint: str) -> bool:
            return endpoint == "/brand_new/thing"

    with make_client(fake, policy=AllowNew()) as client, pytest.raises(Exception) as caught:
        client.post("/brand_new/thing#", body={"input": "x"}, cast_to=object)
    assert not isinstance(caught.value, UnguardedPathError)  # sent: the fake answers 404
    assert [r.path for r in fake.requests] == ["/brand_new/thing"]


def test_known_administrative_posts_still_pass(client: SafeClient, fake: FakeOpenAI) -> None:
    client.post(
        "/moderations", body={"model": "omni-moderation-latest", "input": "x"}, cast_to=object
    )
    assert [r.path for r in fake.requests] == ["/moderations"]


async def test_async_unknown_post_path_is_refused(
    aclient: AsyncSafeClient, fake: FakeOpenAI
) -> None:
    with pytest.raises(UnguardedPathError):
        await aclient.post("/brand_new#", body={"input": BAD}, cast_to=object)
    assert fake.requests == []
