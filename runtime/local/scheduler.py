"""Starts, stops and finds app processes on this machine, each under runtime.local.supervisor in a unit of its own.

Every process of an app runs in a unit (runtime.local.process_unit) that is killed whole: an app process's
when it exits or stops, a one-off's (release phase, deploy scripts) when it ends, a build's when the build
ends, and whatever a dead daemon left at the next start. Under root each of them sees its release at /app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.local import launcher, python_shims, release_mount
from runtime.local.app_user import AppUser, AppUsers, nobody_uid
from runtime.local.build_sandbox import BuildSandbox
from runtime.local.cgroups import Cgroups, Limits
from runtime.local.process_unit import ProcessUnit, Units
from runtime.local.supervisor_events import EVENTS_SOCKET
from runtime.local.unit_bounds import UnitBounds, rlimits, supervisor_limits
from runtime.log_lines import MAX_LINE_BYTES, LineSplitter
from runtime.process_logs import ProcessLogs

log = logging.getLogger(__name__)

SUPERVISOR = "runtime.local.supervisor"
RESTART_REQUEST = "restart-requested"
"""In an instance's directory: the supervisor is to take the process's next exit as a restart asked for."""
STARTUP_OUTPUT = "startup.log"
"""In an instance's directory: the first lines its process printed, which explain a failed start."""
LAUNCH_PLAN = "launch.json"
OPEN_FILES = 65536  # each app process's RLIMIT_NOFILE
RUN_ONCE_TIMEOUT = 3600.0  # release phase and deploy scripts, as Heroku allows
ENDED = ("crashed", "stopped")
"""What a supervisor that ends on purpose leaves in status.json; gone without saying either, it died."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _size(memory: int | None) -> str | None:
    return f"{memory // 1024**2}M" if memory else None


def shell_argv(command: str) -> list[str]:
    """`bash -c`, as on Heroku: bash execs a lone command (also the last of `cd x && cmd`), so a dyno is one
    process, while `a; b` or a pipeline keep shell semantics. Debian's /bin/sh (dash) forks even a lone command;
    it serves only where there is no bash."""
    shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
    return [shell, "-c", command]


def _write_private(path: Path, data: dict) -> None:
    """Root's files in the run directory: they hold the app's config."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as out:
        json.dump(data, out)


@dataclass(frozen=True)
class Instance:
    app: str
    version: int
    process_type: str
    index: int
    port: int
    directory: Path

    @property
    def name(self) -> str:
        return f"{self.process_type}.{self.index}"

    def request_restart(self, reason: str) -> None:
        """Tell the supervisor that the process's next exit is a restart asked for, not a crash."""
        (self.directory / RESTART_REQUEST).write_text(reason + "\n")

    def withdraw_restart_request(self) -> None:
        (self.directory / RESTART_REQUEST).unlink(missing_ok=True)

    def startup_output(self, lines: int) -> list[str]:
        """The last `lines` of what the process printed first (bounded by the supervisor), named as in the log."""
        try:
            text = (self.directory / STARTUP_OUTPUT).read_text(errors="replace")
        except OSError:
            return []
        return [f"{self.name} | {line}" for line in text.splitlines()[-lines:]]

    def status(self) -> dict:
        try:
            return json.loads((self.directory / "status.json").read_text())
        except (OSError, ValueError):
            return {"state": "starting"}

    def spec(self) -> dict:
        return json.loads((self.directory / "spec.json").read_text())

    def alive(self, status: dict | None = None) -> bool:
        """The supervisor runs (checked against its command line, so a reused pid does not count)."""
        pid = (status or self.status()).get("supervisor_pid")
        if not pid:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.directory / "spec.json").encode() in cmdline

    def state(self, status: dict | None = None) -> str:
        """The supervisor's word while it runs; `lost` when it died without ending on purpose (killed, or the
        machine rebooted): runtime.supervisor_watch starts it again."""
        status = status or self.status()
        if self.alive(status):
            return status.get("state", "starting")
        return status["state"] if status.get("state") in ENDED else "lost"

    def record(self) -> dict:
        status = self.status()
        state = self.state(status)
        return {"process": self.name, "release": f"v{self.version}", "port": self.port,
                "memory": _size(status.get("limits", {}).get("memory")), "cpu": status.get("limits", {}).get("cpu"),
                "state": state, "restarts": status.get("restarts", 0),
                "pid": status.get("child_pid") if state not in (*ENDED, "lost") else None}


