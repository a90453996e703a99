"""Liveness checks after the rollout: app.json checks of `"type": "liveness"` keep running on every process
of the live release, and a process that fails one `attempts` times in a row is restarted, as Kubernetes
does. Startup and readiness checks run once, at deploy time (runtime.health)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence

import httpx

from runtime.health import Check, probe
from runtime.local.scheduler import Instance
from runtime.process_logs import ProcessLogs

log = logging.getLogger(__name__)

LIVENESS = "liveness"


def _look(instance: Instance) -> tuple[dict, str]:
    """status.json and what it means, read off the event loop."""
    status = instance.status()
    return status, instance.state(status)


class LivenessMonitor:
    """One task per app with liveness checks, replaced at each rollout and cancelled when the app stops."""

    def __init__(self, logs: ProcessLogs, kill_after: float = 10.0) -> None:
        self.logs = logs
        self.kill_after = kill_after
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def watch(self, app: str, instances: Sequence[Instance], checks: Mapping[str, Sequence[Check]]) -> None:
        self.forget(app)
        watched = [(i, c) for i in instances for c in checks.get(i.process_type, ()) if c.type == LIVENESS]
        if watched:
            self._tasks[app] = asyncio.create_task(self._run(app, watched), name=f"liveness {app}")

    def forget(self, app: str) -> None:
        task = self._tasks.pop(app, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, app: str, watched: list[tuple[Instance, Check]]) -> None:
        async with httpx.AsyncClient(trust_env=False) as client:
            await asyncio.gather(*(self._watch(client, app, instance, check) for instance, check in watched))

    async def _watch(self, client: httpx.AsyncClient, app: str, instance: Instance, check: Check) -> None:
        failures = 0
        started_at = None
        while True:
            status, state = await asyncio.to_thread(_look, instance)
            if state != "running" or not status.get("child_pid"):
                failures = 0  # starting, restarting, stopped, or its supervisor is gone: nothing to judge
                await asyncio.sleep(max(check.wait, 0.5))
                continue
            if status.get("started_at") != started_at:  # a fresh process gets its initial delay again
                started_at, failures = status.get("started_at"), 0
                await asyncio.sleep(check.initial_delay)
            await asyncio.sleep(max(check.wait, 0.5))
            why = await probe(client, instance, check)
            failures = 0 if why is None else failures + 1
            if failures >= max(check.attempts, 1):
                status, state = await asyncio.to_thread(_look, instance)
                if state != "running" or status.get("started_at") != started_at:
                    continue  # it restarted meanwhile: that pid is not the one that failed
                reason = f"liveness check {check.name!r} failed {failures} times in a row ({why})"
                await asyncio.to_thread(self.logs.write, app, instance.name, f"{reason}; restarting the process")
                log.info("%s %s: liveness check %r failed; restarting", app, instance.name, check.name)
                await self._restart(instance, status["child_pid"], reason)
                failures = 0

    async def _restart(self, instance: Instance, child_pid: int, reason: str) -> None:
        """End the process; its supervisor starts it again (SIGTERM, then SIGKILL if it will not go)."""
        await asyncio.to_thread(instance.request_restart, reason)
        try:
            os.killpg(child_pid, signal.SIGTERM)
        except ProcessLookupError:
            await asyncio.to_thread(instance.withdraw_restart_request)  # it is gone already: its exit was not ours
            return
        with contextlib.suppress(ProcessLookupError):
            for _ in range(int(self.kill_after * 10)):
                await asyncio.sleep(0.1)
                os.killpg(child_pid, 0)
            os.killpg(child_pid, signal.SIGKILL)
