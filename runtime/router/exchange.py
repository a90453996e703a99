"""One request and its response through the router: the unit pipelining queues and a retry repeats."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.router.headers import Request

if TYPE_CHECKING:
    from runtime.router.client import ClientConnection
    from runtime.router.routes import Route
    from runtime.router.upstream import UpstreamConnection

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class Exchange:
    """Either proxied to an upstream of `route`, or answered by the router itself with `local`."""

    __slots__ = ("client", "request", "route", "local", "pending", "pending_bytes", "upstream", "request_complete",
                 "response_started", "keep_alive", "retries")

    def __init__(self, client: ClientConnection, request: Request | None) -> None:
        self.client = client
        self.request = request
        self.route: Route | None = None
        self.local: bytes | None = None
        self.pending: list[bytes] = [request.head] if request is not None and request.head else []
        """Request bytes not yet written upstream: the head, then the body as it arrives."""
        self.pending_bytes = 0
        self.upstream: UpstreamConnection | None = None
        self.request_complete = False
        self.response_started = False
        self.keep_alive = request is not None and request.keep_alive
        self.retries = 0

    def answer(self, response: bytes, keep_alive: bool) -> None:
        """The router answers instead of an app."""
        self.local = response
        self.keep_alive = keep_alive

    def flush(self) -> None:
        upstream = self.upstream
        if upstream is not None and self.pending:
            pending = self.pending
            upstream.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
            self.pending = []
            self.pending_bytes = 0

    @property
    def retryable(self) -> bool:
        """The request can go again on another connection: it is all head, and idempotent (RFC 9110 9.2.2),
        as the app may have acted on it before closing the connection."""
        request = self.request
        return (request is not None and request.method in IDEMPOTENT_METHODS and not request.has_body
                and not request.upgrade)
