"""How much disk a tree takes, and work that must stop when a tree it writes into grows past a bound.

du (coreutils) walks with lstat only, never following a link, stays on one file system and counts a
hard-linked file once (a build's node_modules is hard-linked from the cache). It runs as a child
process, so a tree of a million files costs the daemon's event loop nothing; a watch waits five times
as long as its last walk took before the next, so it costs at most a sixth of a CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from pipeline.limits import GiB, KiB, MiB

T = TypeVar("T")
MIN_INTERVAL = 1.0
WALK_SHARE = 5  # a walk that took t seconds waits 5t before the next


def shown_size(size: int) -> str:
    """A size for people: 1.5 GiB, 12.3 MiB, 512 KiB."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


async def disk_usage(path: Path) -> int:
    """Bytes the tree at `path` takes on disk; 0 when it does not exist."""
    proc = await asyncio.create_subprocess_exec(
        "du", "-skx", "--", str(path), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # A file removed during the walk makes du complain and exit 1, with the total still on its last line.
    try:
        return int(out.splitlines()[-1].split(b"\t", 1)[0]) * KiB
    except (IndexError, ValueError):
        return 0


async def within_disk_limit(path: Path, limit: int, work: Awaitable[T], refusal: Callable[[int], Exception]) -> T:
    """`work`'s result, unless the tree at `path` takes more than `limit` bytes before it is done (or once it
    is): then `work` is cancelled and `refusal(bytes used)` raised."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            started = time.monotonic()
            used = await disk_usage(path)
            if used > limit:
                raise refusal(used)
            if task.done():
                return task.result()
            await asyncio.wait({task}, timeout=max(MIN_INTERVAL, WALK_SHARE * (time.monotonic() - started)))
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
