"""Zero-downtime rollout: start the new processes, wait for health, switch the router, drain the old.

The router sends an app's traffic only to its live web processes that serve (runtime.supervisor_watch: running,
on a listener of the app's own uid), through sockets of that uid alone (runtime.router.socket_owners); the watch
has the app routed again whenever that set changes, and one app's route changes are made one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.health import Check, HealthCheckFailed, wait_healthy
from runtime.liveness import LivenessMonitor
from runtime.local.cgroups import Limits
from runtime.local.scheduler import Instance, LocalScheduler, free_port
from runtime.process_logs import ProcessLogs
from runtime.router import Router
from runtime.supervisor_watch import SupervisorWatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReleaseSpec:
    """Everything the runtime needs to run one release of an app."""

    app: str
    version: int
    cwd: Path
    processes: dict[str, str]  # process type -> command
    env: dict[str, str]
    formation: dict[str, int]
    hostnames: Sequence[str]
    healthchecks: dict[str, list[Check]] = field(default_factory=dict)
    limits: Limits = Limits()


@dataclass(frozen=True)
class _Routed:
    """What the router sent an app's traffic to before a cutover: the version and its processes."""

    version: int | None
    current: set[Instance]
    checks: Mapping[str, Sequence[Check]]


@dataclass
class Cutover:
    """A new release serves while the processes it replaces still run: `finish` drains them, `revert` routes
    back to them and stops the new ones (a postdeploy script failed). One of the two, once."""

    rollout: Rollout
    app: str
    replaced: list[Instance]
    started: list[Instance]
    before: _Routed
    done: bool = False

    def finish(self) -> None:
        self._once()
        self.rollout._drain(self.replaced)

    async def revert(self) -> None:
        self._once()
        await self.rollout._revert(self)

    def _once(self) -> None:
        if self.done:
            raise RuntimeError("a cutover is finished or reverted once")
        self.done = True


