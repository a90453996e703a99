"""Starts, stops and finds app processes on this machine, each under runtime.local.supervisor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.local.app_user import AppUser, AppUsers
from runtime.local.cgroups import Cgroups, Limits
from runtime.process_logs import ProcessLogs

SUPERVISOR = "runtime.local.supervisor"
RESTART_REQUEST = "restart-requested"
"""In an instance's directory: the supervisor is to take the process's next exit as a restart asked for."""
STARTUP_OUTPUT = "startup.log"
"""In an instance's directory: the first lines its process printed, which explain a failed start."""
RUN_ONCE_TIMEOUT = 3600.0  # release phase and deploy scripts, as Heroku allows

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _size(memory: int | None) -> str | None:
    return f"{memory // 1024**2}M" if memory else None


def _kill_quietly(supervisor_pid: int, child_pid: int | None) -> None:
    """Last resort for a supervisor that ignored SIGTERM: it and its child's process group."""
    for kill, pid in ((os.kill, supervisor_pid), (os.killpg, child_pid)):
        if pid:
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)

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

    @property
    def cgroup(self) -> str:
        return f"{self.app}.{self.directory.name}"

    def status(self) -> dict:
        try:
            return json.loads((self.directory / "status.json").read_text())
        except (OSError, ValueError):
            return {"state": "starting"}

    def alive(self) -> bool:
        """The supervisor runs (checked against its command line, so a reused pid does not count)."""
        pid = self.status().get("supervisor_pid")
        if not pid:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.directory / "spec.json").encode() in cmdline

    def record(self) -> dict:
        status = self.status()
        return {"process": self.name, "release": f"v{self.version}", "port": self.port,
                "memory": _size(status.get("limits", {}).get("memory")), "cpu": status.get("limits", {}).get("cpu"),
                "state": status.get("state") if self.alive() else "stopped",
                "restarts": status.get("restarts", 0), "pid": status.get("child_pid")}

class LocalScheduler:
    name = "local"

    def __init__(self, run_root: Path, logs: ProcessLogs, users: AppUsers | None = None,
                 cgroups: Cgroups | None = None, stop_timeout: int = 10) -> None:
        self.run_root = run_root
        self.logs = logs
        self.users = users
        self.cgroups = cgroups
        self.stop_timeout = stop_timeout

    async def start(self, app: str, version: int, process_type: str, index: int, command: str, cwd: Path,
                    env: dict[str, str], port: int, limits: Limits | None = None) -> Instance:
        directory = self.run_root / app / f"v{version}-{process_type}.{index}-{secrets.token_hex(3)}"
        directory.mkdir(parents=True)
        instance = Instance(app, version, process_type, index, port, directory)
        limits = limits or Limits()
        user = self.sandbox(app)
        rlimits = {"RLIMIT_NOFILE": 65536}
        cgroup_procs = self.cgroups.create(instance.cgroup, limits) if self.cgroups else []
        if limits.memory and not cgroup_procs:
            rlimits["RLIMIT_DATA"] = limits.memory
        spec = {
            "app": app, "version": version, "process_type": process_type, "index": index, "port": port,
            "name": instance.name, "command": command, "cwd": str(cwd), "env": env,
            "log": str(self.logs.path(app)), "log_max_bytes": self.logs.max_bytes,
            "status": str(directory / "status.json"), "restart_request": str(directory / RESTART_REQUEST),
            "startup_output": str(directory / STARTUP_OUTPUT),
            "user": {"uid": user.uid, "gid": user.gid} if user else None,
            "rlimits": rlimits, "cgroup_procs": cgroup_procs, "limits": limits.as_dict(),
            "stop_timeout": self.stop_timeout,
        }
        (directory / "spec.json").write_text(json.dumps(spec))
        # No pipes: the supervisor outlives this call, and a pipe it inherited would never reach EOF.
        with self.logs.path(app).open("ab") as errors:
            launcher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", SUPERVISOR, str(directory / "spec.json"),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=errors,
                start_new_session=True, cwd=str(directory), env={"PATH": os.environ.get("PATH", os.defpath),
                                                               "PYTHONPATH": os.pathsep.join(sys.path)},
            )
            if await launcher.wait() != 0:
                raise RuntimeError(f"the supervisor of {instance.name} did not start; see `logs {app}`")
        return instance

    async def stop(self, instance: Instance) -> None:
        """SIGTERM to the supervisor, which stops the process gracefully, then forget the instance."""
        status = instance.status()
        pid = status.get("supervisor_pid")
        if pid and instance.alive():
            os.kill(pid, signal.SIGTERM)
            for _ in range(int((self.stop_timeout + 5) / 0.1)):
                if not instance.alive():
                    break
                await asyncio.sleep(0.1)
            else:
                _kill_quietly(pid, instance.status().get("child_pid"))
        if self.cgroups:
            self.cgroups.remove(instance.cgroup)
        for path in instance.directory.iterdir():
            path.unlink()
        instance.directory.rmdir()

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
        """What every build and process of `app` starts from: the host's PATH as its user can use it."""
        env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
        env.setdefault("PATH", os.defpath)
        env.setdefault("LANG", "C.UTF-8")
        user = self.sandbox(app)
        if user is not None:
            env["PATH"] = user.usable_path(env["PATH"])
        return env

    def sandbox(self, app: str) -> AppUser | None:
        """The user `app`'s builds and processes run as; None when the daemon is not root (no switch)."""
        return self.users(app) if self.users is not None else None

    async def run_once(self, app: str, name: str, command: str, cwd: Path, env: dict[str, str],
                       say: Callable[[str], None], timeout: float = RUN_ONCE_TIMEOUT) -> int:
        """A one-off process (release phase, predeploy): output goes to `say` and the app log.

        Past `timeout` (or when the deploy is cancelled) its whole process group is killed; a timeout
        counts as a failure.
        """
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, cwd=str(cwd), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=user.preexec if (user := self.sandbox(app)) else None,
        )

        async def relay() -> int:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                text = line.decode(errors="replace").rstrip("\n")
                self.logs.write(app, name, text)
                say(text)
            return await proc.wait()

        try:
            return await asyncio.wait_for(relay(), timeout)
        except TimeoutError:
            say(f"{name} did not finish within {timeout:g}s; stopped")
            return -1
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
