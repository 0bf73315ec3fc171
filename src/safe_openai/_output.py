"""What a model said: the text of each endpoint's answers and stream events, and the windows a
stream is held back in while that text is moderated. No I/O.

Moderated output is the text a caller receives from the model: chat message ``content`` and
``refusal`` and tool-call ``arguments``; Responses ``output_text`` and ``refusal`` parts,
``function_call`` arguments, ``custom_tool_call`` input and reasoning summaries and text;
completions ``text``. Answers are
read as the SDK's objects or as JSON dicts (raw responses), whichever arrives.

A stream moderated in ``"block"`` mode goes through :class:`OutputWindows`: each event that
carries text (a delta, or a summary such as ``response.output_text.done`` that repeats it) is
held, in order with the events around it, until every text it carries has been judged. A
window closes at :attr:`OutputWindows.chars` characters or :attr:`OutputWindows.sentences`
sentence ends in one output (a choice, a content part, a tool call's arguments), when that
output ends, or when the stream does; the client then moderates the open text of every output
at once and releases what was held. Summary events whose text equals what the deltas spelled
out cost nothing more; a summary that says something else is moderated on its own.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CARRY_CHARS",
    "OutputMode",
    "OutputWindows",
    "answer_texts",
]

#: What a policy does with a call's output: ``"record"`` the violation and return the output,
#: or ``"block"`` it (the caller never receives flagged text).
OutputMode = Literal["record", "block"]

#: A window is moderated together with the unfinished sentence before it (at most this many
#: characters of it), so a word or phrase cut between two windows is still seen whole.
CARRY_CHARS = 120

_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(?=\s)|\n")

# Responses stream events whose ``delta`` is output text, and the family it belongs to.
_DELTAS = {
    "response.output_text.delta": "text",
    "response.refusal.delta": "refusal",
    "response.function_call_arguments.delta": "arguments",
    "response.custom_tool_call_input.delta": "input",
    "response.reasoning_summary_text.delta": "summary",
    "response.reasoning_text.delta": "reasoning",
}
# Responses "done" events and the field that repeats the whole text.
_DONE_FIELDS = {
    "response.output_text.done": "text",
    "response.refusal.done": "refusal",
    "response.function_call_arguments.done": "arguments",
    "response.custom_tool_call_input.done": "input",
    "response.reasoning_summary_text.done": "text",
    "response.reasoning_text.done": "text",
}


def _get(value: Any, name: str) -> Any:
    """A field of a JSON dict or an SDK object (``None`` when absent)."""
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _add(out: list[str], value: Any) -> None:
    if isinstance(value, str) and value.strip():
        out.append(value)


def _content(value: Any, out: list[str]) -> None:
    """A message ``content``: a string or a list of text parts."""
    if isinstance(value, str):
        _add(out, value)
        return
    for part in _items(value):
        _part(part, out)


def _part(part: Any, out: list[str]) -> None:
    """A content part: ``output_text`` / ``text`` parts by their text, refusals by theirs."""
    if isinstance(part, str):
        _add(out, part)
        return
    _add(out, _get(part, "text"))
    _add(out, _get(part, "refusal"))


def _chat_message(message: Any, out: list[str]) -> None:
    _content(_get(message, "content"), out)
    _add(out, _get(message, "refusal"))
    for call in _items(_get(message, "tool_calls")):
        _add(out, _get(_get(call, "function"), "arguments"))
        _add(out, _get(_get(call, "custom"), "input"))
    _add(out, _get(_get(message, "function_call"), "arguments"))


def _output_item(item: Any, out: list[str]) -> None:
    """A Responses output item (message, function call, custom tool call)."""
    kind = _get(item, "type")
    if kind == "message" or (kind is None and _get(item, "content") is not None):
        for part in _items(_get(item, "content")):
            _part(part, out)
    elif kind == "function_call":
        _add(out, _get(item, "arguments"))
    elif kind == "custom_tool_call":
        _add(out, _get(item, "input"))
    elif kind == "reasoning":
        for part in [*_items(_get(item, "summary")), *_items(_get(item, "content"))]:
            _part(part, out)


def answer_texts(answer: Any) -> list[str]:
    """The texts the model returned in a non-streamed answer (a chat completion, a response or
    a completion; an SDK object or its JSON), in order. Odd shapes give what is readable."""
    out: list[str] = []
    for choice in _items(_get(answer, "choices")):
        message = _get(choice, "message")
        if message is not None:
            _chat_message(message, out)
        _add(out, _get(choice, "text"))
    for item in _items(_get(answer, "output")):
        _output_item(item, out)
    return out


@dataclass(slots=True)
class _Output:
    """One output of a stream: what it said so far and what is not judged yet."""

    @property
    def said(self) -> str:
        """Everything this output said so far."""
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    parts: list[str] = field(default_factory=list)
    open: str = ""
    carry: str = ""
    sentences: int = 0


class OutputWindows:
    """The held-back events of one stream moderated in ``"block"`` mode.

    Feed each event to :meth:`add`. When :attr:`due` is true, moderate :meth:`texts` and call
    :meth:`judged` if nothing blocks; then :meth:`release` gives the events that may be
    delivered, in order. :meth:`end` closes the last window when the stream ends.

    Args:
        chars: Characters of one output that close a window.
        sentences: Sentence ends in one output that close a window (``None``: characters only).
        hold: Hold events back (``"block"``); ``False`` only notes what was said, for
            ``"record"``, which moderates :meth:`said` once when the stream ends.
    """

    def __init__(self, *, chars: int, sentences: int | None, hold: bool = True) -> None:
        self.hold = hold
        self.chars = chars
        self.sentences = sentences
        self._outputs: dict[Hashable, _Output] = {}
        self._held: list[Any] = []
        self._extra: list[str] = []
        self._judged_extra: set[str] = set()
        self._due = False
        self._closing = False
        #: Windows moderated so far (for tests and logs).
        self.windows = 0

    @property
    def due(self) -> bool:
        """Whether held text must be moderated before anything more is released."""
        return self._due

    @property
    def closing(self) -> bool:
        """Whether the due window closed because an output or the stream ended: what follows
        is the answer's tail (its usage), not more generated text."""
        return self._closing

    @property
    def held(self) -> int:
        """Events held back now."""
        return len(self._held)

    def add(self, event: Any) -> None:
        """Take one event of the stream (it is held until its text is judged)."""
        deltas, ended, summaries = _read_event(event)
        if not self.hold:
            for key, text in deltas:
                self._outputs.setdefault(key, _Output()).parts.append(text)
            self._note(summaries)
            return
        self._held.append(event)
        for key, text in deltas:
            output = self._outputs.setdefault(key, _Output())
            output.parts.append(text)
            output.open += text
            # counted over the whole open window: a sentence end split between deltas counts
            output.sentences = len(_SENTENCE_END.findall(output.open))
            if len(output.open) >= self.chars or (
                self.sentences is not None and output.sentences >= self.sentences
            ):
                self._due = True
        if ended and self._open():
            self._due = self._closing = True
        if self._note(summaries):
            self._due = True

    def _note(self, summaries: list[str]) -> bool:
        """Keep the summary texts that differ from what was said; whether there were any."""
        if not summaries:
            return False
        said = {output.said for output in self._outputs.values()}
        new = False
        for text in summaries:
            if text not in said and text not in self._extra and text not in self._judged_extra:
                self._extra.append(text)
                new = True
        return new

    def end(self) -> None:
        """The stream ended: whatever is open must be judged before the rest is released."""
        if self._open() or self._extra:
            self._due = self._closing = True

    def texts(self) -> list[str]:
        """What to moderate now: each open window with the unfinished sentence before it, and
        summary texts that differ from what the deltas said."""
        found = [o.carry + o.open for o in self._outputs.values() if o.open.strip()]
        return found + [text for text in self._extra if text.strip()]

    def judged(self) -> None:
        """:meth:`texts` passed moderation: close the open windows."""
        for output in self._outputs.values():
            if output.open:
                output.carry = _unfinished(output.carry + output.open)
                output.open = ""
                output.sentences = 0
        self._judged_extra.update(self._extra)
        self._extra.clear()
        self._due = self._closing = False
        self.windows += 1

    def release(self) -> list[Any]:
        """The held events that may be delivered now (all of them, once nothing is open)."""
        if self._due or self._open():
            return []
        released, self._held = self._held, []
        return released

    def _open(self) -> bool:
        return any(output.open for output in self._outputs.values())

    def said(self) -> list[str]:
        """Every output's whole text so far (what ``"record"`` mode moderates at the end)."""
        return [o.said for o in self._outputs.values() if o.said.strip()] + [
            text for text in self._extra if text.strip()
        ]


