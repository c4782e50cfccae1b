"""The Gateway listener's HTTP/1.1 connection protocol: uvicorn's httptools protocol with the
guards a public listener needs and uvicorn does not have (its open issue #157).

- **Header timeout** (``header_timeout_s``, nginx's ``client_header_timeout``): from the connection's
  opening, or the first byte of its next request, to the end of the request's headers. A client
  that sent part of a request gets ``408`` in the OpenAI error shape; one that sent nothing is
  closed. uvicorn's own ``timeout_keep_alive`` starts only after a response and is reset by every
  byte, so a client trickling a header a byte at a time (slowloris) held its connection forever.
- **Body timeout** (``body_timeout_s``, nginx's ``client_body_timeout``): the longest pause between
  two reads of a body; then the connection is closed (the route sees the client disconnect).
- **Connection caps** (``max_connections``, ``max_connections_per_ip``, per replica, nginx's
  ``limit_conn``): a connection over either cap is closed as soon as it is accepted, so a flood of
  idle connections costs no file descriptor beyond the caps and leaves other clients' room alone.
- **Lingering close** (nginx's ``lingering_close``): when the server closes a connection whose
  request it did not read to the end — a 413 for a body declared too large, a parse error — it
  shuts its sending side and reads and discards what the client still sends (at most
  ``LINGER_BYTES``, ``LINGER_S``) before closing. Closing with unread bytes makes the kernel
  send a reset, and a client still writing its body (urllib, SDKs without
  ``Expect: 100-continue``) saw "connection reset" instead of the 413.
- **Parse errors in the OpenAI shape**: a request the parser refuses (a malformed
  ``Content-Length``, a bad header, …) gets a ``400`` JSON error body naming the header where
  the parser says which, instead of uvicorn's plain-text "Invalid HTTP request received.".

``ConnectionBook`` (the counting) is plain Python; ``guarded_protocol`` makes the protocol class one
listener uses, with its own book.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from deployments import request_ids
from deployments.errors import InvalidRequest, PromptfleetError, RequestTimeout

logger = logging.getLogger("ray.serve")

LINGER_BYTES = 8 * 1024 * 1024  # what a lingering close reads and discards at most
LINGER_S = 5.0  # and for how long (nginx: lingering_time 30 s, lingering_timeout 5 s)


@dataclass(frozen=True)
class ListenerLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 8192
    max_connections_per_ip: int = 1024
    linger_bytes: int = LINGER_BYTES
    linger_s: float = LINGER_S


class ConnectionBook:
    """Open connections, in total and by client address, under two caps."""

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.by_ip: Counter[str] = Counter()
        self.total = 0
        self.refused = 0

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip`` if both caps allow it; False (not counted) if not."""
        if self.total >= self.max_total or self.by_ip[ip] >= self.max_per_ip:
            self.refused += 1
            return False
        self.total += 1
        self.by_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        self.by_ip[ip] -= 1
        if self.by_ip[ip] <= 0:
            del self.by_ip[ip]


def error_response(error: PromptfleetError) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response carrying ``error`` in the OpenAI shape, for
    answers the protocol writes itself (no ASGI app involved)."""
    request_id = request_ids.new_request_id()
    body = json.dumps(error.to_body(request_id)).encode()
    return b"".join([
        STATUS_LINE[error.status_code],
        b"content-type: application/json\r\n",
        b"content-length: ", str(len(body)).encode(), b"\r\n",
        b"x-request-id: ", request_id.encode(), b"\r\n",
        b"connection: close\r\n\r\n",
        body,
    ])


def parse_error(exc: Exception) -> InvalidRequest:
    """The 400 for a request the HTTP parser refused, naming the header the parser's reason names."""
    reason = (str(exc.args[0]) if exc.args else "").encode("ascii", "replace").decode()[:160]
    lowered = reason.lower()
    param = next((name for name in ("Content-Length", "Transfer-Encoding", "Host") if name.lower() in lowered), None)
    detail = f" ({reason.rstrip('.')})" if reason else ""
    return InvalidRequest(f"The request is not valid HTTP/1.1{detail}.", param=param)


