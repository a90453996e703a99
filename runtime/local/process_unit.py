"""Process units: every app process, one-off process and build runs in one, so that it can be killed whole.

A unit is a cgroup where the host allows (runtime.local.cgroups): whatever its processes start stays in it,
daemonized or not, and a kill reaches all of it. Elsewhere it is the process groups its processes lead, noted
in its record; a process that starts a session of its own escapes that, which is why supervisors are also
child subreapers. The record, a root-owned directory, exists as long as the unit does, so a daemon that
starts after a crash finds the units of the builds and one-offs it did not finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.local.cgroups import Cgroups, Limits

log = logging.getLogger(__name__)

GROUPS = "groups"
"""In a unit's record, without cgroups: `PGID STARTTIME` of each process group that joined."""
KILL_WAIT = 5.0
KILL_POLL = 0.02


@dataclass(frozen=True)
class ProcessUnit:
    name: str
    record: Path
    cgroup: Path | None = None
    limit_cgroups: tuple[Path, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "record": str(self.record), "cgroup": str(self.cgroup) if self.cgroup else None,
                "limit_cgroups": [str(d) for d in self.limit_cgroups]}

    @classmethod
    def from_json(cls, data: dict) -> ProcessUnit:
        return cls(data["name"], Path(data["record"]), Path(data["cgroup"]) if data["cgroup"] else None,
                   tuple(Path(d) for d in data["limit_cgroups"]))

    def join(self) -> None:
        """In a new process before it execs (as root, and leading a process group of its own): it and all it
        starts belong to the unit. Only system calls on prepared bytes, so it may run between fork and exec."""
        pid = self.enter_cgroups()
        if self.cgroup is None:
            entry = pid + b" " + str(_start_time(os.getpid())).encode() + b"\n"
            _write(str(self.record / GROUPS), entry, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def enter_cgroups(self) -> bytes:
        """This process (all its threads) into the unit's cgroups, if it has any; returns its pid as written."""
        pid = str(os.getpid()).encode()
        for directory in (*((self.cgroup,) if self.cgroup else ()), *self.limit_cgroups):
            _write(str(directory / "cgroup.procs"), pid, os.O_WRONLY)
        return pid

    def members(self) -> list[int]:
        """The processes in the unit now."""
        if self.cgroup is not None:
            return _cgroup_pids(self.cgroup)
        groups = self._groups()
        return [pid for pid, pgid in _processes() if pgid in groups] if groups else []

    def kill(self) -> None:
        """SIGKILL to every process in the unit; with a cgroup, returns once they are gone (or KILL_WAIT passed)."""
        if self.cgroup is not None:
            self._kill_cgroup(self.cgroup)
            return
        for pgid in self._groups():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.record / GROUPS, 0)  # all dead or dying: nothing left to find there

    def memory_kills(self) -> int:
        """How many of its processes the kernel killed for going over the unit's memory limit."""
        counters = [d / "memory.oom_control" for d in self.limit_cgroups]  # cgroup v1
        if self.cgroup is not None:
            counters.append(self.cgroup / "memory.events")  # cgroup2
        for counter in counters:
            try:
                lines = counter.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
        return 0

    def remove(self) -> None:
        """The unit's cgroups and record go (kill it first: a cgroup with processes cannot be removed)."""
        for directory in (*((self.cgroup,) if self.cgroup else ()), *self.limit_cgroups):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", directory, exc)
        shutil.rmtree(self.record, ignore_errors=True)

    def _groups(self) -> set[int]:
        """The recorded process groups that are still the ones recorded: a leader's pid reused since is not."""
        try:
            lines = (self.record / GROUPS).read_text().split("\n")
        except FileNotFoundError:
            return set()
        groups = set()
        for line in lines:
            pgid, _, start = line.partition(" ")
            if pgid.isdigit() and start.isdigit() and _start_time(int(pgid)) in (None, int(start)):
                groups.add(int(pgid))
        return groups

    @staticmethod
    def _kill_cgroup(cgroup: Path) -> None:
        """cgroup.kill where the kernel has it (5.14+); else freeze, SIGKILL each process, thaw, until empty."""
        kill_file, freeze_file = cgroup / "cgroup.kill", cgroup / "cgroup.freeze"
        deadline = time.monotonic() + KILL_WAIT
        try:
            if kill_file.exists():
                kill_file.write_text("1")
            while pids := _cgroup_pids(cgroup):
                if not kill_file.exists():
                    frozen = freeze_file.exists()
                    if frozen:  # nothing in it can fork while the kills go out
                        freeze_file.write_text("1")
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    if frozen:
                        freeze_file.write_text("0")
                if time.monotonic() > deadline:
                    log.warning("processes %s of %s did not die within %.0fs of SIGKILL", pids, cgroup, KILL_WAIT)
                    return
                time.sleep(KILL_POLL)
        except FileNotFoundError:
            pass  # no such cgroup (a reboot since, or removed already): nothing in it


