"""Guarded Responses WebSocket sessions: ``client.responses.connect()`` and its beta twin.

Every ``response.create`` event takes the same flow as an HTTP call to ``/responses`` (customer,
standing, policy, quota, moderation, tagging) before it is queued or sent, and every
``response.steer`` has its input moderated. Incoming events are watched, lane by lane
(``stream_id``): ``response.created`` binds a sent call to its response id, and the terminal
events carry its usage. Responses the server starts by itself (the successors of a steer) are
recorded for the customer of the response they continue. Closing the connection records what is
still open as an estimate.

The decisions are flows, as in :mod:`safe_openai._guard`; :class:`SocketSession` only keeps the
bookkeeping, under a lock, because a sync connection is often read on one thread and written on
another.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Mapping
from datetime import datetime, timezone
from typing import Any

from . import telemetry
from ._extract import RESPONSES_STEER, resolve_endpoint
from ._guard import Call, Flow, GuardState, begin, finish
from ._log import get_logger
from .errors import UnguardedPathError
from .usage import Outcome, TokenUsage, token_usage_from_payload

__all__ = [
    "SocketSession",
    "closing",
    "given_up",
    "incoming",
    "outgoing",
    "register",
    "sent_steer",
    "unsent",
]

log = get_logger()

#: The endpoint a ``response.create`` event is guarded as; policies see the same path as HTTP.
CREATE_PATH = "/responses"
#: The endpoint of ``response.steer`` events (no HTTP twin).
STEER_PATH = "/responses/steer"

_TERMINAL: dict[str, Outcome] = {
    "response.completed": "ok",
    "response.incomplete": "ok",
    "response.failed": "error",
}
_STEER_KEYS = ("type", "previous_response_id", "input")
#: How many finished responses a session remembers, to find whose a successor is.
_REMEMBERED = 1024


class SocketSession:
    """The guard's bookkeeping for one WebSocket connection.

    Args:
        state: The client's shared guard state.
        customer_id: The customer the connecting client is bound to, if any.
    """

    def __init__(self, state: GuardState, customer_id: str | None) -> None:
        self.state = state
        self.customer_id = customer_id
        #: The connection was opened (a call left open at close was then probably sent).
        self.opened = False
        #: Held from a call's registration to its write on the socket, so calls are registered
        #: in the order they go out (sync connections; async ones use :attr:`async_sending`).
        self.sending = threading.Lock()
        self._async_sending: asyncio.Lock | None = None
        self._lock = threading.Lock()
        self._sent: dict[str | None, deque[Call]] = {}  # by lane, awaiting response.created
        self._frames: dict[int, str | bytes] = {}  # id(call) -> the frame sent for it
        self._open: dict[str, Call] = {}  # by response id
        self._live: dict[str | None, Call] = {}  # by lane: the response streaming now
        self._output_chars: dict[int, int] = {}  # by id(call)
        self._owners: OrderedDict[str, Call] = OrderedDict()  # response id -> its call
        self._steered: set[str] = set()  # responses a steer was sent for

    @property
    def async_sending(self) -> asyncio.Lock:
        """:attr:`sending` for async connections (made on first use, inside the loop)."""
        if self._async_sending is None:
            self._async_sending = asyncio.Lock()
        return self._async_sending

    def sent(self, call: Call, lane: str | None, frame: str | bytes) -> None:
        """``call``'s event goes out now (call under :attr:`sending`)."""
        with self._lock:
            self._sent.setdefault(lane, deque()).append(call)
            self._frames[id(call)] = frame

    def steered(self, response_id: object) -> None:
        if isinstance(response_id, str):
            with self._lock:
                self._steered.add(response_id)

    def forget(self, call: Call) -> None:
        """A call whose event never reached the socket."""
        with self._lock:
            self._frames.pop(id(call), None)
            for waiting in self._sent.values():
                if call in waiting:
                    waiting.remove(call)

    def created(self, lane: str | None, response: Mapping[str, Any]) -> Call:
        """Bind ``response`` to its call: the oldest waiting on its lane, unless the response
        continues one that was steered and no waiting call asked for that (then the server
        started it by itself: a successor)."""
        response_id = str(response.get("id") or "")
        parent_id = response.get("previous_response_id")
        with self._lock:
            waiting = self._sent.get(lane)
            call: Call | None = None
            if waiting:
                asked = next(
                    (c for c in waiting if c.body.get("previous_response_id") == parent_id), None
                )
                if asked is not None and parent_id is not None:
                    call = asked
                elif parent_id is None or parent_id not in self._steered:
                    call = waiting[0]
                if call is not None:
                    waiting.remove(call)
                    self._frames.pop(id(call), None)
            if call is None:
                call = self._successor(lane, response)
            self._open[response_id] = call
            self._live[lane] = call
            self._owners[response_id] = call
            while len(self._owners) > _REMEMBERED:
                self._owners.popitem(last=False)
            return call

    def _successor(self, lane: str | None, response: Mapping[str, Any]) -> Call:
        parent_id = response.get("previous_response_id")
        parent = self._owners.get(parent_id) if isinstance(parent_id, str) else None
        parent = parent or self._live.get(lane)
        model = response.get("model")
        spec = resolve_endpoint(CREATE_PATH)
        assert spec is not None
        return Call(
            spec=spec,
            endpoint=CREATE_PATH,
            customer_id=parent.customer_id if parent else self.customer_id,
            model=model if isinstance(model, str) else (parent.model if parent else None),
            body={},
            created_at=datetime.now(timezone.utc),
            started=time.perf_counter(),
        )

    def output(self, lane: str | None, characters: int) -> None:
        with self._lock:
            call = self._live.get(lane)
            if call is not None:
                self._output_chars[id(call)] = self._output_chars.get(id(call), 0) + characters

    def ended(self, response_id: str) -> tuple[Call | None, int]:
        with self._lock:
            call = self._open.pop(response_id, None)
            if call is None:
                return None, 0
            for lane, live in list(self._live.items()):
                if live is call:
                    del self._live[lane]
            return call, self._output_chars.pop(id(call), 0)

    def failed(self, lane: str | None, *, streaming: bool) -> tuple[Call | None, int]:
        """The call an ``error`` event ends: the response streaming on the lane when the error
        came from inside it (it carries a ``sequence_number``), else the oldest call still
        waiting there for its ``response.created``."""
        with self._lock:
            live = self._live.get(lane) if streaming else None
            if live is not None:
                del self._live[lane]
                for response_id, call in list(self._open.items()):
                    if call is live:
                        del self._open[response_id]
                return live, self._output_chars.pop(id(live), 0)
            waiting = self._sent.get(lane)
            if not waiting:
                return None, 0
            call = waiting.popleft()
            self._frames.pop(id(call), None)
            return call, 0

    def take_unsent(self, frames: Collection[str | bytes]) -> list[Call]:
        """The waiting calls whose frames are among ``frames`` (the SDK gave up on them)."""
        left = set(frames)
        with self._lock:
            taken = []
            for waiting in self._sent.values():
                for call in list(waiting):
                    if self._frames.get(id(call)) in left:
                        waiting.remove(call)
                        self._frames.pop(id(call), None)
                        taken.append(call)
            return taken

    def model_of(self, response_id: object) -> str | None:
        with self._lock:
            call = self._owners.get(response_id) if isinstance(response_id, str) else None
            return call.model if call else None

    def drain(self, unsent: Collection[str | bytes] = ()) -> list[tuple[Call, int, bool]]:
        """Every call still open, emptied out (the connection is closing), each with its output
        characters and whether its frame is among ``unsent`` (never left this process)."""
        left = set(unsent)
        with self._lock:
            calls = [call for waiting in self._sent.values() for call in waiting]
            calls += self._open.values()
            drained = [
                (
                    call,
                    self._output_chars.pop(id(call), 0),
                    self._frames.pop(id(call), None) in left,
                )
                for call in calls
            ]
            self._sent.clear()
            self._open.clear()
            self._live.clear()
            return drained


