"""The live release's instances, watched: supervisors that die are replaced, and the rollout hears at once which
web processes serve.

A supervisor takes its process with it (PR_SET_PDEATHSIG), but what that process started, and the instance,
stay behind. One whose supervisor went without ending on purpose (`Instance.state()` is `lost`: killed, the OOM
killer, or while the daemon was down) has what is left in its unit killed and a new supervisor started on the
same spec and port. An instance whose supervisors keep dying is given up on, and shows as crashed.

A web instance serves while its supervisor says it runs and the socket listening on its port is its app's uid's
(runtime.router.socket_owners): tenants share the loopback's port space, so while a process is down another
tenant's may bind its port. A supervisor tells the watch of each change of state as it makes it
(runtime.local.supervisor_events), first of all when its process exits; the watch looks at that instance and the
rollout routes the app again. A web instance that runs but does not listen yet is looked at every
PENDING_INTERVAL; every live instance every INTERVAL, which finds the supervisors that died (they tell nothing)
and the listeners that changed hands. Each look is off the event loop: a status.json and a socket lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from runtime.local.scheduler import Instance, LocalScheduler
from runtime.local.supervisor_events import SupervisorEvents
from runtime.router.socket_owners import SocketOwners

log = logging.getLogger(__name__)

INTERVAL = 1.0
PENDING_INTERVAL = 0.05
GIVE_UP_AFTER = 3  # supervisors started again for one instance within WINDOW
WINDOW = 60.0


@dataclass(frozen=True)
class _Look:
    instance: Instance
    state: str
    supervisor_pid: int | None
    serving: bool


class SupervisorWatch:
    """`live` gives the instances of the live releases; `on_serving(app)` is awaited when the set of the app's
    instances that serve changed (`serving`)."""

    def __init__(self, scheduler: LocalScheduler, live: Callable[[], Collection[Instance]],
                 on_serving: Callable[[str], Awaitable[None]], interval: float = INTERVAL) -> None:
        self.scheduler = scheduler
        self.live = live
        self.on_serving = on_serving
        self.interval = interval
        self.serving: set[Instance] = set()
        self._pending: set[Instance] = set()  # web instances that run but do not serve
        self._owners = SocketOwners.open()
        self._events = SupervisorEvents(scheduler.events)
        self._tasks: list[asyncio.Task[None]] = []
        self._revived: dict[Path, deque[float]] = {}
        self._looking = asyncio.Lock()  # looks are taken in turn, so none applies over a newer one
        self._woken = asyncio.Event()  # a web instance became pending: look again soon, not at the next interval

    def ensure_running(self) -> None:
        if self._tasks and not any(task.done() for task in self._tasks):
            return
        for task in self._tasks:
            task.cancel()
        self._tasks = [asyncio.create_task(self._run(), name="supervisor watch")]
        if self._events.open():
            self._tasks.append(asyncio.create_task(self._listen(), name="supervisor events"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._events.close()

    async def observe(self, instances: Iterable[Instance]) -> set[str]:
        """Look at these instances now; returns the apps whose instances that serve changed."""
        _, changed = await self._take_looks(list(instances))
        return changed

    async def _take_looks(self, instances: list[Instance]) -> tuple[list[_Look], set[str]]:
        """The looks, and the apps whose instances that serve changed."""
        async with self._looking:
            looks, gone = await asyncio.to_thread(self._look, instances, self.serving | self._pending)
            self.serving -= gone
            self._pending -= gone
            return looks, self._judge(looks)

    async def _run(self) -> None:
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), PENDING_INTERVAL if self._pending else self.interval)
            if self._woken.is_set():
                self._woken.clear()
                await asyncio.sleep(PENDING_INTERVAL)
            try:
                if time.monotonic() - last >= self.interval:
                    last = time.monotonic()
                    await self.check()
                else:
                    await self._refresh(self._pending & set(self.live()))
            except Exception:
                log.exception("checking the app processes' supervisors failed")

    async def _listen(self) -> None:
        while True:
            directory = await self._events.next()
            instance = next((i for i in self.live() if i.directory == directory), None)
            if instance is None:  # not of a live release (being stopped, or starting): its rollout looks
                continue
            try:
                await self._refresh([instance])
            except Exception:
                log.exception("%s %s: looking at it failed", instance.app, instance.name)

    async def _refresh(self, instances: Collection[Instance]) -> None:
        if instances:
            for app in await self.observe(instances):
                await self.on_serving(app)

    async def check(self) -> None:
        """Every live instance: which serve, and whose supervisor died."""
        looks, changed = await self._take_looks(list(self.live()))
        for app in changed:
            await self.on_serving(app)
        live = set(self.live())
        self._revived = {d: times for d, times in self._revived.items() if any(i.directory == d for i in live)}
        for look in looks:
            if look.state != "lost" or look.instance not in live:  # it left the live release meanwhile
                continue
            await self._revive(look.instance, look.supervisor_pid)

    async def _revive(self, instance: Instance, pid: int | None) -> None:
        why = f"its supervisor (pid {pid}) died" if pid else "its supervisor died"
        times = self._revived.setdefault(instance.directory, deque(maxlen=GIVE_UP_AFTER))
        if len(times) == GIVE_UP_AFTER and time.monotonic() - times[0] < WINDOW:
            log.error("%s %s: supervisors keep dying; giving up", instance.app, instance.name)
            await self.scheduler.abandon(instance, f"{why}, the {GIVE_UP_AFTER + 1}th time within {WINDOW:.0f}s; "
                                                   "giving up")
            return
        times.append(time.monotonic())
        log.warning("%s %s: %s; starting it again", instance.app, instance.name, why)
        try:
            await self.scheduler.revive(instance, why)
        except Exception:
            log.exception("%s %s: could not start it again", instance.app, instance.name)

    def _judge(self, looks: list[_Look]) -> set[str]:
        changed = set()
        for look in looks:
            instance = look.instance
            if look.serving != (instance in self.serving):
                changed.add(instance.app)
                (self.serving.add if look.serving else self.serving.discard)(instance)
            if instance.process_type == "web" and look.state == "running" and not look.serving:
                if not self._pending:
                    self._woken.set()
                self._pending.add(instance)
            else:
                self._pending.discard(instance)
        return changed

    def _look(self, instances: list[Instance], known: set[Instance]) -> tuple[list[_Look], set[Instance]]:
        """Blocking: each instance's state, and whether it serves; and which of those `known` are gone."""
        gone = {i for i in known if not i.directory.is_dir()}
        uids: dict[str, int] = {}
        looks = []
        for instance in instances:
            status = instance.status()
            state = instance.state(status)
            serving = instance.process_type == "web" and state == "running" and self._listens(instance, uids)
            looks.append(_Look(instance, state, status.get("supervisor_pid"), serving))
        return looks, gone

    def _listens(self, instance: Instance, uids: dict[str, int]) -> bool:
        """The socket that would take a connection to the instance's port is its app's uid's."""
        if self._owners is None:  # a kernel that cannot say: as before, the port is taken to be the app's
            return True
        if instance.app not in uids:
            uids[instance.app] = self.scheduler.app_uid(instance.app)
        return self._owners.listener(instance.port) == uids[instance.app]
