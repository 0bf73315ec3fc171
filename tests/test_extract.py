"""Where untrusted content is found in each endpoint's request body."""

from __future__ import annotations

from typing import Any

import pytest

from safe_openai._extract import (
    extract,
    is_unguarded_content_path,
    normalize_path,
    resolve_endpoint,
)

DEFAULT_ROLES = frozenset({"user", "tool"})


def pieces(path: str, body: dict[str, Any], roles: frozenset[str] = DEFAULT_ROLES) -> list[str]:
    spec = resolve_endpoint(path)
    assert spec is not None
    return [p.value for p in extract(spec, body, roles).pieces]


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("/chat/completions", "/chat/completions"),
        ("https://api.openai.com/v1/chat/completions", "/chat/completions"),
        ("/responses?beta=true", "/responses"),
        ("/conversations/conv_1/items", "/conversations/conv_1/items"),
        ("http://fake/v1/embeddings/", "/embeddings"),
    ],
)
def test_normalize_path_strips_base_query_and_slash(url: str, path: str) -> None:
    assert normalize_path(url) == path


def test_chat_user_and_tool_content_is_moderated_but_system_is_not() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "model said"},
            {"role": "tool", "tool_call_id": "t", "content": "tool out"},
            {"role": "function", "name": "f", "content": "legacy fn out"},
        ]
    }
    assert pieces("/chat/completions", body) == ["hello", "tool out", "legacy fn out"]


def test_chat_parts_text_and_images_both_extracted() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                    {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}},
                ],
            }
        ]
    }
    spec = resolve_endpoint("/chat/completions")
    assert spec is not None
    out = extract(spec, body, DEFAULT_ROLES)
    assert [(p.kind, p.value) for p in out.pieces] == [
        ("text", "look"),
        ("image", "data:image/png;base64,AAA"),
    ]
    assert out.unmoderatable == ["audio"]


def test_policy_roles_decide_what_counts_as_untrusted() -> None:
    body = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u"}]}
    assert pieces("/chat/completions", body, frozenset({"system"})) == ["sys"]


def test_assistant_tool_call_arguments_moderated_only_when_role_listed() -> None:
    body = {
        "messages": [
            {
                "role": "assistant",
                "tool_calls": [{"id": "1", "type": "function", "function": {"arguments": "{}x"}}],
            }
        ]
    }
    assert pieces("/chat/completions", body) == []
    assert pieces("/chat/completions", body, frozenset({"assistant"})) == ["{}x"]


def test_responses_input_string_items_tool_outputs_and_prompt_variables() -> None:
    body = {
        "instructions": "dev instructions",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "q1"}]},
            {"type": "message", "role": "user", "content": "q2"},
            {"type": "function_call_output", "call_id": "c", "output": "fn result"},
            {
                "type": "computer_call_output",
                "call_id": "c",
                "output": {"type": "computer_screenshot", "image_url": "https://img/x.png"},
            },
            {"type": "item_reference", "id": "msg_1"},
            {
                "type": "custom_tool_call_output",
                "call_id": "c",
                "output": [{"type": "input_text", "text": "custom out"}],
            },
        ],
        "prompt": {"id": "p", "variables": {"name": "var text"}},
    }
    assert pieces("/responses", body) == [
        "q1",
        "q2",
        "fn result",
        "https://img/x.png",
        "custom out",
        "var text",
    ]
    assert pieces("/responses", {"input": "plain"}) == ["plain"]


def test_unknown_item_types_cannot_smuggle_text() -> None:
    body = {"input": [{"type": "future_tool_output", "payload": {"deep": ["hidden text"]}}]}
    assert pieces("/responses", body) == ["hidden text"]


@pytest.mark.parametrize(
    ("path", "body", "expected", "opaque"),
    [
        ("/completions", {"prompt": ["a", "b"], "suffix": "c"}, ["a", "b", "c"], []),
        ("/completions", {"prompt": [1, 2, 3]}, [], ["token_ids"]),
        ("/completions", {"prompt": [[1, 2], [3]]}, [], ["token_ids"]),
        ("/embeddings", {"input": "emb"}, ["emb"], []),
        ("/images/generations", {"prompt": "draw"}, ["draw"], []),
        ("/images/edits", {"prompt": "edit"}, ["edit"], ["image_file"]),
        ("/audio/speech", {"input": "say", "instructions": "calm"}, ["say", "calm"], []),
        ("/audio/transcriptions", {"prompt": "hint"}, ["hint"], ["audio"]),
        ("/conversations/c1/items", {"items": [{"role": "user", "content": "x"}]}, ["x"], []),
        ("/threads/t1/messages", {"role": "user", "content": "thread msg"}, ["thread msg"], []),
        ("/videos", {"prompt": "a cat"}, ["a cat"], []),
    ],
)
def test_other_endpoints(
    path: str, body: dict[str, Any], expected: list[str], opaque: list[str]
) -> None:
    spec = resolve_endpoint(path)
    assert spec is not None
    out = extract(spec, body, DEFAULT_ROLES)
    assert [p.value for p in out.pieces] == expected
    assert out.unmoderatable == opaque


@pytest.mark.parametrize(
    "body",
    [
        {"messages": "not a list"},
        {"messages": [None, 3, "x", {"role": "user", "content": 12}]},
        {"messages": [{"role": "user", "content": [None, 5, {"type": "text"}]}]},
        {"input": {"weird": True}},
        {},
    ],
)
def test_malformed_bodies_never_crash_extraction(body: dict[str, Any]) -> None:
    for path in ("/chat/completions", "/responses"):
        spec = resolve_endpoint(path)
        assert spec is not None
        extract(spec, body, DEFAULT_ROLES)


def test_paths_without_content_pass_and_uncovered_content_paths_are_known() -> None:
    assert resolve_endpoint("/moderations") is None
    assert resolve_endpoint("/files") is None
    assert is_unguarded_content_path("/realtime/client_secrets")
    assert not is_unguarded_content_path("/files")


def test_input_chars_counts_trusted_text_too() -> None:
    spec = resolve_endpoint("/chat/completions")
    assert spec is not None
    out = extract(
        spec,
        {"messages": [{"role": "system", "content": "12345"}, {"role": "user", "content": "123"}]},
        DEFAULT_ROLES,
    )
    assert out.input_chars == 8
