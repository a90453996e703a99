"""Pack exchange through dulwich's handlers, for machines without C git.

The handlers run in a child process (dulwich_service.py), not in the daemon: a pack
exchange is CPU-bound Python and would otherwise stall every other connection.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from dulwich.graph import can_fast_forward
from dulwich.repo import Repo

from gitd.git.pack_backend import PackLimits, Service, service_argv


def _can_fast_forward(repo: Path, old: str, new: str) -> bool:
    with Repo(str(repo)) as r:
        try:
            return can_fast_forward(r, old.encode(), new.encode())
        except KeyError:
            return False


class DulwichBackend:
    name = "dulwich"
    protocol_v2 = False

    def __init__(self, limits: PackLimits) -> None:
        self.limits = limits

    def command(self, service: Service, repo: Path, *, stateless: bool, advertise: bool) -> list[str]:
        program = [sys.executable, "-m", "gitd.git.dulwich_service", service,
                   "--max-input-size", str(self.limits.max_push_bytes)]
        return service_argv(program, repo, stateless=stateless, advertise=advertise)

    async def is_ancestor(self, repo: Path, old: str, new: str, object_env: dict[str, str]) -> bool:
        # dulwich writes pushed objects straight into the repository: no quarantine to add.
        return await asyncio.to_thread(_can_fast_forward, repo, old, new)
