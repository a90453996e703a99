"""Supervisors that die are replaced: no app process runs unsupervised, nor stays down, because its supervisor
was killed (`kill -9`, the OOM killer) or died while the daemon was down.

A supervisor takes its process with it (PR_SET_PDEATHSIG), but what that process started, and the instance,
stay behind. Once a second the live release's instances are looked at, off the event loop (two small reads
each); one whose supervisor went without ending on purpose (`Instance.state()` is `lost`) has what is left
in its unit killed and a new supervisor started on the same spec and port. An instance whose supervisors keep
dying is given up on, and shows as crashed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path

from runtime.local.scheduler import Instance, LocalScheduler

log = logging.getLogger(__name__)

INTERVAL = 1.0
GIVE_UP_AFTER = 3  # supervisors started again for one instance within WINDOW
WINDOW = 60.0


class SupervisorWatch:
    def __init__(self, scheduler: LocalScheduler, live: Callable[[], Collection[Instance]],
                 interval: float = INTERVAL) -> None:
        self.scheduler = scheduler
        self.live = live
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._revived: dict[Path, deque[float]] = {}

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="supervisor watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                log.exception("checking the app processes' supervisors failed")

    async def check(self) -> None:
        watched = list(self.live())
        lost = await asyncio.to_thread(_lost, watched)
        live = set(self.live())
        self._revived = {d: times for d, times in self._revived.items() if any(i.directory == d for i in live)}
        for instance, pid in lost:
            if instance not in live:  # it left the live release meanwhile: its stop cleans up
                continue
            why = f"its supervisor (pid {pid}) died" if pid else "its supervisor died"
            times = self._revived.setdefault(instance.directory, deque(maxlen=GIVE_UP_AFTER))
            if len(times) == GIVE_UP_AFTER and time.monotonic() - times[0] < WINDOW:
                log.error("%s %s: supervisors keep dying; giving up", instance.app, instance.name)
                await self.scheduler.abandon(instance, f"{why}, the {GIVE_UP_AFTER + 1}th time within "
                                                       f"{WINDOW:.0f}s; giving up")
                continue
            times.append(time.monotonic())
            log.warning("%s %s: %s; starting it again", instance.app, instance.name, why)
            try:
                await self.scheduler.revive(instance, why)
            except Exception:
                log.exception("%s %s: could not start it again", instance.app, instance.name)


def _lost(instances: list[Instance]) -> list[tuple[Instance, int | None]]:
    found = []
    for instance in instances:
        status = instance.status()
        if instance.state(status) == "lost":
            found.append((instance, status.get("supervisor_pid")))
    return found
