"""uvicorn's httptools protocol with the bounds an anonymous client must not get past.

httptools hands a header to the protocol only once it is complete, gluing its pieces together one read
at a time (quadratic in the header's size). So the parser is fed a piece at a time, and at most
max_request_head_bytes without progress (the head completing, body bytes, the message ending): past
that the client gets 431 and the rest is never read. A head that begins inside a piece, right after
the previous request, is counted from the next piece on (httptools does not say where it began), so
it may reach twice the limit. The same count bounds what else the parser holds on to within a body:
chunk framing and trailer fields.

Timers only ever wait on the client: request_head_timeout for a whole head (from the moment the
connection is ready for one), request_idle_timeout for a pause within a body and for a client that
stops reading the response. None runs while the server is answering: a push streams its deploy output
for minutes while the client sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from pipeline.limits import LimitExceeded, Limits

log = logging.getLogger(__name__)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the refusal itself is in `_refusal`."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: Limits) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._unparsed = 0  # bytes fed since the parser last made progress
        self._progressed = False
        self._fields = 0  # header and trailer fields of the current request
        self._head_begun = False
        self._in_body = False
        self._body_seen = 0.0  # loop time of the last read within a body
        self._refusal: tuple[int | None, str] | None = None
        self._answering: RequestResponseCycle | None = None  # the request whose application runs
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    # connection events

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_http_connections:
            busy = self.limits.refuse("max_http_connections", "too many open connections, try again shortly")
            self._refuse(503, busy)
            return
        address = self.client[0] if self.client else None
        if address and sum(1 for c in self.connections if c.client and c.client[0] == address) > \
                self.limits.max_connections_per_client:
            self._refuse(503, self.limits.refuse("max_connections_per_client", f"{address} holds too many "
                                                 "connections, try again once some have closed"))
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, feeding the parser a bounded piece at a time."""
        self._unset_keepalive_if_required()
        view = memoryview(data)
        limit = self.limits.max_request_head_bytes
        while view and not self.transport.is_closing():
            piece, view = view[: limit - self._unparsed], view[limit - self._unparsed:]
            self._progressed = False
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self._cancel_timers()  # the connection is the WebSocket protocol's now
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError:
                refusal, self._refusal = self._refusal, None
                if refusal is None:
                    self.logger.warning("Invalid HTTP request received.")
                    refusal = (400, "Invalid HTTP request received.")
                self._refuse(*refusal)
                return
            self._unparsed = 0 if self._progressed else self._unparsed + len(piece)
            if self._unparsed >= limit:
                what = "the request's trailer fields are" if self._in_body else "the request head is"
                self._refuse(431, self.limits.refuse("max_request_head_bytes", f"{what} too large"))
                return
        if self._in_body and not self.transport.is_closing():
            self._body_seen = self.loop.time()
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.request_idle_timeout, self._body_idle)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.request_idle_timeout, self._reader_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Unless a pipelined request is being answered or its body read, the connection waits for a head.
        if not self.transport.is_closing() and self.cycle.response_complete and not self._in_body:
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._fields = 0
        self._head_begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.limits.max_request_headers:
            self._stop(431, self.limits.refuse("max_request_headers", "the request has too many header fields"))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        answering = self.cycle is not None and not self.cycle.response_complete
        if answering and len(self.pipeline) >= self.limits.max_pipelined_requests:
            # The answers already under way come first, so no refusal can be written: hang up.
            log.info("%s sent more than %d requests ahead; closing", self._peer(), self.limits.max_pipelined_requests)
            self._stop(None, "")
        super().on_headers_complete()
        self._progressed = True
        self._head_begun = False
        self._in_body = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._progressed = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._progressed = True
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # timers

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.limits.request_head_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_begun:  # nothing sent: an idle connection, closed without a word
            self.transport.close()
            return
        self._refuse(408, self.limits.refuse("request_head_timeout", "the request head took too long"))

    def _body_idle(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused or self.cycle.waiting_for_100_continue:
            self._body_seen = now  # the server is the one not reading
        idle = now - self._body_seen
        if idle < self.limits.request_idle_timeout:
            self._body_timer = self.loop.call_later(self.limits.request_idle_timeout - idle, self._body_idle)
            return
        log.info("%s stopped sending its request body; closing", self._peer())
        self._refuse(408, self.limits.refuse("request_idle_timeout", "the request body stopped arriving"))

    def _reader_stalled(self) -> None:
        self._write_timer = None
        log.info("%s stopped reading its response; closing", self._peer())
        self.transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._write_timer = None

    # refusals

    def _stop(self, status: int | None, refusal: LimitExceeded | str) -> None:
        """From a parser callback: stop parsing, then refuse (status None: just hang up)."""
        self._refusal = (status, str(refusal))
        raise _Refused

    def _refuse(self, status: int | None, refusal: LimitExceeded | str) -> None:
        """Answer `status` with the refusal as text if it can be the answer the client reads next, and close."""
        if status is not None and self._may_answer():
            body = (str(refusal) + "\n").encode()
            head = [STATUS_LINE[status]]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: text/plain; charset=utf-8\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        for cycle in (self._answering, self.cycle):
            if cycle is not None and not cycle.response_complete:  # what its application still sends goes nowhere
                cycle.disconnected = True
                cycle.message_event.set()
        self.transport.close()

    def _may_answer(self) -> bool:
        """No response is under way or queued before the refusal."""
        if self.pipeline:
            return False
        if self._in_body:
            return not self.cycle.response_started
        return self._answering is None or self._answering.response_complete

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"