#: What :meth:`Policy.allow_unguarded` is asked about a frame that is not a JSON event.
RAW_FRAME = f"wss:{CREATE_PATH}#raw"


def _event(data: str | bytes) -> dict[str, Any] | None:
    """The JSON event ``data`` carries, or ``None`` when it is not one."""
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    return event


def outgoing(session: SocketSession, data: str | bytes) -> Flow[tuple[str | bytes, Call | None]]:
    """Guard one outgoing message. Returns what to send instead and its call, if any; the
    caller registers a ``response.create`` call (:func:`register`) as it writes the frame.

    Raises:
        ModerationBlocked, CustomerSuspended, PolicyDenied, QuotaExceeded, ...: as for HTTP.
        UnguardedPathError: a message that is not an event this guard understands.
    """
    event = _event(data)
    state = session.state
    if event is None:
        if not state.policy.allow_unguarded(RAW_FRAME):
            raise UnguardedPathError(
                "A WebSocket message that is not a JSON event cannot be moderated, so it was not "
                f"sent; allow {RAW_FRAME!r} in the policy (Policy.allow_unguarded) if that is "
                "intended."
            )
        log.warning("safe_openai.unguarded_event_allowed", endpoint=RAW_FRAME)
        return data, None
    kind = event["type"]
    if kind == "response.create":
        body = {key: value for key, value in event.items() if key != "type"}
        flow = begin(state, bound_customer=session.customer_id, path=CREATE_PATH, body=body)
        call = yield from telemetry.watch_begin(
            flow, path=CREATE_PATH, body=body, customer_id=session.customer_id
        )
        assert call is not None
        return json.dumps({"type": kind, **body}), call
    if kind == "response.steer":
        # Policies see the model of the response being steered; only the input is sent on.
        body = {"input": event.get("input")}
        model = session.model_of(event.get("previous_response_id"))
        if model is not None:
            body["model"] = model
        call = yield from begin(
            state,
            bound_customer=session.customer_id,
            path=STEER_PATH,
            body=body,
            spec=RESPONSES_STEER,
        )
        session.steered(event.get("previous_response_id"))
        return json.dumps({key: event[key] for key in _STEER_KEYS if key in event}), call
    endpoint = f"wss:{CREATE_PATH}#{kind}"
    if not state.policy.allow_unguarded(endpoint):
        raise UnguardedPathError(
            f"safe_openai does not know the WebSocket event {kind!r}, so it cannot be "
            "moderated; allow it in the policy (Policy.allow_unguarded) if that is intended."
        )
    log.warning("safe_openai.unguarded_event_allowed", endpoint=endpoint)
    return data, None


