"""Health checks: Dokku's app.json checks, else "the web process listens on $PORT and answers HTTP"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from runtime.local.scheduler import Instance

# Without app.json checks: how long a new web process may take to answer its first request.
DEFAULT_STARTUP_SECONDS = 30.0
POLL = 0.05
# What a check reads of a response, at most: enough to find its `content`, never what an app chooses to send.
BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Check:
    """One Dokku healthcheck (an HTTP GET of `path` on the process's $PORT); defaults are Dokku's."""

    type: str = "startup"
    name: str = ""
    path: str = "/"
    content: str | None = None
    attempts: int = 3
    timeout: float = 5
    wait: float = 5
    initial_delay: float = 0


class HealthCheckFailed(Exception):
    pass


async def _crashed(instance: Instance) -> bool:
    """Read off the event loop: status.json, and the supervisor's command line."""
    return await asyncio.to_thread(instance.state) in ("crashed", "restarting", "stopped", "lost")


async def _get(client: httpx.AsyncClient, instance: Instance, path: str, timeout: float) -> tuple[int, bytes]:
    """The status and the first BODY_BYTES of the body, all within `timeout`: httpx's own timeout is per
    read, and a process that keeps sending would otherwise hold the check, and the daemon's memory, forever.
    Raw bytes, asked for uncompressed: nothing the app sends is inflated here."""
    async with asyncio.timeout(timeout):
        async with client.stream("GET", f"http://127.0.0.1:{instance.port}{path}", timeout=timeout,
                                 headers={"Accept-Encoding": "identity"}) as response:
            body = b""
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) >= BODY_BYTES:
                    break
            return response.status_code, body[:BODY_BYTES]


async def probe(client: httpx.AsyncClient, instance: Instance, check: Check) -> str | None:
    """None when the check passes, else why not. As in Dokku, a declared check passes on 2xx or 3xx only
    (and with the content, when it names one): an app answering 404 on its check path is not healthy."""
    try:
        status, body = await _get(client, instance, check.path, check.timeout)
    except TimeoutError:
        return f"GET {check.path}: no answer within {check.timeout:g}s"
    except httpx.HTTPError as exc:
        return f"GET {check.path}: {type(exc).__name__}"
    if not 200 <= status < 400:
        return f"GET {check.path}: HTTP {status}"
    if check.content is not None and check.content not in body.decode(errors="replace"):
        return f"GET {check.path}: body does not contain {check.content!r} (in its first {BODY_BYTES // 1024} KiB)"
    return None


async def _answers(client: httpx.AsyncClient, instance: Instance, timeout: float) -> bool:
    """Without declared checks a web process is up once it answers HTTP at all, whatever the status."""
    try:
        await _get(client, instance, "/", timeout)
    except (TimeoutError, httpx.HTTPError):
        return False
    return True


async def wait_healthy(instance: Instance, checks: list[Check], say: Callable[[str], None]) -> None:
    """Return once every check passed; raise HealthCheckFailed with the reason otherwise."""
    async with httpx.AsyncClient(trust_env=False) as client:
        # First the process must answer at all; polling fast here keeps deploys quick.
        deadline = time.monotonic() + DEFAULT_STARTUP_SECONDS
        while True:
            if await _crashed(instance):
                raise HealthCheckFailed(f"{instance.name} exited before answering on port {instance.port}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise HealthCheckFailed(
                    f"{instance.name} did not answer HTTP on $PORT within {DEFAULT_STARTUP_SECONDS:.0f}s")
            if await _answers(client, instance, min(2.0, left)):
                break
            await asyncio.sleep(POLL)
        for check in checks:
            await asyncio.sleep(check.initial_delay)
            why = "not tried"
            for attempt in range(1, max(check.attempts, 1) + 1):
                if await _crashed(instance):
                    raise HealthCheckFailed(f"{instance.name} exited during health check {check.name!r}")
                why = await probe(client, instance, check)
                if why is None:
                    say(f"health check {check.name!r} passed for {instance.name}")
                    break
                say(f"health check {check.name!r} attempt {attempt}/{check.attempts} for {instance.name}: {why}")
                await asyncio.sleep(check.wait)
            else:
                raise HealthCheckFailed(f"health check {check.name!r} failed for {instance.name}: {why}")
