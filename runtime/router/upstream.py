"""The router's side of a connection to an app process: parse its responses and stream them to the client.

Everything one read produces for the client (head, re-framed body chunks) goes out in one write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from runtime.router.exchange import Exchange
from runtime.router.headers import CHUNKED, NO_BODY, TUNNEL, response_head
from runtime.router.simple_heads import simple_response

if TYPE_CHECKING:
    from runtime.router.pool import UpstreamPool
    from runtime.router.routes import Address

log = logging.getLogger(__name__)


class UnexpectedUpgrade(Exception):
    """The app switched protocols on a request that did not ask to."""


class ExtraResponse(Exception):
    """The app sent another response after the one asked for, as if answering a request smuggled in a body."""


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to one app process, serving one exchange at a time, pooled in between."""

    def __init__(self, pool: UpstreamPool, address: Address) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport
        self.exchange: Exchange | None = None
        self.owner: int | None = None
        """The uid the route named when this connection was made (and checked against, where the kernel says)."""
        self.reused = False
        self.received = False
        self.idle_since = 0.0
        self._parser = HttpResponseParser(self)
        self._out: list[bytes] = []
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing = NO_BODY
        self._until_close = False
        self._keep_alive = False
        self._done = False
        self._interim = False
        self._tunnel = False
        self._reading_paused = False
        self._rest = 0
        """Bytes of a simple response's body (runtime.router.simple_heads) still to come, passed on as counted."""

    def begin(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.received = self._done = self._interim = self._until_close = False
        self._rest = 0
        if exchange.client.writing_paused:
            self.pause_reading()

    def release(self) -> None:
        """Back to the pool: no exchange, and reading on so that the app closing it is noticed."""
        self.exchange = None
        self.resume_reading()

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # an idle connection must stay silent
            self.transport.close()
            return
        client = exchange.client
        if self._rest:
            self._pass_rest(exchange, data)
            return
        if not self.received:
            self.received = True
            request = exchange.request
            if (request.keep_alive and request.http11 and request.method != b"HEAD" and not request.upgrade
                    and (simple := simple_response(data)) is not None):
                response, self._rest = simple
                exchange.response_started = True
                client.transport.write(response)
                if not self._rest:
                    client.response_done(exchange, self, True)
                return
        if self._tunnel:
            client.transport.write(data)
            return
        started = exchange.response_started
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._tunnel = True
            self._out.append(data[exc.args[0]:])  # already the new protocol's bytes
            client.tunnel_open(exchange)
        except HttpParserError as exc:
            if self._done:  # whatever follows the response, this connection is not used again
                self._keep_alive = False
            else:
                self._failed(exchange, exc, started)
                return
        if self._out:
            out = self._out
            client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self._done:
            client.response_done(exchange, self, self._keep_alive)

    def _pass_rest(self, exchange: Exchange, data: bytes) -> None:
        client = exchange.client
        rest = self._rest
        if len(data) < rest:
            self._rest = rest - len(data)
            client.transport.write(data)
            return
        self._rest = 0
        client.transport.write(data if len(data) == rest else data[:rest])
        # Bytes past the end answer nothing the router asked: the connection is out of step and is not used again.
        client.response_done(exchange, self, len(data) == rest)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self.exchange
        if exchange is None:
            self.pool.discard(self)
            return
        self.exchange = None
        client = exchange.client
        if self._tunnel:
            client.tunnel_closed()
        elif self._until_close and exchange.response_started and not self._done:
            if self._framing == CHUNKED:
                client.transport.write(b"0\r\n\r\n")
            client.response_done(exchange, self, False)
        else:
            client.upstream_failed(exchange, self, retry=True)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.upstream_full(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.upstream_full(False)

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._done:
            raise ExtraResponse
        exchange = self.exchange
        request = exchange.request
        status = self._parser.get_status_code()
        if status == 101 and not request.upgrade:
            raise UnexpectedUpgrade("101 Switching Protocols to a request that asked for no upgrade")
        head, framing, keep_alive, until_close = response_head(status, self._reason, self._headers, request)
        self._reason = b""
        self._headers = []
        if status < 200 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints: the final response follows
            if request.http11:
                self._out.append(head)
            return
        self._out.append(head)
        self._framing, self._until_close = framing, until_close
        self._keep_alive = self._parser.should_keep_alive()
        exchange.response_started = True
        exchange.keep_alive = keep_alive
        if framing == NO_BODY and request.method == b"HEAD":
            # The parser would wait for the body the head announces: end here, and since the parser is left
            # mid-message (and apps do send bodies to HEAD), do not use the connection again.
            self._done, self._keep_alive = True, False

    def on_body(self, body: bytes) -> None:
        if self._done:
            return
        if self._framing == CHUNKED:
            self._out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._done and self._framing != TUNNEL:
            if self._framing == CHUNKED:
                self._out.append(b"0\r\n\r\n")
            self._done = True

    def _failed(self, exchange: Exchange, exc: HttpParserError, started: bool) -> None:
        reason = exc.__context__
        if reason is None or isinstance(reason, UnexpectedUpgrade):
            log.info("router: invalid response from %s:%d: %s", *self.address, reason or exc)
        else:
            log.error("router: failed on a response from %s:%d", *self.address, exc_info=reason)
        self._out.clear()  # nothing of a broken response reaches the client...
        exchange.response_started = started  # ...so it may still get a 502
        self.exchange = None
        self.transport.abort()
        exchange.client.upstream_failed(exchange, self, retry=False)
