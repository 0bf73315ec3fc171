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

import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import structlog

from ._extract import RESPONSES_STEER, resolve_endpoint
from ._guard import Call, Flow, GuardState, begin, finish
from .errors import UnguardedPathError
from .usage import Outcome, TokenUsage, token_usage_from_payload

__all__ = ["SocketSession", "closing", "incoming", "outgoing", "sent_steer", "unsent"]

log = structlog.get_logger("safe_openai")

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
        self._lock = threading.Lock()
        self._sent: dict[str | None, deque[Call]] = {}  # by lane, awaiting response.created
        self._open: dict[str, Call] = {}  # by response id
        self._latest: dict[str | None, Call] = {}  # by lane, for text deltas and successors
        self._output_chars: dict[int, int] = {}  # by id(call)
        self._owners: OrderedDict[str, Call] = OrderedDict()  # response id -> its call

    def sent(self, call: Call, lane: str | None) -> None:
        with self._lock:
            self._sent.setdefault(lane, deque()).append(call)

    def forget(self, call: Call) -> None:
        """A call whose event never reached the socket."""
        with self._lock:
            for waiting in self._sent.values():
                if call in waiting:
                    waiting.remove(call)

    def created(self, lane: str | None, response: Mapping[str, Any]) -> Call:
        """Bind ``response`` to the oldest call waiting on its lane, or start a successor."""
        response_id = str(response.get("id") or "")
        with self._lock:
            waiting = self._sent.get(lane)
            call = waiting.popleft() if waiting else None
            if call is None:
                call = self._successor(lane, response)
            self._open[response_id] = call
            self._latest[lane] = call
            self._owners[response_id] = call
            while len(self._owners) > _REMEMBERED:
                self._owners.popitem(last=False)
            return call

    def _successor(self, lane: str | None, response: Mapping[str, Any]) -> Call:
        parent_id = response.get("previous_response_id")
        parent = self._owners.get(parent_id) if isinstance(parent_id, str) else None
        parent = parent or self._latest.get(lane)
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
            call = self._latest.get(lane)
            if call is not None:
                self._output_chars[id(call)] = self._output_chars.get(id(call), 0) + characters

    def ended(self, response_id: str) -> tuple[Call | None, int]:
        with self._lock:
            call = self._open.pop(response_id, None)
            return call, self._output_chars.pop(id(call), 0) if call else 0

    def failed_before_creation(self, lane: str | None) -> Call | None:
        with self._lock:
            waiting = self._sent.get(lane)
            return waiting.popleft() if waiting else None

    def model_of(self, response_id: object) -> str | None:
        with self._lock:
            call = self._owners.get(response_id) if isinstance(response_id, str) else None
            return call.model if call else None

    def drain(self) -> list[tuple[Call, int]]:
        """Every call still open, emptied out (the connection is closing)."""
        with self._lock:
            calls = [call for waiting in self._sent.values() for call in waiting]
            calls += self._open.values()
            self._sent.clear()
            self._open.clear()
            return [(call, self._output_chars.pop(id(call), 0)) for call in calls]


def _event(data: str | bytes) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        event = None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise UnguardedPathError(
            "A WebSocket message that is not a JSON event cannot be moderated, so it was not sent."
        )
    return event


def outgoing(session: SocketSession, data: str | bytes) -> Flow[tuple[str | bytes, Call | None]]:
    """Guard one outgoing message. Returns what to send instead and its call, if any.

    Raises:
        ModerationBlocked, CustomerSuspended, PolicyDenied, QuotaExceeded, ...: as for HTTP.
        UnguardedPathError: a message that is not an event this guard understands.
    """
    event = _event(data)
    kind = event["type"]
    state = session.state
    if kind == "response.create":
        body = {key: value for key, value in event.items() if key != "type"}
        call = yield from begin(
            state, bound_customer=session.customer_id, path=CREATE_PATH, body=body
        )
        assert call is not None
        lane = body.get("stream_id")
        session.sent(call, lane if isinstance(lane, str) else None)
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
        return json.dumps({key: event[key] for key in _STEER_KEYS if key in event}), call
    endpoint = f"wss:{CREATE_PATH}#{kind}"
    if not state.policy.allow_unguarded(endpoint):
        raise UnguardedPathError(
            f"safe_openai does not know the WebSocket event {kind!r}, so it cannot be "
            "moderated; allow it in the policy (Policy.allow_unguarded) if that is intended."
        )
    log.warning("safe_openai.unguarded_event_allowed", endpoint=endpoint)
    return data, None


def sent_steer(session: SocketSession, call: Call) -> Flow[None]:
    """A steer went out: it is recorded at once (its tokens count in the response it feeds)."""
    yield from finish(session.state, call, outcome="ok", usage=TokenUsage(), request_id=None)


def unsent(session: SocketSession, call: Call) -> Flow[None]:
    """The socket refused a guarded event: record it as an error, release its reservation."""
    session.forget(call)
    yield from finish(session.state, call, outcome="error", usage=None, request_id=None)


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
            yield from finish(
                session.state,
                call,
                outcome=_TERMINAL[kind],
                usage=token_usage_from_payload(response),
                request_id=None,
                output_chars=characters,
            )
        return
    if kind == "error":
        call = session.failed_before_creation(lane)
        if call is not None:
            yield from finish(session.state, call, outcome="error", usage=None, request_id=None)


def closing(session: SocketSession) -> Flow[None]:
    """The connection is closing: what is still open is recorded as an estimate, or as an
    error if the connection never opened (nothing was sent)."""
    outcome: Outcome = "ok" if session.opened else "error"
    for call, characters in session.drain():
        yield from finish(
            session.state,
            call,
            outcome=outcome,
            usage=None,
            request_id=None,
            output_chars=characters,
        )
