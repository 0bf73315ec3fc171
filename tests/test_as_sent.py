"""The guard inspects a body exactly as the SDK's JSON encoding will send it."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pydantic
from hypothesis import given
from hypothesis import strategies as st
from openai._utils._json import openapi_dumps

from safe_openai._client import _as_sent

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=5)
    | st.floats(allow_nan=False, allow_infinity=False)
)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


class Part(pydantic.BaseModel):
    type: str
    text: str
    note: str | None = None


@given(values)
def test_same_as_the_sdk_encoding(value: Any) -> None:
    assert _as_sent(value) == json.loads(openapi_dumps(value))


def test_plain_json_comes_back_as_the_same_object() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "n": 1}
    assert _as_sent(body) is body


def test_models_tuples_and_datetimes_become_what_is_sent() -> None:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    body = {"messages": (Part(type="text", text="hi"),), "metadata": {"at": when}}
    assert _as_sent(body) == {
        "messages": [{"type": "text", "text": "hi"}],
        "metadata": {"at": "2026-01-01T00:00:00+00:00"},
    }
