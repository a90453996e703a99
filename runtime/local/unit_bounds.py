"""The platform's bounds on every unit, whatever its app asks for: a fork bomb or a runaway allocation in an app
process, a release phase or a build step stays in its unit, and the host and the other tenants keep going.

The settings are pipeline.limits' (`--max-process-memory`, `--max-build-memory`, `--max-pids-per-app`); the
composition root hands them here. An app process's unit gets its app's memory (resources:set) up to the ceiling,
else the ceiling; a build's or a one-off's gets the build memory; every unit gets pids.max. Where cgroups cannot
hold a bound, rlimits do: RLIMIT_DATA for memory, and RLIMIT_NPROC for tasks, always when the process runs as a
user of its own (the uid is the app's, so it bounds the tenant, all its units together).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.local.cgroups import Cgroups, Limits

SUPERVISOR_MEMORY = 128 * 1024**2
"""memory.max of a supervisor's own cgroup: it reads its app's output in bounded pieces, and needs far less."""


@dataclass(frozen=True)
class UnitBounds:
    process_memory: int  # bytes: the ceiling, and the default, of an app process's unit
    build_memory: int  # bytes: a build's or a one-off's unit
    pids: int  # tasks (processes and threads) of one unit; also of one app's uid

    def of_process(self, asked: Limits) -> Limits:
        """What an app process's unit gets: what its app asked for, within the ceiling."""
        return Limits(min(asked.memory or self.process_memory, self.process_memory), asked.cpu, self.pids)

    def of_task(self) -> Limits:
        return Limits(self.build_memory, None, self.pids)


def supervisor_limits(process: Limits) -> Limits:
    """A supervisor's own cgroup: its memory bounded, and its CPU (what its process's output costs it to log)
    within what its process may take."""
    return Limits(SUPERVISOR_MEMORY, process.cpu)


def rlimits(limits: Limits, cgroups: Cgroups | None, own_user: bool) -> dict[str, int]:
    """The bounds a unit's processes take as rlimits (soft and hard): memory where cgroups do not hold it, and
    tasks when the process runs as a user of its own (not the daemon's, whose own processes would count)."""
    bounds = {}
    if limits.memory and not (cgroups and cgroups.enforces_limits):
        bounds["RLIMIT_DATA"] = limits.memory
    if limits.pids and own_user:
        bounds["RLIMIT_NPROC"] = limits.pids
    return bounds