class _Drain(asyncio.Protocol):
    """Reads and discards the rest of a request after the answer went out, then closes; bounded."""

    def __init__(self, transport: asyncio.Transport, inner: GuardedHttpProtocol, limits: ListenerLimits) -> None:
        self.transport, self.inner, self.left = transport, inner, limits.linger_bytes
        self.timer = asyncio.get_running_loop().call_later(limits.linger_s, transport.close)

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.transport.close()

    def eof_received(self) -> bool:
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.inner.connection_lost(exc)


class _LingeringTransport:
    """The transport uvicorn's protocol sees: ``close()`` lingers while the request is unread."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol) -> None:
        self._transport, self._protocol, self._lingering = transport, protocol, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def close(self) -> None:
        transport = self._transport
        if self._lingering or transport.is_closing() or not self._protocol.request_unread():
            transport.close()
            return
        self._lingering = True
        self._protocol.cancel_timers()
        transport.set_protocol(_Drain(transport, self._protocol, self._protocol.limits))
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered: the client reads the whole answer, then EOF
        transport.resume_reading()  # uvicorn may have paused reading (flow control)

    def close_now(self) -> None:
        self._transport.close()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards of the module docstring. ``limits`` and ``book``
    are set on the subclass ``guarded_protocol`` makes."""

    limits: ListenerLimits
    book: ConnectionBook
    _last_refusal_log = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._ip = str(peer[0]) if peer else ""
        self._admitted = self.book.admit(self._ip)
        self._begun = self._complete = False
        self._request_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._wrapped = _LingeringTransport(transport, self)
        super().connection_made(cast(asyncio.Transport, self._wrapped))
        if not self._admitted:
            self._log_refusal()
            transport.abort()  # no response: nothing was asked yet; the descriptor is freed now
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timers()
        if self._admitted:
            self._admitted = False
            self.book.release(self._ip)
        super().connection_lost(exc)

    def request_unread(self) -> bool:
        """A request began and its body was not read to the end."""
        return self._begun and not self._complete

    def cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    # -- uvicorn's callbacks, extended ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # uvicorn's own data_received, with its plain-text 400 replaced (it keeps the parser error to itself).
        self._unset_keepalive_if_required()
        if self._header_timer is None and self._body_timer is None and not self.request_unread():
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        self._request_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._answer(parse_error(exc))
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def on_message_begin(self) -> None:
        self._begun, self._complete = True, False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().on_headers_complete()
        if not self._complete:
            self._arm_body_timer()

    def on_body(self, body: bytes) -> None:
        self._arm_body_timer()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._complete = True
        self._request_bytes = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._answer(InvalidRequest(f"The request is not valid HTTP/1.1 ({msg.rstrip('.')}).", param=None))

    # -- the guards ---------------------------------------------------------------------------

    def _answer(self, error: PromptfleetError) -> None:
        """Write ``error`` and close (lingering if the request is unread)."""
        self.cancel_timers()
        if not self._wrapped.is_closing():
            self._wrapped.write(error_response(error))
            self._wrapped.close()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._wrapped.is_closing():
            return
        if self._request_bytes:
            self._wrapped.write(error_response(RequestTimeout(
                f"The request's headers did not arrive within {self.limits.header_timeout_s:g} s.", param=None)))
        self._wrapped.close_now()

    def _body_timeout(self) -> None:
        self._body_timer = None
        if not self._wrapped.is_closing():
            self._wrapped.close_now()

    def _log_refusal(self) -> None:
        now = time.monotonic()
        if now - GuardedHttpProtocol._last_refusal_log > 10:
            GuardedHttpProtocol._last_refusal_log = now
            logger.warning("gateway listener: closing new connections over the caps (%d open, %d from %s; "
                           "%d refused so far)", self.book.total, self.book.by_ip[self._ip], self._ip,
                           self.book.refused)


def guarded_protocol(limits: ListenerLimits) -> type[GuardedHttpProtocol]:
    """A protocol class for one listener: ``limits``, and a connection book of its own."""
    book = ConnectionBook(limits.max_connections, limits.max_connections_per_ip)
    return type("ListenerProtocol", (GuardedHttpProtocol,), {"limits": limits, "book": book})
