"""The fake over real HTTP on loopback (:meth:`~safe_openai.testing.FakeOpenAI.serve`)."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2

from ._base import _API_PREFIX, _FakeBase


class _LoopbackServer(_FakeBase):
    """:meth:`serve` of :class:`~safe_openai.testing.FakeOpenAI`."""

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve this fake over real HTTP on ``127.0.0.1``, for code that builds its own client.

        A ``ThreadingHTTPServer`` on an ephemeral port answers every request through
        :meth:`handle_request`, so recording, failure injection and ``delay`` work as with the
        transport. Streamed replies go out one SSE event per HTTP chunk, flushed as written.
        An injected ``exception`` closes the connection without an answer, which the SDK sees
        as a connection error. The server stops, and its open connections are closed, when the
        block ends.

        Yields:
            The API base URL, e.g. ``"http://127.0.0.1:54321/v1"``: pass it as ``base_url`` or
            set ``OPENAI_BASE_URL`` to it (with any ``OPENAI_API_KEY``).

        Example::

            with fake.serve() as base_url:
                client = openai.OpenAI(base_url=base_url, api_key="sk-test")
        """
        server = _FakeServer(self)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="safe_openai-fake-server",
            daemon=True,
        )
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}{_API_PREFIX}"
        finally:
            server.shutdown()
            server.close_connections()
            server.server_close()
            thread.join()


class _FakeServer(ThreadingHTTPServer):
    """The loopback HTTP server of :meth:`FakeOpenAI.serve`; it tracks its connections so
    they can be closed when the block ends (keep-alive threads would otherwise linger).
    """

    daemon_threads = True

    def __init__(self, fake: _FakeBase) -> None:
        super().__init__(("127.0.0.1", 0), _FakeRequestHandler)
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        # Without TCP_NODELAY, a reply written in pieces waits on the client's delayed ACK.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (or the block ending) is not an error of the fake.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Unblock every handler thread still waiting on a kept-alive connection."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _FakeRequestHandler(BaseHTTPRequestHandler):
    """Turns one HTTP request into an ``httpx2.Request`` for the fake, and writes its answer."""

    protocol_version = "HTTP/1.1"
    server: _FakeServer
    # Hop-by-hop and framing headers: this handler sets its own.
    _SKIP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})

    def do_GET(self) -> None:
        self._answer()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read the fake's records, not an access log on stderr."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _answer(self) -> None:
        body = self._read_body()
        headers = [(name, value) for name, value in self.headers.items()]
        host = f"127.0.0.1:{self.server.server_address[1]}"
        request = httpx2.Request(
            self.command, f"http://{host}{self.path}", headers=headers, content=body
        )
        try:
            response = self.server.fake.handle_request(request)
        except Exception:
            # An injected exception: drop the connection, as a network failure would.
            self.close_connection = True
            return
        try:
            self._write(response)
        except ConnectionError:
            # The client went away mid-answer (an abandoned stream), or the block ended.
            self.close_connection = True
        finally:
            response.close()

    def _write(self, response: httpx2.Response) -> None:
        self.send_response(response.status_code)
        for name, value in response.headers.multi_items():
            if name.lower() not in self._SKIP_HEADERS:
                self.send_header(name, value)
        if "content-length" in response.headers:
            content = response.read()
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
            self.wfile.flush()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for chunk in response.iter_raw():
            if chunk:
                self.wfile.write(b"%X\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
