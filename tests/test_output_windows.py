"""The pure core of output moderation: which texts an answer carries, and how a stream's events
are held back in windows and released in order (no network)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safe_openai import ConfigurationError, DefaultPolicy
from safe_openai._output import CARRY_CHARS, OutputWindows, answer_texts


def chat_chunk(content: str | None = None, *, finish: str | None = None, index: int = 0) -> Any:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    return {"choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def text_delta(delta: str, output_index: int = 0) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "output_index": output_index,
        "content_index": 0,
        "delta": delta,
    }


def run(windows: OutputWindows, events: list[Any]) -> tuple[list[Any], list[list[str]]]:
    """Feed events as the stream tap does, judging every due window clean."""
    released: list[Any] = []
    checks: list[list[str]] = []
    for event in events:
        windows.add(event)
        if windows.due:
            checks.append(windows.texts())
            windows.judged()
        released += windows.release()
    windows.end()
    if windows.due:
        checks.append(windows.texts())
        windows.judged()
    released += windows.release()
    return released, checks


def test_chat_answer_texts_are_content_refusal_and_tool_arguments() -> None:
    answer = {
        "choices": [
            {"message": {"content": "Hello", "refusal": None}},
            {"message": {"content": None, "refusal": "I can't"}},
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": '{"a": "b"}'}}],
                }
            },
        ]
    }
    assert answer_texts(answer) == ["Hello", "I can't", '{"a": "b"}']


def test_responses_answer_texts_are_output_text_refusals_and_calls() -> None:
    answer = {
        "output": [
            {"type": "reasoning", "summary": []},
            {
                "type": "message",
                "content": [
                    {"type": "output_text", "text": "One"},
                    {"type": "refusal", "refusal": "No"},
                ],
            },
            {"type": "function_call", "arguments": '{"x": 1}'},
            {"type": "custom_tool_call", "input": "rm it"},
        ]
    }
    assert answer_texts(answer) == ["One", "No", '{"x": 1}', "rm it"]


def test_completions_answer_texts_are_each_choice_text() -> None:
    assert answer_texts({"choices": [{"text": "a b"}, {"text": " "}, {"text": "c"}]}) == [
        "a b",
        "c",
    ]


@pytest.mark.parametrize(
    "odd", [None, 3, "text", {"choices": "x"}, {"choices": [None, 1]}, {"output": [{"x": 1}]}]
)
def test_odd_answers_give_what_is_readable_and_never_raise(odd: object) -> None:
    assert answer_texts(odd) == []


def test_events_are_held_until_their_window_is_judged_and_released_in_order() -> None:
    windows = OutputWindows(chars=10, sentences=None)
    role = chat_chunk("")
    windows.add(role)
    assert windows.release() == [role]  # nothing open: passes at once
    first, second = chat_chunk("Hello "), chat_chunk("world, ")
    windows.add(first)
    assert not windows.due and windows.release() == []  # 6 characters: held
    windows.add(second)
    assert windows.due and windows.release() == []  # 13 characters: due, still held
    assert windows.texts() == ["Hello world, "]
    windows.judged()
    assert windows.release() == [first, second]


def test_sentence_ends_close_a_window_before_its_characters() -> None:
    windows = OutputWindows(chars=1000, sentences=2)
    released, checks = run(
        windows, [chat_chunk("One. Two"), chat_chunk(". Three"), chat_chunk(" four.")]
    )
    # "One. Two. " has two sentence ends only once the space after the second arrives
    assert checks == [["One. Two. Three"], [" Three four."]]
    assert len(released) == 3


def test_a_finish_reason_closes_the_window_and_the_stream_end_closes_the_last() -> None:
    windows = OutputWindows(chars=1000, sentences=None)
    _, checks = run(windows, [chat_chunk("short"), chat_chunk(finish="stop")])
    assert checks == [["short"]]
    windows = OutputWindows(chars=1000, sentences=None)
    _, checks = run(windows, [chat_chunk("no finish chunk")])
    assert checks == [["no finish chunk"]]


def test_the_unfinished_sentence_before_a_window_is_moderated_with_it() -> None:
    windows = OutputWindows(chars=6, sentences=None)
    _, checks = run(windows, [chat_chunk("Fine. I will ki"), chat_chunk("ll you")])
    assert checks == [["Fine. I will ki"], [" I will kill you"]]


def test_the_carried_context_is_bounded() -> None:
    windows = OutputWindows(chars=10, sentences=None)
    _, checks = run(windows, [chat_chunk("x" * 500), chat_chunk("tail")])
    assert checks[1] == ["x" * CARRY_CHARS + "tail"]


def test_choices_are_separate_outputs_moderated_in_one_batch() -> None:
    windows = OutputWindows(chars=5, sentences=None)
    windows.add(chat_chunk("abc", index=0))
    windows.add(chat_chunk("defgh", index=1))
    assert windows.due
    assert windows.texts() == ["abc", "defgh"]


def test_responses_summaries_that_repeat_the_deltas_cost_nothing() -> None:
    text = "Paris is the capital."
    item = {
        "type": "message",
        "content": [{"type": "output_text", "text": text}],
    }
    events = [
        {"type": "response.created", "response": {"output": []}},
        {"type": "response.content_part.added", "part": {"type": "output_text", "text": ""}},
        text_delta("Paris is "),
        text_delta("the capital."),
        {"type": "response.output_text.done", "text": text},
        {"type": "response.content_part.done", "part": {"type": "output_text", "text": text}},
        {"type": "response.output_item.done", "item": item},
        {"type": "response.completed", "response": {"output": [item], "usage": {}}},
    ]
    released, checks = run(OutputWindows(chars=1000, sentences=None), events)
    assert checks == [[text]]  # one window; done, part, item and completed add nothing
    assert released == events


def test_a_summary_that_says_something_new_is_moderated_before_release() -> None:
    item = {"type": "message", "content": [{"type": "output_text", "text": "kill them"}]}
    events = [
        text_delta("Hello."),
        {"type": "response.output_text.done", "text": "Hello."},
        {"type": "response.output_item.done", "item": item},
        {"type": "response.completed", "response": {"output": [item]}},
    ]
    windows = OutputWindows(chars=1000, sentences=None)
    windows.add(events[0])
    windows.add(events[1])
    assert windows.texts() == ["Hello."]
    windows.judged()
    assert windows.release() == events[:2]
    windows.add(events[2])
    assert windows.due and windows.release() == []
    assert windows.texts() == ["kill them"]
    windows.judged()
    windows.add(events[3])  # the same new text again: judged already
    assert not windows.due
    assert windows.release() == events[2:]


def test_text_in_an_early_event_is_never_released_unjudged() -> None:
    windows = OutputWindows(chars=1000, sentences=None)
    created = {
        "type": "response.created",
        "response": {"output": [{"type": "function_call", "arguments": "sneaky"}]},
    }
    windows.add(created)
    assert windows.due and windows.release() == []
    assert windows.texts() == ["sneaky"]


def test_tool_call_argument_deltas_are_windows_too() -> None:
    windows = OutputWindows(chars=4, sentences=None)
    chunk = {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "x"}'}}]},
            }
        ]
    }
    windows.add(chunk)
    assert windows.due and windows.texts() == ['{"q": "x"}']


def test_record_mode_holds_nothing_and_keeps_what_was_said() -> None:
    windows = OutputWindows(chars=1, sentences=1, hold=False)
    for piece in ("a ", "b. ", "c"):
        windows.add(chat_chunk(piece))
        assert windows.release() == []  # nothing held: the tap delivers each event itself
    windows.add({"type": "response.completed", "response": {"output": []}})
    assert windows.said() == ["a b. c"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"output_moderation": "warn"}, "output_moderation"),
        ({"output_window_chars": 0}, "output_window_chars"),
        ({"output_window_chars": True}, "output_window_chars"),
        ({"output_window_sentences": 0}, "output_window_sentences"),
    ],
)
def test_bad_output_settings_are_configuration_errors(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DefaultPolicy(**settings)


def test_a_sentence_end_split_between_deltas_counts() -> None:
    windows = OutputWindows(chars=1000, sentences=1)
    windows.add(chat_chunk("One."))
    assert not windows.due  # a full stop needs the space after it
    windows.add(chat_chunk(" Two"))
    assert windows.due


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(
        st.tuples(
            st.integers(0, 2), st.text(alphabet="ab .!\n", min_size=0, max_size=12), st.booleans()
        ),
        max_size=40,
    ),
    chars=st.integers(1, 30),
    sentences=st.one_of(st.none(), st.integers(1, 3)),
)
def test_no_text_is_released_before_a_window_that_holds_it_was_judged(
    pieces: list[tuple[int, str, bool]], chars: int, sentences: int | None
) -> None:
    """Whatever the chunking: events come out in order, and each released delta's text was
    inside some moderated window of its output by the time it came out."""
    windows = OutputWindows(chars=chars, sentences=sentences)
    events = [
        chat_chunk(text, index=index, finish="stop" if finish else None)
        for index, text, finish in pieces
    ]
    released: list[Any] = []
    judged: dict[int, str] = {}  # per choice: everything moderated so far, windows joined

    def judge() -> None:
        for text in windows.texts():
            assert text.strip()
        for key, output in windows._outputs.items():
            judged[key[1]] = output.said
        windows.judged()

    for event in events:
        windows.add(event)
        if windows.due:
            judge()
        for out in windows.release():
            released.append(out)
            choice = out["choices"][0]
            said = "".join(
                e["choices"][0]["delta"].get("content", "")
                for e in released
                if e["choices"][0]["index"] == choice["index"]
            )
            assert judged.get(choice["index"], "").startswith(said) or not said.strip()
    windows.end()
    if windows.due:
        judge()
    released += windows.release()
    assert released == events


def test_reasoning_summaries_and_text_are_output_too() -> None:
    item = {
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "Thinking about it"}],
        "content": [{"type": "reasoning_text", "text": "step one"}],
    }
    assert answer_texts({"output": [item]}) == ["Thinking about it", "step one"]
    windows = OutputWindows(chars=1000, sentences=None)
    for index, text in ((0, "first summary"), (1, "second summary")):
        windows.add(
            {
                "type": "response.reasoning_summary_text.delta",
                "output_index": 0,
                "summary_index": index,
                "delta": text,
            }
        )
    windows.add({"type": "response.reasoning_summary_text.done", "text": "first summary"})
    assert windows.due and windows.texts() == ["first summary", "second summary"]
