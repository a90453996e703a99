"""The cgroups this host lets DevFlow make: one cgroup2 hierarchy to hold process units, and the memory and
cpu controllers for limits.

Units (runtime.local.process_unit) live in the cgroup2 hierarchy: the whole tree on a pure-v2 host, the
hybrid's `unified` mount on a v1 host. Limits go in the same cgroup where that hierarchy has the memory and cpu
controllers, else in v1's. Where neither can be written (an unprivileged daemon, a locked-down container),
units fall back to process groups, memory to RLIMIT_DATA, and CPU is not limited; `describe` says which applies.
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


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpu: float | None = None  # cores

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
        return {"memory": self.memory, "cpu": self.cpu}

    @property
    def empty(self) -> bool:
        return self.memory is None and self.cpu is None


class Cgroups:
    def __init__(self, root: Path = Path("/sys/fs/cgroup"), group: str = "devflow") -> None:
        self.group = group
        self.v1_root = root
        self.unified = self._writable_unified(root)
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
                    self.enable_limits(self.unified.parent)
                    self.enable_limits(self.unified)
                    return 2
            if all((root / c).is_dir() for c in LIMIT_CONTROLLERS):
                for controller in LIMIT_CONTROLLERS:
                    (root / controller / self.group).mkdir(exist_ok=True)
                return 1
        except OSError as exc:
            log.info("cgroup controllers not usable (%s); memory limits fall back to rlimits, CPU is not limited",
                     exc)
        return 0

    @staticmethod
    def enable_limits(directory: Path) -> None:
        """In cgroup2, a cgroup's children get the memory and cpu files only once it delegates the controllers."""
        (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in LIMIT_CONTROLLERS))

    def tracking(self, *parts: str) -> Path | None:
        return self.unified.joinpath(*parts) if self.unified is not None else None

    def v1_dirs(self, *parts: str) -> tuple[Path, ...]:
        """Where v1 holds the limits of the cgroup named by `parts`; none when cgroup2 holds them."""
        if self.limits_version != 1:
            return ()
        return tuple(self.v1_root.joinpath(controller, self.group, *parts) for controller in LIMIT_CONTROLLERS)

    def write_limits(self, tracking: Path | None, v1_dirs: tuple[Path, ...], limits: Limits) -> None:
        """Into cgroups already made: `tracking` (cgroup2) or the v1 memory and cpu ones."""
        quota = str(int(limits.cpu * CPU_PERIOD_US)) if limits.cpu else None
        if self.limits_version == 2 and tracking is not None:
            if limits.memory:
                (tracking / "memory.max").write_text(str(limits.memory))
            if quota:
                (tracking / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        elif v1_dirs:
            memory, cpu = v1_dirs
            if limits.memory:
                (memory / "memory.limit_in_bytes").write_text(str(limits.memory))
            if quota:
                (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (cpu / "cpu.cfs_quota_us").write_text(quota)

    @property
    def enforces_limits(self) -> bool:
        return self.limits_version > 0

    def describe(self) -> str:
        if self.limits_version:
            return f"cgroup v{self.limits_version} (memory and CPU)"
        return "rlimits (memory only; cgroups not writable here)"
