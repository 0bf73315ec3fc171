"""The Responses WebSocket (``responses.connect()``) served on loopback."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

from ._base import (
    _API_PREFIX,
    JSON,
    RecordedRequest,
    _ApiError,
    _dumps,
    _error_body,
    _Failure,
    _FakeBase,
)


def _error_event(status: int, message: str | None = None) -> JSON:
    """An ``error`` event of the Responses WebSocket."""
    return {"type": "error", "status": status, **_error_body(status, message)}


class _WebSocketAPI(_FakeBase):
    """:meth:`serve_websocket` of :class:`~safe_openai.testing.FakeOpenAI`."""

    @contextlib.contextmanager
    def serve_websocket(self) -> Iterator[str]:
        """Serve the Responses WebSocket (``responses.connect()``) on ``127.0.0.1``.

        Needs the ``websockets`` package (``openai[realtime]``). Each ``response.create`` is
        answered with the events of a streamed ``POST /responses`` (``response.created``, text
        deltas, ``response.completed`` with usage), echoing its ``stream_id``; each
        ``response.steer`` with ``response.steer.accepted`` and then a successor response
        (``previous_response_id`` set) that answers the steering input. Every event received
        is recorded in :attr:`requests` with method ``"WEBSOCKET"``, and a failure injected on
        ``/responses`` (:meth:`fail`) is answered with an ``error`` event. Only the
        ``/responses`` path is served; other paths are closed with code 1008.

        Yields:
            The WebSocket base URL: pass it as ``websocket_base_url`` to the client.
        """
        from websockets.sync.server import serve

        server = serve(self._websocket_session, "127.0.0.1", 0, compression=None)
        thread = threading.Thread(
            target=server.serve_forever, name="safe_openai-fake-websocket", daemon=True
        )
        thread.start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}{_API_PREFIX}"
        finally:
            server.shutdown()
            thread.join()

    def _websocket_session(self, connection: Any) -> None:
        if self._relative(connection.request.path.split("?", 1)[0]) != "/responses":
            connection.close(code=1008, reason="only /responses is served")
            return
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):  # a client that hangs up ends its session
            self._answer_websocket(connection)

    def _answer_websocket(self, connection: Any) -> None:
        models: dict[str, str] = {}
        for message in connection:
            try:
                event = json.loads(message)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                connection.send(_dumps(_error_event(400, "Invalid JSON event.")))
                continue
            headers = dict(connection.request.headers.raw_items())
            headers = {k.lower(): v for k, v in headers.items() if k.lower() != "authorization"}
            with self._lock:
                self._requests.append(RecordedRequest("WEBSOCKET", "/responses", event, headers))
                self._counter += 1
                number = self._counter
                failure = self._take_failure("/responses")
            lane = event.get("stream_id")
            for reply in self._websocket_replies(event, number, failure, models):
                if lane is not None:
                    reply["stream_id"] = lane
                connection.send(_dumps(reply))

    def _websocket_replies(
        self, event: JSON, number: int, failure: _Failure | None, models: dict[str, str]
    ) -> list[JSON]:
        if failure is not None:
            return [_error_event(failure.status)]
        kind = event.get("type")
        if kind == "response.create":
            body = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
        elif kind == "response.steer":
            previous = str(event.get("previous_response_id"))
            accepted = {"type": "response.steer.accepted", "previous_response_id": previous}
            body = {
                "model": models.get(previous, "gpt-4o-mini"),
                "input": event.get("input"),
                "previous_response_id": previous,
            }
            return [accepted, *self._websocket_response(body, number, models)]
        else:
            return [_error_event(400, f"Unknown event type {kind!r}.")]
        return self._websocket_response(body, number, models)

    def _websocket_response(self, body: JSON, number: int, models: dict[str, str]) -> list[JSON]:
        try:
            reply = self._responses({**body, "stream": True}, number)
        except _ApiError as error:
            return [{"type": "error", "status": error.status, **error.body}]
        events = [json.loads(chunk.split(b"data: ", 1)[1]) for chunk in reply.chunks or ()]
        models[f"resp_fake{number:04d}"] = str(body.get("model"))
        return events
