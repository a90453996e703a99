"""The threads management commands run in, apart from asyncio's default executor.

A command can block for minutes (`restart` waits for health checks, `apps:destroy` stops processes), while
the default executor also serves the quick lookups every SSH login and API request makes. Commands get
their own bounded pool, so a burst of slow ones queues behind itself instead of stalling logins.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

MAX_COMMANDS = 16

P = ParamSpec("P")
T = TypeVar("T")

_pool = ThreadPoolExecutor(max_workers=MAX_COMMANDS, thread_name_prefix="devflow-command")


async def run_command(func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(func, *args, **kwargs))