def register(session: SocketSession, call: Call | None, frame: str | bytes) -> None:
    """Note a guarded ``response.create`` as it is written (under :attr:`SocketSession.sending`),
    so its response finds it; steers and unguarded events need no answer."""
    if call is not None and call.spec is not RESPONSES_STEER:
        lane = call.body.get("stream_id")
        session.sent(call, lane if isinstance(lane, str) else None, frame)


def sent_steer(session: SocketSession, call: Call) -> Flow[None]:
    """A steer went out: it is recorded at once (its tokens count in the response it feeds)."""
    yield from _finish(session.state, call, outcome="ok", usage=TokenUsage(), request_id=None)


def unsent(session: SocketSession, call: Call) -> Flow[None]:
    """The socket refused a guarded event: record it as an error, release its reservation."""
    session.forget(call)
    yield from _finish(session.state, call, outcome="error", usage=None, request_id=None)


def incoming(session: SocketSession, message: str | bytes) -> Flow[None]:
    """Account for one incoming event: bind, count output, record usage at the end."""
    try:
        event = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(event, dict):
        return
    kind = event.get("type")
    lane = event.get("stream_id")
    lane = lane if isinstance(lane, str) else None
    if kind == "response.output_text.delta":
        delta = event.get("delta")
        if isinstance(delta, str):
            session.output(lane, len(delta))
        return
    response = event.get("response")
    if kind == "response.created" and isinstance(response, dict):
        session.created(lane, response)
        return
    if kind in _TERMINAL and isinstance(response, dict):
        call, characters = session.ended(str(response.get("id") or ""))
        if call is not None:
            yield from _finish(
                session.state,
                call,
                outcome=_TERMINAL[kind],
                usage=token_usage_from_payload(response),
                request_id=None,
                output_chars=characters,
            )
        return
    if kind == "error":
        call, characters = session.failed(lane, streaming="sequence_number" in event)
        if call is not None:
            yield from _finish(
                session.state,
                call,
                outcome="error",
                usage=None,
                request_id=None,
                output_chars=characters,
            )


def given_up(session: SocketSession, frames: Collection[str | bytes]) -> Flow[None]:
    """The SDK closed the connection with these frames unsent: their calls are errors."""
    for call in session.take_unsent(frames):
        yield from _finish(session.state, call, outcome="error", usage=None, request_id=None)


def closing(session: SocketSession, unsent: Collection[str | bytes] = ()) -> Flow[None]:
    """The connection is closing: what is still open is recorded as an estimate, or as an
    error if its frame never left (the connection never opened, or the frame is among the
    SDK's ``unsent`` ones)."""
    for call, characters, never_sent in session.drain(unsent):
        outcome: Outcome = "error" if never_sent or not session.opened else "ok"
        yield from _finish(
            session.state,
            call,
            outcome=outcome,
            usage=None,
            request_id=None,
            output_chars=characters,
        )


def _finish(
    state: Any,
    call: Call,
    *,
    outcome: Outcome,
    usage: TokenUsage | None,
    request_id: str | None,
    output_chars: int = 0,
) -> Flow[Any]:
    """The guard's :func:`finish`, ending the call's span when telemetry is on."""
    flow = finish(
        state, call, outcome=outcome, usage=usage, request_id=request_id, output_chars=output_chars
    )
    return telemetry.watch_finish(flow, call, outcome, None)
