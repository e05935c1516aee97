"""`serve`'s listening socket, bound before the models load, and the deadlines of its connections (uvicorn's h11
protocol with the head and body timeouts uvicorn lacks)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from ..core.errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (0: any free port), before the models load, so that a port in use is said at
    once and in one line."""
    if not 0 <= port <= 65535:  # the socket layer would take it modulo 65536, or blame the host
        raise UserError(f"`port` must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"`host` {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"`port` {port} on {host} is in use (another server?): pick another one") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def connections(header_s: float, body_s: float | None, answer: Callable[[int, str], bytes]) -> type:
    """uvicorn's h11 protocol with the deadlines uvicorn lacks (its keep-alive timer starts after an answer and stops
    at any byte, so a client that sends nothing, or a request slowly, holds its connection for ever): a request's
    head is due `header_s` after the connection opens (or after the previous answer on it), its body `body_s` after
    its head (None: no limit). At a deadline the connection closes, with `answer(408, why)` (a whole response, as
    bytes) if a request was begun and not answered. What h11 refuses (malformed HTTP) gets `answer(400, why)`."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        timer: Any = None
        seen: Any = None  # the request whose head came last (uvicorn's cycle)
        in_body = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._due(header_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # which may start a pipelined request
            if self.cycle is self.seen:
                self._due(header_s)
            self._track()

        def _track(self) -> None:
            if self.cycle is not self.seen:  # a new request's head is in
                self.seen, self.in_body = self.cycle, True
                self._due(body_s)
            if self.in_body and not self.cycle.more_body:
                self.in_body = False
                self._due(None)

        def _due(self, seconds: float | None) -> None:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = None if seconds is None else self.loop.call_later(seconds, self._expired, seconds)

        def _expired(self, seconds: float) -> None:
            begun = self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]
            part = "body" if self.in_body else "head"
            self._close(begun, 408, f"the request's {part} did not arrive within this server's {seconds:g} s")

        def send_400_response(self, msg: str) -> None:  # uvicorn's is plain text
            self._close(True, 400, "malformed HTTP request (its request line, headers or framing)")

        def _close(self, begun: Any, status: int, message: str) -> None:
            unanswered = self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self.transport.is_closing()
            if begun and unanswered and not getattr(self.cycle, "response_started", False):
                self.transport.write(answer(status, message))
            self.transport.close()

    return Protocol