class RolloutFailed(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


class Rollout:
    def __init__(self, scheduler: LocalScheduler, router: Router, logs: ProcessLogs,
                 drain_seconds: float = 2.0) -> None:
        self.scheduler = scheduler
        self.router = router
        self.logs = logs
        self.drain_seconds = drain_seconds
        self._draining: set[asyncio.Task] = set()
        self._live: dict[str, int] = {}  # app -> the version the router sends traffic to
        self._current: dict[str, set[Instance]] = {}  # app -> the instances of the live rollout
        self._hostnames: dict[str, Sequence[str]] = {}  # app -> the names it answers to, as last set
        self._checks: dict[str, Mapping[str, Sequence[Check]]] = {}  # app -> the live release's health checks
        self._routing: dict[str, asyncio.Lock] = {}
        self.liveness = LivenessMonitor(logs)
        self.supervisors = SupervisorWatch(scheduler, lambda: [i for c in self._current.values() for i in c],
                                           self._route)

    async def deploy(self, spec: ReleaseSpec, say: Callable[[str], None]) -> Cutover:
        """Route to the new release once it is healthy; raise RolloutFailed, having stopped whatever it started,
        when it is not. The processes it replaces keep running until the cutover is finished (or reverted)."""
        self._hostnames[spec.app] = spec.hostnames
        old = await asyncio.to_thread(self.scheduler.instances, spec.app)
        started: list[Instance] = []
        try:
            for kind, count in sorted(spec.formation.items()):
                if kind not in spec.processes:
                    continue
                for index in range(1, count + 1):
                    port = free_port()
                    env = {**spec.env, "PORT": str(port), "DYNO": f"{kind}.{index}", "DEVFLOW_PROCESS_TYPE": kind}
                    started.append(await self.scheduler.start(
                        spec.app, spec.version, kind, index, spec.processes[kind], spec.cwd, env, port, spec.limits))
            say("starting " + (", ".join(f"{k}={c}" for k, c in sorted(spec.formation.items())
                                         if c and k in spec.processes) or "no processes"))
            web = [i for i in started if i.process_type == "web"]
            # Web processes must answer HTTP; other types only when app.json gives them checks.
            checked = [i for i in started if i.process_type == "web" or spec.healthchecks.get(i.process_type)]
            await asyncio.gather(*(wait_healthy(i, spec.healthchecks.get(i.process_type, []), say) for i in checked))
            for instance in started:
                if (await asyncio.to_thread(instance.status)).get("state") == "crashed":
                    raise HealthCheckFailed(f"{instance.name} crashed at start")
            await self.supervisors.observe(web)
            for instance in web:
                if instance not in self.supervisors.serving:
                    raise HealthCheckFailed(f"{instance.name} does not serve on port {instance.port}: it stopped, or "
                                            "the socket listening there is not its own")
        except HealthCheckFailed as exc:
            # What the new processes said as they started, not what earlier releases logged.
            tail = await asyncio.to_thread(_startup_output, started, 10)
            await asyncio.gather(*(self.scheduler.stop(i) for i in started))
            raise RolloutFailed("health checks", str(exc) + ("\n" + "\n".join(tail) if tail else "")) from None
        except BaseException:
            await asyncio.gather(*(self.scheduler.stop(i) for i in started), return_exceptions=True)
            raise
        before = _Routed(self._live.get(spec.app), self._current.get(spec.app, set()), self._checks.get(spec.app, {}))
        hostnames = self._hostnames.get(spec.app, spec.hostnames)  # a domains:add during the checks counts
        # The new release is live from here, noted before the router has it: a reroute while this waits sends
        # the new processes. The router's changes cannot be taken back, only finished.
        self._note_live(spec.app, spec.version, started, spec.healthchecks)
        await self._route(spec.app)
        say(f"routing {', '.join(hostnames)} to v{spec.version}" + ("" if web else " (no web process)"))
        return Cutover(self, spec.app, old, started, before)

    def _note_live(self, app: str, version: int | None, instances: Iterable[Instance],
                   healthchecks: Mapping[str, Sequence[Check]]) -> None:
        instances = list(instances)
        if version is None:
            self._live.pop(app, None)
        else:
            self._live[app] = version
        self._current[app] = set(instances)
        self._checks[app] = healthchecks
        self.supervisors.ensure_running()
        self.liveness.watch(app, instances, healthchecks)

    async def _revert(self, cutover: Cutover) -> None:
        """Back to the processes the cutover replaced (still running), and the new ones stopped."""
        app, before = cutover.app, cutover.before
        running = await asyncio.to_thread(lambda: [i for i in cutover.replaced if i.alive()])
        previous = [i for i in running if i in before.current]
        await self.supervisors.observe(previous)
        self._note_live(app, before.version, previous, before.checks)
        if before.version is None:
            async with self._routing_of(app):
                self._hostnames.pop(app, None)
                await self.router.remove_app(app)
        else:
            await self._route(app)
        await asyncio.gather(*(self.scheduler.stop(i) for i in cutover.started), return_exceptions=True)

    def _drain(self, old: list[Instance]) -> None:
        """Requests in flight on the old processes finish; then they get SIGTERM."""
        if not old:
            return

        async def drain() -> None:
            await asyncio.sleep(self.drain_seconds)
            await asyncio.gather(*(self.scheduler.stop(i) for i in old), return_exceptions=True)

        task = asyncio.create_task(drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def close(self) -> None:
        """At daemon shutdown: stop watching, let old processes finish draining. Live ones keep running."""
        await self.liveness.close()
        await self.supervisors.close()
        if self._draining:
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def adopt(self, app: str, version: int, hostnames: Sequence[str],
                    healthchecks: Mapping[str, Sequence[Check]]) -> bool:
        """After a daemon restart: route to the release's processes that still run. False if none do.

        Those of the release whose supervisor died meanwhile count too: the supervisor watch starts them again on
        their ports. Processes of other releases, and stopped ones, are drained."""
        instances = await asyncio.to_thread(self.scheduler.instances, app)
        states = dict(zip(instances, await asyncio.to_thread(lambda: [i.state() for i in instances]), strict=True))
        current = [i for i in instances if i.version == version and states[i] != "stopped"]
        if all(states[i] in ("lost", "crashed") for i in current):
            return False  # none of it runs (nothing is left, or the machine rebooted): it is to start afresh
        stale = [i for i in instances if i not in current]
        self._hostnames[app] = hostnames
        await self.supervisors.observe(current)
        self._note_live(app, version, current, healthchecks)
        await self._route(app)
        self._drain(stale)
        return True

    async def reroute(self, app: str, hostnames: Sequence[str]) -> None:
        """New host names for the processes already live (domains:add), and for a rollout under way."""
        self._hostnames[app] = hostnames
        await self._route(app)

    async def stop_app(self, app: str, hostnames: Sequence[str] | None = None) -> None:
        """Stop every process; with `hostnames` the app stays routed (503 until it runs again), else unrouted."""
        self._live.pop(app, None)
        self._current.pop(app, None)
        self._hostnames.pop(app, None)
        self._checks.pop(app, None)
        self.liveness.forget(app)
        async with self._routing_of(app):
            if hostnames is None:
                await self.router.remove_app(app)
            else:
                await self.router.set_app(app, hostnames, [])
        if hostnames is None:
            self._routing.pop(app, None)
        instances = await asyncio.to_thread(self.scheduler.instances, app)
        await asyncio.gather(*(self.scheduler.stop(i) for i in instances), return_exceptions=True)

    def _routing_of(self, app: str) -> asyncio.Lock:
        return self._routing.setdefault(app, asyncio.Lock())

    async def _route(self, app: str) -> None:
        """The app's host names to its live web processes that serve, each change made from what holds when it
        is made; nothing for an app that is stopped (stop_app routed it)."""
        async with self._routing_of(app):
            if app not in self._hostnames:
                return
            web = sorted((i for i in self._current.get(app, ()) if i.process_type == "web"
                          and i in self.supervisors.serving), key=lambda i: i.name)
            owner = await asyncio.to_thread(self.scheduler.app_uid, app)
            await self.router.set_app(app, self._hostnames[app], _upstreams(web), owner)

    def processes(self, app: str) -> list[dict]:
        """The live rollout's processes first; older ones still stopping show as draining."""
        current = self._current.get(app, set())
        records = []
        for instance in self.scheduler.instances(app):
            record = instance.record()
            if instance not in current and record["state"] != "stopped":
                record["state"] = "draining"
            records.append((instance not in current, record))
        return [record for _, record in sorted(records, key=lambda pair: pair[0])]


def _startup_output(instances: Iterable[Instance], lines: int) -> list[str]:
    return [line for instance in instances for line in instance.startup_output(lines)]


def _upstreams(web: Iterable[Instance]) -> list[tuple[str, int]]:
    return [("127.0.0.1", i.port) for i in web]
