"""The built-in router: an HTTP/1.1 reverse proxy on asyncio and httptools. The daemon runs it in a process of
its own (runtime.router.standalone, driven by process_impl).

Apps are served at their host names on one port; each request goes to the next healthy web process of
the app (round-robin), and a replica that refuses the connection, or whose port another uid's socket holds,
is skipped for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

from runtime.router.client import ClientConnection
from runtime.router.config import RouterConfig
from runtime.router.pool import UpstreamPool
from runtime.router.routes import Address, RouteTable
from runtime.router.socket_owners import SocketOwners

log = logging.getLogger(__name__)

BACKLOG = 2048


class BuiltinRouter:
    """Listens on `host`:`port` (0 picks a free port, readable as `.port` after `start`).

    `set_app` and `remove_app` may be called from any thread: they swap the route table in one assignment,
    so a request sees the old routes or the new ones. Requests already sent to an old upstream finish there.
    """

    def __init__(self, host: str, port: int, *, config: RouterConfig | None = None) -> None:
        self.host = host
        self.port = port
        self.config = config or RouterConfig()
        self._routes = RouteTable()
        self._connections: set[ClientConnection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: UpstreamPool | None = None
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on `host`:`port`, or accept on `sock`, a listening socket made elsewhere (a predecessor's)."""
        if self._server is not None:
            raise RuntimeError("the router is already started")
        loop = self._loop = asyncio.get_running_loop()
        pool = self._pool = UpstreamPool(loop, self.config, SocketOwners.open())

        def connection() -> ClientConnection:
            return ClientConnection(self.config, self._routes, pool, self._connections)

        if sock is None:
            self._server = await loop.create_server(connection, self.host, self.port, backlog=BACKLOG,
                                                    reuse_address=True)
        else:
            self._server = await loop.create_server(connection, sock=sock, backlog=BACKLOG)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        log.info("router listening on %s:%d", self.host, self.port)

    @property
    def listening(self) -> bool:
        """Accepting connections: started, and not closing."""
        return self._server is not None

    def listening_fd(self) -> int:
        """The listening socket, for a successor to accept on; still this router's until it closes."""
        if self._server is None:
            raise RuntimeError("the router is not listening")
        return self._server.sockets[0].fileno()

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish for up to `shutdown_timeout`, then cut the rest."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for conn in list(self._connections):
            conn.shutdown()
        deadline = self._loop.time() + self.config.shutdown_timeout
        while self._connections and self._loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            conn.transport.abort()
        self._pool.close()
        await server.wait_closed()

    def set_app(self, app: str, hostnames: Sequence[str], upstreams: Sequence[tuple[str, int]],
                owner: int | None = None) -> None:
        self._routes.set_app(app, hostnames, upstreams, owner)
        self._forget_unrouted()

    def remove_app(self, app: str) -> None:
        self._routes.remove_app(app)
        self._forget_unrouted()

    def routes(self) -> dict[str, tuple[tuple[str, ...], tuple[Address, ...], int | None]]:
        """Every app's host names, upstreams and owner, as set."""
        return self._routes.snapshot()

    def _forget_unrouted(self) -> None:
        """Close idle connections to upstreams no longer routed, on the loop's thread, so old processes drain."""
        if self._server is not None:
            self._loop.call_soon_threadsafe(lambda: self._pool.retain(self._routes.addresses()))
