"""The Builder role: turn an exported tree into something the runtime can start.

Implementations live beside this module, one per thing they wrap (`native_impl` runs the
language tools on the host); the pipeline only sees this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pipeline.detect import Detection


class BuildError(Exception):
    """The build failed for a reason the user can act on; the message is shown in the push output."""


@dataclass(frozen=True)
class BuildResult:
    """The Procfile (or the stack's default processes) and the environment those processes need to run."""

    processes: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)


class Sandbox(Protocol):
    """Where an app's build tools run and whose its trees are: its unprivileged user under a root daemon
    (runtime.local.app_user.AppUser), and for a build, the build's unit too, killed whole when the build ends
    and by the next daemon if this one dies (runtime.local.build_sandbox.BuildSandbox, which the deployment
    makes and ends around the build)."""

    uid: int

    @property
    def preexec(self) -> Callable[[], None]:
        """Runs in each tool's process (leading a process group of its own) before exec: joins the build's unit,
        takes its bounds, switches to the user, and makes the tool die with the daemon."""
        ...

    def hand_over(self, directory: Path) -> None:
        """Create `directory` if missing and give it (not its contents) to the user, if there is one."""
        ...

    def memory_kills(self) -> int:
        """Blocking: how many of the build's processes the kernel killed so far for going over its memory."""
        ...

    def hand_over_tree(self, directory: Path, only_from: int | None = None) -> None:
        """Give a tree to the user (with `only_from`, only what that uid owns), never following a link."""
        ...


class Builder(Protocol):
    name: str

    async def build(self, src: Path, detection: Detection, cache: Path, env: dict[str, str],
                    log: Callable[[str], None], sandbox: Sandbox | None = None) -> BuildResult:
        """Build `src` in place; `cache` persists between builds of one app; every tool line goes to `log`.
        With a `sandbox` the tools run in it (its user owns `src` already); without, as the daemon's children."""
        ...
