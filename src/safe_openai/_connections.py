"""The SDK's Responses WebSocket classes, guarded (``responses.connect()`` and
``beta.responses.connect()``, sync and async).

Every message reaches the socket through one of two doors: the connection's ``_send`` (which
``send``, ``send_raw`` and ``response.create`` / ``response.steer`` all use) or, before the
connection opens, the manager's ``send`` queue. Both doors are guarded here; every message read
(``recv``, ``recv_bytes``, iteration, ``dispatch_events``) passes ``recv_bytes``. The decisions
are the flows of :mod:`safe_openai._sockets`.

The SDK builds its managers and connections inside methods whose state is name-mangled, so they
cannot be subclassed the usual way. The guarded classes are subclasses that change no layout
(their few attributes live in the instance dict), and the SDK's objects are switched to them
right after they are built (:func:`_adopt`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from functools import cached_property
from typing import Any, TypeVar, cast

import pydantic
from openai import WebSocketConnectionClosedError
from openai._send_queue import SendQueue
from openai._utils import maybe_transform
from openai.resources.beta.beta import AsyncBeta, Beta
from openai.resources.beta.responses import responses as beta_responses
from openai.resources.responses import responses
from openai.types.beta.beta_responses_client_event_param import BetaResponsesClientEventParam
from openai.types.responses.responses_client_event_param import ResponsesClientEventParam

from ._client import missing_hook
from ._extract import RESPONSES_STEER
from ._guard import Call, Command, Flow, GuardState, adrive, drive
from ._log import get_logger
from ._sockets import (
    SocketSession,
    closing,
    given_up,
    incoming,
    outgoing,
    register,
    sent_steer,
    unsent,
)
from ._streams import run_soon
from .errors import UnguardedPathError

__all__ = [
    "GuardedAsyncBeta",
    "GuardedAsyncResponses",
    "GuardedBeta",
    "GuardedResponses",
    "opening_guarded_socket",
]

log = get_logger()

Execute = Callable[[Command], Any]
AsyncExecute = Callable[[Command], Awaitable[Any]]
T = TypeVar("T")

# Set while a guarded manager opens its socket, so the client's WebSocket refusal lets it pass.
_OPENING: ContextVar[bool] = ContextVar("safe_openai_opening_guarded_socket", default=False)


def opening_guarded_socket() -> bool:
    """Whether the WebSocket being opened now is a guarded one."""
    return _OPENING.get()


def _event_data(event: Any, param_type: Any) -> str:
    """An event as the SDK serializes it for the socket."""
    if isinstance(event, pydantic.BaseModel):
        data: str = event.to_json(use_api_names=True, exclude_unset=True)  # type: ignore[attr-defined]
        return data
    return json.dumps(maybe_transform(event, param_type))


def _adopt(obj: object, cls: type, session: SocketSession, execute: Any) -> None:
    obj.__class__ = cls
    guarded = cast(Any, obj)
    guarded._safe_session = session
    guarded._safe_execute = execute


def _is_steer(call: Call | None) -> bool:
    return call is not None and call.spec is RESPONSES_STEER


def _close_soon(session: SocketSession, execute: Any, *, only_unopened: bool) -> None:
    """From a finalizer: record what a connection (or a manager never entered) left open, so a
    dropped connection neither loses usage nor holds quota reservations until they expire."""
    if only_unopened and session.opened:
        return
    flow = closing(session)
    if not inspect.iscoroutinefunction(execute):
        with contextlib.suppress(Exception):
            drive(flow, execute)
        return

    async def record() -> None:
        with contextlib.suppress(Exception):
            await adrive(flow, execute)

    run_soon(record)


def _drop_queued(manager: object) -> None:
    """Empty the SDK's queue of a manager whose connection failed to open: its events are
    recorded as never sent, so a retried ``enter()`` must not send them after all. (The queue
    is found by type: the SDK keeps it under a name-mangled attribute.)"""
    for value in vars(manager).values():
        if isinstance(value, SendQueue):
            value.drain()


class _SyncRecording:
    _safe_session: SocketSession
    _safe_execute: Execute

    def _safe_record(self, flow: Flow[None]) -> None:
        """Record usage; a failure is logged (the store flow already spooled what it could)."""
        try:
            drive(flow, self._safe_execute)
        except Exception:
            log.exception("safe_openai.usage_record_failed", customer_id=None)

    def _safe_write(self, call: Call | None, frame: str | bytes, write: Callable[[], None]) -> None:
        """Register a guarded event's call and write its frame, as one step for other threads;
        a frame that fails to go out is an error, a steer that went out is recorded."""
        session = self._safe_session
        failure: BaseException | None = None
        with session.sending:
            register(session, call, frame)
            try:
                write()
            except BaseException as exc:
                failure = exc
        if failure is not None:
            if call is not None:
                self._safe_record(unsent(session, call))
            raise failure
        if _is_steer(call):
            self._safe_record(sent_steer(session, cast(Call, call)))


class _AsyncRecording:
    _safe_session: SocketSession
    _safe_execute: AsyncExecute

    async def _safe_record(self, flow: Flow[None]) -> None:
        try:
            await adrive(flow, self._safe_execute)
        except Exception:
            log.exception("safe_openai.usage_record_failed", customer_id=None)

    async def _safe_write(
        self, call: Call | None, frame: str | bytes, write: Callable[[], Awaitable[None]]
    ) -> None:
        """:meth:`_SyncRecording._safe_write` for async connections."""
        session = self._safe_session
        failure: BaseException | None = None
        async with session.async_sending:
            register(session, call, frame)
            try:
                await write()
            except BaseException as exc:
                failure = exc
        if failure is not None:
            if call is not None:
                await self._safe_record(unsent(session, call))
            raise failure
        if _is_steer(call):
            await self._safe_record(sent_steer(session, cast(Call, call)))


class _GuardedConnection(_SyncRecording):
    def _send(self, data: bytes | str) -> None:
        frame, call = drive(outgoing(self._safe_session, data), self._safe_execute)
        send = cast(Any, super())._send
        self._safe_write(call, frame, lambda: send(frame))

    def recv_bytes(self) -> bytes:
        message: bytes = cast(Any, super()).recv_bytes()
        self._safe_record(incoming(self._safe_session, message))
        return message

    def _iter_events(self) -> Iterator[Any]:
        try:
            yield from cast(Any, super())._iter_events()
        except WebSocketConnectionClosedError as exc:
            self._safe_record(given_up(self._safe_session, exc.unsent_messages))
            raise

    def close(self, *, code: int = 1000, reason: str = "") -> None:
        try:
            cast(Any, super()).close(code=code, reason=reason)
        finally:
            left = cast(Any, self)._send_queue.mark_unsent()
            self._safe_record(closing(self._safe_session, left))


class _GuardedAsyncConnection(_AsyncRecording):
    async def _send(self, data: bytes | str) -> None:
        frame, call = await adrive(outgoing(self._safe_session, data), self._safe_execute)
        send = cast(Any, super())._send
        await self._safe_write(call, frame, lambda: send(frame))

    async def recv_bytes(self) -> bytes:
        message: bytes = await cast(Any, super()).recv_bytes()
        await self._safe_record(incoming(self._safe_session, message))
        return message

    async def _iter_events(self) -> AsyncIterator[Any]:
        try:
            async for event in cast(Any, super())._iter_events():
                yield event
        except WebSocketConnectionClosedError as exc:
            await self._safe_record(given_up(self._safe_session, exc.unsent_messages))
            raise

    async def close(self, *, code: int = 1000, reason: str = "") -> None:
        try:
            await cast(Any, super()).close(code=code, reason=reason)
        finally:
            left = cast(Any, self)._send_queue.mark_unsent()
            await self._safe_record(closing(self._safe_session, left))


class _GuardedManager(_SyncRecording):
    """Guards events queued before the connection opens, and hands the guard to it."""

    _safe_param_type: Any
    _safe_connection_cls: type

    def send(self, event: Any) -> None:
        data = _event_data(event, self._safe_param_type)
        guarded, call = drive(outgoing(self._safe_session, data), self._safe_execute)
        checked = json.loads(guarded)
        queue = cast(Any, super()).send  # raises when the SDK's queue is full
        frame = _event_data(checked, self._safe_param_type)  # as the queue will hold it
        self._safe_write(call, frame, lambda: queue(checked))

    def __enter__(self) -> Any:
        session = self._safe_session
        try:
            connection = cast(Any, super()).__enter__()
        except BaseException:
            _drop_queued(self)
            self._safe_record(closing(session))  # queued calls were never sent
            raise
        session.opened = True
        _adopt(connection, self._safe_connection_cls, session, self._safe_execute)
        weakref.finalize(connection, _close_soon, session, self._safe_execute, only_unopened=False)
        return connection

    enter = __enter__

    def _connect_ws(self, extra_query: Any, extra_headers: Any) -> Any:
        token = _OPENING.set(True)
        try:
            return cast(Any, super())._connect_ws(extra_query, extra_headers)
        finally:
            _OPENING.reset(token)


class _GuardedAsyncManager(_AsyncRecording):
    """The async manager's ``send`` is sync, so queued events are guarded on entry: a blocked
    one raises from ``async with`` (or ``enter()``) and nothing is sent."""

    _safe_param_type: Any
    _safe_connection_cls: type
    _safe_held: list[str]

    def send(self, event: Any) -> None:
        if self._safe_session.opened:
            raise UnguardedPathError(
                "On an AsyncSafeClient, send events on the open connection "
                "(await connection.send(...)): the manager's send is synchronous and cannot "
                "check them once the connection is open."
            )
        self._safe_held.append(_event_data(event, self._safe_param_type))

    async def __aenter__(self) -> Any:
        session = self._safe_session
        try:
            while self._safe_held:
                data, call = await adrive(
                    outgoing(session, self._safe_held.pop(0)), self._safe_execute
                )
                checked = json.loads(data)
                register(session, call, _event_data(checked, self._safe_param_type))
                cast(Any, super()).send(checked)
                if _is_steer(call):
                    await self._safe_record(sent_steer(session, cast(Call, call)))
            connection = await cast(Any, super()).__aenter__()
        except BaseException:
            self._safe_held.clear()
            _drop_queued(self)
            await self._safe_record(closing(session))  # queued calls were never sent
            raise
        session.opened = True
        _adopt(connection, self._safe_connection_cls, session, self._safe_execute)
        weakref.finalize(connection, _close_soon, session, self._safe_execute, only_unopened=False)
        return connection

    enter = __aenter__

    async def _connect_ws(self, extra_query: Any, extra_headers: Any) -> Any:
        token = _OPENING.set(True)
        try:
            return await cast(Any, super())._connect_ws(extra_query, extra_headers)
        finally:
            _OPENING.reset(token)


def _twin(mixin: type, base: type) -> type:
    """``base`` with the guard's overrides in ``mixin``; refused (ImportError) when the SDK's
    class lacks a method ``mixin`` overrides: an SDK that renamed ``_send`` would call the new
    name and never the guarded override, sending every frame past the guard."""
    for name, value in vars(mixin).items():
        # Own methods only: aliases (``enter = __enter__``) and the guard's ``_safe_*`` helpers
        # override nothing.
        own = callable(value) and getattr(value, "__name__", None) == name
        if own and not name.startswith("_safe_") and not callable(getattr(base, name, None)):
            raise missing_hook(base, name, "Responses WebSocket messages")
    return type(f"Guarded{base.__name__}", (mixin, base), {"__module__": __name__})


# SDK manager class -> (guarded manager, guarded connection, event param type)
_TWINS: dict[type, tuple[type, type, Any]] = {
    sdk_manager: (_twin(manager_mixin, sdk_manager), _twin(connection_mixin, sdk_connection), param)
    for sdk_manager, sdk_connection, manager_mixin, connection_mixin, param in (
        (
            responses.ResponsesConnectionManager,
            responses.ResponsesConnection,
            _GuardedManager,
            _GuardedConnection,
            ResponsesClientEventParam,
        ),
        (
            responses.AsyncResponsesConnectionManager,
            responses.AsyncResponsesConnection,
            _GuardedAsyncManager,
            _GuardedAsyncConnection,
            ResponsesClientEventParam,
        ),
        (
            beta_responses.ResponsesConnectionManager,
            beta_responses.ResponsesConnection,
            _GuardedManager,
            _GuardedConnection,
            BetaResponsesClientEventParam,
        ),
        (
            beta_responses.AsyncResponsesConnectionManager,
            beta_responses.AsyncResponsesConnection,
            _GuardedAsyncManager,
            _GuardedAsyncConnection,
            BetaResponsesClientEventParam,
        ),
    )
}


def _guard_manager(manager: T, client: Any) -> T:
    """Switch an SDK connection manager to its guarded twin, with a session of its own."""
    guarded_manager, guarded_connection, param_type = _TWINS[type(manager)]
    state: GuardState = client._safe
    session = SocketSession(state, client._safe_customer)
    _adopt(manager, guarded_manager, session, client._execute)
    # A manager dropped before it is entered still releases what its queued events reserved.
    weakref.finalize(manager, _close_soon, session, client._execute, only_unopened=True)
    target = cast(Any, manager)
    target._safe_param_type = param_type
    target._safe_connection_cls = guarded_connection
    target._safe_held = []
    return manager


class _GuardedConnect:
    """``connect()`` returns the SDK's manager, switched to its guarded twin."""

    _client: Any

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return _guard_manager(cast(Any, super()).connect(*args, **kwargs), self._client)


class GuardedResponses(_GuardedConnect, responses.Responses):
    """``client.responses`` whose ``connect()`` opens a guarded WebSocket."""


class GuardedAsyncResponses(_GuardedConnect, responses.AsyncResponses):
    """``client.responses`` (async) whose ``connect()`` opens a guarded WebSocket."""


class _GuardedBetaResponses(_GuardedConnect, beta_responses.Responses):
    pass


class _GuardedAsyncBetaResponses(_GuardedConnect, beta_responses.AsyncResponses):
    pass


class GuardedBeta(Beta):
    """``client.beta`` whose ``responses.connect()`` opens a guarded WebSocket."""

    @cached_property
    def responses(self) -> beta_responses.Responses:
        return _GuardedBetaResponses(self._client)


class GuardedAsyncBeta(AsyncBeta):
    """``client.beta`` (async) whose ``responses.connect()`` opens a guarded WebSocket."""

    @cached_property
    def responses(self) -> beta_responses.AsyncResponses:
        return _GuardedAsyncBetaResponses(self._client)
