"""The pack exchange role: which program serves upload-pack / receive-pack for a repository.

Both implementations are programs speaking git's wire protocol on stdin/stdout, so SSH
and HTTP drive them the same way (pack_process.py) and their hooks report the same way.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

Service = Literal["upload-pack", "receive-pack"]


@dataclass(frozen=True)
class PackLimits:
    hooks_dir: Path
    max_push_bytes: int  # 0: no limit


class PackBackend(Protocol):
    name: str
    protocol_v2: bool  # whether it answers GIT_PROTOCOL=version=2

    def command(self, service: Service, repo: Path, *, stateless: bool, advertise: bool) -> list[str]:
        """The argv that serves `service` on stdin/stdout."""
        ...

    async def is_ancestor(self, repo: Path, old: str, new: str, object_env: dict[str, str]) -> bool:
        """Whether `old` is reachable from `new`, seeing the objects of a push in flight."""
        ...


def service_argv(program: list[str], repo: Path, *, stateless: bool, advertise: bool) -> list[str]:
    """The flags both pack programs share, C git's spelling."""
    flags = ["--stateless-rpc"] * stateless + ["--advertise-refs"] * advertise
    return [*program, *flags, str(repo)]


def choose_backend(setting: str, limits: PackLimits) -> PackBackend:
    from gitd.git.cgit_impl import CGitBackend
    from gitd.git.dulwich_impl import DulwichBackend

    git = shutil.which("git")
    if setting == "cgit" or (setting == "auto" and git):
        if not git:
            raise RuntimeError("git_backend is cgit but no git executable is on PATH")
        return CGitBackend(git, limits)
    return DulwichBackend(limits)
