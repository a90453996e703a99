"""One log file per app: build output and every process's lines, each timestamped and named.

The file is bounded: past `max_bytes` it becomes `app.log.1` (see runtime.rotating_log), so an app that
logs without pause keeps at most twice that on disk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from runtime.log_lines import LINE, prefix
from runtime.rotating_log import DEFAULT_MAX_BYTES, RotatingLog, rotated


class ProcessLogs:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, app: str) -> Path:
        directory = self.root / app
        directory.mkdir(parents=True, exist_ok=True)
        return directory / "app.log"

    def write(self, app: str, source: str, text: str) -> None:
        start = prefix(source)
        lines = "".join(f"{start}{line}\n" for line in text.splitlines() or [""])
        with RotatingLog(self.path(app), self.max_bytes) as log:
            log.write(lines.encode())

    @staticmethod
    def _matches(line: str, process: str | None) -> bool:
        if process is None:
            return True
        match = LINE.match(line)
        return bool(match) and (match.group(2) == process or match.group(2).split(".")[0] == process)

    def tail(self, app: str, lines: int = 100, process: str | None = None) -> list[str]:
        """The last `lines` lines (all with 0), from the rotated file too when the current one has fewer."""
        current = self.path(app)
        kept: list[str] = []
        for path in (rotated(current), current):
            if path.exists():
                with path.open(errors="replace") as log:
                    kept += [line.rstrip("\n") for line in log if self._matches(line, process)]
                if lines:
                    del kept[:-lines]
        return kept

    async def follow(self, app: str, process: str | None = None,
                     stop: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
        """New lines as they are written, until `stop()` says the reader went away."""
        path = self.path(app)
        path.touch()
        log = path.open(errors="replace")
        try:
            log.seek(0, 2)
            while not stop():
                line = log.readline()
                if line:
                    if self._matches(line, process):
                        yield line.rstrip("\n")
                elif _rotated_away(path, log.fileno()):  # what was written before the rotation has been read
                    log.close()
                    log = path.open(errors="replace")
                else:
                    await asyncio.sleep(0.2)
        finally:
            log.close()

    def forget(self, app: str) -> None:
        path = self.root / app / "app.log"
        path.unlink(missing_ok=True)
        rotated(path).unlink(missing_ok=True)


def _rotated_away(path: Path, fd: int) -> bool:
    try:
        return path.stat().st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
