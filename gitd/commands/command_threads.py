"""The threads management commands run in, apart from asyncio's default executor.

A command can block for minutes (`restart` waits for health checks, `apps:destroy` stops processes), while
the default executor also serves the quick lookups every SSH login and API request makes. Commands get
their own bounded pool, so a burst of slow ones queues behind itself instead of stalling logins; and each
user may have only a few running at once, so one user's burst cannot take the pool from everyone else.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from gitd.errors import TooMany
from pipeline.limits import Limits

MAX_COMMANDS = 16

P = ParamSpec("P")
T = TypeVar("T")


class CommandThreads:
    def __init__(self, limits: Limits, workers: int = MAX_COMMANDS) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="devflow-command")
        self._running: dict[str, int] = {}  # user -> commands of theirs running or queued

    async def run(self, user: str, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._running.get(user, 0) >= self.limits.max_commands_per_user:
            raise TooMany(str(self.limits.refuse(
                "max_commands_per_user", f"{user} has {self._running[user]} commands running; wait for one to end")))
        self._running[user] = self._running.get(user, 0) + 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(func, *args,
                                                                                                  **kwargs))
        finally:
            self._running[user] -= 1
            if not self._running[user]:
                del self._running[user]