class Units:
    """One daemon's units: cgroups under `<cgroup2>/devflow/<id>/`, `id` naming the daemon's run directory, so
    that several daemons on one host never touch each other's; apps' units under `apps/`, the units of builds
    and one-off processes under `tasks/` (their records in `tasks`)."""

    def __init__(self, cgroups: Cgroups | None, run_root: Path, tasks: Path) -> None:
        self.cgroups = cgroups
        self.id = hashlib.sha256(str(run_root).encode()).hexdigest()[:12]
        self.tasks = tasks

    def _unit(self, kind: str, name: str, record: Path, limited: bool) -> ProcessUnit:
        """`limited`: with cgroup v1's limit cgroups too (cgroup2 holds limits in the unit's own)."""
        tracking = self.cgroups.tracking(self.id, kind, name) if self.cgroups else None
        v1_dirs = self.cgroups.v1_dirs(self.id, name) if self.cgroups is not None and limited else ()
        return ProcessUnit(name, record, tracking, v1_dirs)

    def of_instance(self, app: str, directory: Path, limits: Limits | None = None) -> ProcessUnit:
        return self._unit("apps", f"{app}.{directory.name}", directory / "unit", _limited(limits))

    def of_supervisor(self, app: str, directory: Path, limits: Limits) -> ProcessUnit:
        """Where an instance's supervisor runs: a cgroup of its own, apart from its process's unit (which it
        kills whole at each exit)."""
        return self._unit("supervisors", f"{app}.{directory.name}.supervisor", directory / "supervisor-unit",
                          _limited(limits))

    def of_task(self, name: str, limits: Limits | None = None) -> ProcessUnit:
        return self._unit("tasks", name, self.tasks / name, _limited(limits))

    def create(self, unit: ProcessUnit, limits: Limits | None = None) -> ProcessUnit:
        """Make the unit's record and cgroups (each limit in place) before any process joins."""
        unit.record.mkdir(mode=0o700, parents=True, exist_ok=True)
        if unit.cgroup is not None and self.cgroups is not None:
            if self.cgroups.limits_version == 2:
                for level in reversed(unit.cgroup.parents):
                    if level.is_relative_to(self.cgroups.unified) and level != self.cgroups.unified:
                        level.mkdir(exist_ok=True)
                        self.cgroups.enable_limits(level)
            unit.cgroup.mkdir(parents=True, exist_ok=True)
        for directory in unit.limit_cgroups:
            directory.mkdir(parents=True, exist_ok=True)
        if self.cgroups is not None and limits is not None and not limits.empty:
            self.cgroups.write_limits(unit.cgroup, unit.limit_cgroups, limits)
        return unit

    def leftover_tasks(self) -> list[ProcessUnit]:
        """Units of builds and one-offs still recorded: a daemon that starts has none running, so a previous one's."""
        try:
            names = sorted(p.name for p in self.tasks.iterdir() if p.is_dir() and not p.is_symlink())
        except FileNotFoundError:
            return []
        return [self._unit("tasks", name, self.tasks / name, limited=True) for name in names]

    def prune(self) -> None:
        """With the daemon stopped and its units gone: its empty cgroup directories go too."""
        if self.cgroups is None:
            return
        base = self.cgroups.tracking(self.id)
        kinds = (base / "apps", base / "supervisors", base / "tasks", base) if base else ()
        for directory in (*kinds, *self.cgroups.v1_dirs(self.id)):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def describe(self) -> str:
        if self.cgroups is not None and self.cgroups.unified is not None:
            return f"cgroups under {self.cgroups.unified / self.id}"
        return "process groups (no writable cgroup2 hierarchy)"


def _limited(limits: Limits | None) -> bool:
    return limits is not None and not limits.empty


def _write(path: str, data: bytes, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _cgroup_pids(cgroup: Path) -> list[int]:
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses); None if it has gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except ProcessLookupError:  # it exited between the open and the read
        return None
    finally:
        os.close(fd)
    return data.rpartition(b")")[2].decode().split()


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot: with its pid, names one process for good."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _processes() -> list[tuple[int, int]]:
    """(pid, process group) of every process on the host."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)):
            found.append((int(entry), int(fields[2])))
    return found
