"""The cgroups this host lets DevFlow make: one cgroup2 hierarchy to hold process units, and the memory and
cpu controllers (and pids, where there is one) for limits.

Units (runtime.local.process_unit) live in the cgroup2 hierarchy: the whole tree on a pure-v2 host, the
hybrid's `unified` mount on a v1 host. Limits go in the same cgroup where that hierarchy has the memory and cpu
controllers, else in v1's. Where neither can be written (an unprivileged daemon, a locked-down container),
units fall back to process groups, memory to RLIMIT_DATA, tasks to RLIMIT_NPROC (runtime.local.unit_bounds), and
CPU is not limited; `describe` says which applies.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmgKMG]?)[bB]?$")
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
LIMIT_CONTROLLERS = ("memory", "cpu")
TASKS_CONTROLLER = "pids"  # used where the limits' hierarchy has it; RLIMIT_NPROC bounds tasks elsewhere
V2_FILES = {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"}
V1_FILES = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": "pids.max"}


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpu: float | None = None  # cores
    pids: int | None = None  # tasks (processes and threads) at once

    @classmethod
    def parse(cls, values: dict[str, str]) -> Limits:
        """From `memory=512M cpu=0.5`; raises ValueError with a message for the user."""
        memory = cpu = None
        for key, value in values.items():
            if key == "memory":
                match = SIZE.fullmatch(value.strip())
                if not match or float(match[1]) <= 0:
                    raise ValueError(f"memory={value}: use a size like 512M or 2G")
                memory = int(float(match[1]) * UNITS[match[2].lower()])
                if memory < 16 * 1024**2:
                    raise ValueError(f"memory={value}: at least 16M")
            elif key == "cpu":
                try:
                    cpu = float(value)
                except ValueError:
                    cpu = -1.0
                if not 0.01 <= cpu <= 1024:
                    raise ValueError(f"cpu={value}: use a number of cores like 0.5 or 2")
            else:
                raise ValueError(f"unknown resource {key!r}; use memory and cpu")
        return cls(memory, cpu)

    def as_dict(self) -> dict:
        return {"memory": self.memory, "cpu": self.cpu, "pids": self.pids}

    @property
    def empty(self) -> bool:
        return self.memory is None and self.cpu is None and self.pids is None


class Cgroups:
    def __init__(self, root: Path = Path("/sys/fs/cgroup"), group: str = "devflow") -> None:
        self.group = group
        self.v1_root = root
        self.unified = self._writable_unified(root)
        self.controllers: tuple[str, ...] = LIMIT_CONTROLLERS
        self.limits_version = self._limits_version(root)

    def _writable_unified(self, root: Path) -> Path | None:
        """`<cgroup2 mount>/devflow`, made if missing; None where there is no cgroup2 hierarchy DevFlow may write."""
        mount = next((m for m in (root, root / "unified") if (m / "cgroup.controllers").is_file()), None)
        if mount is None:
            log.info("no cgroup2 hierarchy under %s: process units are process groups", root)
            return None
        try:
            (mount / self.group).mkdir(exist_ok=True)
        except OSError as exc:
            log.info("cgroup2 at %s not writable (%s): process units are process groups", mount, exc)
            return None
        return mount / self.group

    def _limits_version(self, root: Path) -> int:
        try:
            if self.unified is not None:
                available = (self.unified.parent / "cgroup.controllers").read_text().split()
                if all(c in available for c in LIMIT_CONTROLLERS):
                    if TASKS_CONTROLLER in available:
                        self.controllers = (*LIMIT_CONTROLLERS, TASKS_CONTROLLER)
                    self.enable_limits(self.unified.parent)
                    self.enable_limits(self.unified)
                    return 2
            if all((root / c).is_dir() for c in LIMIT_CONTROLLERS):
                if (root / TASKS_CONTROLLER).is_dir():
                    self.controllers = (*LIMIT_CONTROLLERS, TASKS_CONTROLLER)
                for controller in self.controllers:
                    (root / controller / self.group).mkdir(exist_ok=True)
                return 1
        except OSError as exc:
            log.info("cgroup controllers not usable (%s); memory limits fall back to rlimits, CPU is not limited",
                     exc)
        self.controllers = LIMIT_CONTROLLERS
        return 0

    def enable_limits(self, directory: Path) -> None:
        """In cgroup2, a cgroup's children get the limit files only once it delegates the controllers."""
        (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in self.controllers))

    def tracking(self, *parts: str) -> Path | None:
        return self.unified.joinpath(*parts) if self.unified is not None else None

    def v1_dirs(self, *parts: str) -> tuple[Path, ...]:
        """Where v1 holds the limits of the cgroup named by `parts`, one per controller; none when cgroup2 holds
        them."""
        if self.limits_version != 1:
            return ()
        return tuple(self.v1_root.joinpath(controller, self.group, *parts) for controller in self.controllers)

    def write_limits(self, tracking: Path | None, v1_dirs: tuple[Path, ...], limits: Limits) -> None:
        """Into cgroups already made: `tracking` (cgroup2) or the v1 ones (of a unit made by an older DevFlow,
        without the pids one)."""
        quota = int(limits.cpu * CPU_PERIOD_US) if limits.cpu else None
        if self.limits_version == 2 and tracking is not None:
            where, files = {c: tracking for c in self.controllers}, V2_FILES
            cpu = f"{quota} {CPU_PERIOD_US}" if quota else None
        else:
            where, files, cpu = {d.relative_to(self.v1_root).parts[0]: d for d in v1_dirs}, V1_FILES, quota
            if quota and "cpu" in where:
                (where["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        for controller, value in (("memory", limits.memory), ("cpu", cpu), ("pids", limits.pids)):
            if value and controller in where:
                (where[controller] / files[controller]).write_text(str(value))

    @property
    def enforces_limits(self) -> bool:
        return self.limits_version > 0

    def describe(self) -> str:
        if self.limits_version:
            tasks = ", CPU and tasks" if TASKS_CONTROLLER in self.controllers else " and CPU"
            return f"cgroup v{self.limits_version} (memory{tasks})"
        return "rlimits (memory and tasks only; cgroups not writable here)"
