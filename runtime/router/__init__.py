"""The Router role: send each request for an app's host names to one of its healthy web processes.

Implementations: `process_impl`, the embedded default, runs the proxy of `builtin_impl` in a process of its
own (`standalone`) and drives it over `control`. Other routers (Caddy, a Kubernetes Ingress) are to take the
same calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Router(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def set_app(self, app: str, hostnames: Sequence[str], upstreams: Sequence[tuple[str, int]],
                      owner: int | None = None) -> None:
        """Atomically replace the app's host names and healthy web upstreams (host, port); [] upstreams -> 503.
        With `owner`, a connection goes to an upstream only if a socket of that uid accepts it. Returns once
        requests go to the new upstreams, so the old ones can be drained."""

    async def remove_app(self, app: str) -> None: ...
