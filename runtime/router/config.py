"""The built-in router's limits and timeouts, in one place so tests and the daemon can tune them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    max_head_bytes: int = 64 * 1024
    """A request line plus headers larger than this gets 431, so a client cannot grow memory without end."""
    head_timeout: float = 30.0
    """An idle keep-alive connection, or one trickling a request head (slowloris), is closed after this."""
    body_timeout: float = 60.0
    """A request body that sends no byte for this long is abandoned."""
    connect_timeout: float = 3.0
    """Per upstream: after this the next replica is tried, as for a refused connection."""
    pool_size: int = 32
    """Idle keep-alive connections kept per upstream; more are closed when they finish."""
    pool_idle_timeout: float = 60.0
    """Idle upstream connections are kept this long, as nginx does: a new connection costs a thread-per-connection
    app (the stdlib's, gunicorn's gthread) a thread start. Apps close theirs sooner (gunicorn after 2 s, uvicorn
    and Node after 5 s); the router sees the close and drops the connection. An idempotent request without a body
    that meets one closing as it is sent, before any answer, goes again once, on a new connection."""
    safe_reuse_idle: float = 1.5
    """Any other request (a body, or a method like POST) reuses only a connection idle for less than this: shorter
    than common app servers' keep-alive timeouts, so the app will not close it as the request arrives."""
    buffer_bytes: int = 256 * 1024
    """Request body held while an upstream is being connected before the client is paused."""
    shutdown_timeout: float = 5.0
    """On close, how long requests in flight may finish before their connections are cut."""
    forwarded_proto: str = "http"
    """X-Forwarded-Proto sent to apps: the scheme clients used to reach the router."""