class LocalScheduler:
    """`run_root` holds a directory per instance; its parent, the daemon's run directory, the records of the
    units of builds and one-offs (`tasks`). `shims` is where `python` and `pip` are provided for apps. `bounds`
    are the platform's on every unit (None: only what an app asks for)."""

    name = "local"

    def __init__(self, run_root: Path, logs: ProcessLogs, users: AppUsers | None = None,
                 cgroups: Cgroups | None = None, stop_timeout: int = 10, shims: Path | None = None,
                 bounds: UnitBounds | None = None) -> None:
        self.run_root = run_root
        self.logs = logs
        self.users = users
        self.cgroups = cgroups
        self.bounds = bounds
        self.stop_timeout = stop_timeout
        self.units = Units(cgroups, run_root, run_root.parent / "tasks")
        self.events = run_root.parent / EVENTS_SOCKET
        self.mount_at = release_mount.mount_point()
        host_path = os.environ.get("PATH", os.defpath)
        self.shims = python_shims.install(shims, self._usable(host_path)) if shims else None
        self._stopping: set[Path] = set()
        self._reviving: set[Path] = set()
        log.info("process units: %s", self.units.describe())

    def _usable(self, search_path: str) -> str:
        """PATH as an app's user can use it: without what only root may enter (a private /root)."""
        if self.users is None:
            return search_path
        return AppUser.numbered(nobody_uid()).usable_path(search_path)

    # app processes

    async def start(self, app: str, version: int, process_type: str, index: int, command: str, cwd: Path,
                    env: dict[str, str], port: int, limits: Limits | None = None) -> Instance:
        directory = self.run_root / app / f"v{version}-{process_type}.{index}-{secrets.token_hex(3)}"
        instance = Instance(app, version, process_type, index, port, directory)
        limits = self.bounds.of_process(limits or Limits()) if self.bounds else limits or Limits()
        await asyncio.to_thread(self._prepare, instance, command, cwd, env, limits)
        try:
            await self._launch(instance)
        except BaseException:
            await asyncio.to_thread(self._discard, instance)
            raise
        return instance

    def _prepare(self, instance: Instance, command: str, cwd: Path, env: dict[str, str], limits: Limits) -> None:
        instance.directory.mkdir(parents=True)
        unit = self.units.create(self.units.of_instance(instance.app, instance.directory, limits), limits)
        supervisor = self._supervisor_unit(instance, limits)
        _write_private(instance.directory / LAUNCH_PLAN,
                       self._plan(instance.app, instance.name, command, cwd, env, unit, limits))
        _write_private(instance.directory / "spec.json", {
            "app": instance.app, "version": instance.version, "process_type": instance.process_type,
            "index": instance.index, "port": instance.port, "name": instance.name,
            "log": str(self.logs.path(instance.app)), "log_max_bytes": self.logs.max_bytes,
            "status": str(instance.directory / "status.json"),
            "restart_request": str(instance.directory / RESTART_REQUEST),
            "startup_output": str(instance.directory / STARTUP_OUTPUT),
            "launch": str(instance.directory / LAUNCH_PLAN), "unit": unit.to_json(), "limits": limits.as_dict(),
            "supervisor_unit": supervisor.to_json() if supervisor else None, "stop_timeout": self.stop_timeout,
            "events": str(self.events),
        })

    def _supervisor_unit(self, instance: Instance, limits: Limits) -> ProcessUnit | None:
        """The supervisor's own cgroup, where cgroups hold limits (runtime.local.unit_bounds.supervisor_limits)."""
        if not (self.cgroups and self.cgroups.enforces_limits):
            return None
        own = supervisor_limits(limits)
        return self.units.create(self.units.of_supervisor(instance.app, instance.directory, own), own)

    def _plan(self, app: str, name: str, command: str, cwd: Path, env: dict[str, str], unit: ProcessUnit,
              limits: Limits) -> dict:
        """What runtime.local.launcher does to become `command`."""
        user = self.sandbox(app)
        return {"name": name, "argv": shell_argv(command), "env": env, "cwd": str(cwd),
                "mount_at": str(self.mount_at) if self.mount_at else None,
                "user": {"uid": user.uid, "gid": user.gid} if user else None,
                "rlimits": {"RLIMIT_NOFILE": OPEN_FILES, **rlimits(limits, self.cgroups, user is not None)},
                "unit": unit.to_json()}

    async def _launch(self, instance: Instance) -> None:
        # No pipes: the supervisor outlives this call, and a pipe it inherited would never reach EOF.
        errors = await asyncio.to_thread(lambda: self.logs.path(instance.app).open("ab"))  # path() makes its dir
        with errors:
            supervisor = await asyncio.create_subprocess_exec(
                sys.executable, "-m", SUPERVISOR, str(instance.directory / "spec.json"),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=errors,
                start_new_session=True, cwd=str(instance.directory),
                env={"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            if await supervisor.wait() != 0:
                raise RuntimeError(f"the supervisor of {instance.name} did not start; see `logs {instance.app}`")

    async def revive(self, instance: Instance, why: str) -> None:
        """Its supervisor died: what it left is killed, and a new one starts on the same spec (the same port, so
        the router's route stays right). An instance being stopped, or gone, is left alone."""
        if instance.directory in self._stopping or instance.directory in self._reviving:
            return
        self._reviving.add(instance.directory)
        try:
            if await asyncio.to_thread(self._clear_for_revival, instance, why):
                await self._launch(instance)
        finally:
            self._reviving.discard(instance.directory)

    def _clear_for_revival(self, instance: Instance, why: str) -> bool:
        try:
            spec = instance.spec()
        except (OSError, ValueError):
            return False
        if "launch" not in spec:
            self._mark_crashed(instance, f"{why}; started by an older DevFlow, it cannot be started again alone: "
                                         "`ps:restart` starts fresh processes")
            return False
        unit = ProcessUnit.from_json(spec["unit"])
        unit.kill()
        limits = Limits(**spec["limits"])
        self.units.create(unit, limits)  # a reboot since took its cgroups
        if spec.get("supervisor_unit"):
            self.units.create(ProcessUnit.from_json(spec["supervisor_unit"]), supervisor_limits(limits))
        self.logs.write(instance.app, instance.name, f"{why}; what it left was killed, and it starts again")
        return True

    async def abandon(self, instance: Instance, why: str) -> None:
        """No new supervisor: what is left is killed, and `ps` shows the instance as crashed."""
        if instance.directory not in self._stopping:
            await asyncio.to_thread(self._mark_crashed, instance, why)

    def _mark_crashed(self, instance: Instance, why: str) -> None:
        status = instance.status()
        if instance.alive(status) or not instance.directory.is_dir():
            return
        self._unit(instance).kill()
        _write_private(instance.directory / "status.json", {**status, "state": "crashed", "child_pid": None})
        self.logs.write(instance.app, instance.name, why)

    async def stop(self, instance: Instance) -> None:
        """SIGTERM to the supervisor, which stops the process gracefully; then whatever is left in its unit is
        killed, and the instance is forgotten."""
        self._stopping.add(instance.directory)
        try:
            while instance.directory in self._reviving:  # a supervisor starting: stop that one, not the dead one
                await asyncio.sleep(0.05)
            status = await asyncio.to_thread(instance.status)
            pid = status.get("supervisor_pid")
            if pid and await asyncio.to_thread(instance.alive, status):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                for _ in range(int((self.stop_timeout + 5) / 0.1)):
                    if not await asyncio.to_thread(instance.alive):
                        break
                    await asyncio.sleep(0.1)
                else:  # it ignored SIGTERM: its process dies with it (PR_SET_PDEATHSIG), the rest with the unit
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(self._discard, instance)
        finally:
            self._stopping.discard(instance.directory)

    def _discard(self, instance: Instance) -> None:
        """What is left of a stopped instance goes: its process's unit, its supervisor's cgroup, its directory."""
        _end(self._unit(instance))
        with contextlib.suppress(OSError, ValueError):
            if supervisor := instance.spec().get("supervisor_unit"):
                _end(ProcessUnit.from_json(supervisor))
        shutil.rmtree(instance.directory, ignore_errors=True)

    def _unit(self, instance: Instance) -> ProcessUnit:
        try:
            spec = instance.spec()
        except (OSError, ValueError):
            return self.units.of_instance(instance.app, instance.directory)
        if "unit" in spec:
            return ProcessUnit.from_json(spec["unit"])
        # Started by an older DevFlow: cgroups only with limits, which its supervisor leaves when it stops.
        return ProcessUnit(f"{instance.app}.{instance.directory.name}", instance.directory / "unit", None,
                           tuple(Path(p).parent for p in spec.get("cgroup_procs", [])))

    def instances(self, app: str | None = None) -> list[Instance]:
        found = []
        roots = [self.run_root / app] if app else sorted(p for p in self.run_root.glob("*") if p.is_dir())
        for root in roots:
            for spec_path in sorted(root.glob("*/spec.json")):
                try:
                    spec = json.loads(spec_path.read_text())
                except (OSError, ValueError):
                    continue
                found.append(Instance(spec["app"], spec["version"], spec["process_type"], spec["index"],
                                      spec["port"], spec_path.parent))
        return found

    def limits_enforcement(self) -> str:
        return self.cgroups.describe() if self.cgroups else "rlimits (memory only)"

    def base_env(self, app: str) -> dict[str, str]:
        """What every build and process of `app` starts from: the host's PATH as its user can use it, and the
        platform's `python` and `pip` after it."""
        env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
        env.setdefault("PATH", os.defpath)
        env.setdefault("LANG", "C.UTF-8")
        user = self.sandbox(app)
        if user is not None:
            env["PATH"] = user.usable_path(env["PATH"])
        if self.shims is not None:
            env["PATH"] = os.pathsep.join([env["PATH"], str(self.shims)])
        return env

    def home(self, release: str) -> str:
        """An app process's HOME, as on Heroku: its release directory, at /app where processes see it there."""
        return str(self.mount_at) if self.mount_at else release

    def sandbox(self, app: str) -> AppUser | None:
        """The user `app`'s builds and processes run as; None when the daemon is not root (no switch)."""
        return self.users(app) if self.users is not None else None

    def app_uid(self, app: str) -> int:
        """Blocking: the uid `app`'s processes run as, whose sockets alone may take its traffic."""
        user = self.sandbox(app)
        return user.uid if user is not None else os.geteuid()

    # builds and one-off processes

    def _task_limits(self) -> Limits:
        return self.bounds.of_task() if self.bounds else Limits()

    @asynccontextmanager
    async def build_sandbox(self, app: str, deployment: int) -> AsyncIterator[BuildSandbox]:
        """Where the build of `deployment` runs (pipeline.builders.Sandbox); what it leaves is killed when it ends."""
        limits = self._task_limits()
        unit = await asyncio.to_thread(self.units.create, self.units.of_task(f"build-{deployment}", limits), limits)
        try:
            user = await asyncio.to_thread(self.sandbox, app)
            yield BuildSandbox(unit, user, rlimits(limits, self.cgroups, user is not None))
        finally:
            await asyncio.to_thread(_end, unit)

    async def run_once(self, app: str, name: str, command: str, cwd: Path, env: dict[str, str],
                       say: Callable[[str], None], timeout: float = RUN_ONCE_TIMEOUT) -> int:
        """A one-off process (release phase, predeploy): output goes to `say` and the app log, line by line
        however long its lines (runtime.log_lines).

        It runs in a unit of its own, within the bounds of a build's: when it exits, what it started goes too;
        past `timeout` (or when the deploy is cancelled) all of it is killed, and a timeout counts as a failure.
        """
        limits = self._task_limits()
        unit = self.units.of_task(f"{name}-{app}-{secrets.token_hex(3)}", limits)
        plan = unit.record / LAUNCH_PLAN
        await asyncio.to_thread(self._prepare_task, unit, limits, plan, app, name, command, cwd, env)
        argv, launcher_env = launcher.command(plan, os.getpid())
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd="/", env=launcher_env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        except BaseException:
            await asyncio.to_thread(_end, unit)
            raise

        async def tell(lines: list[bytes]) -> None:
            texts = [line.decode(errors="replace") for line in lines]
            if texts:
                await asyncio.to_thread(self.logs.write_lines, app, name, texts)
            for text in texts:
                say(text)

        async def relay() -> None:
            assert proc.stdout is not None
            lines = LineSplitter()
            while chunk := await proc.stdout.read(MAX_LINE_BYTES):
                await tell(lines.feed(chunk))
            await tell(lines.end())

        async def run() -> int:
            output = asyncio.ensure_future(relay())
            try:
                await _exited(proc.pid)
                await asyncio.to_thread(unit.kill)  # what it left behind goes, and with it the output's last writers
                await output
            finally:
                output.cancel()
            if limits.memory and await asyncio.to_thread(unit.memory_kills):
                say(f"{name} went over its memory limit of {_size(limits.memory)} and was killed (an admin can "
                    "raise it with devflow up --max-build-memory)")
            return await proc.wait()

        try:
            return await asyncio.wait_for(run(), timeout)
        except TimeoutError:
            say(f"{name} did not finish within {timeout:g}s; stopped")
            return -1
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # ours until it is reaped: the pid cannot be another's
            await asyncio.to_thread(_end, unit)
            await proc.wait()

    def _prepare_task(self, unit: ProcessUnit, limits: Limits, plan: Path, app: str, name: str, command: str,
                      cwd: Path, env: dict[str, str]) -> None:
        self.units.create(unit, limits)
        _write_private(plan, self._plan(app, name, command, cwd, env, unit, limits))

    async def stop_leftover_tasks(self) -> None:
        """At daemon start: the builds and one-offs a previous daemon left (it was killed, or the machine went
        down) are killed, and their units removed."""
        for unit in await asyncio.to_thread(self.units.leftover_tasks):
            members = await asyncio.to_thread(unit.members)
            if members:
                log.warning("%s was left running by a previous daemon: killing its processes %s", unit.name, members)
            await asyncio.to_thread(_end, unit)


async def _exited(pid: int) -> None:
    """Once the process has exited, reaped or not: asyncio's wait() also waits for its output to close, which what
    it started can hold open for ever."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _end(unit: ProcessUnit) -> None:
    unit.kill()
    unit.remove()
