"""The router's side of a client connection: parse requests, route them by Host, stream them to an app.

Requests are handled in order (HTTP/1.1 pipelining): one exchange is active, later ones wait in line with
reading paused. Reading also pauses while an app, or the connection to it, cannot take more body.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from runtime.router import pages
from runtime.router.config import RouterConfig
from runtime.router.exchange import Exchange
from runtime.router.headers import read_request
from runtime.router.pool import UpstreamPool
from runtime.router.routes import Address, RouteTable, normalize_host
from runtime.router.simple_heads import simple_request
from runtime.router.upstream import UpstreamConnection

log = logging.getLogger(__name__)

# Why reading from the client is paused; reading resumes when no reason is left.
PIPELINED, BUFFERING, UPSTREAM_FULL, BROKEN = 1, 2, 4, 8
# Many apps ignore a body on these methods and would read it as the next request on a reused connection.
BODILESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})


class RequestRejected(Exception):
    """Raised inside a parser callback to answer the request with an error status instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


class ClientConnection(asyncio.Protocol):
    """One client connection: its requests in order, each proxied to an upstream or answered by the router."""

    def __init__(self, config: RouterConfig, routes: RouteTable, pool: UpstreamPool,
                 connections: set[ClientConnection]) -> None:
        self._config = config
        self._routes = routes
        self._pool = pool
        self._connections = connections
        self._loop = pool.loop
        self._proto = config.forwarded_proto.encode()
        self._parser = HttpRequestParser(self)
        self.transport: asyncio.Transport
        self.writing_paused = False
        self._peer = b""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_message = False
        """The parser holds part of a request: the next bytes are its continuation, whatever they look like."""
        self._idle_since = 0.0
        self._last_read = 0.0
        self._parsing: Exchange | None = None
        self._active: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._upgrading: Exchange | None = None
        self._held: list[bytes] = []
        """What the client sent after its Upgrade request, held until the app agrees to switch (101):
        an app that does not would read those bytes as requests of its own, ones the router never saw."""
        # asyncio holds tasks weakly: this reference keeps an in-flight connect from being collected.
        self._connecting: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = 0
        self._reading = False
        self._draining = False
        self._closing = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = peer[0].encode() if isinstance(peer, tuple) else b"unknown"
        self._connections.add(self)
        self._idle_since = self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._idle_since + self._config.head_timeout, self._check_timeouts)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._paused & BROKEN:
            return
        self._last_read = self._loop.time()
        upgrading = self._upgrading
        if upgrading is not None:  # after an Upgrade request the client speaks the new protocol
            self._tunnel(upgrading, data)
            return
        if self._parsing is None:
            if not self._in_message and self._active is None and not self._queue and self._start_simple(data):
                return
            self._head_bytes += len(data)
        self._reading = True
        rejected: tuple[int, str] | None = None
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self._upgrading is not None and len(data) > exc.args[0]:
                self._tunnel(self._upgrading, data[exc.args[0]:])
        except HttpParserError as exc:
            reason = exc.__context__
            if isinstance(reason, RequestRejected):
                rejected = (reason.status, reason.message)
            elif reason is not None:
                log.error("router: failed on a request", exc_info=reason)
                rejected = (500, "the router failed on this request")
            else:
                rejected = (400, f"the request is not valid HTTP/1.1: {exc}")
        self._reading = False
        if self._active is not None and not self._closing:
            self._flush(self._active)  # what the requests before a broken one sent still goes out
        if rejected is None and self._parsing is None and self._head_bytes > self._config.max_head_bytes:
            rejected = (431, "the request head is too large")
        if rejected is not None:
            self._request_error(*rejected)

    def eof_received(self) -> bool:
        if self._closing:
            return False
        if self._parsing is not None or self._upgrading is not None or (self._active is None and not self._queue):
            return False
        self._draining = True  # half-closed after its requests: answer them, then close
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        exchange = self._active
        if exchange is not None and exchange.upstream is not None:
            conn = exchange.upstream
            exchange.upstream = None
            conn.release()
            if exchange is self._upgrading and exchange.response_started:
                conn.transport.close()
            else:
                conn.transport.abort()
        self._active = self._parsing = self._upgrading = None
        self._queue.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self._active is not None and self._active.upstream is not None:
            self._active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._active is not None and self._active.upstream is not None:
            self._active.upstream.resume_reading()

    def _start_simple(self, data: bytes) -> bool:
        """Send a simple request (runtime.router.simple_heads) to its app; False for anything else, which the
        parser reads, as it does a request for an unknown host or an app with no web process."""
        if len(data) > self._config.max_head_bytes:
            return False
        request = simple_request(data, self._peer, self._proto)
        if request is None:
            return False
        route = self._routes.lookup(request.host)
        if route is None or not route.upstreams:
            return False
        exchange = Exchange(self, request)
        exchange.route = route
        exchange.request_complete = True
        self._head_bytes = 0  # a stray CRLF the parser skipped is not the start of a head that stalls
        self._start(exchange)
        return True

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_bytes > self._config.max_head_bytes and self._head_size() > self._config.max_head_bytes:
            raise RequestRejected(431, "the request head is too large")
        self._head_bytes = 0
        parser = self._parser
        request = read_request(parser.get_method(), self._url, self._headers, parser.get_http_version() == "1.1",
                               parser.should_keep_alive(), parser.should_upgrade(), self._peer, self._proto)
        self._url = b""
        self._headers = []
        exchange = Exchange(self, request)
        keep_alive = request.keep_alive and not request.has_body and not request.upgrade
        if request.error is not None:
            status, message = request.error
            exchange.answer(pages.page(status, message, as_html=request.as_html, keep_alive=False), False)
        else:
            route = self._routes.lookup(request.host)
            if route is None:
                exchange.answer(pages.unknown_host(normalize_host(request.host), as_html=request.as_html,
                                                   keep_alive=keep_alive), keep_alive)
            elif not route.upstreams:
                exchange.answer(pages.no_upstream(route.app, as_html=request.as_html, keep_alive=keep_alive),
                                keep_alive)
            else:
                exchange.route = route
        self._parsing = exchange
        if request.upgrade:
            self._upgrading = exchange
        self._enqueue(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        if exchange.local is not None:
            return
        if exchange.request.chunked:
            exchange.pending += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            exchange.pending.append(body)
        exchange.pending_bytes += len(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        self._parsing = None
        self._in_message = False
        exchange.request_complete = True
        if exchange.request.chunked and exchange.local is None:
            exchange.pending.append(b"0\r\n\r\n")
        if exchange is self._active and exchange.local is not None:
            self._done()

    # exchanges

    def _enqueue(self, exchange: Exchange) -> None:
        if self._closing:  # requests pipelined behind one that closes the connection go unanswered
            return
        if self._active is None and not self._queue:
            self._start(exchange)
        else:
            self._queue.append(exchange)
            self._pause(PIPELINED)

    def _next(self) -> None:
        """Start exchanges from the line until one waits for an app or for its request body."""
        while self._active is None and self._queue and not self._closing:
            self._start(self._queue.popleft())
        if not self._queue:
            self._resume(PIPELINED)

    def _start(self, exchange: Exchange) -> None:
        self._active = exchange
        if exchange.local is None:
            self._dispatch(exchange)
        else:
            self._answer(exchange)

    def _answer(self, exchange: Exchange) -> None:
        self.transport.write(exchange.local)
        exchange.response_started = True
        if not exchange.keep_alive or self._draining:
            self._close(linger=True)
        elif exchange.request_complete:
            self._done()

    def _done(self) -> None:
        self._active = None
        self._idle_since = self._loop.time()
        if self._queue:
            self._next()

    def _dispatch(self, exchange: Exchange) -> None:
        order = exchange.route.rotation()
        if exchange.retries:  # the app closed a reused connection under the request: this time a new one, once
            max_idle = -1.0
        elif exchange.retryable:
            max_idle = self._config.pool_idle_timeout
        else:
            max_idle = self._config.safe_reuse_idle
        conn = self._pool.take(order[0], max_idle, exchange.route.owner)
        if conn is None:
            self._connecting = self._loop.create_task(self._connect(exchange, order, max_idle))
        else:
            self._attach(exchange, conn)

    async def _connect(self, exchange: Exchange, order: tuple[Address, ...], max_idle: float) -> None:
        for address in order:
            conn = self._pool.take(address, max_idle, exchange.route.owner)
            if conn is None:
                try:
                    conn = await self._pool.connect(address, exchange.route.owner)
                except (OSError, TimeoutError) as exc:
                    log.debug("router: %s: cannot connect to %s:%d: %r", exchange.route.app, *address, exc)
                    continue
            self._connecting = None
            if self._closing or exchange is not self._active or exchange.local is not None:
                self._pool.put(conn)
            else:
                self._attach(exchange, conn)
            return
        self._connecting = None
        if not self._closing and exchange is self._active:
            log.info("router: %s: no web process accepted a connection (%d tried)", exchange.route.app, len(order))
            self._bad_gateway(exchange)

    def _attach(self, exchange: Exchange, conn: UpstreamConnection) -> None:
        exchange.upstream = conn
        conn.begin(exchange)
        if not self._reading:  # else data_received flushes head and body in one write
            self._flush(exchange)

    def _flush(self, exchange: Exchange) -> None:
        if exchange.upstream is not None:
            exchange.flush()
            self._resume(BUFFERING)
        elif exchange.pending_bytes > self._config.buffer_bytes:
            self._pause(BUFFERING)

    def _bad_gateway(self, exchange: Exchange) -> None:
        keep_alive = exchange.request_complete and exchange.request.keep_alive and not exchange.request.upgrade
        exchange.answer(pages.bad_gateway(exchange.route.app, as_html=exchange.request.as_html,
                                          keep_alive=keep_alive), keep_alive)
        self._answer(exchange)

    # called by the upstream connection

    def response_done(self, exchange: Exchange, conn: UpstreamConnection, reusable: bool) -> None:
        exchange.upstream = None
        conn.release()
        request = exchange.request
        if (reusable and exchange.request_complete and not request.upgrade
                and not (request.has_body and request.method in BODILESS_METHODS)
                and not conn.transport.get_write_buffer_size()):
            self._pool.put(conn)
        else:
            conn.transport.close()
        self._resume(UPSTREAM_FULL)
        if not exchange.request_complete:
            self._close(linger=True)
        elif not exchange.keep_alive or self._draining:
            self._close()
        else:
            self._done()

    def upstream_failed(self, exchange: Exchange, conn: UpstreamConnection, retry: bool) -> None:
        """The app closed the connection or answered garbage before its response was complete."""
        exchange.upstream = None
        self._resume(UPSTREAM_FULL)
        if self._closing or exchange is not self._active:
            return
        if exchange.response_started:
            self.transport.abort()  # the client must see a cut response, never a complete-looking one
        elif retry and conn.reused and not conn.received and exchange.retryable and not exchange.retries:
            exchange.retries += 1  # the app closed an idle keep-alive connection as we sent on it
            exchange.pending = [exchange.request.head]
            self._dispatch(exchange)
        else:
            self._bad_gateway(exchange)

    def upstream_full(self, full: bool) -> None:
        if full:
            self._pause(UPSTREAM_FULL)
        else:
            self._resume(UPSTREAM_FULL)

    def tunnel_open(self, exchange: Exchange) -> None:
        """The app switched protocols: from now on bytes flow both ways unparsed."""
        held, self._held = self._held, []
        for data in held:
            self._tunnel(exchange, data)
        self._resume(BUFFERING)

    def tunnel_closed(self) -> None:
        self._close()

    def _tunnel(self, exchange: Exchange, data: bytes) -> None:
        if exchange.response_started:
            exchange.pending.append(data)
            self._flush(exchange)
        else:
            self._held.append(data)
            if sum(map(len, self._held)) > self._config.buffer_bytes:
                self._pause(BUFFERING)

    # closing

    def shutdown(self) -> None:
        """The router is closing: finish the exchange in flight, then close."""
        self._draining = True
        if self._active is None and not self._queue:
            self._close()

    def _close(self, linger: bool = False) -> None:
        """Close once the response is written. With `linger`, the client may still be sending (an error, an
        unread body): half-close and drain it first, as closing over unread bytes resets the connection and
        can destroy the response before the client reads it.
        """
        if self._closing:
            return
        self._closing = True
        transport = self.transport
        if linger and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # asyncio's transport raises when the client is gone already
                transport.close()
                return
            if self._paused:
                self._paused = 0
                transport.resume_reading()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(self._config.head_timeout, transport.close)
        else:
            transport.close()

    def _request_error(self, status: int, message: str) -> None:
        """The client broke its request: answer `status` unless a response is under way, and close."""
        if self._closing:
            return
        self._pause(BROKEN)
        self._upgrading = None
        exchange = self._parsing
        self._parsing = None
        response = pages.page(status, message, as_html=False, keep_alive=False)
        if exchange is None:  # a new request head: answer in turn
            exchange = Exchange(self, None)
            exchange.answer(response, False)
            self._enqueue(exchange)
        elif exchange is not self._active:
            exchange.answer(response, False)
        else:  # inside the active request's body: the app got part of it
            conn = exchange.upstream
            if conn is not None:
                exchange.upstream = None
                conn.release()
                conn.transport.abort()
            if exchange.response_started:
                self.transport.abort()
            else:
                exchange.answer(response, False)
                self._answer(exchange)

    def _check_timeouts(self) -> None:
        config = self._config
        now = self._loop.time()
        deadline = now + config.head_timeout
        if self._upgrading is not None:
            pass  # a tunnel may be quiet for as long as the app likes
        elif self._parsing is not None:
            if not self._paused:  # paused, the router is the slow one
                deadline = self._last_read + config.body_timeout
                if now >= deadline:
                    self._request_error(408, "the request body stalled")
                    return
        elif self._active is None and not self._queue:
            deadline = self._idle_since + config.head_timeout
            if now >= deadline:
                if self._head_bytes:
                    self._request_error(408, "the request head took too long")
                else:
                    self._close()
                return
        self._timer = self._loop.call_at(deadline, self._check_timeouts)

    def _head_size(self) -> int:
        return len(self._url) + sum(len(name) + len(value) + 4 for name, value in self._headers)

    def _pause(self, reason: int) -> None:
        if not self._paused and not self._closing:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self._closing:
                self.transport.resume_reading()
