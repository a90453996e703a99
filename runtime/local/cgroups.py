"""Memory and CPU limits per app process: cgroup v2, or v1's memory and cpu controllers.

Where neither can be written (an unprivileged daemon, a locked-down container), memory falls
back to RLIMIT_DATA and CPU is not limited; `limits_note` says which applies.
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
        self.root = root
        self.group = group
        self.version = 2 if (root / "cgroup.controllers").exists() else 1 if (root / "memory").is_dir() else 0
        self.usable = self.version > 0 and self._prepare()

    def _prepare(self) -> bool:
        try:
            if self.version == 2:
                base = self.root / self.group
                base.mkdir(exist_ok=True)
                for parent in (self.root, base):
                    (parent / "cgroup.subtree_control").write_text("+memory +cpu")
            else:
                for controller in ("memory", "cpu"):
                    (self.root / controller / self.group).mkdir(exist_ok=True)
        except OSError as exc:
            log.info("cgroups not usable (%s); memory limits fall back to rlimits, CPU is not limited", exc)
            return False
        return True

    def _dirs(self, name: str) -> list[Path]:
        if self.version == 2:
            return [self.root / self.group / name]
        return [self.root / controller / self.group / name for controller in ("memory", "cpu")]

    def create(self, name: str, limits: Limits) -> list[str]:
        """The cgroup.procs files a process joins to live under these limits."""
        if not self.usable or limits.empty:
            return []
        dirs = self._dirs(name)
        for directory in dirs:
            directory.mkdir(exist_ok=True)
        quota = str(int(limits.cpu * CPU_PERIOD_US)) if limits.cpu else None
        if self.version == 2:
            if limits.memory:
                (dirs[0] / "memory.max").write_text(str(limits.memory))
            if quota:
                (dirs[0] / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            if limits.memory:
                (dirs[0] / "memory.limit_in_bytes").write_text(str(limits.memory))
            if quota:
                (dirs[1] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (dirs[1] / "cpu.cfs_quota_us").write_text(quota)
        return [str(d / "cgroup.procs") for d in dirs]

    def remove(self, name: str) -> None:
        for directory in self._dirs(name):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", directory, exc)

    def describe(self) -> str:
        if self.usable:
            return f"cgroup v{self.version} (memory and CPU)"
        return "rlimits (memory only; cgroups not writable here)"