def _unfinished(text: str) -> str:
    """The end of ``text`` after its last sentence end, at most :data:`CARRY_CHARS` long."""
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    tail = text[ends[-1] :] if ends else text
    if len(tail) > CARRY_CHARS:
        tail = tail[-CARRY_CHARS:]
    return tail


Delta = tuple[Hashable, str]


def _read_event(event: Any) -> tuple[list[Delta], bool, list[str]]:
    """An event's text deltas by output, whether an output ended, and the whole texts it
    repeats (summaries)."""
    kind = _get(event, "type")
    if isinstance(kind, str) and kind.startswith("response."):
        return _read_responses_event(event, kind)
    deltas: list[Delta] = []
    ended = False
    for position, choice in enumerate(_items(_get(event, "choices"))):
        index = _get(choice, "index")
        index = index if isinstance(index, int) else position
        delta = _get(choice, "delta")
        if delta is not None:
            _chat_delta(index, delta, deltas)
        text = _get(choice, "text")
        if isinstance(text, str) and text:
            deltas.append((("text", index), text))
        if _get(choice, "finish_reason") is not None:
            ended = True
    return deltas, ended, []


def _chat_delta(index: int, delta: Any, deltas: list[Delta]) -> None:
    content = _get(delta, "content")
    if isinstance(content, str) and content:
        deltas.append((("content", index), content))
    else:
        for position, part in enumerate(_items(content)):
            text = _get(part, "text") if not isinstance(part, str) else part
            if isinstance(text, str) and text:
                deltas.append((("content", index, position), text))
    refusal = _get(delta, "refusal")
    if isinstance(refusal, str) and refusal:
        deltas.append((("refusal", index), refusal))
    for position, call in enumerate(_items(_get(delta, "tool_calls"))):
        number = _get(call, "index")
        number = number if isinstance(number, int) else position
        arguments = _get(_get(call, "function"), "arguments")
        if isinstance(arguments, str) and arguments:
            deltas.append((("tool", index, number), arguments))
    arguments = _get(_get(delta, "function_call"), "arguments")
    if isinstance(arguments, str) and arguments:
        deltas.append((("function", index), arguments))


def _read_responses_event(event: Any, kind: str) -> tuple[list[Delta], bool, list[str]]:
    family = _DELTAS.get(kind)
    if family is not None:
        delta = _get(event, "delta")
        place = _get(event, "summary_index" if family == "summary" else "content_index")
        key = (family, _get(event, "output_index"), place)
        return ([(key, delta)] if isinstance(delta, str) and delta else []), False, []
    summaries: list[str] = []
    field = _DONE_FIELDS.get(kind)
    if field is not None:
        _add(summaries, _get(event, field))
    part = _get(event, "part")
    if part is not None:
        _part(part, summaries)
    item = _get(event, "item")
    if item is not None:
        _output_item(item, summaries)
    response = _get(event, "response")
    if response is not None:
        for output in _items(_get(response, "output")):
            _output_item(output, summaries)
    ended = kind.endswith(".done") or kind in _ENDINGS
    return [], ended, summaries


_ENDINGS = frozenset({"response.completed", "response.incomplete", "response.failed"})
