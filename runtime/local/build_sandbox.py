"""Where one build's tools run (pipeline.builders.Sandbox): in the deployment's unit (within its bounds:
runtime.local.unit_bounds), as the app's user under a root daemon, and never longer than the daemon.

Builds keep their real directory (no /app): the builder writes absolute paths (the venv in the cache,
node_modules/.bin) into the release's environment, and app processes find those paths too, /app beside them.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

from runtime.local.app_user import AppUser
from runtime.local.launcher import die_with_parent, rlimit_bounds
from runtime.local.process_unit import ProcessUnit


class BuildSandbox:
    def __init__(self, unit: ProcessUnit, user: AppUser | None, rlimits: dict[str, int] | None = None) -> None:
        self.unit = unit
        self.user = user
        self.parent = os.getpid()
        self._rlimits = rlimit_bounds(rlimits or {})  # worked out here: the preexec only makes system calls

    @property
    def preexec(self) -> Callable[[], None]:
        return self._enter

    def _enter(self) -> None:
        """Between fork and exec in the daemon, a threaded process: system calls only, no imports, no locks."""
        self.unit.join()
        for kind, limit in self._rlimits:
            resource.setrlimit(kind, limit)
        if self.user is not None:
            self.user.drop_privileges()
        die_with_parent(self.parent)

    def memory_kills(self) -> int:
        return self.unit.memory_kills()

    @property
    def uid(self) -> int:
        return self.user.uid if self.user is not None else os.geteuid()

    def hand_over(self, directory: Path) -> None:
        if self.user is not None:
            self.user.hand_over(directory)
        else:
            directory.mkdir(parents=True, exist_ok=True)

    def hand_over_tree(self, directory: Path, only_from: int | None = None) -> None:
        if self.user is not None:
            self.user.hand_over_tree(directory, only_from)
